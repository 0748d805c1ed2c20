/* Residual add backward: gm = g * mask, ga = gm * ra, gb = gm * rb (either output may be NULL). Per element, and
 * each g[i] is read before ga[i] / gb[i] is written, so either output may share g's buffer. */
#include "mt_runtime.h"

void mt_add_grad(const float *g, const uint8_t *mask, int32_t n, float ra, float rb, float *ga, float *gb) {
  for (int32_t i = 0; i < n; i++) {
    const float gm = g[i] * (float)mt_mask_get(mask, i);
    if (ga) ga[i] = gm * ra;
    if (gb) gb[i] = gm * rb;
  }
}

/* qint8 g, ga and gb (either output may be g): per channel, one pass for the maxima, one to quantize. */
void mt_add_grad_q8(const float *g, const uint8_t *mask, int32_t c, int32_t hw, float ra, float rb, float *ga,
                    float *gb) {
  const int8_t *gq = (const int8_t *)(g + c);
  int8_t *aq = ga ? (int8_t *)(ga + c) : 0, *bq = gb ? (int8_t *)(gb + c) : 0;
  for (int32_t o = 0; o < c; o++) {
    const float gs = g[o];
    float ma = 0.0f, mb = 0.0f;
    for (int32_t i = o * hw; i < (o + 1) * hw; i++) {
      const float gm = (float)gq[i] * gs * (float)mt_mask_get(mask, i);
      ma = mt_absmax(ma, gm * ra);
      mb = mt_absmax(mb, gm * rb);
    }
    const float sa = mt_q8_scale(ma), sb = mt_q8_scale(mb);
    for (int32_t i = o * hw; i < (o + 1) * hw; i++) {
      const float gm = (float)gq[i] * gs * (float)mt_mask_get(mask, i);
      if (aq) aq[i] = mt_q8(gm * ra, sa);
      if (bq) bq[i] = mt_q8(gm * rb, sb);
    }
    if (ga) ga[o] = sa;
    if (gb) gb[o] = sb;
  }
}
