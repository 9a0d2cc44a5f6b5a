/* x W^T for W in blocks of 32 quantized weights (ops.py's q4_blocks, q8_blocks): GGUF
 * Q4_1's and Q8_0's bytes per block, each row's float16 scales gathered after its values:
 *   Q4 row: K/32 blocks of 16 bytes (byte j holds weight j's q in its low nibble, weight
 *           j + 16's in its high one), then K/32 scales d, then K/32 minimums m: w = d q + m;
 *   Q8 row: K int8 q, then K/32 scales d: w = d q.
 * With AVX512-VNNI, x is quantized per block of 32 to int8 (x = dx qx, llama.cpp's Q8_1) and
 * each block's dot product is an integer one (VPDPBUSD): a few instructions per 64 weights
 * where de-quantizing to float32 took a dozen. Elsewhere the weights are de-quantized in
 * registers and multiplied with float32 x. Rows of x are independent: a row's result does not
 * depend on the others (batch invariance).
 */
#ifndef INFINIKV_BLOCKS_H
#define INFINIKV_BLOCKS_H
#include <stdint.h>

#include "vec.h"

#define Q4 1
#define Q8 3
#define BLOCK_WEIGHTS 32

/* Bytes of a row's values (its scales follow them) and of the whole row. */
AI int64_t value_bytes(int size, int K) { return size == Q4 ? K / 2 : K; }
AI int64_t block_row_bytes(int size, int K) { return value_bytes(size, K) + (size == Q4 ? 2 : 1) * (K / 16); }

#ifdef __F16C__
#include <immintrin.h>
#endif
AI float half_to_float(uint16_t h) {
#ifdef __F16C__
  return _cvtsh_ss(h);
#else
  const uint32_t e = (h >> 10) & 31, m = h & 1023;
  float f;
  if (e == 0) { /* zero or subnormal: m 2^-24 */
    f = (float)m * 5.9604644775390625e-8f;
  } else { /* normal (the packer refuses infinities and NaNs) */
    const uint32_t w = (e + 112) << 23 | m << 13;
    memcpy(&f, &w, 4);
  }
  return h & 0x8000 ? -f : f;
#endif
}

/* The 32 weights of a block (values at v, scale d, minimum m), as float32: lo holds
 * weights 0..15, hi 16..31. */
AI void q4_weights(const char* v, float d, float m, v16* lo, v16* hi) {
#ifdef __AVX512F__
  /* the block's 16 values d * q + m, looked up by each nibble (a permute reads an index's low
   * four bits): fewer instructions than converting the nibbles */
  const __m512 table = _mm512_fmadd_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                       _mm512_set1_ps(d), _mm512_set1_ps(m));
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)v));
  *lo = (v16)_mm512_permutexvar_ps(b, table);
  *hi = (v16)_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
#else
  typedef unsigned char u8x16 __attribute__((vector_size(16)));
  typedef int i32x16 __attribute__((vector_size(64)));
  u8x16 q;
  memcpy(&q, v, 16);
  i32x16 b = __builtin_convertvector(q, i32x16);
  *lo = __builtin_convertvector(b & 15, v16) * d + m;
  *hi = __builtin_convertvector(b >> 4, v16) * d + m;
#endif
}

AI void q8_weights(const char* v, float d, v16* lo, v16* hi) {
  typedef signed char i8x16 __attribute__((vector_size(16)));
  i8x16 q0, q1;
  memcpy(&q0, v, 16);
  memcpy(&q1, v + 16, 16);
  *lo = __builtin_convertvector(q0, v16) * d;
  *hi = __builtin_convertvector(q1, v16) * d;
}

