/* Depthwise conv backward w.r.t. its input: gx[c, y, x] = sum_{i, j} gacc[c, oy, ox] * w[c, i, j] over the taps with
 * y = oy * s - p + i, x = ox * s - p + j. Channel c reads gacc channel c only, so with scratch != NULL gx shares
 * gacc's buffer: each channel goes to the one-channel scratch, then over, ascending when a gx channel is no larger
 * than a gacc channel and descending otherwise (the planner's in-place contract). */
#include <string.h>

#include "mt_runtime.h"

/* One channel; its gacc is float32 g (q == NULL) or qint8 (float)q[i] * s. */
MT_INLINE void channel(const float *g, const int8_t *q, float s, mt_dims gd, const int8_t *w, int32_t k,
                       int32_t stride, int32_t pad, float *out, int32_t h, int32_t wd) {
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
        const int32_t r = ((y + pad - i) / stride) * gd.w;
        for (int32_t j = j0; j < j1; j += stride) {
          const int32_t e = r + (x + pad - j) / stride;
          acc = mt_fma(q ? (float)q[e] * s : g[e], (float)w[i * k + j], acc);
        }
      }
      out[y * wd + x] = acc;
    }
  }
}

static const int8_t *channel_weights(const mt_weights *w, int32_t c) {
  const int32_t kk = w->k * w->k;
  return c < w->ch ? w->w_train + c * kk : w->w_frozen + (c - w->ch) * kk;
}

void mt_depthwise_grad_input(const float *gacc, mt_dims gd, const mt_weights *w, int32_t stride, int32_t pad,
                             float *gx, mt_dims xd, float *scratch) {
  const int32_t hw = xd.h * xd.w;
  const int descending = scratch && hw > gd.cs;
  for (int32_t n = 0; n < xd.c; n++) {
    const int32_t c = descending ? xd.c - 1 - n : n;
    float *out = scratch ? scratch : gx + c * hw;
    channel(gacc + c * gd.cs, 0, 0.0f, gd, channel_weights(w, c), w->k, stride, pad, out, xd.h, xd.w);
    if (scratch) memcpy(gx + c * hw, scratch, (size_t)hw * sizeof(float));
  }
}

/* qint8 gacc and gx: channel c is computed into plane (one float32 gx channel), then quantized into gx channel c.
 * gx may be gacc (in place: the same scales, the values from the same offset), hence the planner's channel order. */
void mt_depthwise_grad_input_q8(const float *gacc, mt_dims gd, const mt_weights *w, int32_t stride, int32_t pad,
                                float *gx, mt_dims xd, float *plane) {
  const int32_t hw = xd.h * xd.w;
  const int8_t *gq = (const int8_t *)(gacc + gd.c);
  int8_t *xq = (int8_t *)(gx + xd.c);
  const int descending = hw > gd.cs;
  for (int32_t n = 0; n < xd.c; n++) {
    const int32_t c = descending ? xd.c - 1 - n : n;
    channel(0, gq + c * gd.cs, gacc[c], gd, channel_weights(w, c), w->k, stride, pad, plane, xd.h, xd.w);
    gx[c] = mt_q8_quantize(plane, hw, xq + c * hw);
  }
}

/* Channel c alone (the channel-serial block backward): gacc channel g (float32), gx channel into out. */
void mt_depthwise_grad_input_channel(const float *g, mt_dims gd, const mt_weights *w, int32_t c, int32_t stride,
                                     int32_t pad, float *out, mt_dims xd) {
  channel(g, 0, 0.0f, gd, channel_weights(w, c), w->k, stride, pad, out, xd.h, xd.w);
}
