/* Attention of many query rows over a paged KV cache, on the CPU: prefill chunks, where
 * paged_attention.c's four rows per pass would read every key once per four rows. Here
 * the scores of six query rows against 64 keys are one register tile (24 accumulators,
 * one product per key vector and row), the keys transposed once per call so that a
 * tile's products need no horizontal sums; six rows of values likewise. Work items are
 * (kv-head, 48 rows) pairs over OpenMP's threads; each row keeps its running softmax.
 *
 * Layouts and masking as paged_attention.c (kernels.h): q, out (n, Hq, d) float32; k, v
 * pages (P, B, Hkv, d) float32 or bfloat16; slots [start, stop) attended, query row i
 * sees slots < limit + i. A row's arithmetic is the same whatever rows share its tile
 * (keys in blocks of 64 from `start`, in order), so a prompt gives the same output in any
 * company. With `in_bf16` (CPUs with AVX512-BF16) queries, keys, values and probabilities are
 * rounded to bfloat16 and multiplied in pairs by VDPBF16PS (float32 sums): half the
 * instructions, bfloat16's rounding (prefill chunks past the window, `chunk_dtype`).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

#define KB 64           /* key slots per block: four vectors of scores per row */
#define RT 6            /* query rows per register tile */
#define ITEM_TILES 8    /* register tiles per work item */
#define ITEM_ROWS (RT * ITEM_TILES)
#define MAX_D 128
#define HIDDEN (-1e30f) /* the score of a masked key: finite, as -ffast-math needs */

/* Where the pages keep a slot's row, and its row's value e as a float. */
typedef struct {
  const int64_t* pages;
  int B, kv_size;
  int64_t page_stride, row_stride;
} pages_t;
AI const char* slot_row(const char* base, const pages_t* pg, int64_t slot, int64_t head_off) {
  return base + pg->pages[slot / pg->B] * pg->page_stride + (slot % pg->B) * pg->row_stride + head_off;
}
AI float row_value(const char* row, int kv_size, int e) {
  return kv_size == 4 ? ((const float*)row)[e] : bf16_to_float(((const unsigned short*)row)[e]);
}

/* Keys of one kv-head, slots [t0, t0 + nb), as kt[e * KB + t] in float32 (zeros past nb). */
static void transpose_keys(const char* k, const pages_t* pg, int64_t t0, int nb, int64_t head_off, int d, float* kt) {
  memset(kt, 0, sizeof(float) * (size_t)d * KB);
  for (int t = 0; t < nb; t++) {
    const char* row = slot_row(k, pg, t0 + t, head_off);
    for (int e = 0; e < d; e++) kt[e * KB + t] = row_value(row, pg->kv_size, e);
  }
}

/* acc[r] += p[r][t] v[t] over the block's nb value rows, 64 dimensions from e0 (one value
 * row's four vectors against six rows' probabilities per step). */
#define ACCUMULATE(NAME, T, LOAD)                                                                  \
  static void NAME(float (*o)[MAX_D], const float (*p)[KB], const float* corr, const void* const* vpv, \
                   int nb, int e0) {                                                              \
    const T* const* vp = (const T* const*)vpv;                                                    \
    v16 acc[RT][4];                                                                               \
    for (int r = 0; r < RT; r++)                                                                  \
      for (int c = 0; c < 4; c++) acc[r][c] = load(o[r] + e0 + 16 * c) * corr[r];                 \
    for (int t = 0; t < nb; t++) {                                                                \
      v16 v0 = LOAD(vp[t] + e0), v1 = LOAD(vp[t] + e0 + 16), v2 = LOAD(vp[t] + e0 + 32),          \
          v3 = LOAD(vp[t] + e0 + 48);                                                             \
      for (int r = 0; r < RT; r++) {                                                              \
        float w = p[r][t];                                                                        \
        acc[r][0] += w * v0;                                                                      \
        acc[r][1] += w * v1;                                                                      \
        acc[r][2] += w * v2;                                                                      \
        acc[r][3] += w * v3;                                                                      \
      }                                                                                           \
    }                                                                                             \
    for (int r = 0; r < RT; r++)                                                                  \
      for (int c = 0; c < 4; c++) store(o[r] + e0 + 16 * c, acc[r][c]);                           \
  }
ACCUMULATE(accumulate_f32, float, load)
ACCUMULATE(accumulate_bf16, unsigned short, load_bf16)
typedef void (*accumulate_t)(float (*)[MAX_D], const float (*)[KB], const float*, const void* const*, int, int);

