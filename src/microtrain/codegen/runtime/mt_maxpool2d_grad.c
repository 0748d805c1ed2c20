/* Windowed max pool backward: see mt_pool.h and ir/ops.py maxpool2d_grad. */
#include "mt_pool.h"

void mt_maxpool2d_grad(const float *g, const int8_t *x, const mt_pool *p, float *gx, int32_t q8, float *plane) {
  const int32_t hw = p->h * p->w, n = p->ho * p->wo;
  for (int32_t c = 0; c < p->c; c++) {
    const int8_t *xc = x + c * hw;
    float *out = q8 ? plane : gx + c * hw;
    for (int32_t i = 0; i < hw; i++) out[i] = 0.0f;
    for (int32_t oy = 0; oy < p->ho; oy++) {
      const int32_t y0 = oy * p->stride - p->pad_top;
      const int32_t i0 = y0 < 0 ? -y0 : 0, i1 = y0 + p->kh > p->h ? p->h - y0 : p->kh;
      for (int32_t ox = 0; ox < p->wo; ox++) {
        const int32_t x0 = ox * p->stride - p->pad_left;
        const int32_t j0 = x0 < 0 ? -x0 : 0, j1 = x0 + p->kw > p->w ? p->w - x0 : p->kw;
        int32_t m = -129, at = 0;
        for (int32_t i = i0; i < i1; i++)
          for (int32_t j = j0; j < j1; j++) {
            const int32_t k = (y0 + i) * p->w + x0 + j;
            if (xc[k] > m) m = xc[k], at = k;
          }
        if (m >= p->act_min && m <= p->act_max) out[at] = out[at] + mt_grad_at(g, q8, p->c, c, n, oy * p->wo + ox);
      }
    }
    if (q8) gx[c] = mt_q8_quantize(plane, hw, (int8_t *)(gx + p->c) + c * hw);
  }
}
