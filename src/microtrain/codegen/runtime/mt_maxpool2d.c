/* Windowed max pool (TFLite MAX_POOL_2D): see mt_pool.h. Integer only. */
#include "mt_pool.h"

void mt_maxpool2d(const int8_t *x, const mt_pool *p, int8_t *y) {
  for (int32_t c = 0; c < p->c; c++) {
    const int8_t *xc = x + c * p->h * p->w;
    for (int32_t oy = 0; oy < p->ho; oy++) {
      const int32_t y0 = oy * p->stride - p->pad_top;
      const int32_t i0 = y0 < 0 ? -y0 : 0, i1 = y0 + p->kh > p->h ? p->h - y0 : p->kh;
      for (int32_t ox = 0; ox < p->wo; ox++) {
        const int32_t x0 = ox * p->stride - p->pad_left;
        const int32_t j0 = x0 < 0 ? -x0 : 0, j1 = x0 + p->kw > p->w ? p->w - x0 : p->kw;
        int32_t m = -128;
        for (int32_t i = i0; i < i1; i++)
          for (int32_t j = j0; j < j1; j++) {
            const int32_t v = xc[(y0 + i) * p->w + x0 + j];
            if (v > m) m = v;
          }
        m = m < p->act_min ? p->act_min : m > p->act_max ? p->act_max : m;
        y[(c * p->ho + oy) * p->wo + ox] = (int8_t)m;
      }
    }
  }
}
