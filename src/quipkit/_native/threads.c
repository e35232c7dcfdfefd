/* Parallel loops for the decode kernels, on the threads torch already runs.
 *
 * A batch-1 forward calls a kernel a few hundred times per token, each call lasting tens of
 * microseconds. Two thread pools that each spin while idle (torch's OpenMP team and one of ours)
 * take turns at the cores and wake each other up late: measured here, a 60 us kernel took 800 us
 * right after a torch matmul. So a parallel loop joins torch's own OpenMP team when one is loaded
 * (GNU OpenMP's GOMP_parallel, found with dlopen(RTLD_NOLOAD), which LLVM's and Intel's runtimes
 * also provide); only without one does it use a small pool of its own, whose workers spin on a
 * generation counter for a while after each job and then sleep. Either way the calling thread takes
 * a share of the work, and parts are claimed with an atomic counter, so a slow core holds up nobody.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#include "native.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

#define MAX_THREADS 256
/* Spins (about 10-40 ns each) before a worker goes to sleep: about a millisecond of idling. */
#define SPINS 40000

typedef struct {
    task_fn fn;
    void *ctx;
    int64_t count, grain, parts;
} job_t;

/* One slot per worker on its own cache line: the job generation it is asked to run and the last
 * generation it finished. A worker runs only when its slot changes, so a straggler can never join a
 * later job by mistake, and the caller waits for exactly the workers it asked. */
typedef struct {
    atomic_long asked, finished;
    char pad[64 - 2 * sizeof(atomic_long)];
} slot_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t run_lock = PTHREAD_MUTEX_INITIALIZER; /* one job at a time */
static job_t job;
static long generation;
static atomic_long next_part;
static slot_t slots[MAX_THREADS];
static int started; /* worker threads running */

static void run_parts(void) {
    for (;;) {
        int64_t part = atomic_fetch_add(&next_part, 1);
        if (part >= job.parts) return;
        int64_t lo = job.count * part / job.parts, hi = job.count * (part + 1) / job.parts;
        lo -= lo % job.grain;
        hi = part + 1 == job.parts ? job.count : hi - hi % job.grain;
        if (hi > lo) job.fn(job.ctx, lo, hi);
    }
}

static void *worker(void *arg) {
    slot_t *slot = &slots[(intptr_t)arg];
    long seen = atomic_load(&slot->finished); /* set before the thread started: never a job ahead */
    for (;;) {
        long now;
        int spins = 0;
        while ((now = atomic_load(&slot->asked)) == seen && spins < SPINS) {
            CPU_RELAX();
            spins++;
        }
        if (now == seen) {
            pthread_mutex_lock(&lock);
            while ((now = atomic_load(&slot->asked)) == seen) pthread_cond_wait(&wake, &lock);
            pthread_mutex_unlock(&lock);
        }
        seen = now;
        run_parts();
        atomic_store(&slot->finished, now);
    }
    return NULL;
}

static void reset_after_fork(void) { started = 0; }

static void start_workers(int wanted) {
    static int registered;
    if (!registered) {
        pthread_atfork(NULL, NULL, reset_after_fork);
        registered = 1;
    }
    for (; started < wanted && started < MAX_THREADS - 1; started++) {
        pthread_t thread;
        pthread_attr_t attr;
        atomic_store(&slots[started].asked, generation);
        atomic_store(&slots[started].finished, generation);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&thread, &attr, worker, (void *)(intptr_t)started);
        pthread_attr_destroy(&attr);
        if (failed) break;
    }
}

typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
static gomp_parallel_fn gomp_parallel;
static pthread_once_t gomp_once = PTHREAD_ONCE_INIT;

static void find_openmp(void) {
    static const char *runtimes[] = {"libgomp.so.1", "libomp.so", "libiomp5.so", "libomp.dylib", "libiomp5.dylib"};
    for (size_t i = 0; i < sizeof runtimes / sizeof runtimes[0] && gomp_parallel == NULL; i++) {
        void *handle = dlopen(runtimes[i], RTLD_NOW | RTLD_NOLOAD);
        if (handle != NULL) gomp_parallel = (gomp_parallel_fn)dlsym(handle, "GOMP_parallel");
    }
}

static void openmp_member(void *unused) {
    (void)unused;
    run_parts();
}

void parallel_for(int threads, int64_t count, int64_t grain, task_fn fn, void *ctx) {
    if (count <= 0) return;
    if (grain < 1) grain = 1;
    int64_t chunks = (count + grain - 1) / grain;
    if (threads > chunks) threads = (int)chunks;
    if (threads <= 1) {
        fn(ctx, 0, count);
        return;
    }
    pthread_once(&gomp_once, find_openmp);
    pthread_mutex_lock(&run_lock);
    if (gomp_parallel != NULL) {
        job.fn = fn;
        job.ctx = ctx;
        job.count = count;
        job.grain = grain;
        job.parts = chunks < 4 * threads ? chunks : 4 * threads;
        atomic_store(&next_part, 0);
        gomp_parallel(openmp_member, NULL, (unsigned)threads, 0);
        pthread_mutex_unlock(&run_lock);
        return;
    }
    start_workers(threads - 1);
    int helpers = started < threads - 1 ? started : threads - 1;
    job.fn = fn;
    job.ctx = ctx;
    job.count = count;
    job.grain = grain;
    job.parts = chunks < 4 * (helpers + 1) ? chunks : 4 * (helpers + 1);
    atomic_store(&next_part, 0);
    generation++;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < helpers; i++) atomic_store(&slots[i].asked, generation);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&lock);
    run_parts();
    for (int i = 0; i < helpers; i++)
        while (atomic_load(&slots[i].finished) != generation) CPU_RELAX();
    pthread_mutex_unlock(&run_lock);
}
