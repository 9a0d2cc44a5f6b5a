/* Approximate attention logits of a few queries over one layer of the 8-bit key sketch
 * (infinikv/memory/sketch.py), all channels: every evicted key read once per step, for the
 * queries of its kv-head together. A sketch row is one (kv-head, channel) of a chunk of C
 * tokens: C uint8 steps above the row's minimum, then the row's float32 step and minimum, so
 * key[c][t] = min_c + step_c * u[c][t] and
 *
 *     logit_j[t] = sum_c q_j[c] * min_c  +  sum_c (q_j[c] * step_c) * u[c][t].
 *
 * Each (kv-head, chunk, four queries) is one work item, reading the chunk's d rows once. Layouts (contiguous): table (chunks, H * d, C + 8) uint8;
 * q (H, m, d) float32; out (H, m, tokens) float32, tokens <= chunks * C.
 */
#include <stdint.h>
#include <string.h>

#include "vec.h"

typedef unsigned char u8x16 __attribute__((vector_size(16)));
typedef int i32x16 __attribute__((vector_size(64)));

/* 16 bytes widened to float32 through int32 (zero-extend, then a signed convert: one
 * instruction each; a direct uint8 -> float conversion compiles to 16 scalar ones). */
AI v16 widen(const uint8_t* p) {
  u8x16 u;
  memcpy(&u, p, sizeof u);
  return __builtin_convertvector(__builtin_convertvector(u, i32x16), v16);
}

/* Queries j0..j0+MB (MB <= 4, a constant once inlined) of kv-head h over chunk `chunk`:
 * 64 tokens at a time, their MB x 4 accumulators in registers while the d rows stream past. */
AI void chunk_logits(const uint8_t* table, int H, int d, int C, int tokens, const float* q, int m, float* out,
                     int h, int chunk, int j0, const int MB) {
  const int64_t width = C + 8;
  const uint8_t* rows = table + ((int64_t)chunk * H * d + (int64_t)h * d) * width;
  float w[4][128], bias[4] = {0, 0, 0, 0};  /* d <= 128 */
  for (int c = 0; c < d; ++c) {
    float step, low;
    memcpy(&step, rows + c * width + C, sizeof step);
    memcpy(&low, rows + c * width + C + 4, sizeof low);
    for (int j = 0; j < MB; ++j) {
      const float qj = q[((int64_t)h * m + j0 + j) * d + c];
      w[j][c] = qj * step;
      bias[j] += qj * low;
    }
  }
  const int n = tokens - chunk * C < C ? tokens - chunk * C : C;
  for (int t = 0; t < n; t += 64) {
    v16 acc[4][4];
    for (int j = 0; j < MB; ++j)
      for (int v = 0; v < 4; ++v) acc[j][v] = (v16){} + bias[j];
    for (int c = 0; c < d; ++c) {
      const uint8_t* row = rows + c * width + t;
      __builtin_prefetch(row + 128);  /* this row's line two tiles on: 64 rows are read at once */
      v16 u[4];
      for (int v = 0; v < 4; ++v) u[v] = widen(row + 16 * v);
      for (int j = 0; j < MB; ++j)
        for (int v = 0; v < 4; ++v) acc[j][v] += w[j][c] * u[v];
    }
    for (int j = 0; j < MB; ++j) {
      float* dst = out + ((int64_t)h * m + j0 + j) * tokens + (int64_t)chunk * C + t;
      float tile[64];
      for (int v = 0; v < 4; ++v) store(tile + 16 * v, acc[j][v]);
      memcpy(dst, tile, sizeof(float) * (n - t < 64 ? n - t : 64));
    }
  }
}

/* C must be a multiple of 64 and d at most 128. */
void sketch_logits(const uint8_t* table, int chunks, int H, int d, int C, int tokens, const float* q, int m,
                   float* out, int threads) {
  const int groups = (m + 3) / 4;
  const int items = H * chunks * groups;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int i = 0; i < items; ++i) {
    const int h = i / (chunks * groups), chunk = i / groups % chunks, j0 = i % groups * 4;
    switch (m - j0 < 4 ? m - j0 : 4) {
      case 1: chunk_logits(table, H, d, C, tokens, q, m, out, h, chunk, j0, 1); break;
      case 2: chunk_logits(table, H, d, C, tokens, q, m, out, h, chunk, j0, 2); break;
      case 3: chunk_logits(table, H, d, C, tokens, q, m, out, h, chunk, j0, 3); break;
      default: chunk_logits(table, H, d, C, tokens, q, m, out, h, chunk, j0, 4); break;
    }
  }
}
