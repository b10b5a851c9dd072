"""Evaluate step: the candidate against the active version on the evaluation split, and the gate.

Both versions are scored on the same images with the same report (``hashlake.report``, the native
histograms): queries = the labelled images of the evaluation split, database = those of the train split;
relevant = sharing a label. The candidate's codes come from the stored features through its head (what
the re-encode step will write); the active version's are its codes rows in the lake.

Gate: promote when the candidate's tie-expected mAP@ALL is at least the active's minus
``Settings.retrain_tolerance``; otherwise the run ends ``rejected`` and the candidate stays in the
catalog, unpromoted, with the reason on its run record.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hashlake.report import Report, retrieval_report
from scheduler.retrain.data import LabelledImages


@dataclass(frozen=True)
class GateResult:
    candidate: Report
    active: Report
    tolerance: float

    @property
    def promote(self) -> bool:
        return self.candidate.metrics.map_tie_expected >= self.active.metrics.map_tie_expected - self.tolerance

    @property
    def reason(self) -> str:
        c, a = self.candidate.metrics.map_tie_expected, self.active.metrics.map_tie_expected
        verdict = "promoted" if self.promote else "rejected"
        return (f"{verdict}: candidate mAP@ALL {c:.4f} vs active {a:.4f} on the evaluation split "
                f"(tolerance {self.tolerance})")

    def figures(self) -> dict:
        out = {"tolerance": self.tolerance, "promote": self.promote,
               "queries": self.candidate.metrics.n_queries, "database": self.candidate.metrics.n_database}
        for name, report in (("candidate", self.candidate), ("active", self.active)):
            m = report.metrics
            out[f"{name}_map"] = float(m.map_tie_expected)
            out[f"{name}_map_stable"] = float(m.map)
        return out


def evaluate(data: LabelledImages, candidate_codes: np.ndarray, tolerance: float) -> GateResult:
    """candidate_codes: (N, bits/8) uint8 aligned with ``data``."""
    split = data.split_indices()
    if len(split.query) == 0 or len(split.database) == 0:
        raise ValueError(f"the gate needs labelled images in both the evaluation and the train split; the lake has "
                         f"{len(split.query)} and {len(split.database)}")

    def report(codes: np.ndarray) -> Report:
        return retrieval_report(codes[split.query], data.labels[split.query], codes[split.database],
                                data.labels[split.database])

    return GateResult(candidate=report(candidate_codes), active=report(data.active_codes), tolerance=tolerance)
