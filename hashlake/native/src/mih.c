/* Multi-index hashing (Norouzi, Punjani, Fleet, CVPR 2012) over the hash tables that
 * hashlake/index/mih.py builds per segment, with a cost model that says when probing beats the flat
 * scan. Exact: every row within the final radius is verified with its full distance. */
#include "hashlake.h"

/* Python side, for tests of exactness: pin the method the cost model would choose (0 auto, 1 always
 * multi-index hashing, 2 always the flat scan). Every answer must be the same whichever runs. */
int forced_method = 0;

HL_API void hashlake_force_method(int32_t method) {
	forced_method = method;
}

/* ---- multi-index hashing ------------------------------------------------------------------------ */
/* Cost model (ns, this machine): one probed bucket, one verified candidate. */
#define PROBE_NS 8.0
#define CANDIDATE_NS 6.0
#define MIH_BUDGET 0.5 /* of the flat scan's estimated cost, before k-NN gives up on probing */
#define MIH_QUICK_BUDGET 0.03 /* when the radius profile says the k-th row lies far: near duplicates only */
#define MIH_RADIUS_SLACK 3 /* radii past the profile's guess before the quick budget applies */

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
int mih_knn(const hl_snapshot *snap, const uint8_t *query, int64_t k, int threads, hl_hits *out) {
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
	int expected = expected_radius(snap, k);
	double quick = budget * MIH_QUICK_BUDGET / MIH_BUDGET;
	if (forced_method == 1) {
		budget = 1e300;
	} else if (probe_cost(pr, expected) > budget) {
		budget = quick;
	}
	if (forced_method != 1) { /* never verify more rows than the scan would cost */
		pr->max_candidates = (int64_t)(budget / CANDIDATE_NS);
	}
	int bits = snap->code_bytes * 8, status = 0;
	for (int radius = 0; radius <= bits; radius++) {
		if (forced_method != 1 && radius > expected + MIH_RADIUS_SLACK) {
			/* this query lies farther from its neighbours than the codes lie from each other (a
			 * million identical codes and a query unlike them): probing on costs more than it finds */
			budget = budget < quick ? budget : quick;
		}
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
int mih_within(const hl_snapshot *snap, const uint8_t *query, int radius, int threads, hl_hits *out) {
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
