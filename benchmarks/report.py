"""Times an offline retrieval report (hashlake.report) of 10,000 queries over 1M 64-bit codes, against
hashing_models.evaluate on a subset of the same queries in the same run.

Random codes and 10 classes (about 10% of the database relevant to each query, as in cifar10): the
speed depends on the sizes and on that fraction, not on how good the codes are. Timed:

    report        retrieval_report(...): histograms and the stable rule's second pass in the
                  extension, on every core the process may use, then the closed forms
    tie-expected  the same with stable=False (histograms only: one pass)
    reference     hashing_models.evaluate.evaluate_retrieval on the first --reference-queries
                  queries (numpy: a (Q, N) distance block and a radix sort per query), scaled to
                  all queries; its figures on those queries must equal the report's (1e-6)

    .venv/bin/python benchmarks/report.py                       # 10,000 x 1,000,000
    .venv/bin/python benchmarks/report.py --queries 1000 --database 100000   # a quick run

Prints ``RESULT report_<Q>_x_<N>_s`` (10k and 1M written as 10k, 1m) and the others as its last lines;
the ``_cpu_s`` figures are CPU seconds summed over threads (wall time = CPU / cores on an idle machine).
Measured here (2 cores, AVX-512): ~1.7 ns of CPU per (query, code) pair for the full report, of which
~0.5 ns is the histogram pass.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hashing_models.evaluate import evaluate_retrieval  # noqa: E402
from hashlake.native import loader  # noqa: E402
from hashlake.report import retrieval_report  # noqa: E402


def size_tag(n: int) -> str:
    for unit, name in ((1_000_000, "m"), (1_000, "k")):
        if n % unit == 0:
            return f"{n // unit}{name}"
    return str(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--database", type=int, default=1_000_000)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the report; the median is reported")
    parser.add_argument("--reference-queries", type=int, default=100, help="queries the numpy reference times")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    q_codes = rng.integers(0, 256, (args.queries, args.bits // 8), dtype=np.uint8)
    d_codes = rng.integers(0, 256, (args.database, args.bits // 8), dtype=np.uint8)
    q_labels = rng.integers(0, args.classes, args.queries)
    d_labels = rng.integers(0, args.classes, args.database)
    print(f"{args.queries:,} queries x {args.database:,} {args.bits}-bit codes, {args.classes} classes; "
          f"extension on {loader.threads()} threads", flush=True)

    def timed(fn) -> tuple[list[float], list[float]]:
        """wall seconds and CPU seconds (every thread of the process) of each run: on a shared
        machine the CPU seconds say what the work costs whatever the other processes take"""
        wall, cpu = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        return wall, cpu

    full, full_cpu = timed(lambda: retrieval_report(q_codes, q_labels, d_codes, d_labels))
    quick, quick_cpu = timed(lambda: retrieval_report(q_codes, q_labels, d_codes, d_labels, stable=False))
    print(f"report: {' '.join(f'{t:.2f}' for t in full)} s (CPU {' '.join(f'{t:.1f}' for t in full_cpu)} s); "
          f"tie-expected only: {' '.join(f'{t:.2f}' for t in quick)} s (CPU {' '.join(f'{t:.1f}' for t in quick_cpu)} s)",
          flush=True)

    n_ref = min(args.reference_queries, args.queries)
    t0 = time.perf_counter()
    ref = evaluate_retrieval(q_codes[:n_ref], q_labels[:n_ref], d_codes, d_labels)
    ref_s = (time.perf_counter() - t0) * args.queries / n_ref
    ours = retrieval_report(q_codes[:n_ref], q_labels[:n_ref], d_codes, d_labels).metrics
    for name in ("map", "map_tie_expected", "precision_radius"):
        assert abs(getattr(ours, name) - getattr(ref, name)) < 1e-6, (name, getattr(ours, name), getattr(ref, name))
    for k in ref.map_at:
        assert abs(ours.map_at[k] - ref.map_at[k]) < 1e-6 and abs(ours.map_at_tie_expected[k] - ref.map_at_tie_expected[k]) < 1e-6
    print(f"reference (hashing_models.evaluate, {n_ref} queries, scaled to {args.queries:,}): {ref_s:.1f} s; "
          f"figures equal within 1e-6 (mAP {ref.map:.6f}, tie-expected {ref.map_tie_expected:.6f})", flush=True)

    tag = f"{size_tag(args.queries)}_x_{size_tag(args.database)}"
    report_s = statistics.median(full)
    print(f"RESULT report_{tag}_s {report_s:.2f}")
    print(f"RESULT report_{tag}_cpu_s {statistics.median(full_cpu):.1f}")
    print(f"RESULT report_tie_expected_only_{tag}_s {statistics.median(quick):.2f}")
    print(f"RESULT report_tie_expected_only_{tag}_cpu_s {statistics.median(quick_cpu):.1f}")
    print(f"RESULT evaluate_reference_{tag}_s {ref_s:.1f}")
    print(f"RESULT report_vs_evaluate_{tag} {report_s / ref_s:.4f}")


if __name__ == "__main__":
    main()
