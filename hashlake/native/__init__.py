"""Native Hamming search: the ``hashlake_hamming`` DuckDB extension (C) and its Python side.

    hamming.c   the extension: search / within (and their list forms) over published snapshots
    build.py    compiles it against the installed DuckDB's C API headers (`make setup` runs it)
    loader.py   connections with it loaded; publishing a snapshot's buffers to it
"""
