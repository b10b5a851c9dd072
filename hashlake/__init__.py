"""hashlake: deep-hashing image retrieval over object storage, queried with SQL.

The core: what production (encode workers, the intake, beat, the retraining job) and the command share.
Nothing here imports ``workers``, ``scheduler``, ``hashlake.cli`` or ``hashlake.local``
(tests/test_layout.py checks it), nor an optional extra at import time (``extras.py``).

    config.py           the one typed settings object: ``HASHLAKE_*`` variables over an optional TOML file
    store.py            object store access (MinIO, S3, the local S3 server) through the ``minio`` SDK
    catalog.py          model versions (cards, weights) and the active pointer, kept in the index bucket
    model_versions.py   creating model versions (``init_model``, ``publish_checkpoint``); ``load_version``
                        turns a version back into its model; ``backbone_id``
    model_lifecycle.py  rolling back to the previous version; deleting the rows of versions no longer needed
    image_sources.py    images a user points ``hashlake upload`` or the demo at: CIFAR-10 Parquet or a folder
    upload.py           uploading images to the images bucket with their labels as user metadata
    splits.py           which split an image belongs to: a hash of its key
    sql.py              DuckDB over the lake: the views, ``search``/``within``/``hash_image`` and friends
    query_metrics.py    Prometheus metrics of a query process: search latency, index size, refresh time
    report.py           retrieval reports from per-distance histograms (the native extension)
    report_lake.py      retrieval reports over the lake: a version's current labelled codes, split by key
    report_markdown.py  a report as Markdown with a precision-recall plot (matplotlib, the ``bench`` extra)
    extras.py           the optional extras (local, bench, test) and ``require``: a clear error when missing

    index/    in-memory Hamming index of a version's codes, refreshed from the lake's change feed
    lake/     the lake: DuckLake tables (PostgreSQL catalog, Parquet files in the index bucket)
    native/   the ``hashlake_hamming`` DuckDB extension (C) and its Python side
    cli/      the ``hashlake`` command, one module per command group
    local/    the local stack (``hashlake stack``, ``make demo``): services started as processes here
"""

__version__ = "0.1.0"