/* The tile's scores p (RT, KB) of slots t0..t0+nb become its probabilities: masked (the row
 * sees slots < lim), exponentiated against the running max m; l, m updated, corr the
 * factor each row's earlier sums take. */
static void softmax_tile(float (*p)[KB], float* corr, float* m, float* l, const int64_t* lim, int64_t t0, int nb) {
  for (int r = 0; r < RT; r++) {
    int64_t seen = lim[r] - t0;
    int visible = seen < 0 ? 0 : (seen < nb ? (int)seen : nb);
    for (int t = visible; t < KB; t++) p[r][t] = HIDDEN;
    float mb = m[r];
    for (int t = 0; t < KB; t++) mb = p[r][t] > mb ? p[r][t] : mb;
    if (mb <= HIDDEN) { /* nothing visible yet */
      corr[r] = 1.f;
      for (int t = 0; t < KB; t++) p[r][t] = 0.f;
      continue;
    }
    float sum = 0.f;
    for (int t = 0; t < KB; t++) {
      p[r][t] = expf(p[r][t] - mb);
      sum += p[r][t];
    }
    corr[r] = expf(m[r] - mb);
    l[r] = l[r] * corr[r] + sum;
    m[r] = mb;
  }
}

/* One tile's rows (q scaled, o, m, l, lim) folded over one block of keys kt (transposed)
 * and values vp, slots t0..t0+nb. */
static void fold_tile(const float (*q)[MAX_D], float (*o)[MAX_D], float* m, float* l, const int64_t* lim,
                      const float* kt, const void* const* vp, int64_t t0, int nb, int d, accumulate_t accumulate) {
  v16 s[RT][4];
  for (int r = 0; r < RT; r++)
    for (int c = 0; c < 4; c++) s[r][c] = (v16){0};
  for (int e = 0; e < d; e++) {
    const float* kr = kt + e * KB;
    v16 k0 = load(kr), k1 = load(kr + 16), k2 = load(kr + 32), k3 = load(kr + 48);
    for (int r = 0; r < RT; r++) {
      float x = q[r][e];
      s[r][0] += x * k0;
      s[r][1] += x * k1;
      s[r][2] += x * k2;
      s[r][3] += x * k3;
    }
  }
  float p[RT][KB], corr[RT];
  for (int r = 0; r < RT; r++)
    for (int c = 0; c < 4; c++) store(p[r] + 16 * c, s[r][c]);
  softmax_tile(p, corr, m, l, lim, t0, nb);
  for (int e0 = 0; e0 < d; e0 += 64) accumulate(o, (const float (*)[KB])p, corr, vp, nb, e0);
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define PAIRS 1
typedef unsigned short bf16;

/* Keys (by_dims) or values of one kv-head, slots [t0, t0 + nb), rounded to bfloat16 in
 * pairs: keys in pairs of dimensions, out[(e / 2) * 2 * KB + 2 * t + e % 2], values in pairs
 * of slots, out[(t / 2) * 2 * d + 2 * e + t % 2] (zeros past nb). */
static void bf16_pairs(const char* src, const pages_t* pg, int64_t t0, int nb, int64_t head_off, int d, int by_dims,
                       bf16* out) {
  memset(out, 0, sizeof(bf16) * (size_t)d * KB);
  for (int t = 0; t < nb; t++) {
    const char* row = slot_row(src, pg, t0 + t, head_off);
    for (int e = 0; e < d; e++)
      out[by_dims ? e / 2 * 2 * KB + 2 * t + e % 2 : t / 2 * 2 * d + 2 * e + t % 2] =
          float_to_bf16(row_value(row, pg->kv_size, e));
  }
}

/* fold_tile in pairs: q (RT rows of d / 2 bfloat16 pairs) against the block's key pairs kp,
 * the probabilities rounded to bfloat16 pairs against its value pairs vp. */
static void fold_tile_pairs(const uint32_t (*q)[MAX_D / 2], float (*o)[MAX_D], float* m, float* l,
                            const int64_t* lim, const bf16* kp, const bf16* vp, int64_t t0, int nb, int d) {
  __m512 s[RT][4];
  for (int r = 0; r < RT; r++)
    for (int c = 0; c < 4; c++) s[r][c] = _mm512_setzero_ps();
  for (int e2 = 0; e2 < d / 2; e2++) {
    const bf16* kr = kp + e2 * 2 * KB;
    __m512bh k0 = (__m512bh)_mm512_loadu_si512(kr), k1 = (__m512bh)_mm512_loadu_si512(kr + 32),
             k2 = (__m512bh)_mm512_loadu_si512(kr + 64), k3 = (__m512bh)_mm512_loadu_si512(kr + 96);
    for (int r = 0; r < RT; r++) {
      __m512bh x = (__m512bh)_mm512_set1_epi32((int)q[r][e2]);
      s[r][0] = _mm512_dpbf16_ps(s[r][0], x, k0);
      s[r][1] = _mm512_dpbf16_ps(s[r][1], x, k1);
      s[r][2] = _mm512_dpbf16_ps(s[r][2], x, k2);
      s[r][3] = _mm512_dpbf16_ps(s[r][3], x, k3);
    }
  }
  float p[RT][KB], corr[RT];
  for (int r = 0; r < RT; r++)
    for (int c = 0; c < 4; c++) _mm512_storeu_ps(p[r] + 16 * c, s[r][c]);
  softmax_tile(p, corr, m, l, lim, t0, nb);
  uint32_t pp[RT][KB / 2]; /* probabilities of slots 2j, 2j + 1 as one bfloat16 pair */
  for (int r = 0; r < RT; r++)
    for (int c = 0; c < KB; c += 32)
      _mm512_storeu_si512(pp[r] + c / 2,
                          (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p[r] + c + 16), _mm512_loadu_ps(p[r] + c)));
  const int pairs = (nb + 1) / 2;
  for (int e0 = 0; e0 < d; e0 += 64) {
    __m512 acc[RT][4];
    for (int r = 0; r < RT; r++)
      for (int c = 0; c < 4; c++) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o[r] + e0 + 16 * c), _mm512_set1_ps(corr[r]));
    for (int j = 0; j < pairs; j++) {
      const bf16* vr = vp + j * 2 * d + 2 * e0;
      __m512bh v0 = (__m512bh)_mm512_loadu_si512(vr), v1 = (__m512bh)_mm512_loadu_si512(vr + 32),
               v2 = (__m512bh)_mm512_loadu_si512(vr + 64), v3 = (__m512bh)_mm512_loadu_si512(vr + 96);
      for (int r = 0; r < RT; r++) {
        __m512bh w = (__m512bh)_mm512_set1_epi32((int)pp[r][j]);
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w, v0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w, v1);
        acc[r][2] = _mm512_dpbf16_ps(acc[r][2], w, v2);
        acc[r][3] = _mm512_dpbf16_ps(acc[r][3], w, v3);
      }
    }
    for (int r = 0; r < RT; r++)
      for (int c = 0; c < 4; c++) _mm512_storeu_ps(o[r] + e0 + 16 * c, acc[r][c]);
  }
}
#else
#define PAIRS 0
#endif

