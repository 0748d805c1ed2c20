/* The gradient of flatten (ir/ops.py flatten_grad): NHWC order back to CHW. */
#include "mt_pool.h"

void mt_flatten_grad(const float *g, int32_t c, int32_t hw, float *gx, int32_t q8, float *plane) {
  const int32_t n = c * hw;  /* g: n channels of one element each */
  for (int32_t ch = 0; ch < c; ch++) {
    float *out = q8 ? plane : gx + ch * hw;
    for (int32_t i = 0; i < hw; i++) out[i] = mt_grad_at(g, q8, n, i * c + ch, 1, 0);
    if (q8) gx[ch] = mt_q8_quantize(plane, hw, (int8_t *)(gx + c) + ch * hw);
  }
}
