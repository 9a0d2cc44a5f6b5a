/* Attention of a few query rows over a paged KV cache, on the CPU: decode steps and short
 * draft verifications, where a BLAS call per (kv-head) reads the keys at a fraction of the
 * memory bandwidth. One pass over the pages reads every key and value row once for all
 * heads; each kv-head's query rows (4 at a time) keep a running softmax (flash-decoding);
 * long ranges are split across threads, whose partial softmaxes merge at the end.
 *
 * Layouts (contiguous): q, out (n, Hq, d) float32; k, v pages (P, B, Hkv, d) float32 or
 * bfloat16 (kv_size 4 or 2; widened exactly as read); pages: the block table (int64 page
 * ids); lse (n, Hq) float32. Table slots [start, stop) are attended; query
 * row i (of n) sees slots < limit + i. Every row must see at least one slot (the caller
 * checks). Built by infinikv/kernels/cpu/build.py with -O3 -march=native -ffast-math:
 * masking uses a finite sentinel, never an infinity.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "vec.h"

#define ROWS 4        /* query rows per running softmax (of one kv-head) */
#define MAX_NV 8      /* head_dim / 16: 4 (64) or 8 (128) */
#define BLK 32        /* key rows per step */
#define HIDDEN (-1e30f) /* the score of a masked key */
#define MIN_KEYS_PER_THREAD 256 /* each worker takes at least this many slots (bench_kernels_cpu.py) */

/* The running softmax of up to ROWS query rows of one kv-head (unused rows repeat row 0). */
typedef struct {
  v16 q[ROWS][MAX_NV]; /* scaled query */
  v16 acc[ROWS][MAX_NV];
  float m[ROWS], l[ROWS];
  int64_t limit[ROWS]; /* the row sees slots < limit */
  int rows, head_off;
} rows_t;

/* Fold key rows kp[0..nb) (slots t0..t0+nb) into one rows_t; NV = head_dim / 16. The same
 * lines of the next block's first nn rows (kn, vn) are prefetched into L2 as these are read:
 * with the hardware prefetcher alone, each kv-head's fold reading only its part of every
 * row, the kernel read ~20 GB/s out of cache against ~27 with this (an A/B on SmolLM2's
 * shapes); into L1 the lines would evict the block's own rows and it got slower. */
