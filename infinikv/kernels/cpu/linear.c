/* y = x W^T for a few rows of x, on the CPU: decode steps and draft verifications, where
 * the BLAS call reads the float32 weights at a fraction of the memory bandwidth. Each
 * worker (OpenMP: torch's own pool) streams its share of W's rows once, four at a time,
 * and dots them with every row of x (which stays in L1).
 *
 * Layouts (float32, contiguous): x (M, K), W (N, K), y (M, N). Built with the attention
 * kernel by build.py.
 */
#include <stdint.h>

#include "vec.h"

/* One output row: the dot product of x's row and W's row, K floats. */
static float dot(const float* x, const float* w, int K) {
  v16 a = {0};
  int k = 0;
  for (; k + 16 <= K; k += 16) a += load(x + k) * load(w + k);
  float s = hsum4(a, (v16){0}, (v16){0}, (v16){0})[0];
  for (; k < K; k++) s += x[k] * w[k];
  return s;
}

void linear_rows(const float* x, const float* W, float* y, int M, int N, int K, int threads) {
  const int K16 = K - K % 16, blocks = N / 4;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int b = 0; b < blocks; b++) {
    const float* w = W + (int64_t)4 * b * K;
    for (int m = 0; m < M; m++) {
      const float* xm = x + (int64_t)m * K;
      v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
      for (int k = 0; k < K16; k += 16) {
        v16 xv = load(xm + k);
        a0 += xv * load(w + k);
        a1 += xv * load(w + K + k);
        a2 += xv * load(w + 2 * K + k);
        a3 += xv * load(w + 3 * K + k);
      }
      v4 s = hsum4(a0, a1, a2, a3);
      for (int r = 0; r < 4; r++) {
        for (int k = K16; k < K; k++) s[r] += xm[k] * w[(int64_t)r * K + k];
        y[(int64_t)m * N + 4 * b + r] = s[r];
      }
    }
  }
  for (int n = 4 * blocks; n < N; n++) /* the last N % 4 rows of W */
    for (int m = 0; m < M; m++) y[(int64_t)m * N + n] = dot(x + (int64_t)m * K, W + (int64_t)n * K, K);
}
