"""The event intake's commands: ``hashlake intake`` (run it), ``hashlake intake dead-letters`` and
``hashlake reconcile``."""
from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Column, Table

from hashlake.cli.output import console
from hashlake.config import load_settings

intake_app = typer.Typer(help="Run the event intake (MinIO webhook, Redis-list consumer, batcher, reconciler); "
                              "`hashlake intake dead-letters` shows what it refused.")


@intake_app.callback(invoke_without_command=True)
def intake(ctx: typer.Context) -> None:
    """Run the event intake: MinIO webhook, Redis-list consumer, batcher and periodic reconciler."""
    if ctx.invoked_subcommand is not None:
        return
    from workers.intake import run_intake

    run_intake(load_settings())


@intake_app.command("dead-letters")
def intake_dead_letters(limit: Annotated[int, typer.Option(help="show the newest N")] = 20) -> None:
    """Show the events the intake refused (malformed webhook bodies and Redis-list elements), newest last."""
    from datetime import datetime, timezone

    from workers.intake.pending import IntakeKeys, intake_redis, read_dead_letters

    settings = load_settings()
    keys = IntakeKeys.for_settings(settings)
    client = intake_redis(settings)
    try:
        total, letters = read_dead_letters(client, keys, limit)
    finally:
        client.close()
    if not total:
        console.print(f"no dead letters in {keys.dead}", markup=False)
        return
    table = Table("refused at (UTC)", "source", Column("reason", overflow="fold"), Column("element", overflow="fold"))
    for letter in letters:
        at = datetime.fromtimestamp(letter.at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if letter.at else "?"
        table.add_row(at, letter.source, letter.reason, letter.element[:2000])
    console.print(table)
    console.print(f"{len(letters)} of {total} dead letters in {keys.dead} (Redis {settings.redis_url.rsplit('@', 1)[-1]})",
                  markup=False)



def reconcile() -> None:
    """Enqueue every object not indexed under the active model version (and deletes for vanished ones)."""
    from workers.intake import reconcile_once

    summary = reconcile_once(load_settings())  # ModelNotFound: one line, status 1 (OneLineErrors)
    console.print(summary)
    if not summary.batcher_alive:
        console.print("[yellow]no intake is running: the queued work is sent once `hashlake intake` runs[/]")