AI float block_scale(const char* row, int64_t at, int b) {
  uint16_t h;
  memcpy(&h, row + at + 2 * b, 2);
  return half_to_float(h);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define INT8_ACTIVATIONS 1
#include <immintrin.h>

/* x's rows quantized (xq_*): per row, its blocks in pairs of 64 bytes laid out as the
 * weights' pairs unpack (Q4: b[0:16] b'[0:16] b[16:32] b'[16:32]; Q8: b then b'), and per
 * block dx and sx = dx * sum(qx), 16 blocks a group, each group in group_sums' order. */
AI int64_t xq_row_bytes(int K) { return (int64_t)(K / BLOCK_WEIGHTS + 1) / 2 * 64; }
AI int64_t xq_row_scales(int K) { return (int64_t)(K / BLOCK_WEIGHTS + 15) / 16 * 16; }

/* The position of block b of a group in group_sums' result: lane k holds blocks k, k + 4,
 * k + 8, k + 12. */
AI int group_position(int b) { return 4 * (b % 4) + b / 4; }

AI void quantize_row(const float* x, int K, int size, int8_t* q, float* dx, float* sx) {
  const int nb = K / BLOCK_WEIGHTS;
  if (nb % 2) memset(q + 64 * (nb / 2), 0, 64); /* the odd block's missing partner */
  if (nb % 16) { /* the last group's missing blocks */
    memset(dx + nb / 16 * 16, 0, 64);
    memset(sx + nb / 16 * 16, 0, 64);
  }
  for (int b = 0; b < nb; b++) {
    const __m512 x0 = _mm512_loadu_ps(x + BLOCK_WEIGHTS * b), x1 = _mm512_loadu_ps(x + BLOCK_WEIGHTS * b + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    const __m512 id = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, id)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, id));
    int8_t* p = q + 64 * (b / 2);
    const int lo = size == Q4 ? 16 * (b % 2) : 32 * (b % 2), hi = size == Q4 ? lo + 32 : lo + 16;
    _mm_storeu_si128((__m128i*)(p + lo), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128((__m128i*)(p + hi), _mm512_cvtepi32_epi8(q1));
    const int at = b / 16 * 16 + group_position(b % 16);
    dx[at] = amax / 127.f;
    sx[at] = dx[at] * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  }
}

/* The 64 weights of blocks b, b + 1 as unsigned bytes in their x's order (half: b alone, the
 * last of an odd row, its partner's x zero). Q4: [qb qb' qb qb'] shifted by 0, 0, 4, 4, low
 * nibbles kept; Q8: q + 128 (the products' excess, 128 sum(qx), is taken off with the minimum). */
AI __m512i q4_pair(const char* p, int half) {
  const __m512i b = half ? _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)p))
                         : _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)p));
  const __m512i shifts = _mm512_set_epi64(0x0004000400040004, 0x0004000400040004, 0x0004000400040004,
                                          0x0004000400040004, 0, 0, 0, 0);
  return _mm512_and_si512(_mm512_srlv_epi16(b, shifts), _mm512_set1_epi8(0x0F));
}

AI __m512i q8_pair(const char* p, int half) {
  const __m512i b = half ? _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i*)p))
                         : _mm512_loadu_si512((const void*)p);
  return _mm512_xor_si512(b, _mm512_set1_epi8((char)0x80));
}

/* Sums of 8 lanes per block, in three folds: two pairs' products (Q4 lanes b b' b b', Q8
 * b b b' b') -> 4 blocks of 4 lanes; two of those -> 8 blocks of 2; two of those -> 16. */
AI __m512i fold_pairs(__m512i a, __m512i b, int size) {
  const __m512i lo = size == Q4 ? _mm512_shuffle_i32x4(a, b, 0x44) : _mm512_shuffle_i32x4(a, b, 0x88);
  const __m512i hi = size == Q4 ? _mm512_shuffle_i32x4(a, b, 0xEE) : _mm512_shuffle_i32x4(a, b, 0xDD);
  return _mm512_add_epi32(lo, hi);
}

AI __m512i fold_fours(__m512i a, __m512i b) {
  return _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
}

AI __m512i fold_twos(__m512i a, __m512i b) {
  const __m512 fa = _mm512_castsi512_ps(a), fb = _mm512_castsi512_ps(b);
  return _mm512_add_epi32(_mm512_castps_si512(_mm512_shuffle_ps(fa, fb, 0x88)),
                          _mm512_castps_si512(_mm512_shuffle_ps(fa, fb, 0xDD)));
}

/* Per block, its sum in group_position order: 8 pairs folded three times; up to 4 pairs (up
 * to 8 blocks, the rest of a row) the first two times, then with zeros; up to 2 pairs once,
 * then within lanes (position 4k + j holds block k: for j >= 1 a block beyond the row's
 * last, whose scales are zero). */
