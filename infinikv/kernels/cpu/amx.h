/* x W^T for bfloat16 weights in AMX tiles (Intel's Advanced Matrix Extensions, Sapphire
 * Rapids on): W's rows are the tiles' A operand as they lie in memory (16 rows x 32 weights),
 * x rounded to bfloat16 the B operand (k pairs by rows of x), so one TDPBF16PS takes 16 x 16
 * x 32 products. VDPBF16PS took 2-3x one row's time at 16-32 rows on a Xeon, torch's AMX
 * matmul under it. Each product sum is the instruction's own (row by row of x, in a fixed
 * order), so a row's result does not depend on the rows beside it, from 1 row to any.
 *
 * Used where INFINIKV_AMX=1, the build targets AMX-BF16 and Linux grants this process the
 * tile state (`amx_tiles`, asked once when the library loads), for W of N % 16 == 0 rows and
 * K % 32 == 0; up to 16 rows of x, three blocks of W's rows at a time (independent sums).
 */
#ifndef INFINIKV_AMX_H
#define INFINIKV_AMX_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define AMX_GROUPS 4 /* rows of x in groups of 16, four C tiles at a time (tmm2..tmm5) */

static int amx_granted; /* a copy per file that includes this, each set alike at load */

/* Opt-in (INFINIKV_AMX=1): one row costs 5-20% more than in VDPBF16PS, 8-64 rows 1.5-5x
 * less (docs/performance.md). Linux hands a process the tile state only when asked (else the first tile
 * instruction faults): once, at load, before any thread uses it. */
__attribute__((constructor)) static void amx_request(void) {
  const char* on = getenv("INFINIKV_AMX");
  amx_granted = on && strcmp(on, "1") == 0 && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} tile_config;

/* Every tile 16 rows of 64 bytes: tmm0 (and up to 16 rows of x, tmm6, tmm7) W's blocks,
 * tmm1 x's pairs, tmm2..5 the sums. */
AI void amx_configure(void) {
  tile_config c;
  memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int t = 0; t < 8; t++) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  _tile_loadconfig(&c);
}

/* Rows m0.. of x (zero past M) for weights [32 kb, 32 kb + 32) as a B tile: row r holds
 * the r-th pair of weights' x values, two bfloat16s per row of x (rounded as float_to_bf16). */
AI void amx_pair_tile(const float* x, int M, int K, int m0, int kb, uint32_t* out) {
  memset(out, 0, 1024);
  for (int m = m0; m < M && m < m0 + 16; m++) {
    const float* xk = x + (int64_t)m * K + 32 * kb;
    for (int r = 0; r < 16; r++)
      out[r * 16 + m - m0] = float_to_bf16(xk[2 * r]) | (uint32_t)float_to_bf16(xk[2 * r + 1]) << 16;
  }
}

/* Every B tile of x's rows [g0, g0 + 16 G), by 32 weights then group, in this worker's
 * buffer (kept for its next calls; NULL when out of memory: the caller packs tile by tile). */
static const uint32_t* amx_pairs(const float* x, int M, int K, int g0, int G) {
  static __thread uint32_t* buf;
  static __thread int64_t cap;
  const int64_t n = (int64_t)(K / 32) * G * 256;
  if (n > cap) {
    uint32_t* grown = realloc(buf, sizeof(uint32_t) * (size_t)n);
    if (!grown) return NULL;
    buf = grown;
    cap = n;
  }
  for (int kb = 0; kb < K / 32; kb++)
    for (int g = 0; g < G; g++) amx_pair_tile(x, M, K, g0 + 16 * g, kb, buf + ((int64_t)kb * G + g) * 256);
  return buf;
}

/* One group's sums (16 rows of W by 16 rows of x, transposed) into y's rows m0.. (< M). */
AI void amx_store(const float* c, float* y, int M, int N, int m0, int n0) {
  for (int m = m0; m < M && m < m0 + 16; m++)
    for (int i = 0; i < 16; i++) y[(int64_t)m * N + n0 + i] = c[i * 16 + m - m0];
}

