/* The flat scan: every code of a snapshot compared with the query, split into row ranges over the
 * pool (one query) or read in blocks shared by a group of queries (a batch). Kernels: scalar POPCNT
 * for any length, AVX-512 VPOPCNTDQ for 64- and 256-bit codes, chosen per CPU at load. */
#include "hashlake.h"

int has_avx512_popcount; /* set at load: whether the CPU has AVX-512 VPOPCNTDQ */


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

int64_t total_rows(const hl_snapshot *snap) {
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

double flat_ns_per_byte = 0.1; /* measured: a running average over recent flat scans */

/* Every visible row with distance <= limit (k == 0), or every row that can be among the first k:
 * each part keeps what its own rows require (a superset); the caller sorts and cuts. */
void flat_search(const hl_snapshot *snap, const uint8_t *query, int64_t k, int32_t limit, int threads,
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

/* Flat scans of several queries read each block of codes once for all of them: a batch then costs
 * one pass over memory per group of queries instead of one per query (measured: 10M 256-bit codes,
 * 1,000 queries, per-query passes were bandwidth-bound at 1.8x faiss's blocked scan). */
#define BLOCK_BYTES (128 * 1024)

void flat_group(const hl_snapshot *snap, const uint8_t **queries, const int64_t *ks, const int32_t *limits,
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

/* Python side: whether the flat scan of 64-bit codes runs on AVX-512 VPOPCNTDQ on this CPU. */
HL_API int32_t hashlake_uses_avx512(void) {
#if defined(__x86_64__)
	__builtin_cpu_init();
	return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
#else
	return 0;
#endif
}
