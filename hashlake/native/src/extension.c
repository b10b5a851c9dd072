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
 *   search_rows(query, k), within_rows(query, radius)
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
 * pass over the codes). Both are exact. The other files of src/ are listed in hashlake.h.
 *
 * Each call's answer is timed for the query process's latency histogram (metrics.c).
 *
 * This file is the DuckDB glue: the SQL functions, their arguments and result vectors, the entry point.
 */
#include "hashlake.h"

#define DUCKDB_EXTENSION_NAME hashlake_hamming
#include "duckdb_extension.h"

DUCKDB_EXTENSION_EXTERN

static int64_t slot_of(void *extra_info) {
	return (int64_t)(intptr_t)extra_info;
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
	int64_t queries = 0; /* rows with a query and a parameter: what the latency histogram counts */
	for (idx_t i = 0; i < rows; i++) {
		if (!row_valid(&b, i)) {
			continue;
		}
		if (query_error(snap, duckdb_string_t_length(b.queries[i]), b.params[i], is_knn, error, sizeof(error))) {
			release(snap);
			duckdb_scalar_function_set_error(info, error);
			return;
		}
		queries++;
	}
	b.answers = calloc(rows, sizeof(hl_hits));
	if (!b.answers) {
		release(snap);
		duckdb_scalar_function_set_error(info, "hashlake: out of memory");
		return;
	}
	double start = now_ns();
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
	observe_search(is_knn ? HL_FN_SEARCH_LIST : HL_FN_WITHIN_LIST, start, queries);
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
		} else if (bind->snap && !query_error(bind->snap, (uint32_t)len, p, is_knn, error, sizeof(error))) {
			double start = now_ns();
			if (bind->snap->code_bytes &&
			    answer(bind->snap, code, is_knn ? p : 0, is_knn ? 0 : p, hashlake_threads(), &bind->hits) < 0) {
				snprintf(error, sizeof(error), "hashlake: out of memory");
			} else {
				observe_search(rows ? (is_knn ? HL_FN_SEARCH_ROWS : HL_FN_WITHIN_ROWS)
				                    : (is_knn ? HL_FN_SEARCH : HL_FN_WITHIN), start, 1);
			}
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
	       register_table_function(connection, "search_rows", knn_rows_bind, rows_table_function, slot) &&
	       register_table_function(connection, "within_rows", within_rows_bind, rows_table_function, slot) &&
	       register_slot_function(connection, slot);
}
