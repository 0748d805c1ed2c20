/* fp32 head, gradient w.r.t. its int8 input (ir/ops.py linear_grad_input): gx[c] = acc_c * x.scale, where acc_c is
 * one chain of fused multiply-adds over k = 0..K-1 from 0: acc = fma(g[k], w[k, c], acc). */
#include "mt_runtime.h"

static float dot(const float *g, const float *w, int32_t k, int32_t c, int32_t i) {
  float acc = 0.0f;
  for (int32_t o = 0; o < k; o++) acc = mt_fma(g[o], w[o * c + i], acc);
  return acc;
}

void mt_linear_grad_input(const float *g, const float *w, int32_t k, int32_t c, float x_scale, float *gx) {
  for (int32_t i = 0; i < c; i++) gx[i] = dot(g, w, k, c, i) * x_scale;
}

/* qint8 gx [c]: every element is a channel of its own. */
void mt_linear_grad_input_q8(const float *g, const float *w, int32_t k, int32_t c, float x_scale, float *gx) {
  int8_t *q = (int8_t *)(gx + c);
  for (int32_t i = 0; i < c; i++) {
    const float v = dot(g, w, k, c, i) * x_scale;
    gx[i] = mt_q8_scale(__builtin_fabsf(v));
    q[i] = mt_q8(v, gx[i]);
  }
}
