/* Every decoder layer of a forward of few rows (decode steps, short verifications) in one
 * call, for sequences that attend causally over their own pages: per layer the norm and
 * q/k/v projection, the rotation of q and k, the key writes, each sequence's paged attention
 * and the rest of the layer. The parts are the functions the per-layer path calls one by one
 * from Python (kernels.h), so the result is that path's, bit for bit, without its ~0.1 ms of
 * Python per layer (benchmarks/profile_decode.py).
 *
 * Layouts (contiguous): x (M, D) float32, updated in place; phases, group_phases (M, d/2)
 * (cos, sin) pairs at each row's position and its Self-Extend grouped one; the caches
 * (L, P, B, Hkv, d) float32 or bfloat16 (kv_size 4 or 2; k_group NULL: the pool keeps none
 * apart from k_rope); slots (M,)
 * each row's cache slot; sequence s owns rows [starts[s], starts[s] + lens[s]), its block
 * table tables[s] and kv_lens[s] resident slots, its rows the last of them.
 */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "vec.h"

/* One layer's weights: the projections in one of matvec.h's formats (`size`), the norms
 * and biases float32 (a NULL bias: none). */
typedef struct {
  const float* input_norm;
  const void* qkv;
  const float* qkv_bias;
  const void* o;
  const float* o_bias;
  const float* post_norm;
  const void* gate_up;
  const void* down;
} layer_t;

/* out (H, d) = x (H, d) with each interleaved pair rotated by ph (d/2 (cos, sin) pairs):
 * core/rope.py's complex product, each product rounded before the sum as torch's is (build.py
 * compiles this file without fused multiply-adds). */
static void rotate_heads(const float* x, const float* ph, float* out, int H, int d) {
  for (int h = 0; h < H; h++)
    for (int i = 0; i < d / 2; i++) {
      const float a = x[h * d + 2 * i], b = x[h * d + 2 * i + 1], c = ph[2 * i], s = ph[2 * i + 1];
      out[h * d + 2 * i] = a * c - b * s;
      out[h * d + 2 * i + 1] = a * s + b * c;
    }
}

/* n floats of src into dst as the pool keeps them: float32 (kv_size 4), or bfloat16 rounded
 * as torch rounds. */
static void put_row(char* dst, const float* src, int n, int kv_size) {
  if (kv_size == 4) {
    memcpy(dst, src, sizeof(float) * (size_t)n);
    return;
  }
  unsigned short* h = (unsigned short*)dst;
  for (int i = 0; i < n; i++) h[i] = float_to_bf16(src[i]);
}

/* Returns 0, paged_attention's status (2: a page outside the pool), or 3 for out of memory. */
int decoder_stack(float* x, int M, int L, const layer_t* layers, int size, float eps, int D, int F, int Hq, int Hkv,
                  int d, const float* phases, const float* group_phases, void* k, void* k_rope, void* v,
                  void* k_group, int kv_size, int64_t P, int B, const int64_t* slots, int S, const int64_t* starts,
                  const int64_t* lens, const int64_t* const* tables, const int64_t* kv_lens, float scale,
                  int threads) {
  const int A = Hq * d, KV = Hkv * d, N = A + 2 * KV;
  const int64_t layer_stride = P * B * (int64_t)KV * kv_size;
  float* buf = malloc(sizeof(float) * ((size_t)M * (size_t)(D + N + 2 * A + Hq + D + 3 * F) + (size_t)KV));
  if (!buf) return 3;
  float *h = buf, *qkv = h + (int64_t)M * D, *q = qkv + (int64_t)M * N, *attn = q + (int64_t)M * A;
  float *lse = attn + (int64_t)M * A, *scratch = lse + (int64_t)M * Hq, *key = scratch + (int64_t)M * (D + 3 * F);
  char *ck = k, *ck_rope = k_rope, *cv = v, *ck_group = k_group;
  int status = 0;
  for (int l = 0; l < L && !status; l++) {
    const layer_t* w = &layers[l];
    const int64_t base = l * layer_stride;
    norm_project(x, w->input_norm, eps, w->qkv, size, w->qkv_bias, h, qkv, M, N, D, threads);
    for (int m = 0; m < M; m++) {
      const float *row = qkv + (int64_t)m * N, *ph = phases + (int64_t)m * d;
      const int64_t at = base + slots[m] * KV * kv_size;
      rotate_heads(row, ph, q + (int64_t)m * A, Hq, d);
      put_row(ck + at, row + A, KV, kv_size);
      rotate_heads(row + A, ph, key, Hkv, d);
      put_row(ck_rope + at, key, KV, kv_size);
      put_row(cv + at, row + A + KV, KV, kv_size);
      if (k_group) {
        rotate_heads(row + A, group_phases + (int64_t)m * d, key, Hkv, d);
        put_row(ck_group + at, key, KV, kv_size);
      }
    }
    for (int s = 0; s < S && !status; s++) {
      const int64_t r = starts[s], n = lens[s], T = kv_lens[s];
      status = paged_attention(q + r * A, ck_rope + base, cv + base, kv_size, P, tables[s], 0, T, T - n + 1, (int)n,
                               Hq, Hkv, d, B, scale, attn + r * A, lse + r * Hq, threads);
    }
    if (!status)
      mlp_residual(x, attn, w->o, w->o_bias, A, w->post_norm, eps, w->gate_up, w->down, size, scratch, M, D, F,
                   threads);
  }
  free(buf);
  return status;
}
