"""The local stack's S3 server: ``moto_server`` (moto's own ``main()``: its options, its
werkzeug server, its request dispatch, its S3 backend), started with two per-request costs removed.

Under the ingest benchmark's load (every image a PUT and a GET) a py-spy profile of the stock
``moto_server`` spent, of its busy samples:

- ~10% in ``moto.backends.list_of_moto_modules``, which lists moto's package folder (~150 ``isdir``
  calls) on every request to route it. The folder does not change while the server runs, so the
  listing is taken once here.
- ~18% writing werkzeug's access-log line, one per request, through a single locked handler that
  every request thread queues on. Warnings and errors are still logged.

Run as ``python -m hashlake.local.s3_server -H 127.0.0.1 -p PORT`` (``moto_server``'s arguments).
"""
from __future__ import annotations

import logging
import sys

from hashlake.extras import MissingExtra, require


def main(argv: list[str] | None = None) -> None:
    try:
        require("moto.server", "the local stack's S3 server")
    except MissingExtra as exc:
        sys.exit(f"error: {exc}")
    from moto import backends
    from moto.server import main as moto_server_main

    modules = tuple(backends.list_of_moto_modules())
    # Looked up on the module at call time by moto's dispatcher, so replacing it here takes effect.
    backends.list_of_moto_modules = lambda: modules
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    moto_server_main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
