/* Depthwise conv2d (groups = C_in = C_out): output channel c reads input channel c only.
 * In place (scratch != NULL, y and x start at the same address): each channel is computed into the one-channel
 * scratch buffer, then copied over. With per-channel sizes a (input, x's channel stride) and b (output), writing
 * channel c in ascending order is safe when b <= a (it ends before unread input channel c + 1 starts); when b > a
 * the channels go in descending order (compiler/planner.py, INPLACE_OPS). */
#include <string.h>

#include "mt_runtime.h"

static void channel(const int8_t *x, mt_dims xd, const mt_conv *p, int32_t c, int8_t *out, int32_t rs,
                    uint8_t *mask, int32_t mask_base, int32_t oh, int32_t ow) {
  const int32_t k = p->w.k, ch = p->w.ch;
  const int8_t *w = c < ch ? p->w.w_train + c * k * k : p->w.w_frozen + (c - ch) * k * k;
  const int8_t *xc = x + c * xd.cs;
  for (int32_t oy = 0; oy < oh; oy++) {
    for (int32_t ox = 0; ox < ow; ox++) {
      int32_t acc = 0;
      for (int32_t i = 0; i < k; i++) {
        const int32_t iy = oy * p->stride - p->pad_top + i;
        if (iy < 0 || iy >= xd.h) continue;
        for (int32_t j = 0; j < k; j++) {
          const int32_t ix = ox * p->stride - p->pad_left + j;
          if (ix < 0 || ix >= xd.w) continue;
          acc += ((int32_t)xc[iy * xd.rs + ix] - p->x_zero) * w[i * k + j];
        }
      }
      float v = (float)(int32_t)((uint32_t)acc + (uint32_t)p->bias[c]) * p->mult[c];
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