#define AMX_GROUP(G, T)                                                         \
  if ((G) < groups) {                                                           \
    if (!pairs) amx_pair_tile(x, M, K, g0 + 16 * (G), kb, own + (G) * 256);     \
    _tile_loadd(1, b + (G) * 256, 64);                                          \
    _tile_dpbf16ps(T, 0, 1);                                                    \
  }
#define AMX_SAVE(G, T)                                                          \
  if ((G) < groups) {                                                           \
    _tile_stored(T, c, 64);                                                     \
    amx_store(c, y, M, N, g0 + 16 * (G), 16 * nb);                              \
  }

/* y = x W^T (x rounded to bfloat16) inside the caller's parallel region, W's blocks of 16
 * rows shared among the workers (each packs all of x: no barrier); returns after one, y complete. */
static void project_amx(const float* x, const char* W, float* y, int M, int N, int K) {
  for (int g0 = 0; g0 < M; g0 += 16 * AMX_GROUPS) {
    const int groups = (M - g0 + 15) / 16 < AMX_GROUPS ? (M - g0 + 15) / 16 : AMX_GROUPS;
    const uint32_t* pairs = amx_pairs(x, M, K, g0, groups);
    uint32_t own[AMX_GROUPS * 256];
    float c[256];
    amx_configure();
    if (groups == 1) {
#pragma omp for schedule(static)
      for (int p = 0; p < (N / 16 + 2) / 3; p++) {
        const int nb = 3 * p, more = N / 16 - nb;
        const char* w = W + (int64_t)16 * nb * K * 2;
        _tile_zero(2);
        _tile_zero(3);
        _tile_zero(4);
        for (int kb = 0; kb < K / 32; kb++) {
          _tile_loadd(0, w + 64 * kb, 2 * K);
          if (more > 1) _tile_loadd(6, w + (int64_t)32 * K + 64 * kb, 2 * K);
          if (more > 2) _tile_loadd(7, w + (int64_t)64 * K + 64 * kb, 2 * K);
          const uint32_t* b = pairs ? pairs + (int64_t)kb * 256 : own;
          if (!pairs) amx_pair_tile(x, M, K, g0, kb, own);
          _tile_loadd(1, b, 64);
          _tile_dpbf16ps(2, 0, 1);
          if (more > 1) _tile_dpbf16ps(3, 6, 1);
          if (more > 2) _tile_dpbf16ps(4, 7, 1);
        }
        _tile_stored(2, c, 64);
        amx_store(c, y, M, N, g0, 16 * nb);
        if (more > 1) {
          _tile_stored(3, c, 64);
          amx_store(c, y, M, N, g0, 16 * nb + 16);
        }
        if (more > 2) {
          _tile_stored(4, c, 64);
          amx_store(c, y, M, N, g0, 16 * nb + 32);
        }
      }
      _tile_release();
      continue;
    }
#pragma omp for schedule(static)
    for (int nb = 0; nb < N / 16; nb++) {
      const char* w = W + (int64_t)16 * nb * K * 2;
      _tile_zero(2);
      _tile_zero(3);
      _tile_zero(4);
      _tile_zero(5);
      for (int kb = 0; kb < K / 32; kb++) {
        _tile_loadd(0, w + 64 * kb, 2 * K);
        const uint32_t* b = pairs ? pairs + (int64_t)kb * groups * 256 : own;
        AMX_GROUP(0, 2)
        AMX_GROUP(1, 3)
        AMX_GROUP(2, 4)
        AMX_GROUP(3, 5)
      }
      AMX_SAVE(0, 2)
      AMX_SAVE(1, 3)
      AMX_SAVE(2, 4)
      AMX_SAVE(3, 5)
    }
    _tile_release();
  }
}
#undef AMX_GROUP
#undef AMX_SAVE
#else
static const int amx_granted = 0; /* no AMX in this build */
static void project_amx(const float* x, const char* W, float* y, int M, int N, int K) {}
#endif

/* 1 where bfloat16 weights of whole tiles go through project_amx. */
AI int amx_takes(int size, int N, int K) { return amx_granted && size == 2 && N % 16 == 0 && K % 32 == 0; }
#endif