#define FOLD(NAME, NV, T, LOAD)                                                                  \
  static void NAME(rows_t* st, const void* const* kpv, const void* const* vpv, int nb, int64_t t0, \
                   const void* const* knv, const void* const* vnv, int nn) {                    \
    const T* const* kp = (const T* const*)kpv;                                                  \
    const T* const* vp = (const T* const*)vpv;                                                  \
    const T* const* kn = (const T* const*)knv;                                                  \
    const T* const* vn = (const T* const*)vnv;                                                  \
    float s[ROWS][BLK], c[ROWS];                                                                \
    v16 q[ROWS][NV], acc[ROWS][NV];                                                             \
    const int ho = st->head_off;                                                                \
    for (int r = 0; r < ROWS; r++)                                                              \
      for (int e = 0; e < NV; e++) q[r][e] = st->q[r][e];                                       \
    for (int t = 0; t < nb; t++) {                                                              \
      v16 a[ROWS] = {{0}};                                                                      \
      for (int e = 0; e < NV; e++) {                                                            \
        v16 ke = LOAD(kp[t] + ho + 16 * e);                                                     \
        if (t < nn) __builtin_prefetch(kn[t] + ho + 16 * e, 0, 1);                              \
        for (int r = 0; r < ROWS; r++) a[r] += q[r][e] * ke;                                    \
      }                                                                                         \
      v4 sc = hsum4(a[0], a[1], a[2], a[3]);                                                    \
      for (int r = 0; r < ROWS; r++) s[r][t] = sc[r];                                           \
    }                                                                                           \
    for (int r = 0; r < ROWS; r++) {                                                            \
      int visible = (int)(st->limit[r] - t0 < nb ? st->limit[r] - t0 : nb);                     \
      for (int t = visible < 0 ? 0 : visible; t < nb; t++) s[r][t] = HIDDEN;                    \
      float mb = st->m[r];                                                                      \
      for (int t = 0; t < nb; t++) mb = s[r][t] > mb ? s[r][t] : mb;                            \
      if (mb <= HIDDEN) { /* nothing visible yet */                                             \
        c[r] = 1.f;                                                                             \
        for (int t = 0; t < nb; t++) s[r][t] = 0.f;                                             \
        continue;                                                                               \
      }                                                                                         \
      float sum = 0.f;                                                                          \
      for (int t = 0; t < nb; t++) {                                                            \
        s[r][t] = expf(s[r][t] - mb);                                                           \
        sum += s[r][t];                                                                         \
      }                                                                                         \
      c[r] = expf(st->m[r] - mb);                                                               \
      st->l[r] = st->l[r] * c[r] + sum;                                                         \
      st->m[r] = mb;                                                                            \
    }                                                                                           \
    for (int r = 0; r < ROWS; r++)                                                              \
      for (int e = 0; e < NV; e++) acc[r][e] = st->acc[r][e] * c[r];                            \
    for (int t = 0; t < nb; t++)                                                                \
      for (int e = 0; e < NV; e++) {                                                            \
        v16 ve = LOAD(vp[t] + ho + 16 * e);                                                     \
        if (t < nn) __builtin_prefetch(vn[t] + ho + 16 * e, 0, 1);                              \
        for (int r = 0; r < ROWS; r++) acc[r][e] += s[r][t] * ve;                               \
      }                                                                                         \
    for (int r = 0; r < ROWS; r++)                                                              \
      for (int e = 0; e < NV; e++) st->acc[r][e] = acc[r][e];                                   \
  }
FOLD(fold64, 4, float, load)
FOLD(fold128, 8, float, load)
FOLD(fold64_bf16, 4, unsigned short, load_bf16)
FOLD(fold128_bf16, 8, unsigned short, load_bf16)
typedef void (*fold_t)(rows_t*, const void* const*, const void* const*, int, int64_t, const void* const*,
                       const void* const*, int);

/* The key and value rows of the up to BLK slots from t0 before stop; returns their count. */
static int slot_rows(const char* k, const char* v, const int64_t* pages, int64_t t0, int64_t stop, int B,
                     int64_t page_stride, int64_t row_stride, const void** kp, const void** vp) {
  int n = t0 >= stop ? 0 : (int)(stop - t0 < BLK ? stop - t0 : BLK);
  for (int t = 0; t < n; t++) {
    int64_t slot = t0 + t, off = pages[slot / B] * page_stride + (slot % B) * row_stride;
    kp[t] = k + off;
    vp[t] = v + off;
  }
  return n;
}

/* The rows' running softmaxes over slots [start, stop): one worker's share of the keys,
 * BLK slots at a time, the next block's rows at hand for the folds to prefetch; strides
 * in bytes. */
static void fold_range(rows_t* st, int nst, const char* k, const char* v, const int64_t* pages, int64_t start,
                       int64_t stop, int B, int64_t page_stride, int64_t row_stride, fold_t fold) {
  const void *kp[2][BLK], *vp[2][BLK];
  int cur = 0, nb = slot_rows(k, v, pages, start, stop, B, page_stride, row_stride, kp[0], vp[0]);
  for (int64_t t0 = start; t0 < stop; t0 += BLK, cur = !cur) {
    int nn = slot_rows(k, v, pages, t0 + BLK, stop, B, page_stride, row_stride, kp[!cur], vp[!cur]);
    for (int c = 0; c < nst; c++) fold(&st[c], kp[cur], vp[cur], nb, t0, kp[!cur], vp[!cur], nn);
    nb = nn;
  }
}

