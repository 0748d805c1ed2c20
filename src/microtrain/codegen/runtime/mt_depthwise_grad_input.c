/* Depthwise conv backward w.r.t. its input: gx[c, y, x] = sum_{i, j} gacc[c, oy, ox] * w[c, i, j] over the taps with
 * y = oy * s - p + i, x = ox * s - p + j. Channel c reads gacc channel c only, so with scratch != NULL gx shares
 * gacc's buffer: each channel goes to the one-channel scratch, then over, ascending when a gx channel is no larger
 * than a gacc channel and descending otherwise (the planner's in-place contract). */
#include <string.h>

#include "mt_runtime.h"

static void channel(const float *g, mt_dims gd, const int8_t *w, int32_t k, int32_t stride, int32_t pad, float *out,
                    int32_t h, int32_t wd) {
  for (int32_t y = 0; y < h; y++) {
    /* taps i with (y + pad - i) a multiple of stride and the quotient a row of gacc: i ascending by stride */
    int32_t i0 = (y + pad) % stride, i_lo = y + pad - (gd.h - 1) * stride;
    while (i0 < i_lo) i0 += stride;
    const int32_t i1 = y + pad + 1 < k ? y + pad + 1 : k;
    for (int32_t x = 0; x < wd; x++) {
      int32_t j0 = (x + pad) % stride, j_lo = x + pad - (gd.w - 1) * stride;
      while (j0 < j_lo) j0 += stride;
      const int32_t j1 = x + pad + 1 < k ? x + pad + 1 : k;
      float acc = 0.0f;
      for (int32_t i = i0; i < i1; i += stride) {
        const float *gr = g + ((y + pad - i) / stride) * gd.w;
        for (int32_t j = j0; j < j1; j += stride) acc = mt_fma(gr[(x + pad - j) / stride], (float)w[i * k + j], acc);
      }
      out[y * wd + x] = acc;
    }
  }
}

void mt_depthwise_grad_input(const float *gacc, mt_dims gd, const mt_weights *w, int32_t stride, int32_t pad,
                             float *gx, mt_dims xd, float *scratch) {
  const int32_t k = w->k, kk = k * k, hw = xd.h * xd.w;
  const int descending = scratch && hw > gd.cs;
  for (int32_t n = 0; n < xd.c; n++) {
    const int32_t c = descending ? xd.c - 1 - n : n;
    const int8_t *wc = c < w->ch ? w->w_train + c * kk : w->w_frozen + (c - w->ch) * kk;
    float *out = scratch ? scratch : gx + c * hw;
    channel(gacc + c * gd.cs, gd, wc, k, stride, pad, out, xd.h, xd.w);
    if (scratch) memcpy(gx + c * hw, scratch, (size_t)hw * sizeof(float));
  }
}
