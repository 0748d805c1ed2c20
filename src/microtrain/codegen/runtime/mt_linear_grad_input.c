/* fp32 head, gradient w.r.t. its int8 input: gx[c] = (sum_k g[k] * w[k, c]) * x.scale. */
#include "mt_runtime.h"

void mt_linear_grad_input(const float *g, const float *w, int32_t k, int32_t c, float x_scale, float *gx) {
  for (int32_t i = 0; i < c; i++) {
    float acc = 0.0f;
    for (int32_t o = 0; o < k; o++) acc = mt_fma(g[o], w[o * c + i], acc);
    gx[i] = acc * x_scale;
  }
}
