/* fp32 head gradients (batch 1: G_w = outer(g, f), G_b = g with f[c] = float(x[c] - x.zero) * x.scale) and, fused,
 * their update. The head is updated after its input gradient was taken (the schedule guarantees it). */
#include "mt_runtime.h"

void mt_linear_update(const mt_step *s, const float *g, const int8_t *x, int32_t c, int32_t x_zero, float x_scale,
                      int32_t k, const mt_param *w, const mt_param *b) {
  for (int32_t o = 0; o < k; o++)
    for (int32_t i = 0; i < c; i++) mt_update_element(s, w, o * c + i, g[o] * ((float)((int32_t)x[i] - x_zero) * x_scale));
  for (int32_t o = 0; o < k; o++) mt_update_element(s, b, o, g[o]);
}

void mt_linear_weight_grad(const float *g, const int8_t *x, int32_t c, int32_t x_zero, float x_scale, int32_t k,
                           float *gw, float *gb) {
  for (int32_t o = 0; o < k; o++)
    for (int32_t i = 0; i < c; i++) gw[o * c + i] = g[o] * ((float)((int32_t)x[i] - x_zero) * x_scale);
  for (int32_t o = 0; o < k; o++) gb[o] = g[o];
}
