/* Offline retrieval reports: per-query histograms of database codes by Hamming distance. */
#include "hashlake.h"

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
HL_API int32_t hashlake_report_histograms(
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
