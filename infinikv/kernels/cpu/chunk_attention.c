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
 * company.
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

/* Keys of one kv-head, slots [t0, t0 + nb), as kt[e * KB + t] in float32 (zeros past nb). */
static void transpose_keys(const char* k, int kv_size, const int64_t* pages, int64_t t0, int nb, int B,
                           int64_t page_stride, int64_t row_stride, int64_t head_off, int d, float* kt) {
  memset(kt, 0, sizeof(float) * (size_t)d * KB);
  for (int t = 0; t < nb; t++) {
    int64_t slot = t0 + t;
    const char* row = k + pages[slot / B] * page_stride + (slot % B) * row_stride + head_off;
    if (kv_size == 4)
      for (int e = 0; e < d; e++) kt[e * KB + t] = ((const float*)row)[e];
    else
      for (int e = 0; e < d; e++) kt[e * KB + t] = bf16_to_float(((const unsigned short*)row)[e]);
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

/* One tile's rows (q scaled, o, m, l, lim: the row sees slots < lim) folded over one block
 * of keys kt (transposed) and values vp, slots t0..t0+nb. */
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
  for (int r = 0; r < RT; r++) {
    for (int c = 0; c < 4; c++) store(p[r] + 16 * c, s[r][c]);
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
  for (int e0 = 0; e0 < d; e0 += 64) accumulate(o, (const float (*)[KB])p, corr, vp, nb, e0);
}

/* Rows [r0, r1) of kv-head h (row rr: query i = rr / g, head h * g + rr % g) over slots
 * [start, stop), keys transposed per block in kt (block b at kt + b * d * KB). */
static void item(const float* q, const void* v, int kv_size, const int64_t* pages, const float* kt,
                 int64_t start, int64_t stop, int64_t limit, int Hq, int g, int h, int r0, int r1, int d, int B,
                 int64_t page_stride, int64_t row_stride, float scale, float* out, float* lse,
                 accumulate_t accumulate) {
  float qs[ITEM_ROWS][MAX_D], o[ITEM_ROWS][MAX_D], m[ITEM_ROWS], l[ITEM_ROWS];
  int64_t lim[ITEM_ROWS];
  const int rows = r1 - r0;
  for (int r = 0; r < ITEM_ROWS; r++) { /* rows past the item's repeat its first (discarded) */
    int rr = r0 + (r < rows ? r : 0), i = rr / g;
    const float* src = q + ((int64_t)i * Hq + h * g + rr % g) * d;
    for (int e = 0; e < d; e++) {
      qs[r][e] = src[e] * scale;
      o[r][e] = 0.f;
    }
    m[r] = HIDDEN;
    l[r] = 0.f;
    lim[r] = limit + i < stop ? limit + i : stop;
  }
  const int tiles = (rows + RT - 1) / RT;
  const int64_t head_off = (int64_t)h * d * kv_size;
  const void* vp[KB];
  for (int64_t t0 = start; t0 < lim[rows - 1]; t0 += KB) {
    int nb = (int)(stop - t0 < KB ? stop - t0 : KB);
    for (int t = 0; t < nb; t++) {
      int64_t slot = t0 + t;
      vp[t] = (const char*)v + pages[slot / B] * page_stride + (slot % B) * row_stride + head_off;
    }
    const float* kb = kt + (t0 - start) / KB * d * KB;
    for (int c = 0; c < tiles; c++) {
      int a = c * RT, last = a + RT - 1 < rows ? a + RT - 1 : rows - 1;
      if (t0 >= lim[last]) continue; /* no row of the tile sees this block */
      fold_tile(qs + a, o + a, m + a, l + a, lim + a, kb, vp, t0, nb, d, accumulate);
    }
  }
  for (int r = 0; r < rows; r++) {
    int rr = r0 + r;
    int64_t row = (int64_t)(rr / g) * Hq + h * g + rr % g;
    for (int e = 0; e < d; e++) out[row * d + e] = o[r][e] / l[r];
    lse[row] = m[r] + logf(l[r]);
  }
}

/* Returns 0, or 1 for an unsupported head_dim or kv_size, 2 for a page id outside [0, P), 3 for
 * out of memory. Every row must see at least one slot (the caller checks). */
int chunk_attention(const float* q, const void* k, const void* v, int kv_size, int64_t P, const int64_t* pages,
                    int64_t start, int64_t stop, int64_t limit, int n, int Hq, int Hkv, int d, int B, float scale,
                    float* out, float* lse, int threads) {
  if ((d != 64 && d != 128) || (kv_size != 4 && kv_size != 2)) return 1;
  for (int64_t p = start / B; p <= (stop - 1) / B; p++)
    if (pages[p] < 0 || pages[p] >= P) return 2;
  const int g = Hq / Hkv, R = n * g, per_head = (R + ITEM_ROWS - 1) / ITEM_ROWS;
  const int64_t blocks = (stop - start + KB - 1) / KB;
  const int64_t row_stride = (int64_t)Hkv * d * kv_size, page_stride = (int64_t)B * row_stride;
  const accumulate_t accumulate = kv_size == 4 ? accumulate_f32 : accumulate_bf16;
  float* kt = aligned_alloc(64, sizeof(float) * (size_t)(Hkv * blocks * d * KB));
  if (!kt) return 3;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#pragma omp for schedule(static)
    for (int64_t hb = 0; hb < Hkv * blocks; hb++) {
      int64_t h = hb / blocks, t0 = start + hb % blocks * KB;
      transpose_keys(k, kv_size, pages, t0, (int)(stop - t0 < KB ? stop - t0 : KB), B, page_stride, row_stride,
                     h * d * kv_size, d, kt + hb * d * KB);
    }
#pragma omp for schedule(dynamic, 1)
    for (int w = 0; w < Hkv * per_head; w++) {
      int h = w / per_head, r0 = w % per_head * ITEM_ROWS, r1 = r0 + ITEM_ROWS < R ? r0 + ITEM_ROWS : R;
      item(q, v, kv_size, pages, kt + (int64_t)h * blocks * d * KB, start, stop, limit, Hq, g, h, r0, r1, d, B,
           page_stride, row_stride, scale, out, lse, accumulate);
    }
  }
  free(kt);
  return 0;
}
