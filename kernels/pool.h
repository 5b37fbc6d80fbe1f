/* A small work-claiming thread pool for the native kernels (header-only; one pool per process).
 *
 * pool_run(threads, n_items, fn, ctx) runs fn(ctx, i) for i in [0, n_items) on the calling thread and up to
 * threads - 1 workers. Items are claimed one at a time from a shared counter, so the caller never waits for a
 * worker that has not started: on a busy machine, where a worker may not get a core for milliseconds, the caller
 * simply does the work itself and only waits for items a worker has already claimed. (An OpenMP region must wait
 * for every thread of its team to arrive at its closing barrier.)
 *
 * The counter packs (generation, invited workers, item count, next item) into one 64-bit word; a worker runs an
 * item only after a compare-and-swap on that word with the generation it read the job under, so it can never run
 * an item of a job with another job's function. Idle workers spin for a short while (yielding the core to anyone
 * else who wants it), then sleep on a futex. After fork() the child starts with no workers.
 */
#ifndef HF_AUTOROUND_POOL_H
#define HF_AUTOROUND_POOL_H

#include <immintrin.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef void (*pool_fn)(const void *ctx, int64_t item);

#define POOL_MAX_THREADS 64
#ifndef POOL_SPIN_NS
#define POOL_SPIN_NS 200000 /* how long an idle worker keeps looking for work before it sleeps */
#endif

#define GEN_SHIFT 38 /* 26 bits of generation, 6 of invited workers, 16 of item count, 16 of next item */
#define INV_SHIFT 32
#define CNT_SHIFT 16
#define FIELD(v, shift, bits) ((int64_t)(((v) >> (shift)) & ((1ull << (bits)) - 1)))

static struct {
    _Atomic uint64_t next;
    _Atomic int64_t done;
    _Atomic uint32_t wake; /* futex word, bumped once per job */
    _Atomic int sleepers;
    _Atomic(pool_fn) fn;
    _Atomic(const void *) ctx;
    int n_workers;
    pthread_mutex_t lock; /* one job at a time; also guards worker start-up */
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER};

static inline int64_t pool_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Run items of the job of generation gen while there are any and this thread (id) is invited. */
static void pool_work(uint64_t gen, int id) {
    const pool_fn fn = atomic_load(&pool.fn);
    const void *ctx = atomic_load(&pool.ctx);
    uint64_t v = atomic_load(&pool.next);
    while ((v >> GEN_SHIFT) == gen && id < FIELD(v, INV_SHIFT, 6) && FIELD(v, 0, 16) < FIELD(v, CNT_SHIFT, 16)) {
        if (atomic_compare_exchange_weak(&pool.next, &v, v + 1)) {
            fn(ctx, FIELD(v, 0, 16));
            atomic_fetch_add(&pool.done, 1);
            v = atomic_load(&pool.next);
        }
    }
}

/* Wait until the job generation differs from seen: spin (yielding) for POOL_SPIN_NS, then sleep on the futex. */
static uint64_t pool_wait_job(uint64_t seen) {
    const int64_t until = pool_now_ns() + POOL_SPIN_NS;
    for (int i = 1;; i++) {
        const uint64_t gen = atomic_load(&pool.next) >> GEN_SHIFT;
        if (gen != seen) return gen;
        _mm_pause();
        if (i % 64 == 0) {
            sched_yield();
            if (pool_now_ns() > until) break;
        }
    }
    for (;;) {
        atomic_fetch_add(&pool.sleepers, 1);
        const uint32_t w = atomic_load(&pool.wake);
        const uint64_t gen = atomic_load(&pool.next) >> GEN_SHIFT;
        if (gen == seen) syscall(SYS_futex, &pool.wake, FUTEX_WAIT_PRIVATE, w, NULL, NULL, 0);
        atomic_fetch_sub(&pool.sleepers, 1);
        if (gen != seen) return gen;
        const uint64_t now = atomic_load(&pool.next) >> GEN_SHIFT;
        if (now != seen) return now;
    }
}

static void *pool_worker(void *arg) {
    const int id = (int)(intptr_t)arg;
    uint64_t seen = atomic_load(&pool.next) >> GEN_SHIFT;
    for (;;) {
        seen = pool_wait_job(seen);
        pool_work(seen, id);
    }
    return NULL;
}

static void pool_after_fork_child(void) {
    pool.n_workers = 0; /* the workers did not survive the fork */
    atomic_store(&pool.sleepers, 0);
    pthread_mutex_init(&pool.lock, NULL);
}

/* Start workers 1 .. wanted - 1 that do not exist yet (pool.lock held). */
static void pool_grow(int wanted) {
    static int atfork_done;
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, pool_after_fork_child);
        atfork_done = 1;
    }
    while (pool.n_workers + 1 < wanted) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int ok = pthread_create(&t, &attr, pool_worker, (void *)(intptr_t)(pool.n_workers + 1)) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;
        pool.n_workers++;
    }
}

/* fn(ctx, i) for every i in [0, n_items) (n_items < 2^16) on up to `threads` threads; returns when all are done. */
static void pool_run(int threads, int64_t n_items, pool_fn fn, const void *ctx) {
    if (threads > POOL_MAX_THREADS) threads = POOL_MAX_THREADS;
    if (threads > n_items) threads = (int)n_items;
    if (threads <= 1) {
        for (int64_t i = 0; i < n_items; i++) fn(ctx, i);
        return;
    }
    pthread_mutex_lock(&pool.lock);
    pool_grow(threads);
    const uint64_t gen = ((atomic_load(&pool.next) >> GEN_SHIFT) + 1) & ((1u << 26) - 1);
    atomic_store(&pool.fn, fn);
    atomic_store(&pool.ctx, ctx);
    atomic_store(&pool.done, 0);
    atomic_store(&pool.next, gen << GEN_SHIFT | (uint64_t)threads << INV_SHIFT | (uint64_t)n_items << CNT_SHIFT);
    atomic_fetch_add(&pool.wake, 1);
    if (atomic_load(&pool.sleepers) > 0) syscall(SYS_futex, &pool.wake, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
    pool_work(gen, 0);
    for (int i = 1; atomic_load(&pool.done) < n_items; i++) { /* items a worker claimed and still runs */
        _mm_pause();
        if (i % 256 == 0) sched_yield();
    }
    pthread_mutex_unlock(&pool.lock);
}

#endif
