"""The fault suite's ledger: every test records what it injected and what it counted.

At the end of the run pytest prints one summary (faults injected, bad inputs tried, rows lost,
rows duplicated); README.md "Reliability" keeps a copy. Rows lost and rows duplicated must be 0:
a test that counts one fails on its own assert, the summary only reports.
"""

from __future__ import annotations

from collections import Counter

import pytest


class Ledger:
    def __init__(self) -> None:
        self.faults: Counter = Counter()
        self.bad_inputs: Counter = Counter()
        self.rows_checked = 0
        self.rows_lost = 0
        self.rows_duplicated = 0

    def fault(self, kind: str, n: int = 1) -> None:
        self.faults[kind] += n

    def bad_input(self, kind: str, n: int = 1) -> None:
        self.bad_inputs[kind] += n

    def rows(self, expected, seen) -> tuple[int, int]:
        """Count ids of ``expected`` missing from ``seen`` (a list, may repeat) and repeats."""
        seen = list(seen)
        counts = Counter(seen)
        lost = len(set(expected) - set(counts))
        dup = sum(n - 1 for n in counts.values() if n > 1)
        self.rows_checked += len(set(expected))
        self.rows_lost += lost
        self.rows_duplicated += dup
        return lost, dup


LEDGER = Ledger()


@pytest.fixture
def ledger() -> Ledger:
    return LEDGER


def pytest_terminal_summary(terminalreporter):
    if not (LEDGER.faults or LEDGER.bad_inputs or LEDGER.rows_checked):
        return
    tr = terminalreporter
    tr.section("galaxysae fault suite")
    tr.write_line(f"faults injected:  {sum(LEDGER.faults.values())}  "
                  + ", ".join(f"{k} x{n}" for k, n in sorted(LEDGER.faults.items())))
    tr.write_line(f"bad inputs tried: {sum(LEDGER.bad_inputs.values())}  "
                  + ", ".join(f"{k} x{n}" for k, n in sorted(LEDGER.bad_inputs.items())))
    tr.write_line(f"rows checked:     {LEDGER.rows_checked}")
    tr.write_line(f"rows lost:        {LEDGER.rows_lost} (must be 0)")
    tr.write_line(f"rows duplicated:  {LEDGER.rows_duplicated} (must be 0)")
