/* hashlake_hamming: a DuckDB extension (C extension API, v1.2.0) that answers k-nearest and radius
 * Hamming queries over the codes that hashlake's Python index holds in memory.
 *
 * Why native: a Python UDF costs ~0.6 ms per call before it does any work, more than a flat scan of
 * a million codes; here a call costs what the scan costs.
 *
 * Data: Python publishes a snapshot (hashlake/native/loader.py) by handing this library, through
 * ctypes on the same loaded file, an array of segment descriptors that point into its own numpy and
 * Arrow buffers: codes (rows, code_bytes) uint8, the sorted hidden rows, the bucket/key/etag string
 * columns, the size/time/labels columns, and the multi-index hash tables (hashlake/index/mih.py's CSR
 * layout). Nothing is copied; Python keeps the buffers alive until hashlake_forget() says no call is using the snapshot. Each
 * database that loads the extension gets a slot (hashlake_slot()); hashlake_pin() points the slot
 * at the snapshot that database searches.
 *
 * SQL (registered on LOAD):
 *   search(query BLOB|hex VARCHAR, k INTEGER)       table: bucket, key, etag, distance (one constant query)
 *   within(query BLOB|hex VARCHAR, radius INTEGER)  same
 *   hashlake_search_rows(query, k), hashlake_within_rows(query, radius)
 *                                                   table: the hits' rows in the columns of the codes view
 *                                                   (key, bucket, etag, size, last_modified, code, model,
 *                                                   encoded_at, labels), then distance
 *   hashlake_search_list(query BLOB, k INTEGER)     LIST(STRUCT(bucket, key, etag, distance)), a query per row
 *   hashlake_within_list(query BLOB, radius INTEGER) same
 * Rows and lists come ordered by (distance, bucket, key): the stated tie rule. search returns exactly
 * the first k visible rows in that order; within every visible row within the radius.
 *
 * Method per query: multi-index hashing (Norouzi et al.) when its estimated cost beats the flat
 * scan, else the flat scan, split over a thread pool (a batch: groups of queries sharing one blocked
 * pass over the codes). Both are exact.
 */
#define _GNU_SOURCE /* qsort_r */
#define DUCKDB_EXTENSION_NAME hashlake_hamming
#include "duckdb_extension.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

DUCKDB_EXTENSION_EXTERN

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

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static hl_snapshot *registry = NULL;
static int64_t next_id = 1;

/* Python side (ctypes). Returns the new snapshot's id. */
__attribute__((visibility("default"))) int64_t hashlake_publish(int32_t code_bytes, int32_t n_segments,
                                                                const hl_segment *segments, const char *model_version) {
	hl_snapshot *s = calloc(1, sizeof(hl_snapshot));
	if (!s) {
		return -1;
	}
	s->segments = calloc(n_segments ? n_segments : 1, sizeof(hl_segment));
	if (!s->segments) {
		free(s);
		return -1;
	}
	memcpy(s->segments, segments, sizeof(hl_segment) * n_segments);
	s->code_bytes = code_bytes;
	s->n_segments = n_segments;
	snprintf(s->model_version, sizeof(s->model_version), "%s", model_version ? model_version : "");
	pthread_mutex_lock(&registry_lock);
	s->id = next_id++;
	s->next = registry;
	registry = s;
	pthread_mutex_unlock(&registry_lock);
	return s->id;
}

/* Python side: drop the snapshot if no call uses it. 1: dropped (Python may free the buffers),
 * 0: still in use (ask again later), -1: unknown id. */
__attribute__((visibility("default"))) int32_t hashlake_forget(int64_t id) {
	int32_t result = -1;
	pthread_mutex_lock(&registry_lock);
	for (hl_snapshot **p = &registry; *p; p = &(*p)->next) {
		if ((*p)->id == id) {
			hl_snapshot *s = *p;
			if (s->users == 0) {
				*p = s->next;
				free(s->segments);
				free(s);
				result = 1;
			} else {
				result = 0;
			}
			break;
		}
	}
	pthread_mutex_unlock(&registry_lock);
	return result;
}

static hl_snapshot *acquire(int64_t id) {
	hl_snapshot *found = NULL;
	pthread_mutex_lock(&registry_lock);
	for (hl_snapshot *s = registry; s; s = s->next) {
		if (s->id == id) {
			s->users++;
			found = s;
			break;
		}
	}
	pthread_mutex_unlock(&registry_lock);
	return found;
}

static void release(hl_snapshot *s) {
	pthread_mutex_lock(&registry_lock);
	s->users--;
	pthread_mutex_unlock(&registry_lock);
}

/* Pins: one slot per database that loaded the extension (each LOAD registers the functions with
 * its own slot as extra info), holding the snapshot that database's search/within read. Python
 * learns a database's slot from hashlake_slot() and moves it with hashlake_pin(). A slot is a few
 * bytes and lives as long as the process. */
static int64_t *slots = NULL; /* snapshot id per slot, 0 = none */
static int64_t n_slots = 0, slots_capacity = 0;

static int64_t new_slot(void) {
	int64_t slot = -1;
	pthread_mutex_lock(&registry_lock);
	if (n_slots == slots_capacity) {
		int64_t cap = slots_capacity ? slots_capacity * 2 : 16;
		int64_t *grown = realloc(slots, cap * sizeof(int64_t));
		if (grown) {
			slots = grown;
			slots_capacity = cap;
		}
	}
	if (n_slots < slots_capacity) {
		slots[n_slots] = 0;
		slot = n_slots++;
	}
	pthread_mutex_unlock(&registry_lock);
	return slot;
}

/* Python side: point a database's slot at a published snapshot. 0 ok, -1 unknown slot. */
__attribute__((visibility("default"))) int32_t hashlake_pin(int64_t slot, int64_t snapshot) {
	int32_t result = -1;
	pthread_mutex_lock(&registry_lock);
	if (slot >= 0 && slot < n_slots) {
		slots[slot] = snapshot;
		result = 0;
	}
	pthread_mutex_unlock(&registry_lock);
	return result;
}

/* the snapshot a slot is pinned to, acquired; NULL (and a message) when there is none */
static hl_snapshot *acquire_pinned(int64_t slot, char *error, size_t size) {
	pthread_mutex_lock(&registry_lock);
	int64_t id = slot >= 0 && slot < n_slots ? slots[slot] : 0;
	pthread_mutex_unlock(&registry_lock);
	hl_snapshot *snap = id ? acquire(id) : NULL;
	if (!snap) {
		snprintf(error, size, "hashlake: this connection has no index snapshot (open it with hashlake.sql.connect(), "
		         "or refresh it)");
	}
	return snap;
}

static int64_t slot_of(void *extra_info) {
	return (int64_t)(intptr_t)extra_info;
}

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

