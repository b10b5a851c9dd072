/* One query answered: multi-index hashing or the flat scan, then the cut to k rows and the tie rule
 * (distance, then bucket, then key, bytewise as DuckDB orders VARCHAR). */
#include "hashlake.h"

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

/* ---- one query ---------------------------------------------------------------------------------- */
/* Fills `out` with the answer in tie-rule order (knn: at most k rows). 0 ok, -1 out of memory. */
/* Multi-index hashing when the cost model picks it: 1 answered, 0 the flat scan must answer, -1 OOM. */
int try_mih(const hl_snapshot *snap, const uint8_t *query, int64_t k, int32_t radius, int threads,
                   hl_hits *out) {
	if (forced_method == 2) {
		return 0;
	}
	return k > 0 ? mih_knn(snap, query, k, threads, out) : mih_within(snap, query, radius, threads, out);
}

/* the answer in tie-rule order, cut to k rows for k-NN; 0 ok, -1 OOM */
int finish(const hl_snapshot *snap, int64_t k, hl_hits *out) {
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
int32_t start_limit(const hl_snapshot *snap, int64_t k, int32_t radius) {
	int bits = snap->code_bytes * 8;
	return k > 0 ? bits : (radius > bits ? bits : radius);
}

/* Fills `out` with the answer to one query (knn: k > 0; within: k == 0 and the radius), its scan
 * split over `threads`. 0 ok, -1 out of memory. */
int answer(const hl_snapshot *snap, const uint8_t *query, int64_t k, int32_t radius, int threads,
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

/* 1 and a message in `error` when a query cannot be answered: wrong code length, k < 1, radius < 0 */
int query_error(const hl_snapshot *snap, uint32_t len, int32_t param, int is_knn, char *error, size_t size) {
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
