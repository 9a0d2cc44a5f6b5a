/* The parts of a decoder layer around attention, each in one call for a few rows of x
 * (decode steps, draft verifications), so that a step spends its time reading weights
 * rather than dispatching a dozen small PyTorch operations per layer:
 *
 *   norm_project:  y = rms_norm(x) W^T (+ b)          (the q, k, v projections' input)
 *   mlp_residual:  x += a Wo^T (+ bo);                 (attention's output projection)
 *                  x += down(silu(gate) * up)          (the MLP, on rms_norm(x))
 *
 * One OpenMP parallel region per call: the projections share W's rows among the workers
 * (matvec.h), the norms and element-wise parts between them run on one. W is float32
 * (size 4) or bfloat16 (size 2); everything else float32, contiguous. Built by build.py.
 */
#include <math.h>

#include "kernels.h"
#include "matvec.h"

/* h = x / sqrt(mean(x^2) + eps) * w, row by row: x, h (M, D). */
static void rms_norm(const float* x, const float* w, float eps, float* h, int M, int D) {
  for (int m = 0; m < M; m++) {
    const float* xm = x + (int64_t)m * D;
    double squares = 0;
    for (int i = 0; i < D; i++) squares += (double)xm[i] * xm[i];
    const float r = 1.f / sqrtf((float)(squares / D) + eps);
    for (int i = 0; i < D; i++) h[(int64_t)m * D + i] = xm[i] * r * w[i];
  }
}

/* y (M, N) = rms_norm(x (M, K), norm_w) W^T (+ bias); h (M, K): scratch. */
void norm_project(const float* x, const float* norm_w, float eps, const void* W, int size, const float* bias,
                  float* h, float* y, int M, int N, int K, int threads) {
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#pragma omp single
    rms_norm(x, norm_w, eps, h, M, K);
    project(h, (const char*)W, size, y, M, N, K);
    if (bias) {
#pragma omp for schedule(static)
      for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) y[(int64_t)m * N + n] += bias[n];
    }
  }
}

/* silu(g) = g / (1 + e^-g), e^-g kept finite (the build's -ffast-math assumes no infinities):
 * below g = -80 the exact value and this one are both under 2e-35 |g|. */
static inline float silu(float g) { return g / (1.f + expf(-(g > -80.f ? g : -80.f))); }

/* x (M, D) += a (M, A) Wo^T (+ bo), then x += (silu(gate) * up) Wd^T where
 * [gate | up] = rms_norm(x, norm_w) Wgu^T (M, 2F): the rest of a Llama decoder layer.
 * scratch: M * (D + 3F) floats. */
void mlp_residual(float* x, const float* a, const void* Wo, const float* bo, int A, const float* norm_w, float eps,
                  const void* Wgu, const void* Wd, int size, float* scratch, int M, int D, int F, int threads) {
  float *y = scratch, *gu = scratch + (int64_t)M * D, *mid = gu + (int64_t)M * 2 * F;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    project(a, (const char*)Wo, size, y, M, D, A);
#pragma omp single
    {
      for (int m = 0; m < M; m++)
        for (int i = 0; i < D; i++) x[(int64_t)m * D + i] += y[(int64_t)m * D + i] + (bo ? bo[i] : 0.f);
      rms_norm(x, norm_w, eps, y, M, D);
    }
    project(y, (const char*)Wgu, size, gu, M, 2 * F, D);
#pragma omp for schedule(static)
    for (int m = 0; m < M; m++)
      for (int i = 0; i < F; i++)
        mid[(int64_t)m * F + i] = silu(gu[(int64_t)m * 2 * F + i]) * gu[(int64_t)m * 2 * F + F + i];
    project(mid, (const char*)Wd, size, y, M, D, F);
#pragma omp for schedule(static)
    for (int m = 0; m < M; m++)
      for (int i = 0; i < D; i++) x[(int64_t)m * D + i] += y[(int64_t)m * D + i];
  }
}