static void hits_push(hl_hits *h, int32_t segment, int64_t row, int32_t distance) {
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

static void hits_free(hl_hits *h) {
	free(h->items);
	memset(h, 0, sizeof(*h));
}

static int is_hidden(const hl_segment *seg, int64_t row) {
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

static int compare_strings(const hl_strings *a, int64_t ra, const hl_strings *b, int64_t rb) {
	int32_t la = a->offsets[ra + 1] - a->offsets[ra], lb = b->offsets[rb + 1] - b->offsets[rb];
	int c = memcmp(a->data + a->offsets[ra], b->data + b->offsets[rb], la < lb ? la : lb);
	return c ? c : (la > lb) - (la < lb);
}

/* the tie rule: distance, then bucket, then key (bytewise, as DuckDB orders VARCHAR) */
static int compare_hits(const void *pa, const void *pb, void *ctx) {
	const hl_hit *a = pa, *b = pb;
	const hl_snapshot *s = ctx;
	if (a->distance != b->distance) {
		return a->distance < b->distance ? -1 : 1;
	}
	const hl_segment *sa = &s->segments[a->segment], *sb = &s->segments[b->segment];
	int c = compare_strings(&sa->bucket, a->row, &sb->bucket, b->row);
	return c ? c : compare_strings(&sa->key, a->row, &sb->key, b->row);
}

/* ---- distances ------------------------------------------------------------------------------ */
static int has_avx512_popcount;
__attribute__((visibility("default"))) int32_t hashlake_uses_avx512(void);

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

/* A flat scan of rows [begin, end) of one segment keeping every visible row that can be in the answer.
 * A radius query (k == 0) keeps every visible row with distance <= limit. For k-NN (k > 0) the limit
 * shrinks as rows are found: once k kept rows lie strictly below it, rows at the limit can no longer
 * be among the first k, and the limit drops. `counts` (bits + 2,) counts kept rows by distance.
 *
 * Rows at the limit itself (ties) are many when codes repeat: a million identical codes all sit at
 * one distance. They wait in `ties` (this segment's rows at the limit with their tie rank, the row's
 * position in the segment's (bucket, key) order); when it holds twice the rows still needed
 * (k - below), a selection on the ranks keeps the needed ones and `tie_rank` becomes the largest
 * rank kept: a later row of this segment at the limit with a larger rank has at least k rows before
 * it in the tie rule, so the kernels drop it with one integer compare. Each selection halves the
 * buffer, so a segment costs O(rows) however many ties it holds, and hands at most k rows on. */
typedef struct {
	int64_t row;
	uint32_t rank;
} hl_tie;

typedef struct {
	const hl_segment *seg;
	int32_t segment;
	const uint8_t *query;
	int code_bytes;
	int64_t begin, end;
	int64_t k;
	int32_t limit;
	int64_t *counts;
	int64_t below; /* kept rows with distance < limit */
	hl_hits *hits;
	const uint32_t *rank; /* the segment's tie ranks; NULL: ties go straight to hits */
	uint32_t tie_rank;    /* rows at the limit ranked above this cannot be in the answer */
	hl_tie *ties;         /* this segment's candidate rows at the limit (k-NN with ranks) */
	int64_t n_ties, ties_capacity;
} hl_scan;

/* whether a row at distance d passes the limit and, at the limit, the tie rank */
static inline int scan_candidate(const hl_scan *sc, int64_t row, int32_t d) {
	return d < sc->limit || (d == sc->limit && (!sc->rank || sc->rank[row] <= sc->tie_rank));
}

/* move the `need` lowest-ranked ties to the front (quickselect; ranks within a segment are distinct) */
static void select_ties(hl_tie *t, int64_t n, int64_t need) {
	int64_t lo = 0, hi = n - 1;
	uint64_t state = 0x9E3779B97F4A7C15ull ^ (uint64_t)n;
	while (lo < hi) {
		state ^= state << 13, state ^= state >> 7, state ^= state << 17;
		uint32_t pivot = t[lo + (int64_t)(state % (uint64_t)(hi - lo + 1))].rank;
		int64_t i = lo, j = hi;
		while (i <= j) {
			while (t[i].rank < pivot) {
				i++;
			}
			while (t[j].rank > pivot) {
				j--;
			}
			if (i <= j) {
				hl_tie x = t[i];
				t[i++] = t[j];
				t[j--] = x;
			}
		}
		if (need - 1 <= j) {
			hi = j;
		} else if (need - 1 >= i) {
			lo = i;
		} else {
			return;
		}
	}
}

/* keep only the ties that can still be in the answer */
static void trim_ties(hl_scan *sc) {
	int64_t need = sc->k - sc->below;
	if (sc->n_ties > need) {
		select_ties(sc->ties, sc->n_ties, need);
		sc->n_ties = need;
		uint32_t top = 0;
		for (int64_t i = 0; i < need; i++) {
			top = sc->ties[i].rank > top ? sc->ties[i].rank : top;
		}
		sc->tie_rank = top;
	}
}

static void drop_ties(hl_scan *sc) {
	sc->n_ties = 0;
	sc->tie_rank = UINT32_MAX;
}

/* Start and end a segment's scan (its rows may come in several ranges): ties wait per segment. */
static void scan_segment_begin(hl_scan *sc, const hl_segment *seg, int32_t segment) {
	sc->seg = seg;
	sc->segment = segment;
	sc->rank = sc->k > 0 ? seg->tie_rank : NULL;
	drop_ties(sc);
}

static void scan_segment_end(hl_scan *sc) {
	trim_ties(sc);
	for (int64_t i = 0; i < sc->n_ties; i++) {
		hits_push(sc->hits, sc->segment, sc->ties[i].row, sc->limit);
	}
	drop_ties(sc);
}

static void scan_free(hl_scan *sc) {
	free(sc->ties);
	sc->ties = NULL;
	sc->ties_capacity = 0;
}

static void scan_keep(hl_scan *sc, int64_t row, int32_t d) {
	if (!scan_candidate(sc, row, d) || (sc->seg->n_hidden && is_hidden(sc->seg, row))) {
		return;
	}
	if (!sc->k) {
		hits_push(sc->hits, sc->segment, row, d);
		return;
	}
	sc->counts[d]++;
	if (d == sc->limit && sc->rank) {
		if (sc->n_ties == sc->ties_capacity) {
			int64_t cap = sc->ties_capacity ? sc->ties_capacity * 2 : 64;
			hl_tie *grown = realloc(sc->ties, cap * sizeof(hl_tie));
			if (!grown) {
				sc->hits->failed = 1;
				return;
			}
			sc->ties = grown;
			sc->ties_capacity = cap;
		}
		sc->ties[sc->n_ties++] = (hl_tie) {row, sc->rank[row]};
		if (sc->n_ties >= 2 * (sc->k - sc->below) && sc->n_ties >= 32) {
			trim_ties(sc);
		}
		return;
	}
	hits_push(sc->hits, sc->segment, row, d);
	if (d < sc->limit) {
		sc->below++;
	}
	int32_t was = sc->limit;
	while (sc->limit > 0 && sc->below >= sc->k) {
		/* the rows at the limit drop out; those just below it become the new limit's rows */
		sc->limit--;
		sc->below -= sc->counts[sc->limit];
	}
	if (sc->limit != was) {
		drop_ties(sc); /* they were at the old limit */
	}
}

static void scan_scalar(hl_scan *sc) {
	const uint8_t *codes = sc->seg->codes;
	int cb = sc->code_bytes;
	if (cb == 8) {
		uint64_t q = load_word(sc->query, 8);
		for (int64_t r = sc->begin; r < sc->end; r++) {
			int32_t d = __builtin_popcountll(load_word(codes + r * 8, 8) ^ q);
			if (d <= sc->limit && scan_candidate(sc, r, d)) {
				scan_keep(sc, r, d);
			}
		}
		return;
	}
	if (cb == 16 || cb == 32) { /* whole words, unrolled by the compiler for each length */
		uint64_t q[4] = {0};
		memcpy(q, sc->query, cb);
		for (int64_t r = sc->begin; r < sc->end; r++) {
			const uint8_t *c = codes + r * cb;
			int32_t d = __builtin_popcountll(load_word(c, 8) ^ q[0]) + __builtin_popcountll(load_word(c + 8, 8) ^ q[1]);
			if (cb == 32) {
				d += __builtin_popcountll(load_word(c + 16, 8) ^ q[2]) + __builtin_popcountll(load_word(c + 24, 8) ^ q[3]);
			}
			if (d <= sc->limit && scan_candidate(sc, r, d)) {
				scan_keep(sc, r, d);
			}
		}
		return;
	}
	for (int64_t r = sc->begin; r < sc->end; r++) {
		int32_t d = distance(codes + r * cb, sc->query, cb);
		if (d <= sc->limit && scan_candidate(sc, r, d)) {
			scan_keep(sc, r, d);
		}
	}
}

/* the rest of a range after the vector loop, on the scalar kernel */
static void scan_tail(hl_scan *sc, int64_t from) {
	int64_t begin = sc->begin;
	sc->begin = from;
	scan_scalar(sc);
	sc->begin = begin;
}

#if defined(__x86_64__)
/* 64-bit codes, eight per 512-bit vector, 32 per iteration: rows past the limit (nearly all once the
 * limit has settled) cost one compare; rows at the limit, once ties are trimmed, one more (their
 * tie rank); the few others go through scan_keep. */
__attribute__((target("avx512f,avx512vpopcntdq"))) static inline __mmask8 candidates_64(const hl_scan *sc, int64_t r,
                                                                                        __m512i d, __m512i limit) {
	__mmask8 m = _mm512_cmple_epu64_mask(d, limit);
	if (m && sc->rank && sc->tie_rank != UINT32_MAX) {
		__m512i rank = _mm512_cvtepu32_epi64(_mm256_loadu_si256((const __m256i *)(sc->rank + r)));
		m &= _mm512_cmplt_epu64_mask(d, limit) | _mm512_cmple_epu64_mask(rank, _mm512_set1_epi64(sc->tie_rank));
	}
	return m;
}

__attribute__((target("avx512f,avx512vpopcntdq"))) static void scan_avx512_64(hl_scan *sc) {
	const uint64_t *codes = (const uint64_t *)sc->seg->codes;
	__m512i q = _mm512_set1_epi64((long long)load_word(sc->query, 8));
	int64_t r = sc->begin;
	while (r + 32 <= sc->end) {
		__m512i limit = _mm512_set1_epi64(sc->limit);
		__m512i d0 = _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(codes + r), q));
		__m512i d1 = _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(codes + r + 8), q));
		__m512i d2 = _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(codes + r + 16), q));
		__m512i d3 = _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(codes + r + 24), q));
		__mmask8 m0 = _mm512_cmple_epu64_mask(d0, limit), m1 = _mm512_cmple_epu64_mask(d1, limit);
		__mmask8 m2 = _mm512_cmple_epu64_mask(d2, limit), m3 = _mm512_cmple_epu64_mask(d3, limit);
		if ((m0 | m1 | m2 | m3) && sc->rank && sc->tie_rank != UINT32_MAX) {
			m0 = candidates_64(sc, r, d0, limit), m1 = candidates_64(sc, r + 8, d1, limit);
			m2 = candidates_64(sc, r + 16, d2, limit), m3 = candidates_64(sc, r + 24, d3, limit);
		}
		if (m0 | m1 | m2 | m3) {
			uint64_t d[32];
			_mm512_storeu_si512(d, d0);
			_mm512_storeu_si512(d + 8, d1);
			_mm512_storeu_si512(d + 16, d2);
			_mm512_storeu_si512(d + 24, d3);
			uint32_t mask = (uint32_t)m0 | ((uint32_t)m1 << 8) | ((uint32_t)m2 << 16) | ((uint32_t)m3 << 24);
			while (mask) {
				int lane = __builtin_ctz(mask);
				mask &= mask - 1;
				scan_keep(sc, r + lane, (int32_t)d[lane]); /* rechecks: the limit may have dropped within this block */
			}
		}
		r += 32;
	}
	scan_tail(sc, r);
}


/* 256-bit codes, two per 512-bit vector, eight per iteration. Each code's four word counts are summed
 * inside its 256-bit half (swap words within 128-bit lanes, add; swap 128-bit lanes, add), leaving
 * its distance in lanes 0 and 4. */
__attribute__((target("avx512f,avx512vpopcntdq"))) static inline __m512i distances_256(const uint64_t *codes,
                                                                                        __m512i q) {
	__m512i p = _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(codes), q));
	p = _mm512_add_epi64(p, _mm512_shuffle_epi32(p, _MM_PERM_BADC));
	return _mm512_add_epi64(p, _mm512_shuffle_i64x2(p, p, _MM_SHUFFLE(2, 3, 0, 1)));
}

__attribute__((target("avx512f,avx512vpopcntdq"))) static void scan_avx512_256(hl_scan *sc) {
	const uint64_t *codes = (const uint64_t *)sc->seg->codes;
	__m512i q = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)sc->query));
	int64_t r = sc->begin;
	while (r + 8 <= sc->end) {
		__m512i limit = _mm512_set1_epi64(sc->limit);
		__m512i d[4];
		uint32_t mask = 0;
		for (int j = 0; j < 4; j++) {
			d[j] = distances_256(codes + (r + 2 * j) * 4, q);
			mask |= (uint32_t)(_mm512_cmple_epu64_mask(d[j], limit) & 0x11) << (8 * j);
		}
		if (mask) {
			uint64_t lanes[32];
			for (int j = 0; j < 4; j++) {
				_mm512_storeu_si512(lanes + 8 * j, d[j]);
			}
			while (mask) {
				int bit = __builtin_ctz(mask);
				mask &= mask - 1;
				/* scan_keep rechecks: the limit may have dropped within this block */
				scan_keep(sc, r + 2 * (bit / 8) + (bit % 8) / 4, (int32_t)lanes[bit]);
			}
		}
		r += 8;
	}
	scan_tail(sc, r);
}
#endif

static void scan(hl_scan *sc) {
#if defined(__x86_64__)
	if (sc->code_bytes == 8 && has_avx512_popcount) {
		scan_avx512_64(sc);
		return;
	}
	if (sc->code_bytes == 32 && has_avx512_popcount) {
		scan_avx512_256(sc);
		return;
	}
#endif
	scan_scalar(sc);
}

/* ---- how many threads: the cores this process may use -----------------------------------------
 * Not the cores the machine has (_SC_NPROCESSORS_ONLN): in a container or under taskset a process
 * gets fewer, and splitting a scan into more parts than it can run at once only adds hand-offs. The
 * count is the smaller of the CPU affinity mask and the cgroup CPU quota (v2 cpu.max, v1
 * cpu.cfs_quota_us / cpu.cfs_period_us, the tightest along the cgroup's ancestors), rounded up. */
#include <sched.h>

/* cpus granted by the quota file(s) of one cgroup directory, or 0 when it sets none */
static double quota_in(const char *dir, int v2) {
	char path[4352];
	double cpus = 0;
	if (v2) {
		snprintf(path, sizeof(path), "%s/cpu.max", dir);
		FILE *f = fopen(path, "r");
		if (f) {
			char quota[32];
			double period;
			if (fscanf(f, "%31s %lf", quota, &period) == 2 && strcmp(quota, "max") != 0 && period > 0) {
				cpus = atof(quota) / period;
			}
			fclose(f);
		}
		return cpus;
	}
	long long quota = -1, period = 0;
	snprintf(path, sizeof(path), "%s/cpu.cfs_quota_us", dir);
	FILE *f = fopen(path, "r");
	if (f) {
		if (fscanf(f, "%lld", &quota) != 1) {
			quota = -1;
		}
		fclose(f);
	}
	snprintf(path, sizeof(path), "%s/cpu.cfs_period_us", dir);
	f = fopen(path, "r");
	if (f) {
		if (fscanf(f, "%lld", &period) != 1) {
			period = 0;
		}
		fclose(f);
	}
	return quota > 0 && period > 0 ? (double)quota / (double)period : 0;
}

/* whether a comma-separated option list holds `name` as one of its items */
static int has_option(const char *list, const char *name) {
	size_t n = strlen(name);
	for (const char *p = list; p && *p;) {
		const char *end = strchr(p, ',');
		size_t len = end ? (size_t)(end - p) : strlen(p);
		if (len == n && strncmp(p, name, n) == 0) {
			return 1;
		}
		p = end ? end + 1 : NULL;
	}
	return 0;
}

/* The tightest quota (in cpus) over the cgroup of this process and its ancestors, v2 and v1 alike;
 * 0 when none is set. `root` prefixes every path read ("" for the real files; a test's fake tree). */
