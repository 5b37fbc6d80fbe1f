/* Running independent items on several threads: torch's OpenMP team or our own pool (pool.h).
 *
 * parallel_run(mode, threads, n_items, fn, ctx) calls fn(ctx, i) for every i in [0, n_items) on up to `threads`
 * threads (the caller included) and returns when all are done. Items are taken dynamically in both modes.
 *   PAR_OPENMP  an OpenMP region. Inside torch this is torch's own libgomp team, whose worker is usually still
 *               spinning after torch's last parallel op (attention, the lm_head), so it starts at once and no
 *               extra thread competes for the cores. But the region ends in a barrier: when another process holds
 *               the worker's core, the caller waits for it, a scheduler time slice or more.
 *   PAR_POOL    our work-claiming pool: the caller never waits for a worker that has not started, so it degrades
 *               to one thread, not to a stall, on an oversubscribed machine; on an idle one its worker competes
 *               with torch's spinning OpenMP worker for the second core.
 *   PAR_AUTO    PAR_POOL while the machine is oversubscribed (1-minute load average above the usable cores plus
 *               one half, checked once a second), else PAR_OPENMP.
 */
#ifndef HF_AUTOROUND_PARALLEL_H
#define HF_AUTOROUND_PARALLEL_H

#define _GNU_SOURCE
#include <sched.h>
#include <sys/sysinfo.h>

#include "pool.h"

enum { PAR_AUTO = 0, PAR_OPENMP = 1, PAR_POOL = 2 };

static void openmp_run(int threads, int64_t n_items, pool_fn fn, const void *ctx) {
    if (threads > n_items) threads = (int)n_items;
    if (threads <= 1) {
        for (int64_t i = 0; i < n_items; i++) fn(ctx, i);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t i = 0; i < n_items; i++) fn(ctx, i);
}

static int usable_cores(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
    return get_nprocs();
}

/* Whether the machine is oversubscribed, re-read at most once a second. */
static int machine_busy(void) {
    static _Atomic int64_t checked_at = -2000000000;
    static _Atomic int busy = 0;
    const int64_t now = pool_now_ns();
    if (now - atomic_load(&checked_at) > 1000000000) {
        struct sysinfo si;
        if (sysinfo(&si) == 0)
            atomic_store(&busy, (double)si.loads[0] / (1 << SI_LOAD_SHIFT) > usable_cores() + 0.5);
        atomic_store(&checked_at, now);
    }
    return atomic_load(&busy);
}

static void parallel_run(int mode, int threads, int64_t n_items, pool_fn fn, const void *ctx) {
    if (mode == PAR_AUTO) mode = machine_busy() ? PAR_POOL : PAR_OPENMP;
    if (mode == PAR_POOL)
        pool_run(threads, n_items, fn, ctx);
    else
        openmp_run(threads, n_items, fn, ctx);
}

#endif
