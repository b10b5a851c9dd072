"""A retrieval report as Markdown with a precision-recall plot (PNG), model versions side by side.

    write_report({"v1": report_v1, "v2": report_v2}, out_dir, label_names=[...])
    → out_dir/report.md, out_dir/pr_curve.png

Each version's figures come from ``hashlake.report.retrieval_report`` on the same queries and
database; the tables put the versions in columns, in the order given.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from hashlake.extras import require
from hashlake.report import Report

PLOT_NAME = "pr_curve.png"


def _cell(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _metric_rows(reports: Mapping[str, Report]) -> list[list[str]]:
    first = next(iter(reports.values())).metrics
    rows = [["queries scored / given", *(f"{r.metrics.n_scored:,} / {r.metrics.n_queries:,}" for r in reports.values())],
            ["database codes", *(f"{r.metrics.n_database:,}" for r in reports.values())],
            ["bits", *(str(r.metrics.bits) for r in reports.values())],
            ["mAP@ALL, tie-expected", *(_cell(r.metrics.map_tie_expected) for r in reports.values())],
            ["mAP@ALL, ties by database order", *(_cell(r.metrics.map) for r in reports.values())]]
    for k in first.map_at:
        rows.append([f"mAP@{k}, tie-expected", *(_cell(r.metrics.map_at_tie_expected.get(k)) for r in reports.values())])
        rows.append([f"mAP@{k}, ties by database order", *(_cell(r.metrics.map_at.get(k)) for r in reports.values())])
    for k in first.precision_at:
        rows.append([f"precision@{k}, tie-expected",
                     *(_cell(r.metrics.precision_at_tie_expected.get(k)) for r in reports.values())])
        rows.append([f"precision@{k}, ties by database order",
                     *(_cell(r.metrics.precision_at.get(k)) for r in reports.values())])
    rows.append([f"precision within Hamming radius {first.radius}",
                 *(_cell(r.metrics.precision_radius) for r in reports.values())])
    return rows


def plot_pr_curves(reports: Mapping[str, Report], path: Path) -> Path:
    """Precision against recall of the Hamming ball as its radius grows, one line per version."""
    matplotlib = require("matplotlib", "plotting a report (pr_curve.png)")
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for name, report in reports.items():
        curve = report.metrics.pr_curve
        ok = ~np.isnan(curve.precision)
        ax.plot(curve.recall[ok], curve.precision[ok], marker=".", label=f"{name} (mAP {report.metrics.map_tie_expected:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("Precision-recall by Hamming radius")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def render_markdown(reports: Mapping[str, Report], *, title: str = "Retrieval report",
                    label_names: Sequence[str] | None = None, notes: Sequence[str] = (),
                    plot_name: str | None = PLOT_NAME) -> str:
    """The report's Markdown text: figures per version, per-label AP, the PR plot by file name."""
    if not reports:
        raise ValueError("a report needs at least one model version's figures")
    names = list(reports)
    lines = [f"# {title}", ""]
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    lines += ["Relevant: shares at least one label with the query. Ranking: the whole database by Hamming "
              "distance; *tie-expected* figures are exact expectations over random orders within equal "
              "distances, the others break ties by database order.", ""]
    lines += _table(["metric", *names], _metric_rows(reports)) + [""]
    if plot_name:
        lines += ["## Precision-recall", "", f"![precision-recall curves]({plot_name})", ""]
    n_labels = max(len(r.label_ap_tie_expected) for r in reports.values())
    if label_names is None:  # the reports' own names (from the lake), else label ids
        label_names = next((r.label_names for r in reports.values() if len(r.label_names) == n_labels), None)
    label_names = list(label_names) if label_names is not None else [str(c) for c in range(n_labels)]
    if len(label_names) < n_labels:
        raise ValueError(f"label_names has {len(label_names)} names for {n_labels} labels")
    rows = []
    for c in range(n_labels):
        row = [label_names[c]]
        for r in reports.values():
            inside = c < len(r.label_ap_tie_expected)
            row.append(f"{_cell(r.label_ap_tie_expected[c])} ({int(r.label_queries[c])})" if inside else "–")
        rows.append(row)
    lines += ["## AP per label", "", "Mean tie-expected AP@ALL of the scored queries carrying the label "
              "(their number in brackets).", ""]
    lines += _table(["label", *names], rows) + [""]
    return "\n".join(lines)


def write_report(reports: Mapping[str, Report], out_dir: str | Path, *, title: str = "Retrieval report",
                 label_names: Sequence[str] | None = None, notes: Sequence[str] = ()) -> Path:
    """Write ``report.md`` and ``pr_curve.png`` into ``out_dir`` (created); returns the Markdown's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = render_markdown(reports, title=title, label_names=label_names, notes=notes)  # checks before writing
    plot_pr_curves(reports, out / PLOT_NAME)
    path = out / "report.md"
    path.write_text(text)
    return path
