"""Native Hamming search: the ``hashlake_hamming`` DuckDB extension (C) and its Python side.

    src/           the extension in C, one file per role (listed in src/hashlake.h): search / within
                   (and their list forms) over published snapshots, their latency counters, report histograms
    build.py       compiles src/ against the installed DuckDB's C API headers (`make setup` runs it)
    loader.py      connections with it loaded; publishing a snapshot's buffers to it; thread count;
                   the search latency counters (hashlake.query_metrics exports them)
    histograms.py  per-query histograms by Hamming distance for offline reports (hashlake.report)
"""
