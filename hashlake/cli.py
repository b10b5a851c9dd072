"""The `hashlake` command: the local stack, the intake, models, SQL, search and the demo.

Settings come from ``hashlake.config.load_settings``: ``HASHLAKE_*`` variables and the TOML file
``HASHLAKE_CONFIG``; when that is unset and a local stack runs from ``.hashlake/``, its ``stack.toml``
(as for ``hashlake.sql.connect()``), so commands run after ``hashlake stack up`` talk to that stack
without further setup.

A user error (a service not running, a missing model, a non-image, a bad query or setting) is one line
on stderr, ``error: ...``, and exit status 1; ``HASHLAKE_TRACEBACK=1`` shows the traceback behind it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Column, Table

from hashlake.cli_errors import OneLineErrors, fail, one_line
from hashlake.config import Settings, load_settings

app = typer.Typer(help="hashlake: deep-hashing image retrieval over object storage, queried with SQL.",
                  no_args_is_help=True, pretty_exceptions_enable=False, cls=OneLineErrors)
stack_app = typer.Typer(help="Start, stop and inspect the local stack.", no_args_is_help=True)
model_app = typer.Typer(help="Model versions in the catalog.", no_args_is_help=True)
lake_app = typer.Typer(help="The lake: DuckLake tables of codes, failures and deletes.", no_args_is_help=True)
intake_app = typer.Typer(help="Run the event intake (MinIO webhook, Redis-list consumer, batcher, reconciler); "
                              "`hashlake intake dead-letters` shows what it refused.")
app.add_typer(stack_app, name="stack")
app.add_typer(intake_app, name="intake")
app.add_typer(model_app, name="model")
app.add_typer(lake_app, name="lake")
console = Console()


# --- stack ----------------------------------------------------------------------------------------
@stack_app.command("up")
def stack_up(workers: Annotated[Optional[int], typer.Option(help="Celery worker nodes (default: one per GPU, or 1)")] = None,
             prometheus: Annotated[bool, typer.Option(help="also start Prometheus")] = True) -> None:
    """Start redis-server, the S3 server, the intake, the workers and Prometheus in the background."""
    from hashlake import stack

    console.print(f"starting the local stack in {stack.stack_dir(Settings())}")
    stack.up(Settings(), stack.StackOptions(workers=workers, prometheus=prometheus), log=console.print)
    console.print("stack is up; `hashlake stack status` shows it, `hashlake stack down` stops it")


@stack_app.command("down")
def stack_down() -> None:
    """Stop every process of the local stack."""
    from hashlake import stack

    stack.down(Settings(), log=console.print)


@stack_app.command("status")
def stack_status() -> None:
    """Show each process of the local stack and whether it answers."""
    from hashlake import stack

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


# --- roles ----------------------------------------------------------------------------------------
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


@app.command()
def reconcile() -> None:
    """Enqueue every object not indexed under the active model version (and deletes for vanished ones)."""
    from workers.intake import reconcile_once

    summary = reconcile_once(load_settings())  # ModelNotFound: one line, status 1 (OneLineErrors)
    console.print(summary)
    if not summary.batcher_alive:
        console.print("[yellow]no intake is running: the queued work is sent once `hashlake intake` runs[/]")


# --- lake -----------------------------------------------------------------------------------------
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


# --- models ---------------------------------------------------------------------------------------
@model_app.command("init")
def model_init(arch: str = "lsh_effnetlite0_64",
               img_size: Annotated[int, typer.Option(help="input resolution, px")] = 128,
               center_images: Annotated[Optional[Path], typer.Option(
                   help="images whose mean feature centres the projection (.parquet or folder; "
                        "default the bundled CIFAR-10 sample)")] = None,
               activate: bool = True) -> None:
    """Publish a pretrained backbone with a fixed projection of its centred features as a model version
    (and activate it)."""
    from hashlake.datasets import SAMPLE
    from hashlake.models import init_model

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
    from hashlake.models import publish_checkpoint

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


# --- reports --------------------------------------------------------------------------------------
@app.command()
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


# --- data -----------------------------------------------------------------------------------------
@app.command()
def retrain(mode: Annotated[str, typer.Option(help="head: a new hash head on the stored features (finetune is "
                                                     "not built)")] = "head",
            wait: Annotated[bool, typer.Option("--wait", help="follow the run with a progress bar until it ends")] = False,
            resume: Annotated[Optional[str], typer.Option(help="submit this failed or killed run again; it goes on "
                                                                "from its first unfinished step")] = None) -> None:
    """Submit a retraining run to the Ray cluster (HASHLAKE_RAY_ADDRESS) now, as the nightly schedule does."""
    from scheduler.submit import resume as resume_run, submit_retrain, wait_with_progress

    if mode != "head":
        fail(f"retraining mode {mode!r} is not available: only head mode (a new hash head on the stored features) "
             f"is built")
    settings = load_settings()
    submission = resume_run(settings, resume) if resume else submit_retrain(settings, mode)
    run_id = resume or submission
    console.print(f"run {run_id}: submitted as Ray job {submission} to {settings.ray_address}", markup=False)
    if not wait:
        return
    state = wait_with_progress(settings, submission, console, run_id=run_id)
    _print_run(state)
    if state.outcome == "failed":
        raise typer.Exit(1)


def _print_run(state) -> None:
    console.print(f"run {state.run_id}: {state.outcome}" + (f" — {state.reason}" if state.reason else ""),
                  markup=False)
    for name, value in state.figures.items():
        if not isinstance(value, (list, dict)):
            console.print(f"  {name} = {value}", markup=False)


@app.command()
def jobs(limit: Annotated[int, typer.Option(help="show the newest N runs")] = 20) -> None:
    """Retraining runs, newest first: outcome, candidate, duration and the gate's figures."""
    from datetime import datetime, timezone

    from scheduler.retrain.state import RunLog

    table = Table(Column("run", no_wrap=True), "mode", "outcome", "candidate", "started (UTC)", Column("s", justify="right"),
                  Column("mAP active → candidate", justify="right"), "reason")
    for state in RunLog(load_settings()).runs()[:limit]:
        figures = state.figures
        gate = (f"{figures['evaluate.active_map']:.4f} → {figures['evaluate.candidate_map']:.4f}"
                if "evaluate.candidate_map" in figures else "")
        started = datetime.fromtimestamp(state.started_at, timezone.utc).strftime("%Y-%m-%d %H:%M")
        table.add_row(state.run_id, state.mode, state.outcome, state.candidate or "", started,
                      f"{state.updated_at - state.started_at:.0f}", gate, state.reason or "")
    console.print(table)


