"""The Galaxy Zoo Euclid label schema: 13 questions, their answers, the decision tree, column names.

Column names follow ``mwalmsley/gz_euclid`` (DESIGN.md §3): for question ``q`` and answer ``a``
the vote count is ``{q}_{a}`` (int32), the vote fraction ``{q}_{a}_fraction`` (float32), and the
number of volunteers who were asked ``q`` is ``{q}_total-votes`` (int32).

Dataset order is the one the Galaxy Zoo datasets on the Hub use: after ``image`` and ``id_str``,
question by question, each answer's count then its fraction, with the question's
``_total-votes`` right after its first answer (``q_a1, q_a1_fraction, q_total-votes, q_a2,
q_a2_fraction, ...``).
"""

from __future__ import annotations

__all__ = [
    "QUESTIONS", "ASKED_WHEN", "SUFFIX", "questions", "answers", "count_column", "fraction_column",
    "total_column", "count_columns", "fraction_columns", "total_columns", "label_columns",
    "dataset_columns",
]

SUFFIX = "-euclid"

# question -> answers, in dataset order.
QUESTIONS: dict[str, list[str]] = {
    "smooth-or-featured-euclid": ["smooth", "featured-or-disk", "problem"],
    "disk-edge-on-euclid": ["yes", "no"],
    "has-spiral-arms-euclid": ["yes", "no"],
    "bar-euclid": ["strong", "weak", "no"],
    "bulge-size-euclid": ["dominant", "large", "moderate", "small", "none"],
    "how-rounded-euclid": ["round", "in-between", "cigar-shaped"],
    "edge-on-bulge-euclid": ["boxy", "none", "rounded"],
    "spiral-winding-euclid": ["tight", "medium", "loose"],
    "spiral-arm-count-euclid": ["1", "2", "3", "4", "more-than-4", "cant-tell"],
    "merging-euclid": ["none", "minor-disturbance", "major-disturbance", "merger"],
    "clumps-euclid": ["yes", "no"],
    "problem-euclid": ["star", "artifact", "zoom"],
    "artifact-euclid": ["satellite", "scattered", "diffraction", "ray", "saturation", "other", "ghost"],
}

# The decision tree: a question is asked of the volunteers who gave one of these answers
# (``q_a`` names) to an earlier question; None means everyone is asked.
ASKED_WHEN: dict[str, tuple[str, ...] | None] = {
    "smooth-or-featured-euclid": None,
    "disk-edge-on-euclid": ("smooth-or-featured-euclid_featured-or-disk",),
    "has-spiral-arms-euclid": ("disk-edge-on-euclid_no",),
    "bar-euclid": ("disk-edge-on-euclid_no",),
    "bulge-size-euclid": ("disk-edge-on-euclid_no",),
    "how-rounded-euclid": ("smooth-or-featured-euclid_smooth",),
    "edge-on-bulge-euclid": ("disk-edge-on-euclid_yes",),
    "spiral-winding-euclid": ("has-spiral-arms-euclid_yes",),
    "spiral-arm-count-euclid": ("has-spiral-arms-euclid_yes",),
    "merging-euclid": ("smooth-or-featured-euclid_smooth", "smooth-or-featured-euclid_featured-or-disk"),
    "clumps-euclid": ("disk-edge-on-euclid_no",),
    "problem-euclid": ("smooth-or-featured-euclid_problem",),
    "artifact-euclid": ("problem-euclid_artifact",),
}


def questions() -> list[str]:
    return list(QUESTIONS)


def answers(question: str) -> list[str]:
    try:
        return QUESTIONS[question]
    except KeyError:
        raise KeyError(f"unknown Galaxy Zoo Euclid question {question!r} (known: {', '.join(QUESTIONS)})") from None


def count_column(question: str, answer: str) -> str:
    return f"{question}_{answer}"


def fraction_column(question: str, answer: str) -> str:
    return f"{question}_{answer}_fraction"


def total_column(question: str) -> str:
    return f"{question}_total-votes"


def count_columns() -> list[str]:
    """Every ``{q}_{a}`` vote-count column (int32), in dataset order."""
    return [count_column(q, a) for q, ans in QUESTIONS.items() for a in ans]


def fraction_columns() -> list[str]:
    """Every ``{q}_{a}_fraction`` column (float32; NaN where ``q`` was not asked), in dataset order."""
    return [fraction_column(q, a) for q, ans in QUESTIONS.items() for a in ans]


def total_columns() -> list[str]:
    """Every ``{q}_total-votes`` column (int32), in dataset order."""
    return [total_column(q) for q in QUESTIONS]


def label_columns() -> list[str]:
    """All label columns (counts, fractions, total votes) in the order they appear in the dataset."""
    cols: list[str] = []
    for q, ans in QUESTIONS.items():
        for i, a in enumerate(ans):
            cols += [count_column(q, a), fraction_column(q, a)]
            if i == 0:
                cols.append(total_column(q))
    return cols


def dataset_columns() -> list[str]:
    """Every column of a gz_euclid shard, in order: ``image``, ``id_str``, then the labels."""
    return ["image", "id_str", *label_columns()]
