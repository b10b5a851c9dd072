"""``hashlake report``: retrieval figures of model versions over the lake's labelled codes."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Column, Table

from hashlake.cli.output import console
from hashlake.config import load_settings
from hashlake.extras import require


def report(model: Annotated[Optional[list[str]], typer.Option(
               help="model version (default the active one); repeat to compare versions on the same images")] = None,
           split: Annotated[str, typer.Option(help="the queries' split: evaluation or validation "
                                                   "(the database is train)")] = "evaluation",
           out: Annotated[Optional[Path], typer.Option(
               help="write report.md and pr_curve.png into this folder")] = None) -> None:
    """Retrieval figures of model versions over the lake's labelled codes: queries from one split, the
    train split as database (hashlake.splits), relevant = shares a label."""
    from hashlake.catalog import Catalog
    from hashlake.report_lake import compare_versions
    from hashlake.report_markdown import write_report
    from hashlake.store import ObjectStore

    if out is not None:  # before the figures are computed: the plot would fail only at the end
        require("matplotlib", "`hashlake report --out` (its pr_curve.png)")
    settings = load_settings()
    catalog = Catalog(ObjectStore(settings), settings)
    versions = list(dict.fromkeys(model or [catalog.active()]))
    for version in versions:
        catalog.card(version)  # ModelNotFound names an unknown version
    reports = compare_versions(settings, versions, split)
    first = next(iter(reports.values()))
    table = Table("", *(Column(v, justify="right", no_wrap=True) for v in versions))

    def row(name: str, values) -> None:
        table.add_row(name, *values)

    def cells(get) -> list[str]:
        return [f"{get(r.metrics):.4f}" for r in reports.values()]

    row("mAP@ALL (ties by database order)", cells(lambda m: m.map))
    row("mAP@ALL (tie-expected)", cells(lambda m: m.map_tie_expected))
    for k in first.metrics.map_at:
        row(f"mAP@{k}", cells(lambda m, k=k: m.map_at[k]))
    for k in first.metrics.precision_at:
        row(f"P@{k}", cells(lambda m, k=k: m.precision_at[k]))
    row(f"P@r≤{first.metrics.radius}", cells(lambda m: m.precision_radius))
    row("queries (scored)", [f"{r.metrics.n_queries:,} ({r.metrics.n_scored:,})" for r in reports.values()])
    row("database", [f"{r.metrics.n_database:,}" for r in reports.values()])
    console.print(table)
    console.print(f"split {split} vs train, lake snapshot {first.lake_snapshot}"
                  + (", the images coded under every version" if len(versions) > 1 else ""), markup=False)
    if out is not None:
        notes = [f"Queries: the labelled images of the {split} split; database: those of train "
                 f"(hashlake.splits); lake snapshot {first.lake_snapshot}."]
        if len(versions) > 1:
            notes.append("Every version over the same image versions: those with a code under all of them.")
        path = write_report(reports, out, title=f"Retrieval report: {', '.join(versions)}", notes=notes)
        console.print(f"wrote {path} and {path.parent / 'pr_curve.png'}", markup=False)

