/* Block scores over the 8-bit key sketch (infinikv/memory/sketch.py), on the CPU: for each
 * group of m queries that share r picked channels, each block's best approximate logit
 * over its tokens and the group's queries. What fbgemm's embedding bag, a max over the
 * queries and a max-pool do in three passes (the bag re-reading and de-quantizing each
 * row once per query), one pass here: each picked row of a chunk is read and widened once
 * for all m queries.
 *
 * Layouts: table (chunks held, R, C + 8) uint8, a chunk's R = Hkv * d rows of C steps then
 * the row's float32 step and minimum; rows (G, r) int64 row numbers within a chunk;
 * weights (G, m, r) float32, the queries' values on those channels; out (G, chunks * C / B)
 * float32. C is a multiple of B. Built with the other kernels by build.py.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

#define QB 8      /* queries per pass over a chunk's rows */
#define MAX_R 256 /* picked channels (the caller checks) */
#define U 4       /* 16-token vectors per step */

/* Tokens [t, t + 16u) of queries 0 .. qn: u vectors at once, so that u * qn running sums
 * hide the FMA latency (one sum per (query, vector) takes a product per picked row). */
AI void span(const unsigned char* chunk, int64_t width, const int64_t* rows, float a[][MAX_R], const float* bias,
             int t, int qn, int u, int r, float* scores) {
  v16 acc[QB][U];
  for (int i = 0; i < qn; i++)
    for (int k = 0; k < u; k++) acc[i][k] = (v16){0} + bias[i];
  for (int j = 0; j < r; j++) {
    const unsigned char* row = chunk + rows[j] * width + t;
    for (int k = 0; k < u; k++) {
      v16 q = load_u8(row + 16 * k);
      for (int i = 0; i < qn; i++) acc[i][k] += a[i][j] * q;
    }
  }
  for (int k = 0; k < u; k++) {
    v16 best = load(scores + t + 16 * k);
    for (int i = 0; i < qn; i++) best = vmax(best, acc[i][k]);
    store(scores + t + 16 * k, best);
  }
}

/* scores[t] = max(scores[t], the sums of queries i0 .. i0 + qn at token t), qn a constant
 * once inlined (the accumulators stay in registers). Per query: sum_j w_j (q_j step_j +
 * low_j) = bias + sum_j (w_j step_j) q_j, q_j the row's uint8 steps. */
AI void pass(const unsigned char* chunk, int C, const int64_t* rows, const float* w, int i0, int qn, int r,
             float* scores) {
  const int64_t width = C + 8;
  float a[QB][MAX_R], bias[QB] = {0};
  for (int j = 0; j < r; j++) {
    float sl[2];
    memcpy(sl, chunk + rows[j] * width + C, sizeof sl);
    for (int i = 0; i < qn; i++) {
      a[i][j] = w[(i0 + i) * r + j] * sl[0];
      bias[i] += w[(i0 + i) * r + j] * sl[1];
    }
  }
  const int C16 = C - C % 16, u = qn <= QB / 2 ? U : U / 2; /* u * qn <= 16 running sums */
  int t = 0;
  for (; t + 16 * u <= C16; t += 16 * u) span(chunk, width, rows, a, bias, t, qn, u, r, scores);
  for (; t < C16; t += 16) span(chunk, width, rows, a, bias, t, qn, 1, r, scores);
  for (; t < C; t++)
    for (int i = 0; i < qn; i++) {
      float s = bias[i];
      for (int j = 0; j < r; j++) s += a[i][j] * chunk[rows[j] * width + t];
      scores[t] = s > scores[t] ? s : scores[t];
    }
}

/* One group's chunk: out[b] = max over its B-token blocks of max over queries of the sums;
 * scores: C floats of scratch. */
static void chunk_scores(const unsigned char* chunk, int C, const int64_t* rows, const float* w, int m, int r,
                         int B, float* scores, float* out) {
  for (int t = 0; t < C; t++) scores[t] = -3.4e38f;
  for (int i0 = 0; i0 < m; i0 += QB) {
    switch (m - i0 < QB ? m - i0 : QB) {
      case 1: pass(chunk, C, rows, w, i0, 1, r, scores); break;
      case 2: pass(chunk, C, rows, w, i0, 2, r, scores); break;
      case 3: pass(chunk, C, rows, w, i0, 3, r, scores); break;
      case 4: pass(chunk, C, rows, w, i0, 4, r, scores); break;
      case 5: pass(chunk, C, rows, w, i0, 5, r, scores); break;
      case 6: pass(chunk, C, rows, w, i0, 6, r, scores); break;
      case 7: pass(chunk, C, rows, w, i0, 7, r, scores); break;
      default: pass(chunk, C, rows, w, i0, QB, r, scores);
    }
  }
  for (int b = 0; b < C / B; b++) {
    float s = scores[b * B];
    for (int t = 1; t < B; t++) s = scores[b * B + t] > s ? scores[b * B + t] : s;
    out[b] = s;
  }
}

/* Returns 0, or 1 when a worker could not allocate its scratch. */
int sketch_block_scores(const unsigned char* table, int64_t R, int C, const int64_t* rows, const float* weights,
                        int G, int m, int r, int chunks, int B, float* out, int threads) {
  int failed = 0;
  const int64_t per_group = (int64_t)chunks * (C / B);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    float* scores = malloc(sizeof(float) * C);
    if (!scores) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static) collapse(2)
    for (int g = 0; g < G; g++)
      for (int c = 0; c < chunks; c++)
        if (scores)
          chunk_scores(table + (int64_t)c * R * (C + 8), C, rows + (int64_t)g * r, weights + (int64_t)g * m * r, m,
                       r, B, scores, out + g * per_group + (int64_t)c * (C / B));
    free(scores);
  }
  return failed;
}
