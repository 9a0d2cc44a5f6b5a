/* y = x W^T for a few rows of x, on the CPU: decode steps and draft verifications, where
 * the BLAS call reads the weights at a fraction of the memory bandwidth. The workers are
 * OpenMP's (torch's own pool); the loop is matvec.h's. W is float32 (size 4), bfloat16
 * (size 2) or blocks of quantized weights. Built with the other kernels by build.py.
 */
#include "matvec.h"

/* 1 where blocks of quantized weights multiply int8-quantized rows of x (blocks.h). */
int int8_activations(void) { return INT8_ACTIVATIONS; }

/* 1 where bfloat16 weights multiply x rounded to bfloat16 (matvec.h's tile_dot). */
int bf16_dot(void) { return BF16_DOT; }

/* 1 where bfloat16 weights go through AMX tiles (amx.h). */
int amx_tiles(void) { return amx_granted; }

/* 1 where the build's vectors are 16 floats wide in registers (vec.h). */
int wide_vectors(void) { return WIDE_VECTORS; }

void linear_rows(const float* x, const void* W, int size, float* y, int M, int N, int K, int threads) {
#pragma omp parallel num_threads(threads) if (threads > 1)
  project(x, (const char*)W, size, y, M, N, K);
}

/* W's Q4 blocks (N rows of K weights) as bfloat16 in out (N, K): w = d q + m in float32,
 * rounded to nearest even; for torch's bfloat16 matmul of many rows (prefill chunks). */
void q4_to_bf16(const void* W, bf16* out, int N, int K, int threads) {
  const int nb = K / BLOCK_WEIGHTS;
  const int64_t row = block_row_bytes(Q4, K), values = value_bytes(Q4, K);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
  for (int n = 0; n < N; n++) {
    const char* w = (const char*)W + n * row;
    bf16* o = out + (int64_t)n * K;
    for (int b = 0; b < nb; b++) {
      v16 lo, hi;
      q4_weights(w + 16 * b, block_scale(w, values, b), block_scale(w, values + 2 * nb, b), &lo, &hi);
      for (int j = 0; j < 16; j++) {
        o[32 * b + j] = float_to_bf16(lo[j]);
        o[32 * b + 16 + j] = float_to_bf16(hi[j]);
      }
    }
  }
}