@app.command()
def upload(source: Annotated[Path, typer.Argument(help="a CIFAR-style .parquet or a folder of images")],
           limit: Optional[int] = None) -> None:
    """Upload images to the images bucket with their labels as x-amz-meta-labels."""
    from hashlake.datasets import iter_images
    from hashlake.store import ObjectStore
    from hashlake.upload import upload_all

    settings = load_settings()
    etags = upload_all(ObjectStore(settings), settings.images_bucket, iter_images(source, limit))
    console.print(f"uploaded {len(etags)} images to s3://{settings.images_bucket}/")


@app.command()
def sql(query: str) -> None:
    """Run a SQL query over the lake (views codes, failures, failure_history, deletes; the lake's tables as
    lake.codes, ...; search(), within(), search_rows(), within_rows(), hamming(), hash_image())."""
    from hashlake.sql import connect

    con = connect(load_settings())
    result = con.sql(query)  # a bad query, a code of the wrong length: duckdb.Error, one line (OneLineErrors)
    if result is None:
        return
    print_relation(result.columns, result.fetchall())


@app.command()
def search(image: Path, k: Annotated[int, typer.Option("-k", help="how many neighbours")] = 10) -> None:
    """Print the K nearest indexed images to IMAGE by Hamming distance."""
    from hashlake.sql import connect, hash_image

    if not image.is_file():
        fail(f"{image} is not a file: give the path of an image")
    con = connect(load_settings())
    code = hash_image(con, image.resolve())  # here, not in SQL: a non-image is our error, not a UDF's stack
    rel = con.execute("SELECT key, distance, labels FROM search_rows(?, ?)", [code, k])
    print_relation([d[0] for d in rel.description], rel.fetchall())


def print_relation(columns: list[str], rows: list[tuple]) -> None:
    # a narrow terminal wraps values inside their cells rather than cutting them to "…": SQL output is data
    table = Table(*(Column(name, overflow="fold") for name in columns))
    for row in rows:
        table.add_row(*(v.hex() if isinstance(v, bytes) else str(v) for v in row))
    console.print(table)


@app.command()
def demo(dataset: Annotated[Optional[Path], typer.Option(help="CIFAR-10 .parquet or a folder of images")] = None,
         limit: Annotated[int, typer.Option(help="images to upload")] = 1000,
         workers: Annotated[Optional[int], typer.Option(help="Celery worker nodes (default: one per GPU, or 1)")] = None,
         keep: Annotated[bool, typer.Option(help="leave the stack running afterwards")] = True) -> None:
    """Stack up, upload images, wait until all are indexed, query, report mAP; ends with RESULT lines."""
    from hashlake.demo import run_demo

    run_demo(dataset=dataset, limit=limit, workers=workers, keep=keep, console=console)


if __name__ == "__main__":
    app()
