/* Gradient w.r.t. a conv's int32 accumulator (straight-through rint): y = (g * mask) * m[c] (per element). */
#include "mt_runtime.h"

void mt_conv2d_grad_acc(const float *g, const uint8_t *mask, int32_t c, int32_t hw, const float *mult, float *y) {
  for (int32_t o = 0; o < c; o++)
    for (int32_t j = 0; j < hw; j++) y[o * hw + j] = g[o * hw + j] * (float)mt_mask_get(mask, o * hw + j) * mult[o];
}
