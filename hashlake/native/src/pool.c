/* Threads: how many this process may use (CPU affinity, cgroup quota), and the pool that runs a
 * job's tasks on them without making the caller wait for a thread to start. */
#include "hashlake.h"

#include <sched.h>
#include <time.h>
#include <unistd.h>

/* ---- how many threads: the cores this process may use -----------------------------------------
 * Not the cores the machine has (_SC_NPROCESSORS_ONLN): in a container or under taskset a process
 * gets fewer, and splitting a scan into more parts than it can run at once only adds hand-offs. The
 * count is the smaller of the CPU affinity mask and the cgroup CPU quota (v2 cpu.max, v1
 * cpu.cfs_quota_us / cpu.cfs_period_us, the tightest along the cgroup's ancestors), rounded up. */

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
HL_API double hashlake_cgroup_cpus(const char *root) {
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
HL_API int32_t hashlake_threads(void) {
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

double now_ns(void) {
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
HL_API int64_t hashlake_pool_spins(void) {
	return atomic_load(&spin_rounds);
}

/* Run tasks 0..tasks-1 of `run` on the caller and the pool; returns when every task has finished. */
void pool_run(void (*run)(void *, int64_t), void *ctx, int64_t tasks) {
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