__attribute__((visibility("default"))) double hashlake_cgroup_cpus(const char *root) {
	char path[4096], line[4096];
	char v2_path[2048] = "", v1_path[2048] = "";
	int has_v2 = 0, has_v1 = 0;
	snprintf(path, sizeof(path), "%s/proc/self/cgroup", root);
	FILE *f = fopen(path, "r");
	if (!f) {
		return 0;
	}
	while (fgets(line, sizeof(line), f)) { /* "id:controllers:path" */
		line[strcspn(line, "\n")] = 0;
		char *first = strchr(line, ':'), *second = first ? strchr(first + 1, ':') : NULL;
		if (!second) {
			continue;
		}
		*second = 0;
		if (strcmp(line, "0:") == 0) { /* v2: "0::path" */
			snprintf(v2_path, sizeof(v2_path), "%s", second + 1);
			has_v2 = 1;
		} else if (has_option(first + 1, "cpu")) {
			snprintf(v1_path, sizeof(v1_path), "%s", second + 1);
			has_v1 = 1;
		}
	}
	fclose(f);
	snprintf(path, sizeof(path), "%s/proc/self/mountinfo", root);
	f = fopen(path, "r");
	if (!f) {
		return 0;
	}
	double best = 0;
	while (fgets(line, sizeof(line), f)) {
		/* "id parent major:minor root mountpoint options [optional...] - fstype source superoptions" */
		char mount_root[1024], mount_point[1024], fstype[64], source[256], super[1024] = "";
		const char *dash = strstr(line, " - ");
		if (!dash || sscanf(line, "%*s %*s %*s %1023s %1023s", mount_root, mount_point) != 2 ||
		    sscanf(dash + 3, "%63s %255s %1023s", fstype, source, super) < 2) {
			continue;
		}
		int v2 = strcmp(fstype, "cgroup2") == 0;
		if (!(v2 ? has_v2 : strcmp(fstype, "cgroup") == 0 && has_v1 && has_option(super, "cpu"))) {
			continue;
		}
		/* the cgroup's directory: its path relative to the mount's root, under the mount point */
		const char *cg = v2 ? v2_path : v1_path;
		size_t root_len = strcmp(mount_root, "/") == 0 ? 0 : strlen(mount_root);
		if (root_len && strncmp(cg, mount_root, root_len) != 0) {
			continue; /* this process's cgroup lies outside what is mounted here */
		}
		char dir[4096];
		snprintf(dir, sizeof(dir), "%s%s%s", root, mount_point, cg + root_len);
		size_t floor = strlen(root) + strlen(mount_point);
		for (;;) { /* the cgroup, then each ancestor up to the mount point */
			double cpus = quota_in(dir, v2);
			if (cpus > 0 && (best == 0 || cpus < best)) {
				best = cpus;
			}
			char *slash = strrchr(dir, '/');
			if (!slash || (size_t)(slash - dir) < floor) {
				break;
			}
			*slash = 0;
		}
	}
	fclose(f);
	return best;
}

static int cpu_count = 1;
static pthread_once_t cpu_count_once = PTHREAD_ONCE_INIT;

static void count_cpus(void) {
	int cpus = 0;
	cpu_set_t set;
	if (sched_getaffinity(0, sizeof(set), &set) == 0) {
		cpus = CPU_COUNT(&set);
	}
	if (cpus < 1) {
		long online = sysconf(_SC_NPROCESSORS_ONLN);
		cpus = online < 1 ? 1 : (int)online;
	}
	double quota = hashlake_cgroup_cpus("");
	if (quota > 0 && quota < cpus) {
		int granted = (int)quota;
		cpus = granted < quota ? granted + 1 : granted; /* 1.5 cpus: two threads, each busy 3/4 of the time */
	}
	cpu_count = cpus < 1 ? 1 : cpus > HL_MAX_THREADS ? HL_MAX_THREADS : cpus;
}

/* threads a query's scan and a report are split over */
__attribute__((visibility("default"))) int32_t hashlake_threads(void) {
	pthread_once(&cpu_count_once, count_cpus);
	return cpu_count;
}

/* ---- a pool of threads that never makes the caller wait for one to start -------------------------
 * A job is a number of tasks; the caller runs tasks itself and the pool's threads (one per other core,
 * started once) take tasks when they get a core. The caller then waits only for tasks already
 * running: on a loaded machine a thread that has not been scheduled yet costs nothing, whereas
 * joining a freshly created thread cost up to a scheduler slice (measured: 0.5 ms queries taking
 * 5-15 ms at load 3 on 2 cores). A job is freed by whoever drops its last reference. */
typedef struct hl_job {
	void (*run)(void *ctx, int64_t task);
	void *ctx;
	int64_t tasks;
	atomic_llong next; /* next task to claim */
	atomic_llong done; /* tasks finished */
	atomic_int refs;
	pthread_mutex_t lock;
	pthread_cond_t finished;
	struct hl_job *queue_next;
} hl_job;

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_work = PTHREAD_COND_INITIALIZER;
static hl_job *pool_queue = NULL;
static atomic_int pool_queued; /* jobs queued: read without the lock while spinning */

/* Waking a sleeping thread took ~50-100 us here, a fifth of a million-code scan. A query from Python
 * comes every ~0.5-1 ms in a loop: a pool thread that sleeps between them pays that wake on every
 * query (at 0.2 ms of spin it was asleep for most: 1M 256-bit codes, scan 0.65-0.82 ms, ratio to
 * faiss 0.96/0.65/0.90 in three runs; at 3 ms of spin 0.46-0.77 ms, 0.78/0.64/0.82). So a pool
 * thread that has just worked on a job spins SPIN_NS for the next one, but only while jobs come
 * back to back (the last two arrived less than SPIN_NS apart); after a lone query it spins only
 * SPIN_BRIEF_NS (which still catches the next chunk of a batch), and a thread woken for a job that
 * others have already taken goes straight back to sleep. When no query comes, nothing spins: the
 * most a stream of queries leaves behind is SPIN_NS of one core per pool thread after its last one.
 * A caller waiting for the last parts of its own job spins SPIN_BRIEF_NS before sleeping: a part
 * takes ~10-50 us, and on a loaded machine a longer spin would hold the core the part needs. */
#define SPIN_NS 3000000.0
#define SPIN_BRIEF_NS 100000.0

