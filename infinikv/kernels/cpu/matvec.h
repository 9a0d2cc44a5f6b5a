/* x W^T for a few rows of x, the loop the projection kernels share (linear.c, decoder.c):
 * `project` runs inside an OpenMP parallel region, each worker streaming its share of W's
 * rows once, four at a time, prefetching the next four, and dotting them with up to four
 * rows of x at once (x stays in L1). W is float32 or bfloat16 (`size` 4 or 2 bytes: half
 * the bytes, each value widened to float32 in registers, so the products and sums are
 * float32's), or blocks of 4-bit or 8-bit weights (`size` Q4 or Q8, below).
 *
 * Layouts (contiguous): x (M, K) float32, W (N, K) (Q4, Q8: N rows of K / 32 blocks),
 * y (M, N) float32.
 */
#ifndef INFINIKV_MATVEC_H
#define INFINIKV_MATVEC_H
#include <stdint.h>

#include "vec.h"

typedef unsigned short bf16;

/* Blocks of 32 weights (llama.cpp's Q4_1 and Q8_0 with float32 scales): a Q4 block is
 * float32 d and m, then 16 bytes whose low nibbles are q of weights 0..15 and high nibbles
 * those of 16..31 (w = d * q + m, GGUF Q4_1's order); a Q8 block is float32 d, then 32
 * int8 q (w = d * q). */
#define Q4 1
#define Q8 3
#define Q4_BLOCK 24
#define Q8_BLOCK 36
#define BLOCK_WEIGHTS 32

/* The 32 weights of the block at p, as float32: lo holds weights 0..15, hi 16..31. */
AI void q4_weights(const char* p, v16* lo, v16* hi) {
  float d, m;
  memcpy(&d, p, 4);
  memcpy(&m, p + 4, 4);
#ifdef __AVX512F__
  /* the block's 16 values d * q + m, looked up by each nibble (a permute reads an index's low
   * four bits): fewer instructions than converting the nibbles, and the step is bound by them */
  const __m512 table = _mm512_fmadd_ps(
      _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_ps(d), _mm512_set1_ps(m));
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + 8)));
  *lo = (v16)_mm512_permutexvar_ps(b, table);
  *hi = (v16)_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
#else
  typedef unsigned char u8x16 __attribute__((vector_size(16)));
  typedef int i32x16 __attribute__((vector_size(64)));
  u8x16 q;
  memcpy(&q, p + 8, 16);
  i32x16 b = __builtin_convertvector(q, i32x16);
  *lo = __builtin_convertvector(b & 15, v16) * d + m;
  *hi = __builtin_convertvector(b >> 4, v16) * d + m;
#endif
}

AI void q8_weights(const char* p, v16* lo, v16* hi) {
  float d;
  memcpy(&d, p, 4);
#ifdef __AVX512F__
  *lo = (v16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 4)))) * d;
  *hi = (v16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 20)))) * d;
#else
  typedef signed char i8x16 __attribute__((vector_size(16)));
  i8x16 q0, q1;
  memcpy(&q0, p + 4, 16);
  memcpy(&q1, p + 20, 16);
  *lo = __builtin_convertvector(q0, v16) * d;
  *hi = __builtin_convertvector(q1, v16) * d;
#endif
}

/* The weight loads of the two float formats: 16 values at p, and one value. */
AI v16 wvec_f32(const char* p) { return load((const float*)p); }
AI v16 wvec_bf16(const char* p) { return load_bf16((const bf16*)p); }
AI float wone_f32(const char* p) { return *(const float*)p; }
AI float wone_bf16(const char* p) { return bf16_to_float(*(const bf16*)p); }

/* tile's loop for rows of blocks (`bytes` each, read by `weights`): each block's 32 weights
 * of the four rows made float32 once for the mb rows of x; the next four rows prefetched as
 * these are read. */
AI void tile_blocks(const float* x, const char* w, float* y, int N, int K, int m0, int mb, int n0, int64_t row,
                    int bytes, void (*weights)(const char*, v16*, v16*)) {
  v16 acc[4][4] = {{0}};
  for (int b = 0; b < K / BLOCK_WEIGHTS; b++) {
    const char* wb = w + (int64_t)b * bytes;
    for (int off = 0; off < 4 * bytes; off += 64) __builtin_prefetch(w + 4 * row + 4 * (int64_t)b * bytes + off);
    v16 lo[4], hi[4];
    for (int r = 0; r < 4; r++) weights(wb + r * row, &lo[r], &hi[r]);
    for (int i = 0; i < mb; i++) {
      const float* xb = x + (int64_t)(m0 + i) * K + b * BLOCK_WEIGHTS;
      v16 xl = load(xb), xh = load(xb + 16);
      for (int r = 0; r < 4; r++) acc[i][r] += xl * lo[r] + xh * hi[r];
    }
  }
  for (int i = 0; i < mb; i++) {
    v4 s = hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
    for (int r = 0; r < 4; r++) y[(int64_t)(m0 + i) * N + n0 + r] = s[r];
  }
}

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

/* four_rows for rows of blocks. */
AI void four_rows_blocks(const float* x, const char* W, float* y, int M, int N, int K, int b, int bytes,
                         void (*weights)(const char*, v16*, v16*)) {
  const int64_t row = (int64_t)K / BLOCK_WEIGHTS * bytes;
  const char* w = W + 4 * b * row;
  for (int m0 = 0; m0 < M; m0 += 4) {
    switch (M - m0) {
      case 1: tile_blocks(x, w, y, N, K, m0, 1, 4 * b, row, bytes, weights); break;
      case 2: tile_blocks(x, w, y, N, K, m0, 2, 4 * b, row, bytes, weights); break;
      case 3: tile_blocks(x, w, y, N, K, m0, 3, 4 * b, row, bytes, weights); break;
      default: tile_blocks(x, w, y, N, K, m0, 4, 4 * b, row, bytes, weights);
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
#pragma omp for schedule(static)
  for (int b = 0; b < N / 4; b++) {
    if (size == 4)
      four_rows(x, W, y, M, N, K, b, 4, wvec_f32, wone_f32);
    else if (size == 2)
      four_rows(x, W, y, M, N, K, b, 2, wvec_bf16, wone_bf16);
    else if (size == Q4)
      four_rows_blocks(x, W, y, M, N, K, b, Q4_BLOCK, q4_weights);
    else
      four_rows_blocks(x, W, y, M, N, K, b, Q8_BLOCK, q8_weights);
  }
#pragma omp single
  {
    if (size == 4)
      tail_rows(x, W, y, M, N, K, 4, wone_f32);
    else if (size == 2)
      tail_rows(x, W, y, M, N, K, 2, wone_bf16);
  }
}
#endif
