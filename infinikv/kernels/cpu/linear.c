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

void linear_rows(const float* x, const void* W, int size, float* y, int M, int N, int K, int threads) {
#pragma omp parallel num_threads(threads) if (threads > 1)
  project(x, (const char*)W, size, y, M, N, K);
}
