"""Going back to the previous model version, and deleting the lake rows of versions no longer needed.

``rollback``: the active pointer keeps the version it replaced (``Catalog.previous``); a rollback
activates that version again. It is instant because the previous version's codes are still in the
lake, and it is refused when they no longer cover what the active version covers (images uploaded or
replaced since the switch have no code under it): then ``hashlake model promote <previous>``
re-encodes the bucket under it first. The version rolled back from becomes the previous one, so a
second rollback returns.

``gc``: the codes and failures rows (codes are partitioned by model) of every version that is neither
active nor previous (nor kept by the caller), deleted in one DuckLake transaction. Weights and cards
stay in the catalog, so such a version can be promoted again (it is re-encoded). Nothing runs it on
its own; ``plan_gc`` says what it would delete. ``hashlake lake compact`` later removes the files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import duckdb

from hashlake.catalog import Catalog, ModelNotFound
from hashlake.config import Settings
from hashlake.lake.connection import open_lake
from hashlake.lake.rules import current_codes_sql
from hashlake.lake.schema import LAKE
from hashlake.store import ObjectStore


class RollbackError(RuntimeError):
    """The rollback was refused; the message says why and what to do."""


@dataclass(frozen=True)
class RollbackResult:
    version: str  # active now
    rolled_back_from: str  # active before, previous now
    codes: int  # current codes rows of ``version``
    missing: int  # image versions coded under the version rolled back from but not under ``version``


def coverage(con: duckdb.DuckDBPyConnection, version: str, reference: str) -> tuple[int, int]:
    """(current codes rows of ``version``, image versions (bucket, key, etag) with a current code under
    ``reference`` and none under ``version``), at the lake's current snapshot."""
    deletes = f"{LAKE}.deletes"
    current = {name: current_codes_sql(f"(SELECT * FROM {LAKE}.codes WHERE model = ${name})", deletes)
               for name in ("v", "ref")}
    return con.execute(f"""
        WITH v AS ({current['v']}), ref AS ({current['ref']})
        SELECT (SELECT count(*) FROM v),
               (SELECT count(*) FROM ref ANTI JOIN v USING (bucket, key, etag))""",
                       {"v": version, "ref": reference}).fetchone()


def rollback(settings: Settings, *, force: bool = False) -> RollbackResult:
    """Activate the previous version again. ``RollbackError`` when there is none, when settings pin a
    version, or (unless ``force``: the reconciler then queues what is missing) when its codes do not
    cover every image the active version has a code for."""
    catalog = Catalog(ObjectStore(settings), settings)
    active = catalog.active()  # ModelNotFound: nothing was ever activated
    previous = catalog.previous()
    if previous is None:
        raise RollbackError(f"no previous model version to roll back to: {active!r} is the only one ever "
                            f"activated since the pointer kept history (`hashlake model activate <v>` or "
                            f"`hashlake model promote <v>` choose one explicitly)")
    if settings.model_version and settings.model_version != previous:
        raise RollbackError(f"settings pin model version {settings.model_version!r} (HASHLAKE_MODEL_VERSION): "
                            f"workers and queries ignore the active pointer; unpin it to roll back")
    catalog.card(previous)  # ModelNotFound if its card vanished
    con = open_lake(settings)
    try:
        codes, missing = coverage(con, previous, active)
    finally:
        con.close()
    if missing and not force:
        raise RollbackError(
            f"the previous version {previous!r} has no current code for {missing:,} of the images coded under "
            f"{active!r} (it has {codes:,} codes): a rollback would serve without them. "
            f"`hashlake model promote {previous}` re-encodes them, then activates it "
            f"(or roll back with --force and let the reconciler queue them)")
    catalog.activate(previous)  # records `active` as the previous one: a second rollback returns
    return RollbackResult(previous, active, codes, missing)


@dataclass(frozen=True)
class GcPlan:
    keep: tuple[str, ...]  # active, previous and the caller's
    delete: dict[str, tuple[int, int]]  # version -> (codes rows, failures rows), every row, not only current
    deleted: bool = False


def _rows_by_version(con: duckdb.DuckDBPyConnection) -> dict[str, tuple[int, int]]:
    counts: dict[str, list[int]] = {}
    for column, table in enumerate(("codes", "failures")):
        for model, n in con.execute(f"SELECT model, count(*) FROM {LAKE}.{table} GROUP BY model").fetchall():
            counts.setdefault(model, [0, 0])[column] = n
    return {model: (c[0], c[1]) for model, c in sorted(counts.items())}


def _kept(settings: Settings, keep: Iterable[str]) -> tuple[str, ...]:
    catalog = Catalog(ObjectStore(settings), settings)
    try:
        active = catalog.active()
    except ModelNotFound:
        raise ModelNotFound("no active model: gc keeps the active and the previous version's rows, and there is "
                            "none; nothing deleted") from None
    kept = [active, catalog.previous(), *keep]
    if settings.model_version:
        kept.append(settings.model_version)
    return tuple(dict.fromkeys(v for v in kept if v))


def plan_gc(settings: Settings, *, keep: Iterable[str] = ()) -> GcPlan:
    """What ``gc`` would delete now: nothing is changed."""
    kept = _kept(settings, keep)
    con = open_lake(settings)
    try:
        rows = _rows_by_version(con)
    finally:
        con.close()
    return GcPlan(kept, {v: n for v, n in rows.items() if v not in kept})


def gc(settings: Settings, *, keep: Iterable[str] = ()) -> GcPlan:
    """Delete the codes and failures rows of every version not active, previous or in ``keep``, in one
    transaction; returns what was deleted (counted inside the transaction)."""
    kept = _kept(settings, keep)
    con = open_lake(settings)
    try:
        con.execute("BEGIN")
        try:
            rows = _rows_by_version(con)
            doomed = {v: n for v, n in rows.items() if v not in kept}
            if doomed:
                placeholders = ", ".join(f"${i}" for i in range(1, len(doomed) + 1))
                for table in ("codes", "failures"):
                    con.execute(f"DELETE FROM {LAKE}.{table} WHERE model IN ({placeholders})", list(doomed))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        con.close()
    return GcPlan(kept, doomed, deleted=True)
