"""Model versions' commands: ``hashlake model init|publish|promote|list|activate|rollback|gc``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Column, Table

from hashlake.cli.errors import fail, one_line
from hashlake.cli.output import console
from hashlake.config import load_settings

model_app = typer.Typer(help="Model versions in the catalog.", no_args_is_help=True)


@model_app.command("init")
def model_init(arch: str = "lsh_effnetlite0_64",
               img_size: Annotated[int, typer.Option(help="input resolution, px")] = 128,
               center_images: Annotated[Optional[Path], typer.Option(
                   help="images whose mean feature centres the projection (.parquet or folder; "
                        "default the bundled CIFAR-10 sample)")] = None,
               activate: bool = True) -> None:
    """Publish a pretrained backbone with a fixed projection of its centred features as a model version
    (and activate it)."""
    from hashlake.image_sources import SAMPLE
    from hashlake.model_versions import init_model

    try:
        card = init_model(load_settings(), arch=arch, img_size=img_size, activate=activate,
                          center_images=center_images or SAMPLE)
    except (FileNotFoundError, ValueError) as exc:  # no such --center-images, no image in it, unknown arch
        console.print(str(exc), style="red", markup=False)
        raise typer.Exit(1) from None
    console.print(f"published {card.version}: {card.description}")


@model_app.command("publish")
def model_publish(checkpoint: Annotated[Path, typer.Argument(help="a checkpoint written by hashing_models' trainer")],
                  version: Annotated[Optional[str], typer.Option(help="version id (default <arch>-<px>px-<time>)")] = None,
                  activate: bool = True) -> None:
    """Publish a trained checkpoint as a model version (and activate it: the bucket is re-encoded).
    With --no-activate, `hashlake model promote VERSION` switches without emptying the index."""
    from hashlake.model_versions import publish_checkpoint

    try:
        card = publish_checkpoint(load_settings(), checkpoint, version=version, activate=activate)
    except OSError as exc:  # a missing or unreadable file (ValueError: truncated, mismatched, a taken version)
        fail(one_line(exc))
    console.print(f"published {card.version}: {card.description}"
                  + (" (active)" if activate else f"; switch to it with `hashlake model promote {card.version}`"))


@model_app.command("promote")
def model_promote(version: str,
                  timeout: Annotated[float, typer.Option(help="seconds to wait for the re-encode")] = 3600.0,
                  poll: Annotated[float, typer.Option(help="seconds between progress checks")] = 5.0) -> None:
    """Re-encode the bucket under VERSION while the active version keeps serving, then activate VERSION."""
    from scheduler.promote import PromoteError, promote

    def progress(summary) -> None:
        console.print(f"{version}: {summary.indexed + summary.failed} of {summary.listed} objects encoded "
                      f"({summary.failed} failed), {summary.missing} to go", markup=False)

    try:
        result = promote(load_settings(), version, timeout_s=timeout, poll_s=poll, progress=progress)
    except PromoteError as exc:
        fail(one_line(exc))
    console.print(f"active model is now {result.version} (was {result.previous}): {result.indexed} objects "
                  f"indexed, {result.failed} failed, in {result.seconds:.0f} s", markup=False)


@model_app.command("list")
def model_list() -> None:
    """List model versions; the active one is starred."""
    from hashlake.catalog import Catalog, ModelNotFound
    from hashlake.store import ObjectStore

    settings = load_settings()
    catalog = Catalog(ObjectStore(settings), settings)
    try:
        active = catalog.active()
    except ModelNotFound:
        active = None
    versions = catalog.versions()
    # Version ids whole on one line, whatever the terminal's width (the description wraps instead):
    # they are what `promote` and `activate` take, so they must copy as they are.
    table = Table("", Column("version", no_wrap=True, min_width=max(map(len, versions), default=7)), "arch",
                  "bits", "input px", "description")
    for version in versions:
        card = catalog.card(version)
        table.add_row("*" if version == active else "", version, card.arch, str(card.bits), str(card.input_size),
                      card.description)
    console.print(table)


@model_app.command("activate")
def model_activate(version: str) -> None:
    """Point the active pointer at VERSION (workers follow within seconds)."""
    from hashlake.catalog import Catalog
    from hashlake.store import ObjectStore

    settings = load_settings()
    Catalog(ObjectStore(settings), settings).activate(version)
    console.print(f"active model is now {version}")


@model_app.command("rollback")
def model_rollback(force: Annotated[bool, typer.Option(
        help="roll back even when the previous version lacks codes for some images (the reconciler then "
             "queues them)")] = False) -> None:
    """Make the previous active version active again (instant: its codes are still in the lake).
    Refused when there is none, or when its codes no longer cover the images the active version has
    codes for (`hashlake model promote <previous>` re-encodes them). Rolling back twice returns."""
    from hashlake.model_lifecycle import RollbackError, rollback

    try:
        result = rollback(load_settings(), force=force)
    except RollbackError as exc:
        fail(one_line(exc))
    console.print(f"active model is now {result.version} (was {result.rolled_back_from}, now the previous "
                  f"version): {result.codes:,} codes"
                  + (f", {result.missing:,} images without a code yet" if result.missing else ""), markup=False)


@model_app.command("gc")
def model_gc(yes: Annotated[bool, typer.Option("--yes", help="delete; without it, only list what would go")] = False,
             keep: Annotated[Optional[list[str]], typer.Option(
                 help="also keep this version's rows (e.g. one being promoted now); repeatable")] = None) -> None:
    """Delete the lake's codes and failures rows of model versions neither active nor previous.
    Without --yes only lists them (versions, row counts). Weights and cards stay in the catalog: such a
    version can still be promoted (it is re-encoded). Never runs on its own; do not run it while a
    version is being promoted unless --keep names it. `hashlake lake compact` then frees the files."""
    from hashlake.model_lifecycle import gc, plan_gc

    settings = load_settings()
    plan = gc(settings, keep=keep or ()) if yes else plan_gc(settings, keep=keep or ())
    console.print(f"keeping {', '.join(plan.keep)}", markup=False)
    if not plan.delete:
        console.print("no other version has rows in the lake: nothing to delete")
        return
    table = Table(Column("version", no_wrap=True), Column("codes rows", justify="right"),
                  Column("failures rows", justify="right"))
    for version, (codes, failures) in plan.delete.items():
        table.add_row(version, f"{codes:,}", f"{failures:,}")
    console.print(table)
    if plan.deleted:
        console.print(f"deleted the rows of {len(plan.delete)} version(s); weights and cards stay in the catalog",
                      markup=False)
    else:
        console.print(f"would delete the rows of {len(plan.delete)} version(s): run with --yes to delete",
                      markup=False)