static double now_ns(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static void cpu_relax(void) {
#if defined(__x86_64__)
	__builtin_ia32_pause();
#endif
}
static int pool_threads = 0; /* started so far */
static _Atomic double last_job_ns = -1e18; /* when the last job was queued */
static _Atomic double job_gap_ns = 1e18;   /* between the last two jobs */
static atomic_llong spin_rounds;           /* spins started by pool threads: for tests of idleness */

static void job_release(hl_job *job) {
	if (atomic_fetch_sub(&job->refs, 1) == 1) {
		pthread_mutex_destroy(&job->lock);
		pthread_cond_destroy(&job->finished);
		free(job);
	}
}

/* claim and run tasks until none is left; returns how many this thread ran */
static int64_t job_work(hl_job *job) {
	int64_t ran = 0;
	for (;;) {
		int64_t task = atomic_fetch_add(&job->next, 1);
		if (task >= job->tasks) {
			return ran;
		}
		job->run(job->ctx, task);
		ran++;
		if (atomic_fetch_add(&job->done, 1) + 1 == job->tasks) {
			pthread_mutex_lock(&job->lock);
			pthread_cond_broadcast(&job->finished);
			pthread_mutex_unlock(&job->lock);
		}
	}
}

static void *pool_thread(void *arg) {
	(void)arg;
	int worked = 0; /* whether this thread ran a task since it last slept */
	pthread_mutex_lock(&pool_lock);
	for (;;) {
		if (!pool_queue && worked) {
			double window = atomic_load(&job_gap_ns) < SPIN_NS ? SPIN_NS : SPIN_BRIEF_NS;
			pthread_mutex_unlock(&pool_lock);
			atomic_fetch_add(&spin_rounds, 1);
			for (double until = now_ns() + window; !atomic_load(&pool_queued) && now_ns() < until;) {
				cpu_relax();
			}
			pthread_mutex_lock(&pool_lock);
		}
		worked = 0;
		while (!pool_queue) {
			pthread_cond_wait(&pool_work, &pool_lock);
		}
		hl_job *job = pool_queue;
		if (atomic_load(&job->next) >= job->tasks) { /* exhausted: drop it from the queue */
			pool_queue = job->queue_next;
			atomic_fetch_sub(&pool_queued, 1);
			continue;
		}
		atomic_fetch_add(&job->refs, 1);
		pthread_mutex_unlock(&pool_lock);
		worked = job_work(job) > 0;
		job_release(job);
		pthread_mutex_lock(&pool_lock);
	}
	return NULL;
}

/* Python side, for tests: how many spins pool threads have started (a pool at rest starts none). */
__attribute__((visibility("default"))) int64_t hashlake_pool_spins(void) {
	return atomic_load(&spin_rounds);
}

/* Run tasks 0..tasks-1 of `run` on the caller and the pool; returns when every task has finished. */
static void pool_run(void (*run)(void *, int64_t), void *ctx, int64_t tasks) {
	int threads = hashlake_threads();
	hl_job *job = tasks > 1 && threads > 1 ? calloc(1, sizeof(hl_job)) : NULL;
	if (!job) { /* one task, one core, or no memory: all here */
		for (int64_t t = 0; t < tasks; t++) {
			run(ctx, t);
		}
		return;
	}
	job->run = run;
	job->ctx = ctx;
	job->tasks = tasks;
	atomic_init(&job->refs, 1);
	pthread_mutex_init(&job->lock, NULL);
	pthread_cond_init(&job->finished, NULL);
	double now = now_ns();
	atomic_store(&job_gap_ns, now - atomic_exchange(&last_job_ns, now));
	pthread_mutex_lock(&pool_lock);
	while (pool_threads < threads - 1) {
		pthread_t tid;
		if (pthread_create(&tid, NULL, pool_thread, NULL) != 0) {
			break; /* fewer helpers: the caller does more of the work */
		}
		pthread_detach(tid);
		pool_threads++;
	}
	hl_job **tail = &pool_queue;
	while (*tail) {
		tail = &(*tail)->queue_next;
	}
	*tail = job;
	atomic_fetch_add(&pool_queued, 1);
	/* wake no more sleepers than there are tasks besides the caller's own */
	for (int64_t woken = 0; woken < tasks - 1 && woken < pool_threads; woken++) {
		pthread_cond_signal(&pool_work);
	}
	pthread_mutex_unlock(&pool_lock);
	job_work(job);
	for (double until = now_ns() + SPIN_BRIEF_NS; atomic_load(&job->done) < job->tasks && now_ns() < until;) {
		cpu_relax();
	}
	pthread_mutex_lock(&job->lock);
	while (atomic_load(&job->done) < job->tasks) {
		pthread_cond_wait(&job->finished, &job->lock);
	}
	pthread_mutex_unlock(&job->lock);
	pthread_mutex_lock(&pool_lock); /* it may still be queued if no pool thread looked at it */
	for (hl_job **p = &pool_queue; *p; p = &(*p)->queue_next) {
		if (*p == job) {
			*p = job->queue_next;
			atomic_fetch_sub(&pool_queued, 1);
			break;
		}
	}
	pthread_mutex_unlock(&pool_lock);
	job_release(job);
}
/* ---- flat search over a snapshot, split into row ranges --------------------------------------- */
typedef struct {
	const hl_snapshot *snap;
	const uint8_t *query;
	int64_t k;
	int32_t limit;
	int64_t rows; /* in all segments together */
	int64_t parts;
	hl_hits *hits; /* per part */
} hl_flat;

static void run_part(void *ctx, int64_t part) {
	hl_flat *f = ctx;
	const hl_snapshot *snap = f->snap;
	int64_t first_row = f->rows * part / f->parts, last_row = f->rows * (part + 1) / f->parts;
	int64_t counts[HL_MAX_BYTES * 8 + 2];
	memset(counts, 0, sizeof(counts));
	hl_scan sc = {.query = f->query, .code_bytes = snap->code_bytes, .k = f->k, .limit = f->limit,
	              .counts = counts, .hits = &f->hits[part]};
	int64_t base = 0;
	for (int32_t s = 0; s < snap->n_segments; s++) {
		const hl_segment *seg = &snap->segments[s];
		int64_t begin = first_row - base, end = last_row - base;
		begin = begin < 0 ? 0 : begin;
		end = end > seg->rows ? seg->rows : end;
		if (begin < end) {
			scan_segment_begin(&sc, seg, s);
			sc.begin = begin;
			sc.end = end;
			scan(&sc);
			scan_segment_end(&sc);
		}
		base += seg->rows;
	}
	scan_free(&sc);
}

static int64_t total_rows(const hl_snapshot *snap) {
	int64_t n = 0;
	for (int32_t s = 0; s < snap->n_segments; s++) {
		n += snap->segments[s].rows;
	}
	return n;
}

/* Below this many codes a part's hand-off costs more than the scan it saves; a few parts per core
 * let the cores that got scheduled take more of them. */
#define ROWS_PER_PART (1 << 16)
#define PARTS_PER_CORE 4
#define MAX_PARTS 256

static double flat_ns_per_byte = 0.1; /* measured: a running average over recent flat scans */

/* Every visible row with distance <= limit (k == 0), or every row that can be among the first k:
 * each part keeps what its own rows require (a superset); the caller sorts and cuts. */
static void flat_search(const hl_snapshot *snap, const uint8_t *query, int64_t k, int32_t limit, int threads,
                        hl_hits *out) {
	int64_t n = total_rows(snap);
	int64_t parts = threads > 1 ? n / ROWS_PER_PART : 1;
	parts = parts < 1 ? 1 : parts > (int64_t)threads * PARTS_PER_CORE ? (int64_t)threads * PARTS_PER_CORE : parts;
	parts = parts > MAX_PARTS ? MAX_PARTS : parts;
	hl_hits hits[MAX_PARTS];
	memset(hits, 0, sizeof(hl_hits) * parts);
	hl_flat f = {.snap = snap, .query = query, .k = k, .limit = limit, .rows = n, .parts = parts, .hits = hits};
	double start = now_ns();
	pool_run(run_part, &f, parts);
	if (n >= ROWS_PER_PART) { /* ns per byte on one core: the wall time times the cores it ran on */
		double per_byte = (now_ns() - start) * (parts < threads ? parts : threads) / ((double)n * snap->code_bytes);
		flat_ns_per_byte = 0.8 * flat_ns_per_byte + 0.2 * per_byte; /* a race here only blurs an estimate */
	}
	for (int64_t p = 0; p < parts; p++) {
		for (int64_t i = 0; i < hits[p].size; i++) {
			hl_hit *h = &hits[p].items[i];
			hits_push(out, h->segment, h->row, h->distance);
		}
		out->failed |= hits[p].failed;
		hits_free(&hits[p]);
	}
}

/* Python side, for tests of exactness: pin the method the cost model would choose (0 auto, 1 always
 * multi-index hashing, 2 always the flat scan). Every answer must be the same whichever runs. */
static int forced_method = 0;

__attribute__((visibility("default"))) void hashlake_force_method(int32_t method) {
	forced_method = method;
}

/* ---- multi-index hashing ------------------------------------------------------------------------ */
/* Cost model (ns, this machine): one probed bucket, one verified candidate. */
#define PROBE_NS 8.0
#define CANDIDATE_NS 6.0
#define MIH_BUDGET 0.5 /* of the flat scan's estimated cost, before k-NN gives up on probing */
#define MIH_QUICK_BUDGET 0.03 /* when the radius profile says the k-th row lies far: near duplicates only */

static double binomial(int n, int r) {
	if (r < 0 || r > n) {
		return 0;
	}
	double c = 1;
	for (int i = 1; i <= r; i++) {
		c = c * (n - r + i) / i;
	}
	return c;
}

/* the substring of bits [start, start+len) of a code (bit 0 = MSB of byte 0), first bit most significant */
static uint64_t substring(const uint8_t *code, int start, int len) {
	uint64_t v = 0;
	for (int b = start; b < start + len; b++) {
		v = (v << 1) | ((code[b >> 3] >> (7 - (b & 7))) & 1);
	}
	return v;
}

/* Largest shell each table must be probed to for a radius (Norouzi et al., section 4): with
 * radius = m*s + a, one of the first a+1 substrings is within s, or one of the others within s-1. */
static int shell_limit(const hl_segment *seg, int t, int radius) {
	int s = radius / seg->tables, a = radius % seg->tables;
	int limit = t <= a ? s : s - 1;
	return limit > seg->key_bits[t] ? seg->key_bits[t] : limit;
}

/* Set of rows already verified, per segment: open addressing, grows at half full. */
typedef struct {
	int64_t *slots;
	int64_t capacity, size;
} hl_seen;

static int seen_add(hl_seen *s, int64_t row) {
	if (2 * (s->size + 1) > s->capacity) {
		int64_t cap = s->capacity ? s->capacity * 2 : 1024;
		int64_t *slots = malloc(cap * sizeof(int64_t));
		if (!slots) {
			return -1;
		}
		memset(slots, 0xff, cap * sizeof(int64_t));
		for (int64_t i = 0; i < s->capacity; i++) {
			if (s->slots[i] >= 0) {
				uint64_t h = (uint64_t)s->slots[i] * 0x9E3779B97F4A7C15ull & (cap - 1);
				while (slots[h] >= 0) {
					h = (h + 1) & (cap - 1);
				}
				slots[h] = s->slots[i];
			}
		}
		free(s->slots);
		s->slots = slots;
		s->capacity = cap;
	}
	uint64_t h = (uint64_t)row * 0x9E3779B97F4A7C15ull & (s->capacity - 1);
	while (s->slots[h] >= 0) {
		if (s->slots[h] == row) {
			return 0;
		}
		h = (h + 1) & (s->capacity - 1);
	}
	s->slots[h] = row;
	s->size++;
	return 1;
}

typedef struct {
	const hl_snapshot *snap;
	const uint8_t *query;
	uint64_t keys[64][HL_MAX_TABLES]; /* per segment: the query's key in each table */
	int shells[64][HL_MAX_TABLES]; /* per segment and table: the largest shell probed (-1: none) */
	hl_seen seen[64];
	hl_hits found; /* every verified visible row */
	int64_t candidates, max_candidates; /* rows looked at so far, and the most k-NN may look at */
} hl_probe;

#define MIH_MAX_SEGMENTS 64

static double probe_cost(const hl_probe *pr, int radius) {
	double cost = 0;
	for (int32_t s = 0; s < pr->snap->n_segments; s++) {
		const hl_segment *seg = &pr->snap->segments[s];
		if (!seg->tables) {
			continue;
		}
		for (int t = 0; t < seg->tables; t++) {
			double per_bucket = (double)seg->rows / (double)(1ull << seg->key_bits[t]);
			for (int shell = pr->shells[s][t] + 1; shell <= shell_limit(seg, t, radius); shell++) {
				/* the query's own bucket is known exactly: repeated codes make it hold most rows */
				const int32_t *offsets = seg->table_offsets[t];
				uint64_t key = pr->keys[s][t];
				double candidates = shell == 0 ? (double)(offsets[key + 1] - offsets[key])
				                               : binomial(seg->key_bits[t], shell) * per_bucket;
				cost += binomial(seg->key_bits[t], shell) * PROBE_NS + CANDIDATE_NS * candidates;
			}
		}
	}
	return cost;
}

/* 0 ok, 1 over the candidate budget (k-NN then scans instead), -1 out of memory */
static int probe_bucket(hl_probe *pr, int32_t s, int t, uint64_t key) {
	const hl_segment *seg = &pr->snap->segments[s];
	const int32_t *offsets = seg->table_offsets[t];
	pr->candidates += offsets[key + 1] - offsets[key];
	if (pr->candidates > pr->max_candidates) {
		return 1;
	}
	for (int32_t i = offsets[key]; i < offsets[key + 1]; i++) {
		int64_t row = seg->table_rows[t][i];
		int added = seen_add(&pr->seen[s], row);
		if (added < 0) {
			return -1;
		}
		if (added && !(seg->n_hidden && is_hidden(seg, row))) {
			hits_push(&pr->found, s, row, distance(seg->codes + row * pr->snap->code_bytes, pr->query,
			                                       pr->snap->code_bytes));
		}
	}
	return 0;
}

/* every key at exactly `shell` bits from `key` in a table of `bits`-bit keys: flip each combination */
static int probe_shell(hl_probe *pr, int32_t s, int t, int shell) {
	const hl_segment *seg = &pr->snap->segments[s];
	int bits = seg->key_bits[t];
	uint64_t key = pr->keys[s][t];
	if (shell == 0) {
		return probe_bucket(pr, s, t, key);
	}
	int pos[64];
	for (int i = 0; i < shell; i++) {
		pos[i] = i;
	}
	for (;;) {
		uint64_t mask = 0;
		for (int i = 0; i < shell; i++) {
			mask |= 1ull << pos[i];
		}
		int status = probe_bucket(pr, s, t, key ^ mask);
		if (status) {
			return status;
		}
		int i = shell - 1;
		while (i >= 0 && pos[i] == bits - shell + i) {
			i--;
		}
		if (i < 0) {
			return 0;
		}
		pos[i]++;
		for (int j = i + 1; j < shell; j++) {
			pos[j] = pos[j - 1] + 1;
		}
	}
}

static int probe_start(hl_probe *pr, const hl_snapshot *snap, const uint8_t *query) {
	memset(pr, 0, sizeof(*pr));
	pr->max_candidates = INT64_MAX;
	pr->snap = snap;
	pr->query = query;
	for (int32_t s = 0; s < snap->n_segments; s++) {
		const hl_segment *seg = &snap->segments[s];
		for (int t = 0; t < seg->tables; t++) {
			pr->keys[s][t] = substring(query, seg->starts[t], seg->key_bits[t]);
			pr->shells[s][t] = -1;
		}
		if (!seg->tables) { /* a small segment: every row, at once */
			for (int64_t r = 0; r < seg->rows; r++) {
				if (!(seg->n_hidden && is_hidden(seg, r))) {
					hits_push(&pr->found, s, r, distance(seg->codes + r * snap->code_bytes, query, snap->code_bytes));
				}
			}
		}
	}
	return pr->found.failed ? -1 : 0;
}

static int probe_extend(hl_probe *pr, int radius) {
	for (int32_t s = 0; s < pr->snap->n_segments; s++) {
		const hl_segment *seg = &pr->snap->segments[s];
		for (int t = 0; t < seg->tables; t++) {
			int limit = shell_limit(seg, t, radius);
			while (pr->shells[s][t] < limit) {
				pr->shells[s][t]++;
				int status = probe_shell(pr, s, t, pr->shells[s][t]);
				if (status) {
					return status;
				}
			}
		}
	}
	return pr->found.failed ? -1 : 0;
}

static void probe_free(hl_probe *pr) {
	for (int32_t s = 0; s < pr->snap->n_segments; s++) {
		free(pr->seen[s].slots);
	}
	hits_free(&pr->found);
}

/* ns the flat scan is expected to take on `threads` threads */
static double flat_cost(const hl_snapshot *snap, int threads) {
	return (double)total_rows(snap) * snap->code_bytes * flat_ns_per_byte / threads;
}

static int has_tables(const hl_snapshot *snap) {
	for (int32_t s = 0; s < snap->n_segments; s++) {
		if (snap->segments[s].tables) {
			return 1;
		}
	}
	return 0;
}

/* the smallest radius holding k rows by the segments' radius profiles */
static int expected_radius(const hl_snapshot *snap, int64_t k) {
	int bits = snap->code_bytes * 8;
	for (int r = 0; r <= bits; r++) {
		double rows = 0;
		for (int32_t s = 0; s < snap->n_segments; s++) {
			const hl_segment *seg = &snap->segments[s];
			if (seg->radius_profile) {
				rows += seg->rows * seg->radius_profile[r];
			}
		}
		if (rows >= k) {
			return r;
		}
	}
	return bits;
}

static int64_t count_within(const hl_hits *h, int radius) {
	int64_t n = 0;
	for (int64_t i = 0; i < h->size; i++) {
		n += h->items[i].distance <= radius;
	}
	return n;
}

/* k-NN by growing the radius until k visible rows lie within it. 1: done (out holds every row
 * within the final radius), 0: over budget (use the flat scan), -1: out of memory. */
static int mih_knn(const hl_snapshot *snap, const uint8_t *query, int64_t k, int threads, hl_hits *out) {
	if (!has_tables(snap) || snap->n_segments > MIH_MAX_SEGMENTS) {
		return 0;
	}
	double start = now_ns(), budget = MIH_BUDGET * flat_cost(snap, threads);
	hl_probe *pr = malloc(sizeof(hl_probe));
	if (!pr || probe_start(pr, snap, query) < 0) {
		if (pr) {
			probe_free(pr);
		}
		free(pr);
		return -1;
	}
	if (forced_method == 1) {
		budget = 1e300;
	} else if (probe_cost(pr, expected_radius(snap, k)) > budget) {
		budget *= MIH_QUICK_BUDGET / MIH_BUDGET;
	}
	if (forced_method != 1) { /* never verify more rows than the scan would cost */
		pr->max_candidates = (int64_t)(budget / CANDIDATE_NS);
	}
	int bits = snap->code_bytes * 8, status = 0;
	for (int radius = 0; radius <= bits; radius++) {
		if (now_ns() - start + probe_cost(pr, radius) > budget) {
			break;
		}
		int extended = probe_extend(pr, radius);
		if (extended) {
			status = extended < 0 ? -1 : 0;
			break;
		}
		if (count_within(&pr->found, radius) >= k || radius == bits) {
			for (int64_t i = 0; i < pr->found.size; i++) {
				if (pr->found.items[i].distance <= radius) {
					hl_hit *h = &pr->found.items[i];
					hits_push(out, h->segment, h->row, h->distance);
				}
			}
			status = out->failed ? -1 : 1;
			break;
		}
	}
	probe_free(pr);
	free(pr);
	return status;
}

/* radius search by probing, when that is estimated cheaper than the scan: 1 done, 0 not chosen, -1 OOM */
static int mih_within(const hl_snapshot *snap, const uint8_t *query, int radius, int threads, hl_hits *out) {
	if (!has_tables(snap) || snap->n_segments > MIH_MAX_SEGMENTS) {
		return 0;
	}
	hl_probe *pr = malloc(sizeof(hl_probe));
	if (!pr || probe_start(pr, snap, query) < 0) {
		if (pr) {
			probe_free(pr);
		}
		free(pr);
		return -1;
	}
	int status = 0;
	if (forced_method == 1 || probe_cost(pr, radius) <= flat_cost(snap, threads)) {
		status = probe_extend(pr, radius) < 0 ? -1 : 1;
		for (int64_t i = 0; status == 1 && i < pr->found.size; i++) {
			if (pr->found.items[i].distance <= radius) {
				hits_push(out, pr->found.items[i].segment, pr->found.items[i].row, pr->found.items[i].distance);
			}
		}
		status = status == 1 && out->failed ? -1 : status;
	}
	probe_free(pr);
	free(pr);
	return status;
}

/* ---- one query ---------------------------------------------------------------------------------- */
/* Fills `out` with the answer in tie-rule order (knn: at most k rows). 0 ok, -1 out of memory. */
/* Multi-index hashing when the cost model picks it: 1 answered, 0 the flat scan must answer, -1 OOM. */
static int try_mih(const hl_snapshot *snap, const uint8_t *query, int64_t k, int32_t radius, int threads,
                   hl_hits *out) {
	if (forced_method == 2) {
		return 0;
	}
	return k > 0 ? mih_knn(snap, query, k, threads, out) : mih_within(snap, query, radius, threads, out);
}

/* the answer in tie-rule order, cut to k rows for k-NN; 0 ok, -1 OOM */
static int finish(const hl_snapshot *snap, int64_t k, hl_hits *out) {
	if (out->failed) {
		return -1;
	}
	if (k > 0 && out->size > k) {
		/* the scan keeps a superset (hundreds to thousands of rows): cut it to the k-th row's distance
		 * by a count per distance, so that the tie rule's string comparisons sort ~k rows, not all */
		int64_t counts[HL_MAX_BYTES * 8 + 2] = {0};
		for (int64_t i = 0; i < out->size; i++) {
			counts[out->items[i].distance]++;
		}
		int32_t cut = 0;
		for (int64_t below = 0; (below += counts[cut]) < k; cut++) {
		}
		int64_t kept = 0;
		for (int64_t i = 0; i < out->size; i++) {
			if (out->items[i].distance <= cut) {
				out->items[kept++] = out->items[i];
			}
		}
		out->size = kept;
	}
	qsort_r(out->items, out->size, sizeof(hl_hit), compare_hits, (void *)snap);
	if (k > 0 && out->size > k) {
		out->size = k;
	}
	return 0;
}

/* the largest distance a flat scan keeps at first: everything for k-NN, the radius for within */
static int32_t start_limit(const hl_snapshot *snap, int64_t k, int32_t radius) {
	int bits = snap->code_bytes * 8;
	return k > 0 ? bits : (radius > bits ? bits : radius);
}

/* Fills `out` with the answer to one query (knn: k > 0; within: k == 0 and the radius), its scan
 * split over `threads`. 0 ok, -1 out of memory. */
static int answer(const hl_snapshot *snap, const uint8_t *query, int64_t k, int32_t radius, int threads,
                  hl_hits *out) {
	radius = start_limit(snap, 0, radius);
	int status = try_mih(snap, query, k, radius, threads, out);
	if (status < 0) {
		return -1;
	}
	if (status == 0) {
		flat_search(snap, query, k, start_limit(snap, k, radius), threads, out);
	}
	return finish(snap, k, out);
}

/* Flat scans of several queries read each block of codes once for all of them: a batch then costs
 * one pass over memory per group of queries instead of one per query (measured: 10M 256-bit codes,
 * 1,000 queries, per-query passes were bandwidth-bound at 1.8x faiss's blocked scan). */
#define GROUP_QUERIES 16
#define BLOCK_BYTES (128 * 1024)

static void flat_group(const hl_snapshot *snap, const uint8_t **queries, const int64_t *ks, const int32_t *limits,
                       int m, hl_hits **outs) {
	int64_t (*counts)[HL_MAX_BYTES * 8 + 2] = calloc(m, sizeof(*counts));
	hl_scan sc[GROUP_QUERIES];
	if (!counts) {
		for (int j = 0; j < m; j++) {
			outs[j]->failed = 1;
		}
		return;
	}
	for (int j = 0; j < m; j++) {
		sc[j] = (hl_scan) {.query = queries[j], .code_bytes = snap->code_bytes, .k = ks[j], .limit = limits[j],
		                   .counts = counts[j], .hits = outs[j]};
	}
	int64_t block = BLOCK_BYTES / snap->code_bytes;
	for (int32_t s = 0; s < snap->n_segments; s++) {
		const hl_segment *seg = &snap->segments[s];
		for (int j = 0; j < m; j++) {
			scan_segment_begin(&sc[j], seg, s);
		}
		for (int64_t begin = 0; begin < seg->rows; begin += block) {
			int64_t end = begin + block < seg->rows ? begin + block : seg->rows;
			for (int j = 0; j < m; j++) {
				sc[j].begin = begin;
				sc[j].end = end;
				scan(&sc[j]);
			}
		}
		for (int j = 0; j < m; j++) {
			scan_segment_end(&sc[j]);
		}
	}
	for (int j = 0; j < m; j++) {
		scan_free(&sc[j]);
	}
	free(counts);
}

/* ---- offline retrieval reports: histograms per Hamming distance --------------------------------
 * For each query code, over every database code: how many lie at each distance, and how many of
 * those are relevant (share a label with the query). From these two histograms the tie-expected
 * mAP@ALL, mAP@k and precision@k, precision within a radius and the precision-recall curve follow
 * exactly (hashlake/report.py); one pass, no sort.
 *
 * Ranked with ties broken by database order (hashing_models.evaluate's stable rule), a relevant
 * item's rank and precision also depend on the items before it in its own tie group, which the
 * histograms do not say; an optional second pass gives them exactly: once the first pass has fixed
 * how many items (and relevant items) lie strictly closer, the item at distance d that is the p-th
 * of its group (the j-th relevant one) has rank closer_all[d] + p and precision
 * (closer_rel[d] + j) / rank. Still O(N) per query, no sort.
 *
 * Labels: label_words > 0: multi-hot bitmasks of label_words uint64 per item (bit c = label c),
 * relevant = any bit in common; label_words == 0: one int64 class id per item, relevant = equal ids
 * (single-label data with any number of classes).
 *
 * Work: queries in tasks of REPORT_TASK_QUERIES, split over the pool; each task reads the database
 * in blocks that stay in L2 while all its queries pass over them, a few queries at a time in the
 * inner loop (each with its own histogram, so consecutive increments hit different counters). */
#define REPORT_TASK_QUERIES 64
#define REPORT_GROUP 4           /* queries sharing one load of a database item */
#define REPORT_BLOCK_ITEMS 4096 /* 4096 x (8-byte code + 8-byte labels) = 64 KB */
#define REPORT_MAX_KS 16

typedef struct {
	int32_t code_bytes, label_words, n_ks;
	int64_t n_queries, n_db;
	const uint8_t *q_codes, *db_codes;
	const uint64_t *q_labels, *db_labels;
	const int64_t *ks;
	int64_t *hist_all, *hist_rel; /* (Q, bits + 1) */
	double *ap_sum;               /* (Q,) stable: Σ precision over relevant items; NULL: no second pass */
	double *ap_at_sum;            /* (Q, n_ks) stable: Σ precision over relevant items ranked <= k */
	int64_t *hits_at;             /* (Q, n_ks) stable: relevant items ranked <= k */
	atomic_int failed;
} hl_report;

static inline int report_relevant(const hl_report *r, const uint64_t *ql, int64_t item) {
	if (r->label_words == 0) {
		return ql[0] == r->db_labels[item];
	}
	const uint64_t *dl = r->db_labels + item * r->label_words;
	uint64_t any = 0;
	for (int w = 0; w < r->label_words; w++) {
		any |= ql[w] & dl[w];
	}
	return any != 0;
}

static inline int32_t report_distance(const hl_report *r, const uint8_t *q, int64_t item) {
	if (r->code_bytes == 8) {
		return __builtin_popcountll(load_word(q, 8) ^ load_word(r->db_codes + item * 8, 8));
	}
	return distance(r->db_codes + item * r->code_bytes, q, r->code_bytes);
}

#if defined(__x86_64__)
/* 64-bit codes, one label word or class id: distances and relevance of 8 items per vector for two
 * queries at once, then the counters, alternating between the two queries' histograms so that
 * consecutive increments never wait on each other. */
__attribute__((target("avx512f,avx512vpopcntdq"))) static void report_count_avx512(
    const hl_report *r, int64_t q0, int64_t begin, int64_t end, int32_t (*counts)[2 * (HL_MAX_BYTES * 8 + 1)]) {
	const uint64_t *codes = (const uint64_t *)r->db_codes, *labels = r->db_labels;
	__m512i qa = _mm512_set1_epi64((long long)load_word(r->q_codes + q0 * 8, 8));
	__m512i qb = _mm512_set1_epi64((long long)load_word(r->q_codes + (q0 + 1) * 8, 8));
	__m512i la = _mm512_set1_epi64((long long)r->q_labels[q0]), lb = _mm512_set1_epi64((long long)r->q_labels[q0 + 1]);
	__m512i one = _mm512_set1_epi64(1);
	int32_t *ca = counts[0], *cb = counts[1];
	int ids = r->label_words == 0;
	int64_t i = begin;
	for (; i + 8 <= end; i += 8) {
		__m512i c = _mm512_loadu_si512(codes + i), l = _mm512_loadu_si512(labels + i);
		__mmask8 ra = ids ? _mm512_cmpeq_epi64_mask(l, la) : _mm512_test_epi64_mask(l, la);
		__mmask8 rb = ids ? _mm512_cmpeq_epi64_mask(l, lb) : _mm512_test_epi64_mask(l, lb);
		__m512i da = _mm512_slli_epi64(_mm512_popcnt_epi64(_mm512_xor_si512(c, qa)), 1); /* 2 d */
		__m512i db = _mm512_slli_epi64(_mm512_popcnt_epi64(_mm512_xor_si512(c, qb)), 1);
		__m512i ia = _mm512_mask_add_epi64(da, ra, da, one), ib = _mm512_mask_add_epi64(db, rb, db, one);
		uint32_t xa[8], xb[8];
		_mm256_storeu_si256((__m256i *)xa, _mm512_cvtepi64_epi32(ia));
		_mm256_storeu_si256((__m256i *)xb, _mm512_cvtepi64_epi32(ib));
		for (int t = 0; t < 8; t++) {
			ca[xa[t]]++;
			cb[xb[t]]++;
		}
	}
	uint64_t sa = load_word(r->q_codes + q0 * 8, 8), sb = load_word(r->q_codes + (q0 + 1) * 8, 8);
	uint64_t lsa = r->q_labels[q0], lsb = r->q_labels[q0 + 1];
	for (; i < end; i++) {
		uint64_t c = codes[i], l = labels[i];
		ca[2 * __builtin_popcountll(c ^ sa) + (ids ? l == lsa : (l & lsa) != 0)]++;
		cb[2 * __builtin_popcountll(c ^ sb) + (ids ? l == lsb : (l & lsb) != 0)]++;
	}
}
#endif

/* first pass over items [begin, end) for queries [q0, q0 + m): counts[j][2 d + relevant] */
static void report_count(const hl_report *r, int64_t q0, int m, int64_t begin, int64_t end, int32_t (*counts)[2 * (HL_MAX_BYTES * 8 + 1)]) {
	int lw = r->label_words ? r->label_words : 1;
#if defined(__x86_64__)
	if (r->code_bytes == 8 && r->label_words <= 1 && has_avx512_popcount && m == REPORT_GROUP) {
		for (int j = 0; j < REPORT_GROUP; j += 2) {
			report_count_avx512(r, q0 + j, begin, end, counts + j);
		}
		return;
	}
#endif
	if (r->code_bytes == 8 && r->label_words <= 1 && m == REPORT_GROUP) {
		/* the common case (64-bit codes, up to 64 labels or class ids), unrolled over the group */
		uint64_t q[REPORT_GROUP], ql[REPORT_GROUP];
		for (int j = 0; j < REPORT_GROUP; j++) {
			q[j] = load_word(r->q_codes + (q0 + j) * 8, 8);
			ql[j] = r->q_labels[q0 + j];
		}
		const uint64_t *codes = (const uint64_t *)r->db_codes, *labels = r->db_labels;
		if (r->label_words == 1) {
			for (int64_t i = begin; i < end; i++) {
				uint64_t c = codes[i], l = labels[i];
				for (int j = 0; j < REPORT_GROUP; j++) {
					counts[j][2 * __builtin_popcountll(c ^ q[j]) + ((l & ql[j]) != 0)]++;
				}
			}
		} else {
			for (int64_t i = begin; i < end; i++) {
				uint64_t c = codes[i], l = labels[i];
				for (int j = 0; j < REPORT_GROUP; j++) {
					counts[j][2 * __builtin_popcountll(c ^ q[j]) + (l == ql[j])]++;
				}
			}
		}
		return;
	}
	for (int64_t i = begin; i < end; i++) {
		for (int j = 0; j < m; j++) {
			const uint8_t *q = r->q_codes + (q0 + j) * r->code_bytes;
			counts[j][2 * report_distance(r, q, i) + report_relevant(r, r->q_labels + (q0 + j) * lw, i)]++;
		}
	}
}

/* Second pass (stable tie rule), per query: next_rank[d] is the rank the next item at distance d
 * gets (items closer, plus those of its group already seen), next_hit[d] the count of relevant
 * items up to and including the next relevant one at d. A block's relevant items wait in `found`
 * (rank and distance in one word), so the loop over items has no branch; then each adds its precision. */
typedef struct {
	int64_t next_rank[HL_MAX_BYTES * 8 + 1], next_hit[HL_MAX_BYTES * 8 + 1];
	double ap, ap_at[REPORT_MAX_KS];
	int64_t hits[REPORT_MAX_KS];
} hl_stable;

static void stable_start(const hl_report *r, int64_t qi, hl_stable *st) {
	int bits = r->code_bytes * 8;
	const int64_t *all = r->hist_all + qi * (bits + 1), *rel = r->hist_rel + qi * (bits + 1);
	memset(st, 0, sizeof(*st));
	for (int d = 0, a = 0, b = 0; d <= bits; d++) {
		st->next_rank[d] = a;
		st->next_hit[d] = b;
		a += all[d];
		b += rel[d];
	}
}

/* found: rank << 9 | distance (distances <= 256) */
static void stable_add(const hl_report *r, hl_stable *st, const uint64_t *found, int n) {
	for (int f = 0; f < n; f++) {
		int64_t rank = (int64_t)(found[f] >> 9);
		double precision = (double)++st->next_hit[found[f] & 511] / (double)rank;
		st->ap += precision;
		for (int t = 0; t < r->n_ks; t++) {
			int inside = rank <= r->ks[t];
			st->ap_at[t] += inside ? precision : 0;
			st->hits[t] += inside;
		}
	}
}

static void stable_block(const hl_report *r, int64_t qi, hl_stable *st, int64_t begin, int64_t end) {
	int lw = r->label_words ? r->label_words : 1;
	const uint8_t *q = r->q_codes + qi * r->code_bytes;
	const uint64_t *ql = r->q_labels + qi * lw;
	uint64_t found[REPORT_BLOCK_ITEMS];
	int n = 0;
	for (int64_t i = begin; i < end; i++) {
		int32_t d = report_distance(r, q, i);
		found[n] = (uint64_t)++st->next_rank[d] << 9 | (uint64_t)d;
		n += report_relevant(r, ql, i);
	}
	stable_add(r, st, found, n);
}

#if defined(__x86_64__)
/* the same for 64-bit codes and one label word or class id: distances and relevance 8 at a time */
__attribute__((target("avx512f,avx512vpopcntdq"))) static void stable_block_avx512(
    const hl_report *r, int64_t qi, hl_stable *st, int64_t begin, int64_t end) {
	const uint64_t *codes = (const uint64_t *)r->db_codes, *labels = r->db_labels;
	uint64_t qs = load_word(r->q_codes + qi * 8, 8), ls = r->q_labels[qi];
	__m512i q = _mm512_set1_epi64((long long)qs), ql = _mm512_set1_epi64((long long)ls);
	int ids = r->label_words == 0;
	uint64_t found[REPORT_BLOCK_ITEMS];
	int n = 0;
	int64_t i = begin;
	for (; i + 8 <= end; i += 8) {
		__m512i c = _mm512_loadu_si512(codes + i), l = _mm512_loadu_si512(labels + i);
		uint32_t rel = ids ? _mm512_cmpeq_epi64_mask(l, ql) : _mm512_test_epi64_mask(l, ql);
		uint32_t x[8];
		_mm256_storeu_si256((__m256i *)x, _mm512_cvtepi64_epi32(_mm512_popcnt_epi64(_mm512_xor_si512(c, q))));
		for (int t = 0; t < 8; t++) {
			found[n] = (uint64_t)++st->next_rank[x[t]] << 9 | x[t];
			n += (rel >> t) & 1;
		}
	}
	for (; i < end; i++) {
		int32_t d = __builtin_popcountll(codes[i] ^ qs);
		found[n] = (uint64_t)++st->next_rank[d] << 9 | (uint64_t)d;
		n += ids ? labels[i] == ls : (labels[i] & ls) != 0;
	}
	stable_add(r, st, found, n);
}
#endif

/* the second pass for queries [first, last), reading the database in blocks as the first pass does */
static int report_stable(const hl_report *r, int64_t first, int64_t last) {
	int64_t m = last - first;
	hl_stable *st = malloc(m * sizeof(hl_stable));
	if (!st) {
		return -1;
	}
	for (int64_t j = 0; j < m; j++) {
		stable_start(r, first + j, &st[j]);
	}
#if defined(__x86_64__)
	int vector = r->code_bytes == 8 && r->label_words <= 1 && has_avx512_popcount;
#else
	int vector = 0;
#endif
	for (int64_t begin = 0; begin < r->n_db; begin += REPORT_BLOCK_ITEMS) {
		int64_t end = begin + REPORT_BLOCK_ITEMS < r->n_db ? begin + REPORT_BLOCK_ITEMS : r->n_db;
		for (int64_t j = 0; j < m; j++) {
#if defined(__x86_64__)
			if (vector) {
				stable_block_avx512(r, first + j, &st[j], begin, end);
				continue;
			}
#endif
			(void)vector;
			stable_block(r, first + j, &st[j], begin, end);
		}
	}
	for (int64_t j = 0; j < m; j++) {
		int64_t qi = first + j;
		r->ap_sum[qi] = st[j].ap;
		for (int t = 0; t < r->n_ks; t++) {
			r->ap_at_sum[qi * r->n_ks + t] = st[j].ap_at[t];
			r->hits_at[qi * r->n_ks + t] = st[j].hits[t];
		}
	}
	free(st);
	return 0;
}

static void report_task(void *ctx, int64_t task) {
	hl_report *r = ctx;
	int bits = r->code_bytes * 8;
	int64_t first = task * REPORT_TASK_QUERIES;
	int64_t last = first + REPORT_TASK_QUERIES < r->n_queries ? first + REPORT_TASK_QUERIES : r->n_queries;
	int m = (int)(last - first);
	/* int32 counters per block, added into the int64 histograms after each block */
	int32_t (*counts)[2 * (HL_MAX_BYTES * 8 + 1)] = calloc(m, sizeof(*counts));
	if (!counts) {
		atomic_store(&r->failed, 1);
		return;
	}
	for (int64_t qi = first; qi < last; qi++) {
		memset(r->hist_all + qi * (bits + 1), 0, sizeof(int64_t) * (bits + 1));
		memset(r->hist_rel + qi * (bits + 1), 0, sizeof(int64_t) * (bits + 1));
	}
	for (int64_t begin = 0; begin < r->n_db; begin += REPORT_BLOCK_ITEMS) {
		int64_t end = begin + REPORT_BLOCK_ITEMS < r->n_db ? begin + REPORT_BLOCK_ITEMS : r->n_db;
		for (int g = 0; g < m; g += REPORT_GROUP) {
			int size = m - g < REPORT_GROUP ? m - g : REPORT_GROUP;
			report_count(r, first + g, size, begin, end, counts + g);
		}
		for (int j = 0; j < m; j++) {
			int64_t *all = r->hist_all + (first + j) * (bits + 1), *rel = r->hist_rel + (first + j) * (bits + 1);
			for (int d = 0; d <= bits; d++) {
				all[d] += counts[j][2 * d] + counts[j][2 * d + 1];
				rel[d] += counts[j][2 * d + 1];
			}
			memset(counts[j], 0, sizeof(counts[j]));
		}
	}
	free(counts);
	if (r->ap_sum && report_stable(r, first, last) < 0) {
		atomic_store(&r->failed, 1);
	}
}

/* Python side (hashlake/report.py). Shapes as in hl_report; ap_sum, ap_at_sum and hits_at NULL for
 * the histograms alone. 0 ok, -1 out of memory, -2 bad arguments (the Python side checks them first). */
__attribute__((visibility("default"))) int32_t hashlake_report_histograms(
    int32_t code_bytes, int32_t label_words, int64_t n_queries, const uint8_t *q_codes, const uint64_t *q_labels,
    int64_t n_db, const uint8_t *db_codes, const uint64_t *db_labels, int32_t n_ks, const int64_t *ks,
    int64_t *hist_all, int64_t *hist_rel, double *ap_sum, double *ap_at_sum, int64_t *hits_at) {
	if (code_bytes < 1 || code_bytes > HL_MAX_BYTES || label_words < 0 || n_ks < 0 || n_ks > REPORT_MAX_KS ||
	    n_queries < 0 || n_db < 0) {
		return -2;
	}
	hl_report r = {.code_bytes = code_bytes, .label_words = label_words, .n_ks = n_ks, .n_queries = n_queries,
	               .n_db = n_db, .q_codes = q_codes, .db_codes = db_codes, .q_labels = q_labels,
	               .db_labels = db_labels, .ks = ks, .hist_all = hist_all, .hist_rel = hist_rel, .ap_sum = ap_sum,
	               .ap_at_sum = ap_at_sum, .hits_at = hits_at};
	has_avx512_popcount = hashlake_uses_avx512(); /* ctypes callers never ran the extension's entry point */
	pool_run(report_task, &r, (n_queries + REPORT_TASK_QUERIES - 1) / REPORT_TASK_QUERIES);
	return atomic_load(&r.failed) ? -1 : 0;
}

/* ---- the SQL functions ---------------------------------------------------------------------------- */
typedef struct {
	const hl_snapshot *snap;
	const duckdb_string_t *queries;
	const int32_t *params;
	uint64_t *valid_q, *valid_p;
	int64_t rows;
	int is_knn;
	hl_hits *answers;
	atomic_int failed;
} hl_batch;

static const uint8_t *row_query(hl_batch *b, int64_t i) {
	return (const uint8_t *)duckdb_string_t_data((duckdb_string_t *)&b->queries[i]);
}

static int row_valid(const hl_batch *b, int64_t i) {
	return (!b->valid_q || duckdb_validity_row_is_valid(b->valid_q, i)) &&
	       (!b->valid_p || duckdb_validity_row_is_valid(b->valid_p, i));
}

/* 1 and a message in `error` when a query cannot be answered: wrong code length, k < 1, radius < 0 */
static int query_error(const hl_snapshot *snap, uint32_t len, int32_t param, int is_knn, char *error, size_t size) {
	if (snap->code_bytes && len != (uint32_t)snap->code_bytes) {
		snprintf(error, size, "query code has %u bits but the index of model version '%s' holds %d-bit codes",
		         len * 8, snap->model_version, snap->code_bytes * 8);
	} else if (is_knn && param < 1) {
		snprintf(error, size, "k must be at least 1, got %d", param);
	} else if (!is_knn && param < 0) {
		snprintf(error, size, "radius must be at least 0, got %d", param);
	} else {
		return 0;
	}
	return 1;
}

static int row_valid(const hl_batch *b, int64_t i);

/* One task: a group of up to GROUP_QUERIES rows; those multi-index hashing does not answer share
 * one blocked flat scan. */
static void batch_task(void *ctx, int64_t group) {
	hl_batch *b = ctx;
	const uint8_t *queries[GROUP_QUERIES];
	int64_t ks[GROUP_QUERIES];
	int32_t limits[GROUP_QUERIES];
	hl_hits *outs[GROUP_QUERIES];
	int m = 0;
	int64_t first = group * GROUP_QUERIES, last = first + GROUP_QUERIES < b->rows ? first + GROUP_QUERIES : b->rows;
	for (int64_t i = first; i < last; i++) {
		if (!row_valid(b, i)) {
			continue;
		}
		int64_t k = b->is_knn ? b->params[i] : 0;
		int32_t radius = start_limit(b->snap, 0, b->is_knn ? 0 : b->params[i]);
		int status = try_mih(b->snap, row_query(b, i), k, radius, 1, &b->answers[i]);
		if (status < 0) {
			atomic_store(&b->failed, 1);
		} else if (status == 0) {
			queries[m] = row_query(b, i);
			ks[m] = k;
			limits[m] = start_limit(b->snap, k, radius);
			outs[m++] = &b->answers[i];
		}
	}
	if (m) {
		flat_group(b->snap, queries, ks, limits, m, outs);
	}
	for (int64_t i = first; i < last; i++) {
		if (row_valid(b, i) && finish(b->snap, b->is_knn ? b->params[i] : 0, &b->answers[i]) < 0) {
			atomic_store(&b->failed, 1);
		}
	}
}

static void write_strings(duckdb_vector vec, idx_t at, const hl_strings *s, int64_t row) {
	int32_t begin = s->offsets[row], end = s->offsets[row + 1];
	duckdb_vector_assign_string_element_len(vec, at, s->data + begin, end - begin);
}

static void hamming_function(duckdb_function_info info, duckdb_data_chunk input, duckdb_vector output, int is_knn) {
	idx_t rows = duckdb_data_chunk_get_size(input);
	duckdb_vector query_vec = duckdb_data_chunk_get_vector(input, 0);
	duckdb_vector param_vec = duckdb_data_chunk_get_vector(input, 1);
	char error[512];
	if (rows == 0) {
		return;
	}
	hl_snapshot *snap = acquire_pinned(slot_of(duckdb_scalar_function_get_extra_info(info)), error, sizeof(error));
	if (!snap) {
		duckdb_scalar_function_set_error(info, error);
		return;
	}
	hl_batch b = {.snap = snap, .queries = duckdb_vector_get_data(query_vec),
	              .params = duckdb_vector_get_data(param_vec), .valid_q = duckdb_vector_get_validity(query_vec),
	              .valid_p = duckdb_vector_get_validity(param_vec), .rows = (int64_t)rows, .is_knn = is_knn};
	/* check every row before doing any work, so an error names the first bad row */
	for (idx_t i = 0; i < rows; i++) {
		if (row_valid(&b, i) && query_error(snap, duckdb_string_t_length(b.queries[i]), b.params[i], is_knn, error,
		                                    sizeof(error))) {
			release(snap);
			duckdb_scalar_function_set_error(info, error);
			return;
		}
	}
	b.answers = calloc(rows, sizeof(hl_hits));
	if (!b.answers) {
		release(snap);
		duckdb_scalar_function_set_error(info, "hashlake: out of memory");
		return;
	}
	if (snap->code_bytes) {
		/* one row: its scan is split over the cores; many rows: the cores answer groups of them */
		if (rows == 1) {
			if (row_valid(&b, 0) && answer(snap, row_query(&b, 0), is_knn ? b.params[0] : 0, is_knn ? 0 : b.params[0],
			                               hashlake_threads(), &b.answers[0]) < 0) {
				atomic_store(&b.failed, 1);
			}
		} else {
			pool_run(batch_task, &b, ((int64_t)rows + GROUP_QUERIES - 1) / GROUP_QUERIES);
		}
	}
	if (atomic_load(&b.failed)) {
		for (idx_t i = 0; i < rows; i++) {
			hits_free(&b.answers[i]);
		}
		free(b.answers);
		release(snap);
		duckdb_scalar_function_set_error(info, "hashlake: out of memory");
		return;
	}
	idx_t total = 0;
	for (idx_t i = 0; i < rows; i++) {
		total += b.answers[i].size;
	}
	duckdb_list_vector_reserve(output, total);
	duckdb_list_entry *entries = duckdb_vector_get_data(output);
	duckdb_vector items = duckdb_list_vector_get_child(output);
	duckdb_vector bucket = duckdb_struct_vector_get_child(items, 0);
	duckdb_vector key = duckdb_struct_vector_get_child(items, 1);
	duckdb_vector etag = duckdb_struct_vector_get_child(items, 2);
	int32_t *dist = duckdb_vector_get_data(duckdb_struct_vector_get_child(items, 3));
	duckdb_vector_ensure_validity_writable(output);
	uint64_t *out_valid = duckdb_vector_get_validity(output);
	idx_t at = 0;
	for (idx_t i = 0; i < rows; i++) {
		entries[i].offset = at;
		entries[i].length = b.answers[i].size;
		if (!row_valid(&b, i)) {
			duckdb_validity_set_row_invalid(out_valid, i);
			continue;
		}
		for (int64_t j = 0; j < b.answers[i].size; j++, at++) {
			const hl_hit *h = &b.answers[i].items[j];
			const hl_segment *seg = &snap->segments[h->segment];
			write_strings(bucket, at, &seg->bucket, h->row);
			write_strings(key, at, &seg->key, h->row);
			write_strings(etag, at, &seg->etag, h->row);
			dist[at] = h->distance;
		}
		hits_free(&b.answers[i]);
	}
	duckdb_list_vector_set_size(output, total);
	free(b.answers);
	release(snap);
}

static void knn_function(duckdb_function_info info, duckdb_data_chunk input, duckdb_vector output) {
	hamming_function(info, input, output, 1);
}

static void within_function(duckdb_function_info info, duckdb_data_chunk input, duckdb_vector output) {
	hamming_function(info, input, output, 0);
}

static duckdb_logical_type hits_type(void) {
	duckdb_logical_type members[4] = {
	    duckdb_create_logical_type(DUCKDB_TYPE_VARCHAR), duckdb_create_logical_type(DUCKDB_TYPE_VARCHAR),
	    duckdb_create_logical_type(DUCKDB_TYPE_VARCHAR), duckdb_create_logical_type(DUCKDB_TYPE_INTEGER)};
	const char *names[4] = {"bucket", "key", "etag", "distance"};
	duckdb_logical_type item = duckdb_create_struct_type(members, names, 4);
	duckdb_logical_type list = duckdb_create_list_type(item);
	for (int i = 0; i < 4; i++) {
		duckdb_destroy_logical_type(&members[i]);
	}
	duckdb_destroy_logical_type(&item);
	return list;
}

static int register_function(duckdb_connection connection, const char *name, duckdb_scalar_function_t fn,
                             int64_t slot) {
	duckdb_scalar_function f = duckdb_create_scalar_function();
	duckdb_scalar_function_set_name(f, name);
	duckdb_scalar_function_set_extra_info(f, (void *)(intptr_t)slot, NULL);
	duckdb_type params[2] = {DUCKDB_TYPE_BLOB, DUCKDB_TYPE_INTEGER};
	for (int i = 0; i < 2; i++) {
		duckdb_logical_type t = duckdb_create_logical_type(params[i]);
		duckdb_scalar_function_add_parameter(f, t);
		duckdb_destroy_logical_type(&t);
	}
	duckdb_logical_type ret = hits_type();
	duckdb_scalar_function_set_return_type(f, ret);
	duckdb_destroy_logical_type(&ret);
	/* NULL rows are handled here (a NULL query gives a NULL list), and a call reads the snapshot
	 * registry, which changes between calls: never folded into a constant */
	duckdb_scalar_function_set_special_handling(f);
	duckdb_scalar_function_set_volatile(f);
	duckdb_scalar_function_set_function(f, fn);
	duckdb_state state = duckdb_register_scalar_function(connection, f);
	duckdb_destroy_scalar_function(&f);
	return state == DuckDBSuccess;
}

/* ---- the table functions: one constant query, rows out directly ---------------------------------
 * For `search(query, k)` with a constant query (hex, BLOB, parameter, hash_image(...)): the answer is
 * computed at bind, where the arguments are known, and emitted as rows. Skipping the list and its
 * unnest saves ~0.2 ms per query, as much as a flat scan of a million codes costs. */
typedef struct {
	hl_snapshot *snap;
	hl_hits hits;
} hl_table_bind;

typedef struct {
	int64_t next; /* next hit to emit */
} hl_table_state;

static void table_bind_free(void *data) {
	hl_table_bind *bind = data;
	hits_free(&bind->hits);
	if (bind->snap) {
		release(bind->snap);
	}
	free(bind);
}

static int hex_value(char c) {
	return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* hex text (optionally 0x-prefixed, spaces ignored, as hashing_models.codes.code_from_hex) → bytes;
 * -1 when it is not hex */
static int64_t parse_hex(const char *text, uint8_t *out, int64_t capacity) {
	const char *p = text;
	while (*p == ' ') {
		p++;
	}
	if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
		p += 2;
	}
	int64_t n = 0;
	int high = -1;
	for (; *p; p++) {
		if (*p == ' ') {
			continue;
		}
		int v = hex_value(*p);
		if (v < 0 || (high < 0 && n >= capacity)) {
			return -1;
		}
		if (high < 0) {
			high = v;
		} else {
			out[n++] = (uint8_t)(high << 4 | v);
			high = -1;
		}
	}
	return high < 0 ? n : -1;
}

/* The query argument: a BLOB, or hex text. 1: code set, 0: NULL, -1: error written. */
static int query_argument(duckdb_value value, uint8_t *code, int64_t *len, char *error, size_t size) {
	if (duckdb_is_null_value(value)) {
		return 0;
	}
	duckdb_logical_type type = duckdb_get_value_type(value);
	duckdb_type id = duckdb_get_type_id(type);
	if (id == DUCKDB_TYPE_BLOB) {
		duckdb_blob blob = duckdb_get_blob(value);
		*len = (int64_t)blob.size;
		memcpy(code, blob.data, blob.size < HL_MAX_BYTES + 1 ? blob.size : HL_MAX_BYTES + 1);
		duckdb_free(blob.data);
		return 1;
	}
	if (id == DUCKDB_TYPE_VARCHAR) {
		char *text = duckdb_get_varchar(value);
		*len = parse_hex(text, code, HL_MAX_BYTES + 1);
		if (*len < 0) {
			snprintf(error, size, "not a hex code: '%.64s'", text);
		}
		duckdb_free(text);
		return *len < 0 ? -1 : 1;
	}
	snprintf(error, size, "the query must be a code given as a BLOB or as hex text, not a value of DuckDB type id %d",
	         (int)id);
	return -1;
}

/* the columns of hashlake_*_rows: the codes view's, in its order, then distance */
#define HL_ROW_COLUMNS 10
static const char *const row_names[HL_ROW_COLUMNS] = {"key",   "bucket",     "etag",   "size",     "last_modified",
                                                 "code",  "model",      "encoded_at", "labels", "distance"};

static void add_result_columns(duckdb_bind_info info, int rows) {
	if (!rows) {
		const char *names[4] = {"bucket", "key", "etag", "distance"};
		duckdb_type types[4] = {DUCKDB_TYPE_VARCHAR, DUCKDB_TYPE_VARCHAR, DUCKDB_TYPE_VARCHAR, DUCKDB_TYPE_INTEGER};
		for (int c = 0; c < 4; c++) {
			duckdb_logical_type t = duckdb_create_logical_type(types[c]);
			duckdb_bind_add_result_column(info, names[c], t);
			duckdb_destroy_logical_type(&t);
		}
		return;
	}
	duckdb_type types[HL_ROW_COLUMNS] = {DUCKDB_TYPE_VARCHAR,      DUCKDB_TYPE_VARCHAR, DUCKDB_TYPE_VARCHAR,
	                                     DUCKDB_TYPE_BIGINT,       DUCKDB_TYPE_TIMESTAMP_TZ, DUCKDB_TYPE_BLOB,
	                                     DUCKDB_TYPE_VARCHAR,      DUCKDB_TYPE_TIMESTAMP_TZ, DUCKDB_TYPE_LIST,
	                                     DUCKDB_TYPE_INTEGER};
	for (int c = 0; c < HL_ROW_COLUMNS; c++) {
		duckdb_logical_type t;
		if (types[c] == DUCKDB_TYPE_LIST) {
			duckdb_logical_type item = duckdb_create_logical_type(DUCKDB_TYPE_VARCHAR);
			t = duckdb_create_list_type(item);
			duckdb_destroy_logical_type(&item);
		} else {
			t = duckdb_create_logical_type(types[c]);
		}
		duckdb_bind_add_result_column(info, row_names[c], t);
		duckdb_destroy_logical_type(&t);
	}
}

static void table_bind(duckdb_bind_info info, int is_knn, int rows) {
	duckdb_value query = duckdb_bind_get_parameter(info, 0);
	duckdb_value param = duckdb_bind_get_parameter(info, 1);
	add_result_columns(info, rows);
	char error[512] = "";
	uint8_t code[HL_MAX_BYTES + 1];
	int64_t len = 0;
	hl_table_bind *bind = calloc(1, sizeof(hl_table_bind));
	int has_query = 0;
	if (!bind) {
		snprintf(error, sizeof(error), "hashlake: out of memory");
	} else if ((has_query = query_argument(query, code, &len, error, sizeof(error))) < 0) {
		/* error written */
	} else if (has_query && !duckdb_is_null_value(param)) {
		/* a NULL query or parameter finds nothing, as in the list form */
		int32_t p = duckdb_get_int32(param);
		bind->snap = acquire_pinned(slot_of(duckdb_bind_get_extra_info(info)), error, sizeof(error));
		if (bind->snap && len > HL_MAX_BYTES) {
			snprintf(error, sizeof(error), "query code has %lld bits but the index of model version '%s' holds "
			         "%d-bit codes", (long long)len * 8, bind->snap->model_version, bind->snap->code_bytes * 8);
		} else if (bind->snap && !query_error(bind->snap, (uint32_t)len, p, is_knn, error, sizeof(error)) &&
		           bind->snap->code_bytes &&
		           answer(bind->snap, code, is_knn ? p : 0, is_knn ? 0 : p, hashlake_threads(), &bind->hits) < 0) {
			snprintf(error, sizeof(error), "hashlake: out of memory");
		}
	}
	duckdb_destroy_value(&query);
	duckdb_destroy_value(&param);
	if (error[0]) {
		if (bind) {
			table_bind_free(bind);
		}
		duckdb_bind_set_error(info, error);
		return;
	}
	duckdb_bind_set_cardinality(info, bind->hits.size, true);
	duckdb_bind_set_bind_data(info, bind, table_bind_free);
}

static void knn_table_bind(duckdb_bind_info info) {
	table_bind(info, 1, 0);
}

static void within_table_bind(duckdb_bind_info info) {
	table_bind(info, 0, 0);
}

static void knn_rows_bind(duckdb_bind_info info) {
	table_bind(info, 1, 1);
}

static void within_rows_bind(duckdb_bind_info info) {
	table_bind(info, 0, 1);
}

static void table_init(duckdb_init_info info) {
	hl_table_state *state = calloc(1, sizeof(hl_table_state));
	if (!state) {
		duckdb_init_set_error(info, "hashlake: out of memory");
		return;
	}
	duckdb_init_set_init_data(info, state, free);
	duckdb_init_set_max_threads(info, 1);
}

static void table_function(duckdb_function_info info, duckdb_data_chunk output) {
	hl_table_bind *bind = duckdb_function_get_bind_data(info);
	hl_table_state *state = duckdb_function_get_init_data(info);
	idx_t capacity = duckdb_vector_size();
	idx_t n = 0;
	duckdb_vector bucket = duckdb_data_chunk_get_vector(output, 0);
	duckdb_vector key = duckdb_data_chunk_get_vector(output, 1);
	duckdb_vector etag = duckdb_data_chunk_get_vector(output, 2);
	int32_t *dist = duckdb_vector_get_data(duckdb_data_chunk_get_vector(output, 3));
	for (; n < capacity && state->next < bind->hits.size; n++, state->next++) {
		const hl_hit *h = &bind->hits.items[state->next];
		const hl_segment *seg = &bind->snap->segments[h->segment];
		write_strings(bucket, n, &seg->bucket, h->row);
		write_strings(key, n, &seg->key, h->row);
		write_strings(etag, n, &seg->etag, h->row);
		dist[n] = h->distance;
	}
	duckdb_data_chunk_set_size(output, n);
}

static int is_valid(const hl_validity *v, int64_t row) {
	if (!v->bits) {
		return 1;
	}
	int64_t i = v->offset + row;
	return (v->bits[i >> 3] >> (i & 7)) & 1;
}

static void set_null(duckdb_vector vec, idx_t at) {
	duckdb_vector_ensure_validity_writable(vec);
	duckdb_validity_set_row_invalid(duckdb_vector_get_validity(vec), at);
}

static void write_int64(duckdb_vector vec, idx_t at, const hl_int64s *col, int64_t row) {
	if (!col->values || !is_valid(&col->valid, row)) {
		set_null(vec, at);
		return;
	}
	((int64_t *)duckdb_vector_get_data(vec))[at] = col->values[row];
}

/* One LIST(VARCHAR) value: its items go at the end of the list vector's child. -1: out of memory. */
static int write_labels(duckdb_vector vec, idx_t at, const hl_string_lists *col, int64_t row) {
	if (!col->offsets || !is_valid(&col->valid, row)) {
		set_null(vec, at);
		return 0;
	}
	int32_t begin = col->offsets[row], end = col->offsets[row + 1];
	idx_t base = duckdb_list_vector_get_size(vec);
	if (duckdb_list_vector_reserve(vec, base + (idx_t)(end - begin)) != DuckDBSuccess) {
		return -1;
	}
	duckdb_vector items = duckdb_list_vector_get_child(vec);
	for (int32_t j = begin; j < end; j++) {
		write_strings(items, base + (idx_t)(j - begin), &col->items, j);
	}
	duckdb_list_vector_set_size(vec, base + (idx_t)(end - begin));
	duckdb_list_entry *entries = duckdb_vector_get_data(vec);
	entries[at].offset = base;
	entries[at].length = (idx_t)(end - begin);
	return 0;
}

static void rows_table_function(duckdb_function_info info, duckdb_data_chunk output) {
	hl_table_bind *bind = duckdb_function_get_bind_data(info);
	hl_table_state *state = duckdb_function_get_init_data(info);
	idx_t capacity = duckdb_vector_size();
	idx_t n = 0;
	duckdb_vector out[HL_ROW_COLUMNS];
	for (int c = 0; c < HL_ROW_COLUMNS; c++) {
		out[c] = duckdb_data_chunk_get_vector(output, c);
	}
	int32_t *dist = duckdb_vector_get_data(out[9]);
	const hl_snapshot *snap = bind->snap;
	size_t model_len = snap ? strlen(snap->model_version) : 0;
	for (; n < capacity && state->next < bind->hits.size; n++, state->next++) {
		const hl_hit *h = &bind->hits.items[state->next];
		const hl_segment *seg = &snap->segments[h->segment];
		write_strings(out[0], n, &seg->key, h->row);
		write_strings(out[1], n, &seg->bucket, h->row);
		write_strings(out[2], n, &seg->etag, h->row);
		write_int64(out[3], n, &seg->size, h->row);
		write_int64(out[4], n, &seg->last_modified, h->row);
		duckdb_vector_assign_string_element_len(out[5], n, (const char *)seg->codes + h->row * snap->code_bytes,
		                                        snap->code_bytes);
		duckdb_vector_assign_string_element_len(out[6], n, snap->model_version, model_len);
		write_int64(out[7], n, &seg->encoded_at, h->row);
		if (write_labels(out[8], n, &seg->labels, h->row) < 0) {
			duckdb_function_set_error(info, "hashlake: out of memory");
			return;
		}
		dist[n] = h->distance;
	}
	duckdb_data_chunk_set_size(output, n);
}

static void slot_function(duckdb_function_info info, duckdb_data_chunk input, duckdb_vector output) {
	idx_t rows = duckdb_data_chunk_get_size(input);
	int64_t *out = duckdb_vector_get_data(output);
	for (idx_t i = 0; i < rows; i++) {
		out[i] = slot_of(duckdb_scalar_function_get_extra_info(info));
	}
}

/* hashlake_slot(): this database's slot, for hashlake_pin() */
static int register_slot_function(duckdb_connection connection, int64_t slot) {
	duckdb_scalar_function f = duckdb_create_scalar_function();
	duckdb_scalar_function_set_name(f, "hashlake_slot");
	duckdb_scalar_function_set_extra_info(f, (void *)(intptr_t)slot, NULL);
	duckdb_logical_type t = duckdb_create_logical_type(DUCKDB_TYPE_BIGINT);
	duckdb_scalar_function_set_return_type(f, t);
	duckdb_destroy_logical_type(&t);
	duckdb_scalar_function_set_function(f, slot_function);
	duckdb_state state = duckdb_register_scalar_function(connection, f);
	duckdb_destroy_scalar_function(&f);
	return state == DuckDBSuccess;
}

static int register_table_function(duckdb_connection connection, const char *name, duckdb_table_function_bind_t bind,
                                   duckdb_table_function_t function, int64_t slot) {
	duckdb_table_function f = duckdb_create_table_function();
	duckdb_table_function_set_name(f, name);
	duckdb_table_function_set_extra_info(f, (void *)(intptr_t)slot, NULL);
	duckdb_type params[2] = {DUCKDB_TYPE_ANY, DUCKDB_TYPE_INTEGER};
	for (int i = 0; i < 2; i++) {
		duckdb_logical_type t = duckdb_create_logical_type(params[i]);
		duckdb_table_function_add_parameter(f, t);
		duckdb_destroy_logical_type(&t);
	}
	duckdb_table_function_set_bind(f, bind);
	duckdb_table_function_set_init(f, table_init);
	duckdb_table_function_set_function(f, function);
	duckdb_state state = duckdb_register_table_function(connection, f);
	duckdb_destroy_table_function(&f);
	return state == DuckDBSuccess;
}

DUCKDB_EXTENSION_ENTRYPOINT(duckdb_connection connection, duckdb_extension_info info,
                            struct duckdb_extension_access *access) {
	(void)info;
	(void)access;
	has_avx512_popcount = hashlake_uses_avx512();
	int64_t slot = new_slot();
	if (slot < 0) {
		return false;
	}
	return register_function(connection, "hashlake_search_list", knn_function, slot) &&
	       register_function(connection, "hashlake_within_list", within_function, slot) &&
	       register_table_function(connection, "search", knn_table_bind, table_function, slot) &&
	       register_table_function(connection, "within", within_table_bind, table_function, slot) &&
	       register_table_function(connection, "hashlake_search_rows", knn_rows_bind, rows_table_function, slot) &&
	       register_table_function(connection, "hashlake_within_rows", within_rows_bind, rows_table_function, slot) &&
	       register_slot_function(connection, slot);
}

/* Python side: whether the flat scan of 64-bit codes runs on AVX-512 VPOPCNTDQ on this CPU. */
__attribute__((visibility("default"))) int32_t hashlake_uses_avx512(void) {
#if defined(__x86_64__)
	__builtin_cpu_init();
	return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
#else
	return 0;
#endif
}
