/* The FMA peak of this CPU for one vector width, in GFLOP/s, with 1..T OpenMP threads: ten
 * independent FMA chains per thread (more than latency x pipes, so the pipes stay full), no
 * memory traffic. benchmarks/cpu_limits.py compiles and runs it to put the kernels' GFLOP/s
 * beside what the cores can do:
 *   cc -O2 -mavx2 -mfma -fopenmp fma_peak.c -o fma_peak && ./fma_peak 2       (ymm, AVX2+FMA)
 *   cc -O2 -mavx512f -DWIDTH=512 -fopenmp fma_peak.c -o fma_peak && ./fma_peak 2   (zmm)
 * Prints one line per thread count: "threads=<t> gflops=<best of 5 runs>".
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef WIDTH
#define WIDTH 256
#endif

#if WIDTH == 512
typedef __m512 vec;
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define LANES 16
#else
typedef __m256 vec;
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define LANES 8
#endif

#define CHAINS 10

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char** argv) {
  const int max_threads = argc > 1 ? atoi(argv[1]) : 1;
  const long iters = 100000000L; /* vector FMAs per thread (CHAINS chains of iters / CHAINS) */
  volatile float sink = 0;
  for (int threads = 1; threads <= max_threads; ++threads) {
    double best = 0;
    for (int rep = 0; rep < 5; ++rep) {
      const double t0 = now();
#pragma omp parallel num_threads(threads)
      {
        vec a[CHAINS];
        const vec b = SET1(0.999999f), c = SET1(1e-7f);
        for (int i = 0; i < CHAINS; ++i) a[i] = SET1((float)i);
        for (long it = 0; it < iters / CHAINS; ++it) {
#pragma GCC unroll 10
          for (int i = 0; i < CHAINS; ++i) a[i] = FMA(a[i], b, c);
        }
        /* every lane of every chain reaches the result, so no lane's FMAs can be dropped */
        float lanes[LANES] __attribute__((aligned(64)));
        float s = 0;
        for (int i = 0; i < CHAINS; ++i) {
          memcpy(lanes, &a[i], sizeof lanes);
          for (int l = 0; l < LANES; ++l) s += lanes[l];
        }
#pragma omp atomic
        sink += s;
      }
      const double gflops = threads * (double)iters * LANES * 2 / (now() - t0) / 1e9;
      if (gflops > best) best = gflops;
    }
    printf("threads=%d gflops=%.1f\n", threads, best);
  }
  return sink == 12345.0f;
}
