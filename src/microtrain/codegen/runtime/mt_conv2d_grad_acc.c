/* Gradient w.r.t. a conv's int32 accumulator (straight-through rint): y = (g * mask) * m[c] (per element). */
#include "mt_runtime.h"

void mt_conv2d_grad_acc(const float *g, const uint8_t *mask, int32_t c, int32_t hw, const float *mult, float *y) {
  for (int32_t o = 0; o < c; o++)
    for (int32_t j = 0; j < hw; j++) y[o * hw + j] = g[o * hw + j] * (float)mt_mask_get(mask, o * hw + j) * mult[o];
}

/* qint8 g and y (y may be g): per channel, one pass for the maximum, one to quantize. */
void mt_conv2d_grad_acc_q8(const float *g, const uint8_t *mask, int32_t c, int32_t hw, const float *mult, float *y) {
  const int8_t *gq = (const int8_t *)(g + c);
  int8_t *yq = (int8_t *)(y + c);
  for (int32_t o = 0; o < c; o++) {
    const float gs = g[o], mo = mult[o];
    float m = 0.0f;
    for (int32_t i = o * hw; i < (o + 1) * hw; i++) m = mt_absmax(m, (float)gq[i] * gs * (float)mt_mask_get(mask, i) * mo);
    const float s = mt_q8_scale(m);
    for (int32_t i = o * hw; i < (o + 1) * hw; i++) yq[i] = mt_q8((float)gq[i] * gs * (float)mt_mask_get(mask, i) * mo, s);
    y[o] = s;
  }
}

/* Channel c alone, in place on its float32 plane (the channel-serial block backward). */
void mt_conv2d_grad_acc_plane(float *g, const uint8_t *mask, int32_t c, int32_t hw, float mult) {
  for (int32_t j = 0; j < hw; j++) g[j] = g[j] * (float)mt_mask_get(mask, c * hw + j) * mult;
}
