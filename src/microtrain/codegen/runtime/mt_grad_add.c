/* Sum of two gradient contributions to one tensor (per element; y may share a's or b's buffer). */
#include "mt_runtime.h"

void mt_grad_add(const float *a, const float *b, int32_t n, float *y) {
  for (int32_t i = 0; i < n; i++) y[i] = a[i] + b[i];
}

/* qint8 a, b and y (y may be a or b): per channel, one pass for the maximum, one to quantize. */
void mt_grad_add_q8(const float *a, const float *b, int32_t c, int32_t hw, float *y) {
  const int8_t *aq = (const int8_t *)(a + c), *bq = (const int8_t *)(b + c);
  int8_t *yq = (int8_t *)(y + c);
  for (int32_t o = 0; o < c; o++) {
    const float as = a[o], bs = b[o];
    float m = 0.0f;
    for (int32_t i = o * hw; i < (o + 1) * hw; i++) m = mt_absmax(m, (float)aq[i] * as + (float)bq[i] * bs);
    const float s = mt_q8_scale(m);
    for (int32_t i = o * hw; i < (o + 1) * hw; i++) yq[i] = mt_q8((float)aq[i] * as + (float)bq[i] * bs, s);
    y[o] = s;
  }
}
