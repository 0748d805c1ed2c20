/* Windowed average pool (TFLite AVERAGE_POOL_2D): see mt_pool.h. */
#include "mt_pool.h"

void mt_avgpool2d(const int8_t *x, const mt_pool *p, int32_t tflite, int8_t *y) {
  for (int32_t c = 0; c < p->c; c++) {
    const int8_t *xc = x + c * p->h * p->w;
    for (int32_t oy = 0; oy < p->ho; oy++) {
      const int32_t y0 = oy * p->stride - p->pad_top;
      const int32_t i0 = y0 < 0 ? -y0 : 0, i1 = y0 + p->kh > p->h ? p->h - y0 : p->kh;
      for (int32_t ox = 0; ox < p->wo; ox++) {
        const int32_t x0 = ox * p->stride - p->pad_left;
        const int32_t j0 = x0 < 0 ? -x0 : 0, j1 = x0 + p->kw > p->w ? p->w - x0 : p->kw;
        int32_t s = 0;
        for (int32_t i = i0; i < i1; i++)
          for (int32_t j = j0; j < j1; j++) s += xc[(y0 + i) * p->w + x0 + j];
        const int32_t n = (i1 - i0) * (j1 - j0);
        int32_t v;
        if (tflite)
          v = s > 0 ? (s + n / 2) / n : (s - n / 2) / n;
        else
          v = (int32_t)mt_rint((float)s / (float)n);
        y[(c * p->ho + oy) * p->wo + ox] = mt_clamp8(v);
      }
    }
  }
}
