/* hashlake_hamming's internals, shared by its source files (one role each):
 *
 *   registry.c   published snapshots (Python's buffers, described), per-database slots and pins
 *   pool.c       how many threads this process may use; the thread pool that splits work
 *   scan.c       Hamming distances and the flat scan kernels (scalar, AVX-512), single and grouped
 *   mih.c        multi-index hashing: probing the segments' hash tables, and when that beats the scan
 *   query.c      one query answered: the method, the cut to k, the tie rule
 *   report.c     per-distance histograms for offline retrieval reports (ctypes only)
 *   metrics.c    search latency per SQL function: bucket counts in atomics, read by ctypes
 *   extension.c  the DuckDB glue: SQL functions, arguments, result vectors, the entry point
 *
 * Symbols shared between files are hidden (-fvisibility=hidden); HL_API marks what Python calls
 * through ctypes. Layouts marked "mirrored by ctypes" must change together with loader.py.
 */
#ifndef HASHLAKE_H
#define HASHLAKE_H

#define _GNU_SOURCE /* qsort_r, sched_getaffinity */
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HL_API __attribute__((visibility("default")))

#define HL_MAX_TABLES 4
#define HL_MAX_BYTES 32 /* 256-bit codes */
#define HL_MAX_THREADS 64

/* ---- published data (layout mirrored by ctypes in loader.py: change both together) ----------- */
typedef struct {
	const int32_t *offsets; /* Arrow utf8 offsets, already advanced by the array's offset */
	const char *data;
} hl_strings;

typedef struct {
	const uint8_t *bits; /* Arrow validity bitmap (bit i of byte i/8, LSB first); NULL: no nulls */
	int64_t offset;      /* the array's offset into it */
} hl_validity;

typedef struct {
	const int64_t *values; /* already advanced by the array's offset; NULL: the segment lacks the column */
	hl_validity valid;
} hl_int64s;

typedef struct {
	const int32_t *offsets; /* (rows + 1,) into items, advanced by the array's offset; NULL: no such column */
	hl_validity valid;
	hl_strings items; /* the list items: never null */
} hl_string_lists;

typedef struct {
	int64_t rows;
	const uint8_t *codes; /* rows * code_bytes */
	const int64_t *hidden; /* sorted row positions no longer visible */
	int64_t n_hidden;
	hl_strings bucket, key, etag;
	int32_t tables; /* 0: no hash tables (small segment) */
	int32_t starts[HL_MAX_TABLES]; /* first bit (MSB-first) of each substring */
	int32_t key_bits[HL_MAX_TABLES];
	const int32_t *table_offsets[HL_MAX_TABLES]; /* (2**key_bits + 1,) */
	const uint32_t *table_rows[HL_MAX_TABLES]; /* (rows,) sorted by key */
	const double *radius_profile; /* (bits + 1,) cumulative fraction of pairs within each radius, or NULL */
	hl_int64s size, last_modified, encoded_at; /* times: µs since the epoch, UTC */
	hl_string_lists labels;
	const uint32_t *tie_rank; /* (rows,) each row's position in the segment's (bucket, key) order, or NULL */
} hl_segment;

typedef struct hl_snapshot {
	int64_t id;
	int32_t code_bytes; /* 0 while the index holds nothing */
	int32_t n_segments;
	hl_segment *segments;
	char model_version[128];
	int64_t users; /* calls running on it */
	struct hl_snapshot *next;
} hl_snapshot;


/* ---- results ---------------------------------------------------------------------------------- */
typedef struct {
	int32_t segment;
	int32_t distance;
	int64_t row;
} hl_hit;

typedef struct {
	hl_hit *items;
	int64_t size, capacity;
	int failed; /* allocation failure */
} hl_hits;

static inline void hits_push(hl_hits *h, int32_t segment, int64_t row, int32_t distance) {
	if (h->size == h->capacity) {
		int64_t cap = h->capacity ? h->capacity * 2 : 64;
		hl_hit *items = realloc(h->items, cap * sizeof(hl_hit));
		if (!items) {
			h->failed = 1;
			return;
		}
		h->items = items;
		h->capacity = cap;
	}
	h->items[h->size++] = (hl_hit) {segment, distance, row};
}

static inline void hits_free(hl_hits *h) {
	free(h->items);
	memset(h, 0, sizeof(*h));
}

static inline int is_hidden(const hl_segment *seg, int64_t row) {
	int64_t lo = 0, hi = seg->n_hidden;
	while (lo < hi) {
		int64_t mid = (lo + hi) / 2;
		if (seg->hidden[mid] < row) {
			lo = mid + 1;
		} else {
			hi = mid;
		}
	}
	return lo < seg->n_hidden && seg->hidden[lo] == row;
}

/* ---- distances ---------------------------------------------------------------------------------- */
static inline uint64_t load_word(const uint8_t *p, int bytes) {
	uint64_t w = 0;
	memcpy(&w, p, bytes);
	return w;
}

static inline int32_t distance(const uint8_t *code, const uint8_t *query, int code_bytes) {
	int32_t d = 0;
	int b = 0;
	for (; b + 8 <= code_bytes; b += 8) {
		d += __builtin_popcountll(load_word(code + b, 8) ^ load_word(query + b, 8));
	}
	if (b < code_bytes) {
		d += __builtin_popcountll(load_word(code + b, code_bytes - b) ^ load_word(query + b, code_bytes - b));
	}
	return d;
}

/* ---- across files -------------------------------------------------------------------------------- */
/* registry.c */
hl_snapshot *acquire(int64_t id);
void release(hl_snapshot *s);
int64_t new_slot(void);
hl_snapshot *acquire_pinned(int64_t slot, char *error, size_t size);

/* pool.c */
HL_API int32_t hashlake_threads(void);
void pool_run(void (*run)(void *, int64_t), void *ctx, int64_t tasks);
double now_ns(void);

/* scan.c */
extern int has_avx512_popcount;
extern double flat_ns_per_byte;
HL_API int32_t hashlake_uses_avx512(void);
int64_t total_rows(const hl_snapshot *snap);
void flat_search(const hl_snapshot *snap, const uint8_t *query, int64_t k, int32_t limit, int threads, hl_hits *out);
void flat_group(const hl_snapshot *snap, const uint8_t **queries, const int64_t *ks, const int32_t *limits, int m,
                hl_hits **outs);
#define GROUP_QUERIES 16 /* queries per grouped scan */

/* mih.c */
extern int forced_method;
int mih_knn(const hl_snapshot *snap, const uint8_t *query, int64_t k, int threads, hl_hits *out);
int mih_within(const hl_snapshot *snap, const uint8_t *query, int radius, int threads, hl_hits *out);

/* query.c */
int try_mih(const hl_snapshot *snap, const uint8_t *query, int64_t k, int32_t radius, int threads, hl_hits *out);
int finish(const hl_snapshot *snap, int64_t k, hl_hits *out);
int32_t start_limit(const hl_snapshot *snap, int64_t k, int32_t radius);
int answer(const hl_snapshot *snap, const uint8_t *query, int64_t k, int32_t radius, int threads, hl_hits *out);
int query_error(const hl_snapshot *snap, uint32_t len, int32_t param, int is_knn, char *error, size_t size);

/* metrics.c: the SQL functions whose answers are timed (names in metrics.c, in this order) */
enum { HL_FN_SEARCH, HL_FN_WITHIN, HL_FN_SEARCH_ROWS, HL_FN_WITHIN_ROWS, HL_FN_SEARCH_LIST, HL_FN_WITHIN_LIST,
       HL_FUNCTIONS };
void observe_search(int function, double start_ns, int64_t queries);

#endif
