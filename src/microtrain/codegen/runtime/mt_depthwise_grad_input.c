/* Depthwise conv backward w.r.t. its input: gx[c, y, x] = sum_{i, j} gacc[c, oy, ox] * w[c, i, j] over the taps with
 * y = oy * s - p + i, x = ox * s - p + j. Channel c reads gacc channel c only, so with scratch != NULL gx shares
 * gacc's buffer: each channel goes to the one-channel scratch, then over, ascending when a gx channel is no larger
 * than a gacc channel and descending otherwise (the planner's in-place contract). */
#include <string.h>

#include "mt_runtime.h"

static void channel(const float *g, mt_dims gd, const int8_t *w, int32_t k, int32_t stride, int32_t pad, float *out,
                    int32_t h, int32_t wd) {
  for (int32_t y = 0; y < h; y++) {
    for (int32_t x = 0; x < wd; x++) {
      float acc = 0.0f;
      for (int32_t i = 0; i < k; i++) {
        const int32_t ty = y + pad - i;
        if (ty < 0 || ty % stride || ty / stride >= gd.h) continue;
        for (int32_t j = 0; j < k; j++) {
          const int32_t tx = x + pad - j;
          if (tx < 0 || tx % stride || tx / stride >= gd.w) continue;
          acc = mt_fma(g[(ty / stride) * gd.w + tx / stride], (float)w[i * k + j], acc);
        }
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
