"""The local stack's commands: ``hashlake stack up|down|status`` and ``hashlake demo``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from hashlake.cli.output import console
from hashlake.config import Settings

stack_app = typer.Typer(help="Start, stop and inspect the local stack.", no_args_is_help=True)


@stack_app.command("up")
def stack_up(workers: Annotated[Optional[int], typer.Option(help="Celery worker nodes (default: one per GPU, or 1)")] = None,
             prometheus: Annotated[bool, typer.Option(help="also start Prometheus")] = True) -> None:
    """Start redis-server, the S3 server, the intake, the workers and Prometheus in the background."""
    from hashlake.local import stack

    console.print(f"starting the local stack in {stack.stack_dir(Settings())}")
    stack.up(Settings(), stack.StackOptions(workers=workers, prometheus=prometheus), log=console.print)
    console.print("stack is up; `hashlake stack status` shows it, `hashlake stack down` stops it")


@stack_app.command("down")
def stack_down() -> None:
    """Stop every process of the local stack."""
    from hashlake.local import stack

    stack.down(Settings(), log=console.print)


@stack_app.command("status")
def stack_status() -> None:
    """Show each process of the local stack and whether it answers."""
    from hashlake.local import stack

    rows = stack.status(Settings())
    if not rows:
        console.print("no stack is running")
        raise typer.Exit(1)
    table = Table("service", "pid", "port", "healthy", "log")
    for record, healthy in rows:
        table.add_row(record.name, str(record.pid), str(record.port or "-"),
                      "[green]yes[/]" if healthy else "[red]no[/]", record.log)
    console.print(table)
    if not all(h for _, h in rows):
        raise typer.Exit(1)



def demo(dataset: Annotated[Optional[Path], typer.Option(help="CIFAR-10 .parquet or a folder of images")] = None,
         limit: Annotated[int, typer.Option(help="images to upload")] = 1000,
         workers: Annotated[Optional[int], typer.Option(help="Celery worker nodes (default: one per GPU, or 1)")] = None,
         keep: Annotated[bool, typer.Option(help="leave the stack running afterwards")] = True) -> None:
    """Stack up, upload images, wait until all are indexed, query, report mAP; ends with RESULT lines."""
    from hashlake.local.demo import run_demo

    run_demo(dataset=dataset, limit=limit, workers=workers, keep=keep, console=console)

