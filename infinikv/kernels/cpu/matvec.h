/* x W^T for a few rows of x, the loop the projection kernels share (linear.c, decoder.c):
 * `project` runs inside an OpenMP parallel region, each worker streaming its share of W's
 * rows once, four at a time, prefetching the next four, and dotting them with up to four
 * rows of x at once (bfloat16: up to eight, against two of W's rows at a time; past eight
 * rows six against four; without AVX-512 three against two; x stays in L1). W is float32
 * or bfloat16 (`size` 4 or 2 bytes: half the bytes; on CPUs with AVX512-BF16 x is rounded
 * to bfloat16 and multiplied in VDPBF16PS, as torch's bfloat16 matmul does; elsewhere each
 * weight is widened to float32 in registers, float32 products; on CPUs with AMX in its tiles:
 * amx.h), or blocks of 4-bit or 8-bit weights (`size` Q4 or Q8: blocks.h).
 *
 * Layouts (contiguous): x (M, K) float32, W (N, K) (Q4, Q8: N rows of blocks.h's bytes),
 * y (M, N) float32.
 */
#ifndef INFINIKV_MATVEC_H
#define INFINIKV_MATVEC_H
#include <stdint.h>
#include <stdlib.h>

#include "blocks.h"
#include "vec.h"

typedef unsigned short bf16;

#include "amx.h"

/* The tiles' vectors: a 16-float AVX-512 register, or two 8-float halves where the CPU has
 * none (GCC keeps arrays of 16-float vectors in memory there). Lane j sums k = j mod 16 either
 * way. The loads of x and of the two weight formats: 16 / HALVES values at p; one value. */
#if WIDE_VECTORS
#define HALVES 1
typedef v16 vt;
AI vt xvec(const float* p) { return load(p); }
AI vt wvec_f32(const char* p) { return load((const float*)p); }
AI vt wvec_bf16(const char* p) { return load_bf16((const bf16*)p); }
AI v16 whole(const vt* a) { return a[0]; }
#else
#define HALVES 2
typedef v8 vt;
AI vt xvec(const float* p) { return load8(p); }
AI vt wvec_f32(const char* p) { return load8((const float*)p); }
AI vt wvec_bf16(const char* p) { return load8_bf16((const bf16*)p); }
AI v16 whole(const vt* a) { return join8(a[0], a[1]); }
#endif
AI float wone_f32(const char* p) { return *(const float*)p; }
AI float wone_bf16(const char* p) { return bf16_to_float(*(const bf16*)p); }

/* y[m0 + i, n0 + r] for i < mb and r < R (constants once inlined; mb <= 8, R 2 or 4, mb * R
 * <= 16 accumulators; tile_dot's up to 24): W's rows n0.. start at w, `row` bytes apart,
 * `size` bytes a weight. Each group of 16 weights is loaded once for the mb rows of x; the R
 * rows of W at pf (the rows that follow the tile's block) are prefetched as these are read,
 * one 64-byte line per 16 weights of `size` bytes per row. A row's products and sums do not
 * depend on mb or R. */
