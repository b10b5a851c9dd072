"""The lake's commands: ``hashlake lake init|compact``."""
from __future__ import annotations

import typer

from hashlake.cli.output import console
from hashlake.config import load_settings

lake_app = typer.Typer(help="The lake: DuckLake tables of codes, failures and deletes.", no_args_is_help=True)


@lake_app.command("init")
def lake_init() -> None:
    """Create the catalog database, its read-only query role and the lake's tables (idempotent)."""
    from hashlake.lake import init_lake

    settings = load_settings()
    init_lake(settings)
    console.print(f"lake ready: catalog postgresql://{settings.pg_host}:{settings.pg_port}/{settings.pg_database}, "
                  f"files under {settings.lake_path}")


@lake_app.command("compact")
def lake_compact() -> None:
    """Flush inlined rows, merge small files, expire old snapshots, delete unreferenced files."""
    from hashlake.lake.maintenance import compact

    summary = compact(load_settings())
    for table in summary.files_before:
        console.print(f"{table:<9} files {summary.files_before[table]:>6} -> {summary.files_after[table]:>6}")
    console.print(f"inlined rows flushed {summary.inlined_rows_flushed}, snapshots expired "
                  f"{summary.snapshots_expired}, files deleted {summary.files_deleted}, {summary.seconds} s")

