"""Retrieval reports over the lake: a model version's current codes and their labels, split by key.

    report = version_report(settings, "v2")                          # evaluation queries vs train
    reports = compare_versions(settings, ["v1", "v2"], "evaluation")  # the same images under both

The rows are the version's *current* codes rows (``hashlake.lake.rules.current_codes_sql``: what
``codes`` and ``search`` serve) carrying at least one label (the ``labels`` column, from the object's
``x-amz-meta-labels``; several labels per image are allowed: relevant = shares one), read at one lake
snapshot and ordered by (bucket, key), the stable tie rule of ``search``. Queries are the rows of the
given split (``evaluation`` or ``validation``), the database the rows of ``train``
(``hashlake.splits``). Label names share one order between queries and database, and across the
versions of a comparison.

``compare_versions`` keeps only the image versions (bucket, key, etag) that have a current code under
every version compared, so the figures are over the same queries and the same database (the nightly
gate compares a candidate with the active version this way).
"""
from __future__ import annotations

from typing import Sequence

import duckdb
import numpy as np

from hashlake.config import Settings
from hashlake.lake.connection import attach_for_queries
from hashlake.lake.rules import current_codes_sql
from hashlake.lake.schema import LAKE
from hashlake.report import Report, multi_hot, retrieval_report
from hashlake.splits import split_sql

QUERY_SPLITS = ("evaluation", "validation")
DATABASE_SPLIT = "train"


class ReportError(ValueError):
    """No report can be made from what the lake holds (the message says what is missing)."""


def version_report(settings: Settings, version: str, *, split: str = "evaluation",
                   con: duckdb.DuckDBPyConnection | None = None, topk: Sequence[int] = (100, 1000),
                   radius: int = 2) -> Report:
    """The retrieval report of ``version``: its labelled current codes of ``split`` as queries, those of
    ``train`` as the database, read at one lake snapshot. ``con``: a connection with the lake attached
    as ``lake`` (``open_lake``, or one ``attach_for_queries`` was called on); by default a read-only
    query connection of its own, closed after."""
    return compare_versions(settings, [version], split, con=con, topk=topk, radius=radius)[version]


def compare_versions(settings: Settings, versions: Sequence[str], split: str = "evaluation", *,
                     con: duckdb.DuckDBPyConnection | None = None, topk: Sequence[int] = (100, 1000),
                     radius: int = 2) -> dict[str, Report]:
    """One report per version (in the order given), all on the same images: the image versions
    (bucket, key, etag) with a current code under every version, read at one lake snapshot."""
    versions = list(dict.fromkeys(versions))
    if not versions:
        raise ReportError("no model version to report on")
    if split not in QUERY_SPLITS:
        raise ReportError(f"split must be one of {', '.join(QUERY_SPLITS)} (the database is always "
                          f"{DATABASE_SPLIT!r}), got {split!r}")
    own = con is None
    if own:
        con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
        try:
            attach_for_queries(con, settings)
        except BaseException:
            con.close()
            raise
    try:
        snapshot, rows = _read(con, versions)
    finally:
        if own:
            con.close()

    what = (f"model version {versions[0]!r}" if len(versions) == 1
            else "all of the model versions " + ", ".join(map(repr, versions)))
    if rows["n_coded"] == 0:
        raise ReportError(f"no image has a current code under {what} in the lake (snapshot {snapshot}): "
                          f"unknown to the lake, or not encoded yet (`hashlake model promote <version>` "
                          f"encodes the bucket under one)")
    labels = rows["labels"]
    if not labels:
        raise ReportError(f"none of the {rows['n_coded']:,} images coded under {what} carries labels "
                          f"(x-amz-meta-labels): a report needs labelled images")
    splits = np.asarray(rows["split"])
    queries, database = np.flatnonzero(splits == split), np.flatnonzero(splits == DATABASE_SPLIT)
    if len(queries) == 0:
        raise ReportError(f"none of the {len(labels):,} labelled images coded under {what} is in the {split!r} "
                          f"split (hashlake.splits: 10% of keys by hash): nothing to query with")
    if len(database) == 0:
        raise ReportError(f"none of the {len(labels):,} labelled images coded under {what} is in the "
                          f"{DATABASE_SPLIT!r} split: no database to rank")
    hot, names = multi_hot(labels)  # one order of label names for queries, database and every version
    reports = {}
    for version in versions:
        codes = rows["codes"][version]
        report = retrieval_report(codes[queries], hot[queries], codes[database], hot[database],
                                  topk=topk, radius=radius)
        reports[version] = Report(report.metrics, report.label_ap, report.label_ap_tie_expected,
                                  report.label_queries, report.histograms, label_names=tuple(names),
                                  lake_snapshot=snapshot, split=split)
    return reports


def _read(con: duckdb.DuckDBPyConnection, versions: list[str]) -> tuple[int, dict]:
    """(snapshot, rows): the labelled current rows common to ``versions`` at the lake's current
    snapshot, in (bucket, key) order, with each version's codes as an (N, B) uint8 matrix."""
    snapshot = int(con.execute(f"FROM {LAKE}.current_snapshot()").fetchone()[0])
    at = f"AT (VERSION => {snapshot})"
    deletes = f"(SELECT * FROM {LAKE}.deletes {at})"
    ctes, params = [], {}
    for i, version in enumerate(versions):
        params[f"m{i}"] = version
        rows = f"(SELECT * FROM {LAKE}.codes {at} WHERE model = $m{i})"
        ctes.append(f"v{i} AS ({current_codes_sql(rows, deletes, ', r.code')})")
    joins = "".join(f" JOIN v{i} USING (bucket, key, etag)" for i in range(1, len(versions)))
    code_columns = ", ".join(f"v{i}.code AS code{i}" for i in range(len(versions)))
    common = f"SELECT v0.bucket, v0.key, v0.labels, {code_columns} FROM v0{joins}"
    table = con.execute(f"""
        WITH {', '.join(ctes)}, common AS ({common})
        SELECT key, list_filter(labels, x -> x IS NOT NULL AND x <> '') AS labels,
               {split_sql('bucket', 'key')} AS split,
               {', '.join(f'code{i}' for i in range(len(versions)))},
               count(*) OVER () AS n_coded
        FROM common
        ORDER BY bucket, key""", params).to_arrow_table()
    n_coded = table.column("n_coded")[0].as_py() if table.num_rows else 0
    labels = table.column("labels").to_pylist()
    keep = np.array([bool(names) for names in labels], bool)
    out = {"n_coded": n_coded, "labels": [names for names, k in zip(labels, keep) if k],
           "split": np.asarray(table.column("split").to_pylist(), object)[keep], "codes": {}}
    for i, version in enumerate(versions):
        codes = table.column(f"code{i}").to_pylist()
        width = {len(c) for c in codes}
        if len(width) > 1:
            raise ReportError(f"the codes of model version {version!r} have different lengths: {sorted(width)} bytes")
        matrix = (np.frombuffer(b"".join(codes), np.uint8).reshape(len(codes), width.pop()) if codes
                  else np.zeros((0, 0), np.uint8))
        out["codes"][version] = matrix[keep]
    return snapshot, out
