/* The fp32 head (ir/ops.py linear, float32 weights): logits[k] = acc_k + b[k], where acc_k is one chain of fused
 * multiply-adds over c = 0..C-1 from 0: acc = fma(f[c], w[k, c], acc), f[c] = float(x[c] - x.zero) * x.scale. */
#include "mt_runtime.h"

void mt_linear(const int8_t *x, int32_t c, int32_t x_zero, float x_scale, const float *w, const float *b,
               int32_t k, float *logits) {
  for (int32_t o = 0; o < k; o++) {
    float acc = 0.0f;
    for (int32_t i = 0; i < c; i++) acc = mt_fma((float)((int32_t)x[i] - x_zero) * x_scale, w[o * c + i], acc);
    logits[o] = acc + b[o];
  }
}
