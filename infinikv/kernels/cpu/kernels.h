/* The entry points of the CPU kernels that others call too (stack.c runs them all per layer). */
#ifndef INFINIKV_KERNELS_H
#define INFINIKV_KERNELS_H
#include <stdint.h>

int paged_attention(const float* q, const void* k, const void* v, int kv_size, int64_t P, const int64_t* pages,
                    int64_t start, int64_t stop, int64_t limit, int n, int Hq, int Hkv, int d, int B, float scale,
                    float* out, float* lse, int threads);
void norm_project(const float* x, const float* norm_w, float eps, const void* W, int size, const float* bias,
                  float* h, float* y, int M, int N, int K, int threads);
void mlp_residual(float* x, const float* a, const void* Wo, const float* bo, int A, const float* norm_w, float eps,
                  const void* Wgu, const void* Wd, int size, float* scratch, int M, int D, int F, int threads);
#endif