/* Returns 0, or 1 for an unsupported head_dim or kv_size, 2 for a page id outside [0, P), 3 for out of
 * memory. Up to `threads` workers (OpenMP: torch's own pool, whose libgomp this library
 * shares), each with MIN_KEYS_PER_THREAD slots or more, take equal shares of the slots;
 * their softmaxes merge at the end. */
int paged_attention(const float* q, const void* k, const void* v, int kv_size, int64_t P, const int64_t* pages,
                    int64_t start, int64_t stop, int64_t limit, int n, int Hq, int Hkv, int d, int B, float scale,
                    float* out, float* lse, int threads) {
  if ((d != 64 && d != 128) || (kv_size != 4 && kv_size != 2)) return 1;
  const fold_t fold = kv_size == 4 ? (d == 64 ? fold64 : fold128) : (d == 64 ? fold64_bf16 : fold128_bf16);
  for (int64_t p = start / B; p <= (stop - 1) / B; p++)
    if (pages[p] < 0 || pages[p] >= P) return 2;
  const int g = Hq / Hkv, R = n * g, nv = d / 16, per_head = (R + ROWS - 1) / ROWS;
  const int nst = Hkv * per_head;
  const int64_t row_stride = (int64_t)Hkv * d * kv_size, page_stride = (int64_t)B * row_stride;
  if (threads > (stop - start) / MIN_KEYS_PER_THREAD) threads = (int)((stop - start) / MIN_KEYS_PER_THREAD);
  if (threads < 1) threads = 1;
  rows_t* st = aligned_alloc(64, sizeof(rows_t) * (size_t)nst * (size_t)threads);
  if (!st) return 3;
  for (int h = 0, c = 0; h < Hkv; h++)
    for (int r0 = 0; r0 < R; r0 += ROWS, c++) {
      rows_t* s = &st[c];
      s->rows = R - r0 < ROWS ? R - r0 : ROWS;
      s->head_off = h * d;
      for (int r = 0; r < ROWS; r++) {
        int rr = r0 + (r < s->rows ? r : 0), i = rr / g, j = rr % g;
        const float* src = q + ((int64_t)i * Hq + h * g + j) * d;
        for (int e = 0; e < nv; e++) {
          s->q[r][e] = load(src + 16 * e) * scale;
          s->acc[r][e] = (v16){0};
        }
        s->m[r] = HIDDEN;
        s->l[r] = 0.f;
        s->limit[r] = limit + i;
      }
    }
  for (int t = 1; t < threads; t++) memcpy(&st[t * nst], st, sizeof(rows_t) * (size_t)nst);
  const int64_t span = stop - start;
#pragma omp parallel for num_threads(threads) schedule(static, 1) if (threads > 1)
  for (int t = 0; t < threads; t++)
    fold_range(&st[t * nst], nst, k, v, pages, start + span * t / threads, start + span * (t + 1) / threads,
               B, page_stride, row_stride, fold);
  for (int h = 0, c = 0; h < Hkv; h++)
    for (int r0 = 0; r0 < R; r0 += ROWS, c++)
      for (int r = 0; r < st[c].rows; r++) {
        float m = HIDDEN, l = 0.f;
        for (int t = 0; t < threads; t++) m = st[t * nst + c].m[r] > m ? st[t * nst + c].m[r] : m;
        v16 acc[MAX_NV] = {{0}};
        for (int t = 0; t < threads; t++) {
          const rows_t* s = &st[t * nst + c];
          float w = s->l[r] > 0.f ? expf(s->m[r] - m) : 0.f;
          l += s->l[r] * w;
          for (int e = 0; e < nv; e++) acc[e] += s->acc[r][e] * w;
        }
        int rr = r0 + r, i = rr / g, j = rr % g;
        int64_t row = (int64_t)i * Hq + h * g + j;
        for (int e = 0; e < nv; e++) store(out + row * d + 16 * e, acc[e] * (1.f / l));
        lse[row] = m + logf(l);
      }
  free(st);
  return 0;
}