AI __m512i group_sums(const __m512i v[8], int pairs, int size) {
  const __m512i t = fold_pairs(v[0], v[1], size);
  if (pairs <= 2) {
    const __m512i u = _mm512_add_epi32(t, _mm512_shuffle_epi32(t, (_MM_PERM_ENUM)0x4E));
    return _mm512_add_epi32(u, _mm512_shuffle_epi32(u, (_MM_PERM_ENUM)0xB1));
  }
  const __m512i f = fold_fours(t, fold_pairs(v[2], v[3], size));
  if (pairs <= 4) return fold_twos(f, _mm512_setzero_si512());
  return fold_twos(f, fold_fours(fold_pairs(v[4], v[5], size), fold_pairs(v[6], v[7], size)));
}

/* acc[i] += one group's products for x's rows m0 + i < mb: blocks b0 .. b0 + 2 pairs of W's
 * row w (pairs and half constants for whole groups), each block's integer dot product scaled
 * by d dx, plus m sx (Q8: m = -128 d). */
AI void group_int8(const int8_t* xq, const float* dx, const float* sx, const char* w, __m512* acc, int K, int m0,
                   int mb, int b0, int pairs, int half, int size) {
  const int nb = K / BLOCK_WEIGHTS, blocks = 2 * pairs - half;
  const int64_t qbytes = xq_row_bytes(K), scales = xq_row_scales(K), values = value_bytes(size, K);
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __mmask16 k = (__mmask16)((1u << blocks) - 1);
  const __m512 d = _mm512_permutexvar_ps(order, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, w + values + 2 * b0)));
  const __m512 m = size == Q4 ? _mm512_permutexvar_ps(
                                    order, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, w + values + nb * 2 + 2 * b0)))
                              : _mm512_mul_ps(d, _mm512_set1_ps(-128.f));
  __m512i wp[8];
  for (int p = 0; p < 8; p++) {
    const int last = half && p == pairs - 1;
    if (p >= pairs)
      wp[p] = _mm512_setzero_si512();
    else if (size == Q4)
      wp[p] = q4_pair(w + 16 * (int64_t)b0 + 32 * p, last);
    else
      wp[p] = q8_pair(w + 32 * (int64_t)b0 + 64 * p, last);
  }
  for (int i = 0; i < mb; i++) {
    const int8_t* xr = xq + (m0 + i) * qbytes + 32 * (int64_t)b0;
    __m512i v[8];
    for (int p = 0; p < 8; p++)
      v[p] = p < pairs ? _mm512_dpbusd_epi32(_mm512_setzero_si512(), wp[p], _mm512_loadu_si512(xr + 64 * p))
                       : _mm512_setzero_si512();
    const __m512 s = _mm512_cvtepi32_ps(group_sums(v, pairs, size));
    const float* dr = dx + (m0 + i) * scales + b0;
    const float* sr = sx + (m0 + i) * scales + b0;
    acc[i] = _mm512_fmadd_ps(s, _mm512_mul_ps(d, _mm512_loadu_ps(dr)), acc[i]);
    acc[i] = _mm512_fmadd_ps(m, _mm512_loadu_ps(sr), acc[i]);
  }
}

/* acc[i] (i < mb, a constant once inlined) = the lanes of x's row m0 + i times W's row at w:
 * whole groups of 16 blocks, then the rest. */
AI void row_int8(const int8_t* xq, const float* dx, const float* sx, const char* w, __m512* acc, int K, int m0,
                 int mb, int size) {
  const int nb = K / BLOCK_WEIGHTS, rest = nb % 16;
  for (int i = 0; i < mb; i++) acc[i] = _mm512_setzero_ps();
  for (int b0 = 0; b0 + 16 <= nb; b0 += 16) group_int8(xq, dx, sx, w, acc, K, m0, mb, b0, 8, 0, size);
  if (rest) group_int8(xq, dx, sx, w, acc, K, m0, mb, nb - rest, (rest + 1) / 2, rest % 2, size);
}

/* y[m0 + i, n0 + r] for i < mb and r < 4: each row of W's lanes kept, then the four rows'
 * sums at once (one horizontal fold per four outputs, off each row's dependency chain). */
