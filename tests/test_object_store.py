"""Object-store semantics the jobs rely on, on the real S3 server of the test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from galaxysae import storage

REPO = Path(__file__).resolve().parents[1]


def test_a_listing_sees_what_another_process_wrote_since_and_so_does_exists(s3_prefix):
    """fsspec caches listings per filesystem instance, and ours is shared within a process:
    render lists its grids folder, then Ray workers write grids into it; a later listing or
    exists() of this process must see them, not the empty folder it listed first."""
    folder = storage.join(s3_prefix, "grids")
    storage.write_bytes(storage.join(folder, "a.jpg"), b"a")
    assert storage.listdir(folder, ".jpg") == [storage.join(folder, "a.jpg")]
    other = storage.join(folder, "b.jpg")
    subprocess.run([sys.executable, "-c", "import sys; from galaxysae import storage; "
                    "storage.write_bytes(sys.argv[1], b'b')", other],
                   env={**os.environ, "PYTHONPATH": str(REPO)}, check=True, timeout=120)
    assert storage.exists(other)
    assert storage.listdir(folder, ".jpg") == [storage.join(folder, "a.jpg"), other]


def test_a_file_written_piece_by_piece_lands_whole_or_not_at_all(tmp_path, s3_prefix):
    """storage.writing: the block writes a local file; only a block that ends lands it at the
    URL (locally renamed into place, on S3 uploaded), and no temporary file is left either way."""
    for url in (str(tmp_path / "out" / "a.bin"), storage.join(s3_prefix, "a.bin")):
        with pytest.raises(RuntimeError):
            with storage.writing(url) as tmp:
                Path(tmp).write_bytes(b"half")
                raise RuntimeError("killed mid-write")
        assert not storage.exists(url) and not Path(tmp).exists()
        with storage.writing(url) as tmp:
            Path(tmp).write_bytes(b"whole")
        assert storage.read_bytes(url) == b"whole" and not Path(tmp).exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.bin"]
