/* Search latency per SQL function: fixed-bound histograms of seconds, read through ctypes by
 * hashlake/query_metrics.py, which exports them as the Prometheus histogram
 * hashlake_query_search_seconds{function}.
 *
 * What is timed (extension.c): the answer of a call, from its snapshot in hand to its hits in
 * tie-rule order (the method's choice, the probes or the scan, the cut to k, the sort); not the
 * parsing of arguments or the writing of result rows. A list call answers its chunk of queries
 * (up to 2,048) together, so each query of the chunk observes the chunk's time: its latency.
 *
 * Observing costs two clock reads and two relaxed atomic adds; nothing locks. Counts are kept per
 * bucket (one add per observation), made cumulative when read. A reader may see a call's count
 * before its sum or the other way round: a scrape is that consistent, never more than one call off. */
#include "hashlake.h"

static const char *const function_names[HL_FUNCTIONS] = {"search",      "within",      "search_rows",
                                                         "within_rows", "search_list", "within_list"};

/* upper bounds of the buckets, in seconds (Prometheus' `le`): from 50 µs (a small index's answer) to
 * 1 s (a large chunk of list queries); a last bucket counts what exceeds them all */
#define HL_LATENCY_BOUNDS 14
static const double bounds_s[HL_LATENCY_BOUNDS] = {50e-6, 100e-6, 250e-6, 500e-6, 1e-3,  2.5e-3, 5e-3,
                                                   10e-3, 25e-3,  50e-3,  100e-3, 250e-3, 500e-3, 1.0};

typedef struct {
	_Atomic uint64_t counts[HL_LATENCY_BOUNDS + 1]; /* queries per bucket (not cumulative) */
	_Atomic uint64_t sum_ns; /* their latencies added up, in ns */
} __attribute__((aligned(64))) hl_latency; /* a cache line or more each: functions do not share one */

static hl_latency latency[HL_FUNCTIONS];

/* `queries` answered by one call of `function` that started at `start_ns` (now_ns()) and ends now */
void observe_search(int function, double start_ns, int64_t queries) {
	double elapsed_ns = now_ns() - start_ns;
	if (queries <= 0 || function < 0 || function >= HL_FUNCTIONS) {
		return;
	}
	if (elapsed_ns < 0) {
		elapsed_ns = 0;
	}
	int b = 0;
	while (b < HL_LATENCY_BOUNDS && elapsed_ns > bounds_s[b] * 1e9) {
		b++;
	}
	atomic_fetch_add_explicit(&latency[function].counts[b], (uint64_t)queries, memory_order_relaxed);
	atomic_fetch_add_explicit(&latency[function].sum_ns, (uint64_t)(elapsed_ns * (double)queries),
	                          memory_order_relaxed);
}

/* Python side (ctypes): the bucket bounds in seconds, written to `out` when not NULL; returns their number */
HL_API int32_t hashlake_latency_bounds(double *out) {
	if (out) {
		memcpy(out, bounds_s, sizeof(bounds_s));
	}
	return HL_LATENCY_BOUNDS;
}

/* Python side: the SQL name of function `function` (0 .. n-1), NULL past the last */
HL_API const char *hashlake_latency_function(int32_t function) {
	return function >= 0 && function < HL_FUNCTIONS ? function_names[function] : NULL;
}

/* Python side: `cumulative` (HL_LATENCY_BOUNDS + 1 entries) gets the queries at or under each bound,
 * the last entry every query (+Inf); `sum_s` their latencies added up, in seconds. 0 ok, -1 unknown. */
HL_API int32_t hashlake_latency_read(int32_t function, uint64_t *cumulative, double *sum_s) {
	if (function < 0 || function >= HL_FUNCTIONS) {
		return -1;
	}
	uint64_t total = 0;
	for (int b = 0; b <= HL_LATENCY_BOUNDS; b++) {
		total += atomic_load_explicit(&latency[function].counts[b], memory_order_relaxed);
		cumulative[b] = total;
	}
	*sum_s = (double)atomic_load_explicit(&latency[function].sum_ns, memory_order_relaxed) / 1e9;
	return 0;
}
