"""Shared mistakes (paper section 5.2, Tables 2, 15 and 16).

Given which of k runs (models, or verifiers on one model) certify each of N test samples, count
the samples certified by exactly 0, 1, ..., k runs, and compare with the counts expected if the
runs failed independently, each with its own certified accuracy p_i (the observed fraction of
samples it certifies): the number of runs that certify a sample is then Poisson-binomial with
parameters p_1..p_k, and the expected count of "j runs succeed" is N P(j). Its distribution is
computed exactly by dynamic programming over the runs:

    P_0 = [1];   P_i[j] = P_{i-1}[j] (1 - p_i) + P_{i-1}[j - 1] p_i.

Example: two runs with 90% certified accuracy are expected to both certify 81% of the inputs.
The paper rounds expected counts to the nearest integer; both forms are returned.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

TWO_RUN_LABELS = ("neither certifies", "one certifies", "both certify")


def poisson_binomial(probabilities: Sequence[float]) -> np.ndarray:
    """P(exactly j of k independent events occur), j = 0..k, for event probabilities p_i."""
    distribution = np.ones(1, dtype=np.float64)
    for p in np.asarray(probabilities, dtype=np.float64):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probability {p} outside [0, 1]")
        distribution = np.concatenate([distribution * (1.0 - p), [0.0]]) + np.concatenate([[0.0], distribution * p])
    return distribution


@dataclass(frozen=True)
class SharedMistakes:
    """Observed and expected counts of samples certified by exactly j runs, j = 0..k."""

    runs: int
    samples: int
    run_names: list[str]
    accuracies: list[float]
    labels: list[str]
    observed: list[int]
    expected: list[float]
    expected_rounded: list[int]

    def as_dict(self) -> dict:
        return asdict(self)


def shared_mistakes(certified: np.ndarray | Sequence[Sequence[bool]], run_names: Sequence[str] | None = None,
                    ) -> SharedMistakes:
    """Histogram of how many runs certify each sample, and its expectation under independence.

    Args:
        certified: boolean (k runs, N samples): True where the run certifies the sample.
        run_names: optional names of the k runs (default run1..runk).
    """
    matrix = np.asarray(certified, dtype=bool)
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"need a non-empty (runs, samples) boolean matrix, got shape {matrix.shape}")
    runs, samples = matrix.shape
    names = list(run_names) if run_names is not None else [f"run{i + 1}" for i in range(runs)]
    if len(names) != runs:
        raise ValueError(f"{len(names)} run names for {runs} runs")
    observed = np.bincount(matrix.sum(0), minlength=runs + 1)
    accuracies = matrix.mean(1)
    expected = poisson_binomial(accuracies) * samples
    labels = list(TWO_RUN_LABELS) if runs == 2 else [str(j) for j in range(runs + 1)]
    return SharedMistakes(runs, samples, names, accuracies.tolist(), labels, observed.tolist(),
                          expected.tolist(), np.floor(expected + 0.5).astype(int).tolist())


def two_verifier_table(first: np.ndarray, second: np.ndarray, names: Sequence[str] = ("verifier 1", "verifier 2"),
                       ) -> SharedMistakes:
    """Paper Table 15 layout: two verifiers on one model; columns neither / one / both certify."""
    return shared_mistakes(np.stack([np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)]), names)


def markdown_table(results: dict[str, SharedMistakes | dict]) -> str:
    """Table 2 layout as markdown: one 'obs.' and one 'exp.' row per setting (expected counts
    rounded to the nearest integer). ``results`` maps a setting label to a result (or its dict)."""
    items = [(label, r if isinstance(r, dict) else r.as_dict()) for label, r in results.items()]
    if not items:
        return ""
    labels = items[0][1]["labels"]
    header = "| setting | | " + " | ".join(labels) + " |"
    rule = "|---|---|" + "---:|" * len(labels)
    lines = [header, rule]
    for label, row in items:
        if row["labels"] != labels:
            raise ValueError("all settings need the same number of runs")
        lines.append(f"| {label} | obs. | " + " | ".join(str(v) for v in row["observed"]) + " |")
        lines.append("| | exp. | " + " | ".join(str(v) for v in row["expected_rounded"]) + " |")
    return "\n".join(lines) + "\n"
