/* Global average pool backward: gx[c, h, w] = g[c] / float(H * W). */
#include "mt_runtime.h"

void mt_avgpool_grad(const float *g, int32_t c, int32_t hw, float *gx) {
  for (int32_t i = 0; i < c; i++) {
    const float v = g[i] / (float)hw;
    for (int32_t j = 0; j < hw; j++) gx[i * hw + j] = v;
  }
}

/* qint8 g [c] (a channel per element) and gx: channel i is hw copies of one value. */
void mt_avgpool_grad_q8(const float *g, int32_t c, int32_t hw, float *gx) {
  const int8_t *gq = (const int8_t *)(g + c);
  int8_t *xq = (int8_t *)(gx + c);
  for (int32_t i = 0; i < c; i++) {
    const float v = (float)gq[i] * g[i] / (float)hw;
    const float s = mt_q8_scale(__builtin_fabsf(v));
    const int8_t q = mt_q8(v, s);
    for (int32_t j = 0; j < hw; j++) xq[i * hw + j] = q;
    gx[i] = s;
  }
}
