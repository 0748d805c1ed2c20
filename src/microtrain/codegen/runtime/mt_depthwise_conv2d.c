/* Depthwise conv2d (groups = C_in = C_out): output channel c reads input channel c only.
 * In place (scratch != NULL, y and x start at the same address): each channel is computed into the one-channel
 * scratch buffer, then copied over. With per-channel sizes a (input, x's channel stride) and b (output), writing
 * channel c in ascending order is safe when b <= a (it ends before unread input channel c + 1 starts); when b > a
 * the channels go in descending order (compiler/planner.py, INPLACE_OPS). */
#include <string.h>

#include "mt_runtime.h"

/* One output channel, a row at a time: for each tap, the output columns it reaches accumulate into an int32 row
 * (integer sums: any order is exact), so the innermost loop is a plain run over columns. */
static void channel(const int8_t *x, mt_dims xd, const mt_conv *p, int32_t c, int8_t *out, int32_t rs,
                    uint8_t *mask, int32_t mask_base, int32_t oh, int32_t ow) {
  const int32_t k = p->w.k, ch = p->w.ch, s = p->stride;
  const int8_t *w = c < ch ? p->w.w_train + c * k * k : p->w.w_frozen + (c - ch) * k * k;
  const int8_t *xc = x + c * xd.cs;
  int32_t acc[MT_ROW_MAX];
  for (int32_t oy = 0; oy < oh; oy++) {
    const int32_t y0 = oy * s - p->pad_top;
    const int32_t i0 = y0 < 0 ? -y0 : 0, i1 = y0 + k > xd.h ? xd.h - y0 : k;
    for (int32_t ox = 0; ox < ow; ox++) acc[ox] = 0;
    for (int32_t i = i0; i < i1; i++) {
      const int8_t *xr = xc + (y0 + i) * xd.rs;
      for (int32_t j = 0; j < k; j++) {
        int32_t lo, hi;
        mt_tap_range(ow, xd.w, s, p->pad_left, j, &lo, &hi);
        const int32_t wv = w[i * k + j], off = j - p->pad_left;
        if (s == 1) {
          for (int32_t ox = lo; ox < hi; ox++) acc[ox] += ((int32_t)xr[ox + off] - p->x_zero) * wv;
        } else {
          for (int32_t ox = lo; ox < hi; ox++) acc[ox] += ((int32_t)xr[ox * s + off] - p->x_zero) * wv;
        }
      }
    }
    for (int32_t ox = 0; ox < ow; ox++) {
      float v = (float)(int32_t)((uint32_t)acc[ox] + (uint32_t)p->bias[c]) * p->mult[c];
      float r = mt_rint(v) + (float)p->y_zero;
      if (mask) mt_mask_set(mask, mask_base + oy * ow + ox, r >= -128.0f && r <= 127.0f);
      out[oy * rs + ox] = mt_clamp8(r);
    }
  }
}

void mt_depthwise_conv2d(const int8_t *x, mt_dims xd, const mt_conv *p, int8_t *y, mt_dims yd, uint8_t *mask,
                         int8_t *scratch) {
  const int32_t hw = yd.h * yd.w;
  if (!scratch) {
    for (int32_t c = 0; c < yd.c; c++) channel(x, xd, p, c, y + c * yd.cs, yd.rs, mask, c * hw, yd.h, yd.w);
    return;
  }
  const int descending = yd.cs > xd.cs;
  for (int32_t n = 0; n < yd.c; n++) {
    const int32_t c = descending ? yd.c - 1 - n : n;
    channel(x, xd, p, c, scratch, yd.w, mask, c * hw, yd.h, yd.w);
    for (int32_t oy = 0; oy < yd.h; oy++) memcpy(y + c * yd.cs + oy * yd.rs, scratch + oy * yd.w, (size_t)yd.w);
  }
}