AI void tile(const float* x, const char* w, float* y, int N, int K, int m0, int mb, int n0, int64_t row, int R,
             const char* pf, int size, vt (*wvec)(const char*), float (*wone)(const char*)) {
  const int K16 = K - K % 16, lines = size * R / 4;
  vt acc[8][4][HALVES] = {{{0}}};
  for (int k = 0; k < K16; k += 16) {
    const char* wk = w + (int64_t)k * size;
    for (int line = 0; line < lines; line++) __builtin_prefetch(pf + R * (int64_t)k * size + 64 * line);
    /* bfloat16 rows streamed at ~17 GB/s against float32's ~23 with the prefetch above alone:
     * a second one 12 rows further into L2 keeps more lines in flight (~19-20 GB/s, Xeon). */
    if (size == 2)
      for (int line = 0; line < lines; line++)
        __builtin_prefetch(pf + 12 * row + R * (int64_t)k * size + 64 * line, 0, 2);
    for (int h = 0; h < HALVES; h++) {
      const int kh = k + h * 16 / HALVES;
      vt wr[4];
      for (int r = 0; r < R; r++) wr[r] = wvec(wk + r * row + h * 16 / HALVES * size);
      for (int i = 0; i < mb; i++) {
        vt xv = xvec(x + (int64_t)(m0 + i) * K + kh);
        for (int r = 0; r < R; r++) acc[i][r][h] += xv * wr[r];
      }
    }
  }
  for (int i = 0; i < mb; i++) {
    const float* xm = x + (int64_t)(m0 + i) * K;
    v4 s = hsum4(whole(acc[i][0]), whole(acc[i][1]), whole(acc[i][R - 2]), whole(acc[i][R - 1]));
    for (int r = 0; r < R; r++) {
      for (int k = K16; k < K; k++) s[r] += xm[k] * wone(w + r * row + (int64_t)k * size);
      y[(int64_t)(m0 + i) * N + n0 + r] = s[r];
    }
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define BF16_DOT 1
#include <immintrin.h>

/* tile() for bfloat16 weights and x rounded to bfloat16 (xb, rows K apart): 32 products of
 * bfloat16 pairs per instruction, summed in float32 (VDPBF16PS). The bytes each widened
 * weight took in float32 products made 8 rows compute-bound (SmolLM2: ~11 against ~6.5 ms,
 * AMD Zen 5); the products are exact, only x's rounding differs from float32's. */
AI void tile_dot(const bf16* xb, const char* w, float* y, int N, int K, int m0, int mb, int n0, int64_t row, int R,
                 const char* pf) {
  const int K32 = K - K % 32;
  __m512 acc[8][4];
  for (int i = 0; i < mb; i++)
    for (int r = 0; r < R; r++) acc[i][r] = _mm512_setzero_ps();
  for (int k = 0; k < K32; k += 32) {
    for (int line = 0; line < R; line++) {
      __builtin_prefetch(pf + R * 2 * (int64_t)k + 64 * line);
      __builtin_prefetch(pf + 12 * row + R * 2 * (int64_t)k + 64 * line, 0, 2);
    }
    __m512bh wr[4];
    for (int r = 0; r < R; r++) wr[r] = (__m512bh)_mm512_loadu_si512(w + r * row + 2 * (int64_t)k);
    for (int i = 0; i < mb; i++) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + (int64_t)(m0 + i) * K + k);
      for (int r = 0; r < R; r++) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv, wr[r]);
    }
  }
  for (int i = 0; i < mb; i++) {
    const bf16* xm = xb + (int64_t)(m0 + i) * K;
    v4 s = hsum4((v16)acc[i][0], (v16)acc[i][1], (v16)acc[i][R - 2], (v16)acc[i][R - 1]);
    for (int r = 0; r < R; r++) {
      for (int k = K32; k < K; k++) s[r] += bf16_to_float(xm[k]) * wone_bf16(w + r * row + 2 * (int64_t)k);
      y[(int64_t)(m0 + i) * N + n0 + r] = s[r];
    }
  }
}

/* x (M, K) rounded to bfloat16 into this worker's buffer (kept for its next calls; NULL when
 * out of memory). Each worker rounds all of x: a few hundred cycles, no barrier. */
static bf16* rounded_rows(const float* x, int M, int K) {
  static __thread bf16* buf;
  static __thread int64_t cap;
  const int64_t n = (int64_t)M * K;
  if (n > cap) {
    bf16* grown = realloc(buf, sizeof(bf16) * (size_t)n);
    if (!grown) return NULL;
    buf = grown;
    cap = n;
  }
  for (int64_t i = 0; i < n; i++) buf[i] = float_to_bf16(x[i]);
  return buf;
}
#else
#define BF16_DOT 0
#endif

#define TILE_WIDENED(MB, R, P) \
  tile(x, w + (P) * row, y, N, K, m0, MB, 4 * b + (P), row, R, w + (4 + (P)) * row, size, wvec, wone)
#if BF16_DOT
#define TILE(MB, R, P)                                                                                    \
  do {                                                                                                    \
    if (xb)                                                                                               \
      tile_dot(xb, w + (P) * row, y, N, K, m0, MB, 4 * b + (P), row, R, w + (4 + (P)) * row);           \
    else                                                                                                  \
      TILE_WIDENED(MB, R, P);                                                                             \
  } while (0)
#else
#define TILE TILE_WIDENED
#endif

/* Rows [4b, 4b + 4) of y for every row of x: four rows of x at a time against the four rows
 * of W; in bfloat16, five to eight rows of x against two rows of W at a time, so each weight
 * streams from memory once for eight rows of x, not twice from cache for four (8 rows: ~17
 * ms against ~19.5 for SmolLM2's matrices; float32 did not gain, Xeon). */
