// Compiler switches shared by the CPU inner loops.
//
// DA2EXT_CPU_CLONES: the baseline x86-64 build has only SSE2, while nearly every
// x86 CPU in use has AVX2 (twice the width). With GCC on x86-64 Linux a function
// marked so is cloned for AVX2 and for the baseline (target_clones), and the
// loader picks the clone the CPU supports (an ifunc). Loop bodies it calls are
// DA2EXT_ALWAYS_INLINE so that each clone compiles its own copy. Elsewhere
// (aarch64, e.g. a Jetson, whose baseline NEON is all there is; other
// compilers) one baseline copy is built.
//
// DA2EXT_VECTORIZE_SUM(var): floating-point sums are reductions a compiler may
// not vectorise without permission to reassociate; '#pragma omp simd reduction'
// gives it for the loop that follows only. The summation order is then fixed by
// the binary, so results stay deterministic run to run.
// DA2EXT_VECTORIZE_SUM_MAX_OR(sum, top, flag): the same for a loop that also keeps
// a running max (exact, whatever the order) and an or-ed int flag.
// DA2EXT_VECTORIZE_SUM4(a, b, c, d): four sums at once (four dot products sharing a vector).
// DA2EXT_VECTORIZE: a loop with no reduction, vectorised even where it holds an inner
// loop (each lane runs that inner loop in order: the arithmetic of the scalar loop).
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DA2EXT_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#define DA2EXT_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define DA2EXT_CPU_CLONES
#define DA2EXT_ALWAYS_INLINE inline
#endif

#define DA2EXT_PRAGMA(x) _Pragma(#x)
#if defined(_OPENMP) || defined(DA2EXT_OPENMP_SIMD)
#define DA2EXT_VECTORIZE_SUM(var) DA2EXT_PRAGMA(omp simd reduction(+ : var))
#define DA2EXT_VECTORIZE_SUM_MAX_OR(sum, top, flag) \
  DA2EXT_PRAGMA(omp simd reduction(+ : sum) reduction(max : top) reduction(| : flag))
#define DA2EXT_VECTORIZE_SUM4(a, b, c, d) DA2EXT_PRAGMA(omp simd reduction(+ : a, b, c, d))
#define DA2EXT_VECTORIZE DA2EXT_PRAGMA(omp simd)
#else
#define DA2EXT_VECTORIZE_SUM(var)
#define DA2EXT_VECTORIZE_SUM_MAX_OR(sum, top, flag)
#define DA2EXT_VECTORIZE_SUM4(a, b, c, d)
#define DA2EXT_VECTORIZE
#endif
