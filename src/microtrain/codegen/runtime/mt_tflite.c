/* TensorFlow Lite's int8 kernels (Requant.TFLITE): see mt_tflite.h. Plain loops; integer sums are exact in any
 * order, and the requantization is integer-only, so the host and the Cortex-M compute the same bits. */
#include <string.h>

#include "mt_tflite.h"

static const int8_t *weight_row(const mt_conv *p, int32_t cin, int32_t o, int32_t c, int32_t depthwise) {
  const int32_t kk = p->w.k * p->w.k, ch = p->w.ch;
  if (depthwise) return o < ch ? p->w.w_train + o * kk : p->w.w_frozen + (o - ch) * kk;
  return c < ch ? p->w.w_train + (o * ch + c) * kk : p->w.w_frozen + (o * (cin - ch) + c - ch) * kk;
}

/* Output channel o into out (row stride rs), its mask bits at mask_base + oy * ow + ox. */
static void channel(const int8_t *x, mt_dims xd, const mt_conv *p, const int32_t *qmult, const int32_t *qshift,
                    int32_t act_min, int32_t act_max, int32_t o, int8_t *out, int32_t rs, uint8_t *mask,
                    int32_t mask_base, int32_t oh, int32_t ow, int32_t depthwise) {
  const int32_t k = p->w.k, s = p->stride, z = p->x_zero;
  const int32_t c0 = depthwise ? o : 0, c1 = depthwise ? o + 1 : xd.c;
  for (int32_t oy = 0; oy < oh; oy++) {
    const int32_t y0 = oy * s - p->pad_top;
    const int32_t i0 = y0 < 0 ? -y0 : 0, i1 = y0 + k > xd.h ? xd.h - y0 : k;
    for (int32_t ox = 0; ox < ow; ox++) {
      const int32_t x0 = ox * s - p->pad_left;
      const int32_t j0 = x0 < 0 ? -x0 : 0, j1 = x0 + k > xd.w ? xd.w - x0 : k;
      int32_t acc = p->bias[o];
      for (int32_t c = c0; c < c1; c++) {
        const int8_t *w = weight_row(p, xd.c, o, c, depthwise);
        const int8_t *xc = x + c * xd.cs;
        for (int32_t i = i0; i < i1; i++)
          for (int32_t j = j0; j < j1; j++)
            acc += ((int32_t)xc[(y0 + i) * xd.rs + x0 + j] - z) * (int32_t)w[i * k + j];
      }
      uint32_t in;
      out[oy * rs + ox] = mt_clamp_act(mt_mbqm(acc, qmult[o], qshift[o]) + p->y_zero, act_min, act_max, &in);
      if (mask) mt_mask_set(mask, mask_base + oy * ow + ox, (int)in);
    }
  }
}

void mt_conv2d_tfl(const int8_t *x, mt_dims xd, const mt_conv *p, const int32_t *qmult, const int32_t *qshift,
                   int32_t act_min, int32_t act_max, int8_t *y, mt_dims yd, uint8_t *mask, int32_t depthwise,
                   int8_t *scratch) {
  const int32_t hw = yd.h * yd.w;
  if (!scratch) {
    for (int32_t o = 0; o < yd.c; o++)
      channel(x, xd, p, qmult, qshift, act_min, act_max, o, y + o * yd.cs, yd.rs, mask, o * hw, yd.h, yd.w,
              depthwise);
    return;
  }
  const int descending = yd.cs > xd.cs;  /* in place: the channel order of mt_depthwise_conv2d */
  for (int32_t n = 0; n < yd.c; n++) {
    const int32_t o = descending ? yd.c - 1 - n : n;
    channel(x, xd, p, qmult, qshift, act_min, act_max, o, scratch, yd.w, mask, o * hw, yd.h, yd.w, depthwise);
    for (int32_t oy = 0; oy < yd.h; oy++) memcpy(y + o * yd.cs + oy * yd.rs, scratch + oy * yd.w, (size_t)yd.w);
  }
}

void mt_add_tfl(const int8_t *a, mt_dims ad, int32_t a_zero, int32_t qa, int32_t sa, const int8_t *b, mt_dims bd,
                int32_t b_zero, int32_t qb, int32_t sb, int8_t *y, mt_dims yd, int32_t y_zero, int32_t qy, int32_t sy,
                int32_t act_min, int32_t act_max, uint8_t *mask) {
  for (int32_t c = 0; c < yd.c; c++) {
    for (int32_t r = 0; r < yd.h; r++) {
      for (int32_t x = 0; x < yd.w; x++) {
        const int32_t va = mt_mbqm(((int32_t)a[c * ad.cs + r * ad.rs + x] - a_zero) * (1 << 20), qa, sa);
        const int32_t vb = mt_mbqm(((int32_t)b[c * bd.cs + r * bd.rs + x] - b_zero) * (1 << 20), qb, sb);
        uint32_t in;
        y[c * yd.cs + r * yd.rs + x] = mt_clamp_act(mt_mbqm(va + vb, qy, sy) + y_zero, act_min, act_max, &in);
        if (mask) mt_mask_set(mask, (c * yd.h + r) * yd.w + x, (int)in);
      }
    }
  }
}

void mt_avgpool_tfl(const int8_t *x, int32_t c, int32_t hw, int32_t act_min, int32_t act_max, int8_t *y) {
  for (int32_t i = 0; i < c; i++) {
    int32_t s = 0;
    uint32_t in;
    for (int32_t j = 0; j < hw; j++) s += x[i * hw + j];
    y[i] = mt_clamp_act(s > 0 ? (s + hw / 2) / hw : (s - hw / 2) / hw, act_min, act_max, &in);
  }
}

void mt_mean_tfl(const int8_t *x, int32_t c, int32_t hw, int32_t x_zero, int32_t q, int32_t shift, int32_t y_zero,
                 int32_t act_min, int32_t act_max, int8_t *y) {
  for (int32_t i = 0; i < c; i++) {
    int32_t s = 0;
    uint32_t in;
    for (int32_t j = 0; j < hw; j++) s += x[i * hw + j];
    y[i] = mt_clamp_act(mt_mbqm(s - x_zero * hw, q, shift) + y_zero, act_min, act_max, &in);
  }
}