AI void four_rows(const float* x, const bf16* xb, const char* W, float* y, int M, int N, int K, int b, int size,
                  vt (*wvec)(const char*), float (*wone)(const char*)) {
  const int64_t row = (int64_t)K * size;
  const char* w = W + 4 * b * row;
  const int pairs = size == 2;
#if !WIDE_VECTORS
  /* Without AVX-512: three rows of x against two of W (12 of AVX2's 16 registers accumulate).
   * SmolLM2 at 8 rows, AVX2 build: float32 31-33 ms, bfloat16 29-32, against 79-120 in 4 x 4. */
  if (M > 1) {
    for (int p = 0; p < 4; p += 2)
      for (int m0 = 0; m0 < M; m0 += 3) {
        if (M - m0 >= 3)
          TILE(3, 2, p);
        else if (M - m0 == 2)
          TILE(2, 2, p);
        else
          TILE(1, 2, p);
      }
    return;
  }
#endif
  /* Past 8 rows the products bound the time, not W's bytes: six rows of x against all four
   * of W's (24 accumulators) load less per product (SmolLM2 on Zen 5, 32 rows: bfloat16 dot
   * products 20 ms against 30-35 in 8 x 2 tiles; float32 46-51 against 57-78 in 4 x 4). */
  if ((xb || size == 4) && M > 8) {
    int m0 = 0;
    for (; M - m0 >= 6; m0 += 6) TILE(6, 4, 0);
    switch (M - m0) {
      case 0: break;
      case 1: TILE(1, 4, 0); break;
      case 2: TILE(2, 4, 0); break;
      case 3: TILE(3, 4, 0); break;
      case 4: TILE(4, 4, 0); break;
      default: TILE(5, 4, 0);
    }
    return;
  }
  for (int m0 = 0; m0 < M; m0 += pairs && M - m0 > 4 ? 8 : 4) {
    switch (pairs && M - m0 > 4 ? M - m0 : M - m0 > 4 ? 4 : M - m0) {
      case 1: TILE(1, 4, 0); break;
      case 2: TILE(2, 4, 0); break;
      case 3: TILE(3, 4, 0); break;
      case 4: TILE(4, 4, 0); break;
      case 5: TILE(5, 2, 0); TILE(5, 2, 2); break;
      case 6: TILE(6, 2, 0); TILE(6, 2, 2); break;
      case 7: TILE(7, 2, 0); TILE(7, 2, 2); break;
      default: TILE(8, 2, 0); TILE(8, 2, 2);
    }
  }
}
#undef TILE
#undef TILE_WIDENED

/* The last N % 4 rows of W, one dot product each (x rounded where the tiles round it: xb). */
AI void tail_rows(const float* x, const bf16* xb, const char* W, float* y, int M, int N, int K, int size,
                  float (*wone)(const char*)) {
  for (int n = N - N % 4; n < N; n++)
    for (int m = 0; m < M; m++) {
      float s = 0;
      for (int k = 0; k < K; k++) {
        const int64_t i = (int64_t)m * K + k;
        s += (xb ? bf16_to_float(xb[i]) : x[i]) * wone(W + ((int64_t)n * K + k) * size);
      }
      y[(int64_t)m * N + n] = s;
    }
}

/* y = x W^T, W's rows shared among the workers of the enclosing parallel region (which
 * all call this); returns after a barrier, y complete. Blocks come in whole groups of four
 * rows (the callers check). Out of memory for the rounded x, bfloat16 weights are widened. */
AI void project(const float* x, const char* W, int size, float* y, int M, int N, int K) {
  if (size == Q4 || size == Q8) {
    project_blocks(x, W, size, y, M, N, K);
    return;
  }
  if (amx_takes(size, N, K)) {
    project_amx(x, W, y, M, N, K);
    return;
  }
  const bf16* xb = NULL;
#if BF16_DOT
  if (size == 2) xb = rounded_rows(x, M, K);
#endif
#pragma omp for schedule(static)
  for (int b = 0; b < N / 4; b++) {
    if (size == 4)
      four_rows(x, NULL, W, y, M, N, K, b, 4, wvec_f32, wone_f32);
    else
      four_rows(x, xb, W, y, M, N, K, b, 2, wvec_bf16, wone_bf16);
  }
#pragma omp single
  {
    if (size == 4)
      tail_rows(x, NULL, W, y, M, N, K, 4, wone_f32);
    else
      tail_rows(x, xb, W, y, M, N, K, 2, wone_bf16);
  }
}
#endif
