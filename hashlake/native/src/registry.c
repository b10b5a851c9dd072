/* The registry of published snapshots and the slots that pin one per database.
 *
 * Python (loader.py) publishes a snapshot by handing over an array of segment descriptors that point
 * into its own buffers; a call acquires the snapshot it reads and releases it when done, and Python
 * frees the buffers only once hashlake_forget() says no call holds it. */
#include "hashlake.h"

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static hl_snapshot *registry = NULL;
static int64_t next_id = 1;

/* Python side (ctypes). Returns the new snapshot's id. */
HL_API int64_t hashlake_publish(int32_t code_bytes, int32_t n_segments,
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
HL_API int32_t hashlake_forget(int64_t id) {
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

hl_snapshot *acquire(int64_t id) {
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

void release(hl_snapshot *s) {
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

int64_t new_slot(void) {
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
HL_API int32_t hashlake_pin(int64_t slot, int64_t snapshot) {
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
hl_snapshot *acquire_pinned(int64_t slot, char *error, size_t size) {
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
