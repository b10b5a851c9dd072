"""``python -m scheduler.retrain --run-id RUN --mode head``: the Ray job's entry point (``scheduler.submit``
submits it; run by hand it resumes a run). Exit status 0 for succeeded or rejected, 1 for failed."""
from __future__ import annotations

import argparse
import logging
import sys

from hashlake.config import load_settings
from scheduler.retrain.job import MODES, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scheduler.retrain", description=__doc__)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--mode", choices=MODES, default="head")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = run(load_settings(), args.run_id, args.mode)
    print(f"run {state.run_id}: {state.outcome}" + (f" ({state.reason})" if state.reason else ""), flush=True)
    return 1 if state.outcome == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