AI void tile_int8(const int8_t* xq, const float* dx, const float* sx, const char* w, int64_t row, float* y, int N,
                  int K, int m0, int mb, int n0, int size) {
  __m512 acc[4][4];
  for (int r = 0; r < 4; r++) row_int8(xq, dx, sx, w + r * row, acc[r], K, m0, mb, size);
  for (int i = 0; i < mb; i++) {
    const v4 s = hsum4((v16)acc[0][i], (v16)acc[1][i], (v16)acc[2][i], (v16)acc[3][i]);
    for (int r = 0; r < 4; r++) y[(int64_t)(m0 + i) * N + n0 + r] = s[r];
  }
}

/* Rows [4b, 4b + 4) of y for every row of x, four rows of x at a time; the next four rows
 * of W prefetched as these are read. */
AI void four_rows_int8(const int8_t* xq, const float* dx, const float* sx, const char* W, float* y, int M, int N,
                       int K, int b, int size) {
  const int64_t row = block_row_bytes(size, K);
  const char* w = W + 4 * b * row;
  for (int64_t off = 0; off < 4 * row; off += 64) __builtin_prefetch(w + 4 * row + off);
  for (int m0 = 0; m0 < M; m0 += 4) {
    switch (M - m0) {
      case 1: tile_int8(xq, dx, sx, w, row, y, N, K, m0, 1, 4 * b, size); break;
      case 2: tile_int8(xq, dx, sx, w, row, y, N, K, m0, 2, 4 * b, size); break;
      case 3: tile_int8(xq, dx, sx, w, row, y, N, K, m0, 3, 4 * b, size); break;
      default: tile_int8(xq, dx, sx, w, row, y, N, K, m0, 4, 4 * b, size);
    }
  }
}

/* y = x W^T for blocks, inside the enclosing parallel region: each worker quantizes x on its
 * own stack (no barrier), then takes its share of W's rows. */
AI void project_blocks(const float* x, const char* W, int size, float* y, int M, int N, int K) {
  const int64_t qbytes = xq_row_bytes(K), scales = xq_row_scales(K);
  int8_t xq[M * qbytes];
  float dx[M * scales], sx[M * scales];
  for (int i = 0; i < M; i++)
    quantize_row(x + (int64_t)i * K, K, size, xq + i * qbytes, dx + i * scales, sx + i * scales);
  if (size == Q4) {
#pragma omp for schedule(static)
    for (int b = 0; b < N / 4; b++) four_rows_int8(xq, dx, sx, W, y, M, N, K, b, Q4);
  } else {
#pragma omp for schedule(static)
    for (int b = 0; b < N / 4; b++) four_rows_int8(xq, dx, sx, W, y, M, N, K, b, Q8);
  }
}

#else
#define INT8_ACTIVATIONS 0
#if WIDE_VECTORS
#define BLOCK_TILE 4 /* rows of x a tile takes */

/* y[m0 + i, n0 + r] for i < mb and r < 4: each block's 32 weights of the four rows made
 * float32 once for the mb rows of x; the next four rows prefetched as these are read. */
AI void tile_blocks(const float* x, const char* w, float* y, int N, int K, int m0, int mb, int n0, int64_t row,
                    int size) {
  const int nb = K / BLOCK_WEIGHTS, step = size == Q4 ? 16 : 32;
  const int64_t values = value_bytes(size, K);
  v16 acc[4][4] = {{0}};
  for (int b = 0; b < nb; b++) {
    for (int r = 0; r < 4; r++) __builtin_prefetch(w + 4 * row + r * row + (int64_t)b * step);
    v16 lo[4], hi[4];
    for (int r = 0; r < 4; r++) {
      const char* wr = w + r * row;
      const float d = block_scale(wr, values, b), m = size == Q4 ? block_scale(wr, values + 2 * nb, b) : 0.f;
      if (size == Q4)
        q4_weights(wr + (int64_t)b * step, d, m, &lo[r], &hi[r]);
      else
        q8_weights(wr + (int64_t)b * step, d, &lo[r], &hi[r]);
    }
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
#else
/* Without AVX-512, in 8-float vectors (GCC keeps arrays of 16-float ones in memory there:
 * SmolLM2 in int4 ran at 0.1x torch's kernel): one row of W's block at a time, made float32
 * in four vectors (weights 0..7, 8..15, 16..23, 24..31) and dotted with up to two rows of x. */
#define BLOCK_TILE 2
typedef unsigned char u8x8 __attribute__((vector_size(8)));
typedef signed char i8x8 __attribute__((vector_size(8)));
typedef int i32x8 __attribute__((vector_size(32)));

/* 8 bytes at v widened to int32, unsigned or signed: one instruction each with AVX2 (GCC
 * builds the generic conversion from scalar inserts). */
#ifdef __AVX2__
AI i32x8 widen_u8(const char* v) { return (i32x8)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)v)); }
AI i32x8 widen_i8(const char* v) { return (i32x8)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)v)); }
#else
AI i32x8 widen_u8(const char* v) {
  u8x8 b;
  memcpy(&b, v, 8);
  return __builtin_convertvector(b, i32x8);
}
AI i32x8 widen_i8(const char* v) {
  i8x8 b;
  memcpy(&b, v, 8);
  return __builtin_convertvector(b, i32x8);
}
#endif

