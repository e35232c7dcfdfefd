/* Which kernel tier runs: the best this CPU supports, unless QUIPKIT_ISA asks for a lower one. */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

static const kernel_set_t *chosen;

static const kernel_set_t *best_supported(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni") &&
        __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("avx512bitalg") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return &kernels_avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return &kernels_avx2;
#endif
    return &kernels_portable;
}

static int rank(const kernel_set_t *k) {
#if defined(__x86_64__)
    if (k == &kernels_avx512) return 2;
    if (k == &kernels_avx2) return 1;
#endif
    (void)k;
    return 0;
}

static const kernel_set_t *by_name(const char *name) {
    if (name == NULL) return NULL;
    if (strcmp(name, "portable") == 0) return &kernels_portable;
#if defined(__x86_64__)
    if (strcmp(name, "avx2") == 0) return &kernels_avx2;
    if (strcmp(name, "avx512") == 0) return &kernels_avx512;
#endif
    return NULL;
}

/* Switch tiers; returns 0, or -1 when the name is unknown or above what the CPU supports. */
int use_kernels(const char *name) {
    const kernel_set_t *wanted = by_name(name), *best = best_supported();
    if (wanted == NULL || rank(wanted) > rank(best)) return -1;
    chosen = wanted;
    return 0;
}

const kernel_set_t *active_kernels(void) {
    if (chosen == NULL && use_kernels(getenv("QUIPKIT_ISA")) != 0) chosen = best_supported();
    return chosen;
}
