/* The portable kernels (kernels_generic.h), instantiated for the baseline instruction set and, on
 * x86, for AVX2 + FMA (kernels_avx2_auto: what kernels_avx2.c does not hand-write). */
#include "kernels_common.h"

#define KERNEL_SUFFIX _portable
#define KERNEL_TARGET
#define KERNEL_SET kernels_portable
#define KERNEL_NAME "portable"
#include "kernels_generic.h"
#undef KERNEL_SUFFIX
#undef KERNEL_TARGET
#undef KERNEL_SET
#undef KERNEL_NAME

#if defined(__x86_64__)
#define KERNEL_SUFFIX _avx2_auto
#define KERNEL_TARGET __attribute__((target("avx2,fma,f16c,popcnt")))
#define KERNEL_SET kernels_avx2_auto
#define KERNEL_NAME "avx2"
#include "kernels_generic.h"
#endif
