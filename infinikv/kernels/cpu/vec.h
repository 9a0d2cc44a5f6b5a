/* 16-float vectors (GCC/Clang vector extensions: AVX-512 registers where the CPU has them,
 * pairs of AVX2 ones elsewhere) and the helpers the kernels share. */
#ifndef INFINIKV_VEC_H
#define INFINIKV_VEC_H
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

#define AI static inline __attribute__((always_inline))
/* 1 where a v16 is one register. Without AVX-512 GCC keeps arrays of them in memory: tiles of
 * many rows then run slower than torch's kernels (docs/performance.md, "CPUs without AVX-512"). */
#ifdef __AVX512F__
#define WIDE_VECTORS 1
#else
#define WIDE_VECTORS 0
#endif
AI v16 load(const float* p) { v16 x; memcpy(&x, p, sizeof x); return x; }
AI v8 load8(const float* p) { v8 x; memcpy(&x, p, sizeof x); return x; }
AI void store(float* p, v16 x) { memcpy(p, &x, sizeof x); }

/* Two 8-float vectors as one of 16 (lo's lanes first). */
AI v16 join8(v8 lo, v8 hi) {
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

/* 8 bfloat16 values (the high halves of float32s) widened to float32: exact; one widening
 * instruction and a shift with AVX2 (GCC's generic conversion takes two 128-bit ones). */
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#ifdef __AVX2__
AI v8 load8_bf16(const unsigned short* p) {
  return (v8)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
#else
typedef unsigned short u16x8 __attribute__((vector_size(16)));
typedef unsigned int u32x8 __attribute__((vector_size(32)));
AI v8 load8_bf16(const unsigned short* p) {
  u16x8 h;
  memcpy(&h, p, sizeof h);
  u32x8 w = __builtin_convertvector(h, u32x8) << 16;
  v8 x;
  memcpy(&x, &w, sizeof x);
  return x;
}
#endif
/* The same for 16 values. With AVX-512 in one widening instruction: GCC lowers the generic
 * conversion to five shuffles where it prefers 256-bit vectors (-march=native on Intel), and
 * the decode step was bound by them. */
#ifdef __AVX512F__
AI v16 load_bf16(const unsigned short* p) {
  __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16);
  return (v16)_mm512_castsi512_ps(w);
}
#else
AI v16 load_bf16(const unsigned short* p) { return join8(load8_bf16(p), load8_bf16(p + 8)); }
#endif
/* f rounded to bfloat16 to nearest even, as torch's conversion rounds (a NaN stays one). */
AI unsigned short float_to_bf16(float f) {
  unsigned int u;
  memcpy(&u, &f, sizeof u);
  return (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0 : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
AI float bf16_to_float(unsigned short h) {
  unsigned int w = (unsigned int)h << 16;
  float x;
  memcpy(&x, &w, sizeof x);
  return x;
}

/* The sums of a0..a3's 16 lanes each. */
AI v4 hsum4(v16 a0, v16 a1, v16 a2, v16 a3) {
  v16 x = __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
          __builtin_shufflevector(a0, a1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  v16 y = __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
          __builtin_shufflevector(a2, a3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  v16 z = __builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
          __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  v16 w = z + __builtin_shufflevector(z, z, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  w = w + __builtin_shufflevector(w, w, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return (v4){w[0], w[4], w[8], w[12]};
}

/* The sums of a0..a3's 8 lanes each. */
AI v4 hsum4_8(v8 a0, v8 a1, v8 a2, v8 a3) {
  v8 x = __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(a0, a1, 4, 5, 6, 7, 12, 13, 14, 15);
  v8 y = __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(a2, a3, 4, 5, 6, 7, 12, 13, 14, 15);
  v8 z = __builtin_shufflevector(x, y, 0, 1, 4, 5, 8, 9, 12, 13) +
         __builtin_shufflevector(x, y, 2, 3, 6, 7, 10, 11, 14, 15);
  z = z + __builtin_shufflevector(z, z, 1, 0, 3, 2, 5, 4, 7, 6);
  return (v4){z[0], z[2], z[4], z[6]};
}
#endif
