"""Times a full evaluation (mAP@ALL and all companions) of 10,000 queries × 50,000 random 64-bit codes.

The cifar10-2 protocol's shape: 10 classes, random codes and labels (the speed does not depend on
how good the codes are, only on the sizes and on ~10% of items being relevant).
Prints ``RESULT map_eval_10000x50000_s <median seconds>`` as its last line.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from hashing_models.evaluate import evaluate_retrieval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--database", type=int, default=50_000)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    q_codes = rng.integers(0, 256, size=(args.queries, args.bits // 8), dtype=np.uint8)
    d_codes = rng.integers(0, 256, size=(args.database, args.bits // 8), dtype=np.uint8)
    q_labels = rng.integers(0, 10, size=args.queries).astype(np.int8)
    d_labels = rng.integers(0, 10, size=args.database).astype(np.int8)

    times = []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        metrics = evaluate_retrieval(q_codes, q_labels, d_codes, d_labels)
        times.append(time.perf_counter() - start)
        print(f"run {repeat}: {times[-1]:.2f} s  mAP {metrics.map:.4f}  "
              f"tie-expected {metrics.map_tie_expected:.4f}", flush=True)
    name = f"map_eval_{args.queries}x{args.database}_s"
    print(f"RESULT {name} {statistics.median(times):.2f}")


if __name__ == "__main__":
    main()