AI void q4_weights8(const char* v, float d, float m, v8 q[4]) {
  const i32x8 lo = widen_u8(v), hi = widen_u8(v + 8);
  q[0] = __builtin_convertvector(lo & 15, v8) * d + m;
  q[1] = __builtin_convertvector(hi & 15, v8) * d + m;
  q[2] = __builtin_convertvector(lo >> 4, v8) * d + m;
  q[3] = __builtin_convertvector(hi >> 4, v8) * d + m;
}

AI void q8_weights8(const char* v, float d, v8 q[4]) {
  for (int j = 0; j < 4; j++) q[j] = __builtin_convertvector(widen_i8(v + 8 * j), v8) * d;
}

AI void tile_blocks(const float* x, const char* w, float* y, int N, int K, int m0, int mb, int n0, int64_t row,
                    int size) {
  const int nb = K / BLOCK_WEIGHTS, step = size == Q4 ? 16 : 32;
  const int64_t values = value_bytes(size, K);
  v8 acc[BLOCK_TILE][4] = {{0}};
  for (int b = 0; b < nb; b++) {
    for (int r = 0; r < 4; r++) {
      const char* wr = w + r * row;
      __builtin_prefetch(wr + 4 * row + (int64_t)b * step);
      const float d = block_scale(wr, values, b), m = size == Q4 ? block_scale(wr, values + 2 * nb, b) : 0.f;
      v8 q[4];
      if (size == Q4)
        q4_weights8(wr + (int64_t)b * step, d, m, q);
      else
        q8_weights8(wr + (int64_t)b * step, d, q);
      for (int i = 0; i < mb; i++) {
        const float* xb = x + (int64_t)(m0 + i) * K + b * BLOCK_WEIGHTS;
        acc[i][r] += load8(xb) * q[0] + load8(xb + 8) * q[1] + load8(xb + 16) * q[2] + load8(xb + 24) * q[3];
      }
    }
  }
  for (int i = 0; i < mb; i++) {
    v4 s = hsum4_8(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
    for (int r = 0; r < 4; r++) y[(int64_t)(m0 + i) * N + n0 + r] = s[r];
  }
}
#endif

AI void project_blocks(const float* x, const char* W, int size, float* y, int M, int N, int K) {
  const int64_t row = block_row_bytes(size, K);
#pragma omp for schedule(static)
  for (int b = 0; b < N / 4; b++) {
    const char* w = W + 4 * b * row;
    for (int m0 = 0; m0 < M; m0 += BLOCK_TILE) {
      switch (M - m0 < BLOCK_TILE ? M - m0 : BLOCK_TILE) {
        case 1: tile_blocks(x, w, y, N, K, m0, 1, 4 * b, row, size); break;
#if BLOCK_TILE == 4
        case 2: tile_blocks(x, w, y, N, K, m0, 2, 4 * b, row, size); break;
        case 3: tile_blocks(x, w, y, N, K, m0, 3, 4 * b, row, size); break;
#endif
        default: tile_blocks(x, w, y, N, K, m0, BLOCK_TILE, 4 * b, row, size);
      }
    }
  }
}
#endif
#endif