/* One call's inputs: the prepared blocks of every kv-head (keys transposed, or in pairs with
 * the values), block b of head h at [h * blocks + b] * d * KB elements. */
typedef struct {
  const float* q;
  const char* v;
  pages_t pg;
  const float* kt;
  const void* kp;
  const void* vp;
  int64_t start, stop, limit, blocks;
  int Hq, g, d;
  float scale;
  accumulate_t accumulate;
  float* out;
  float* lse;
} call_t;

/* Rows [r0, r1) of kv-head h (row rr: query i = rr / g, head h * g + rr % g), every block
 * they see. */
static void item(const call_t* c, int h, int r0, int r1) {
  const int d = c->d, g = c->g, rows = r1 - r0, tiles = (rows + RT - 1) / RT;
  float qs[ITEM_ROWS][MAX_D], o[ITEM_ROWS][MAX_D], m[ITEM_ROWS], l[ITEM_ROWS];
#if PAIRS
  uint32_t qp[ITEM_ROWS][MAX_D / 2]; /* in pairs: the scaled query rounded to bfloat16 */
#endif
  int64_t lim[ITEM_ROWS];
  for (int r = 0; r < ITEM_ROWS; r++) { /* rows past the item's repeat its first (discarded) */
    int rr = r0 + (r < rows ? r : 0), i = rr / g;
    const float* src = c->q + ((int64_t)i * c->Hq + h * g + rr % g) * d;
    for (int e = 0; e < d; e++) {
      qs[r][e] = src[e] * c->scale;
      o[r][e] = 0.f;
    }
#if PAIRS
    for (int e = 0; c->kp && e < d; e += 2)
      qp[r][e / 2] = float_to_bf16(qs[r][e]) | (uint32_t)float_to_bf16(qs[r][e + 1]) << 16;
#endif
    m[r] = HIDDEN;
    l[r] = 0.f;
    lim[r] = c->limit + i < c->stop ? c->limit + i : c->stop;
  }
  const int64_t head_off = (int64_t)h * d * c->pg.kv_size;
  const void* vrows[KB];
  for (int64_t t0 = c->start; t0 < lim[rows - 1]; t0 += KB) {
    int nb = (int)(c->stop - t0 < KB ? c->stop - t0 : KB);
    int64_t block = (h * c->blocks + (t0 - c->start) / KB) * d * KB;
    if (!c->kp)
      for (int t = 0; t < nb; t++) vrows[t] = slot_row(c->v, &c->pg, t0 + t, head_off);
    for (int tile = 0; tile < tiles; tile++) {
      int a = tile * RT, last = a + RT - 1 < rows ? a + RT - 1 : rows - 1;
      if (t0 >= lim[last]) continue; /* no row of the tile sees this block */
#if PAIRS
      if (c->kp) {
        fold_tile_pairs(qp + a, o + a, m + a, l + a, lim + a, (const bf16*)c->kp + block,
                        (const bf16*)c->vp + block, t0, nb, d);
        continue;
      }
#endif
      fold_tile(qs + a, o + a, m + a, l + a, lim + a, c->kt + block, vrows, t0, nb, d, c->accumulate);
    }
  }
  for (int r = 0; r < rows; r++) {
    int rr = r0 + r;
    int64_t row = (int64_t)(rr / g) * c->Hq + h * g + rr % g;
    for (int e = 0; e < d; e++) c->out[row * d + e] = o[r][e] / l[r];
    c->lse[row] = m[r] + logf(l[r]);
  }
}

