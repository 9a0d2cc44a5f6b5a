/* x W^T for a few rows of x, the loop the projection kernels share (linear.c, decoder.c):
 * `project` runs inside an OpenMP parallel region, each worker streaming its share of W's
 * rows once, four at a time, prefetching the next four, and dotting them with up to four
 * rows of x at once (x stays in L1). W is float32 or bfloat16 (`size` 4 or 2 bytes: half
 * the bytes, each value widened to float32 in registers, so the products and sums are
 * float32's), or blocks of 4-bit or 8-bit weights (`size` Q4 or Q8: blocks.h).
 *
 * Layouts (contiguous): x (M, K) float32, W (N, K) (Q4, Q8: N rows of blocks.h's bytes),
 * y (M, N) float32.
 */
#ifndef INFINIKV_MATVEC_H
#define INFINIKV_MATVEC_H
#include <stdint.h>

#include "blocks.h"
#include "vec.h"

typedef unsigned short bf16;

/* The weight loads of the two float formats: 16 values at p, and one value. */
AI v16 wvec_f32(const char* p) { return load((const float*)p); }
AI v16 wvec_bf16(const char* p) { return load_bf16((const bf16*)p); }
AI float wone_f32(const char* p) { return *(const float*)p; }
AI float wone_bf16(const char* p) { return bf16_to_float(*(const bf16*)p); }

/* y[m0 + i, n0 + r] for i < mb (a constant once inlined) and r < 4: W's rows n0.. start at
 * w, `row` bytes apart, `size` bytes a weight. Each group of 16 weights is loaded once for
 * the mb rows of x; the next four rows of W (the next `4 * row` bytes) are prefetched as
 * these are read, one 64-byte line per 16 weights of `size` bytes per row. */
AI void tile(const float* x, const char* w, float* y, int N, int K, int m0, int mb, int n0, int64_t row,
             int size, v16 (*wvec)(const char*), float (*wone)(const char*)) {
  const int K16 = K - K % 16;
  v16 acc[4][4] = {{0}};
  for (int k = 0; k < K16; k += 16) {
    const char* wk = w + (int64_t)k * size;
    for (int line = 0; line < size; line++) __builtin_prefetch(w + 4 * row + 4 * (int64_t)k * size + 64 * line);
    /* bfloat16 rows streamed at ~17 GB/s against float32's ~23 with the prefetch above alone:
     * a second one 16 rows ahead into L2 keeps more lines in flight (~19-20 GB/s, Xeon). */
    if (size == 2)
      for (int line = 0; line < size; line++) __builtin_prefetch(w + 16 * row + 4 * (int64_t)k * size + 64 * line, 0, 2);
    v16 w0 = wvec(wk), w1 = wvec(wk + row), w2 = wvec(wk + 2 * row), w3 = wvec(wk + 3 * row);
    for (int i = 0; i < mb; i++) {
      v16 xv = load(x + (int64_t)(m0 + i) * K + k);
      acc[i][0] += xv * w0;
      acc[i][1] += xv * w1;
      acc[i][2] += xv * w2;
      acc[i][3] += xv * w3;
    }
  }
  for (int i = 0; i < mb; i++) {
    const float* xm = x + (int64_t)(m0 + i) * K;
    v4 s = hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
    for (int r = 0; r < 4; r++) {
      for (int k = K16; k < K; k++) s[r] += xm[k] * wone(w + r * row + (int64_t)k * size);
      y[(int64_t)(m0 + i) * N + n0 + r] = s[r];
    }
  }
}

/* Rows [4b, 4b + 4) of y for every row of x, four rows of x at a time. */
AI void four_rows(const float* x, const char* W, float* y, int M, int N, int K, int b, int size,
                  v16 (*wvec)(const char*), float (*wone)(const char*)) {
  const int64_t row = (int64_t)K * size;
  const char* w = W + 4 * b * row;
  for (int m0 = 0; m0 < M; m0 += 4) {
    switch (M - m0) {
      case 1: tile(x, w, y, N, K, m0, 1, 4 * b, row, size, wvec, wone); break;
      case 2: tile(x, w, y, N, K, m0, 2, 4 * b, row, size, wvec, wone); break;
      case 3: tile(x, w, y, N, K, m0, 3, 4 * b, row, size, wvec, wone); break;
      default: tile(x, w, y, N, K, m0, 4, 4 * b, row, size, wvec, wone);
    }
  }
}

/* The last N % 4 rows of W, one dot product each. */
AI void tail_rows(const float* x, const char* W, float* y, int M, int N, int K, int size,
                  float (*wone)(const char*)) {
  for (int n = N - N % 4; n < N; n++)
    for (int m = 0; m < M; m++) {
      float s = 0;
      for (int k = 0; k < K; k++) s += x[(int64_t)m * K + k] * wone(W + ((int64_t)n * K + k) * size);
      y[(int64_t)m * N + n] = s;
    }
}

/* y = x W^T, W's rows shared among the workers of the enclosing parallel region (which
 * all call this); returns after a barrier, y complete. Blocks come in whole groups of four
 * rows (the callers check). */
AI void project(const float* x, const char* W, int size, float* y, int M, int N, int K) {
  if (size == Q4 || size == Q8) {
    project_blocks(x, W, size, y, M, N, K);
    return;
  }
#pragma omp for schedule(static)
  for (int b = 0; b < N / 4; b++) {
    if (size == 4)
      four_rows(x, W, y, M, N, K, b, 4, wvec_f32, wone_f32);
    else
      four_rows(x, W, y, M, N, K, b, 2, wvec_bf16, wone_bf16);
  }
#pragma omp single
  {
    if (size == 4)
      tail_rows(x, W, y, M, N, K, 4, wone_f32);
    else
      tail_rows(x, W, y, M, N, K, 2, wone_bf16);
  }
}
#endif