/* Returns 0, or 1 for an unsupported head_dim, kv_size or bf16 (without AVX512-BF16), 2 for a
 * page id outside [0, P), 3 for out of memory. Every row must see at least one slot (the
 * caller checks). */
int chunk_attention(const float* q, const void* k, const void* v, int kv_size, int64_t P, const int64_t* pages,
                    int64_t start, int64_t stop, int64_t limit, int n, int Hq, int Hkv, int d, int B, float scale,
                    int in_bf16, float* out, float* lse, int threads) {
  if ((d != 64 && d != 128) || (kv_size != 4 && kv_size != 2) || (in_bf16 && !PAIRS)) return 1;
  for (int64_t p = start / B; p <= (stop - 1) / B; p++)
    if (pages[p] < 0 || pages[p] >= P) return 2;
  const int g = Hq / Hkv, R = n * g, per_head = (R + ITEM_ROWS - 1) / ITEM_ROWS;
  const int64_t blocks = (stop - start + KB - 1) / KB, row_stride = (int64_t)Hkv * d * kv_size;
  const size_t elements = (size_t)(Hkv * blocks * d * KB);
  call_t c = {q, v, {pages, B, kv_size, B * row_stride, row_stride}, NULL, NULL, NULL, start, stop, limit, blocks,
              Hq, g, d, scale, kv_size == 4 ? accumulate_f32 : accumulate_bf16, out, lse};
  void* scratch = aligned_alloc(64, in_bf16 ? 2 * sizeof(unsigned short) * elements : sizeof(float) * elements);
  if (!scratch) return 3;
  if (in_bf16) {
    c.kp = scratch;
    c.vp = (unsigned short*)scratch + elements;
  } else {
    c.kt = (const float*)scratch;
  }
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#pragma omp for schedule(static)
    for (int64_t hb = 0; hb < Hkv * blocks; hb++) {
      int64_t h = hb / blocks, t0 = start + hb % blocks * KB, head_off = h * d * kv_size;
      int nb = (int)(stop - t0 < KB ? stop - t0 : KB);
#if PAIRS
      if (in_bf16) {
        bf16_pairs(k, &c.pg, t0, nb, head_off, d, 1, (bf16*)c.kp + hb * d * KB);
        bf16_pairs(v, &c.pg, t0, nb, head_off, d, 0, (bf16*)c.vp + hb * d * KB);
        continue;
      }
#endif
      transpose_keys(k, &c.pg, t0, nb, head_off, d, (float*)scratch + hb * d * KB);
    }
#pragma omp for schedule(dynamic, 1)
    for (int w = 0; w < Hkv * per_head; w++) {
      int r0 = w % per_head * ITEM_ROWS;
      item(&c, w / per_head, r0, r0 + ITEM_ROWS < R ? r0 + ITEM_ROWS : R);
    }
  }
  free(scratch);
  return 0;
}
