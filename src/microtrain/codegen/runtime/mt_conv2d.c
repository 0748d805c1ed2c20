/* conv2d (groups = 1): acc = sum (x - x.zero) * w in int32, y = clamp8(rint(float(acc + b) * m) + y.zero).
 * Padding is real zero (an input outside the view contributes nothing). The trainable slice holds the first `ch`
 * input channels and the frozen part the rest, so each accumulator sums two channel ranges. */
#include "mt_runtime.h"

/* Requantize one accumulator, record the clamp mask bit (the pre-clamp value was inside [-128, 127]). */
static inline int8_t requant(int32_t acc, int32_t bias, float mult, int32_t y_zero, uint8_t *mask, int32_t i) {
  float v = (float)(int32_t)((uint32_t)acc + (uint32_t)bias) * mult;
  float r = mt_rint(v) + (float)y_zero;
  if (mask) mt_mask_set(mask, i, r >= -128.0f && r <= 127.0f);
  return mt_clamp8(r);
}

/* Pointwise stride-1 conv over compact tensors: blocks of pixels, so the inner loop streams one input row. */
#define PW_BLOCK 16
static void pointwise(const int8_t *x, mt_dims xd, const mt_conv *p, int8_t *y, mt_dims yd, uint8_t *mask) {
  const int32_t hw = yd.h * yd.w, cin = xd.c, ch = p->w.ch;
  for (int32_t o = 0; o < yd.c; o++) {
    const int8_t *wt = p->w.w_train ? p->w.w_train + o * ch : 0;
    const int8_t *wf = p->w.w_frozen ? p->w.w_frozen + o * (cin - ch) : 0;
    for (int32_t p0 = 0; p0 < hw; p0 += PW_BLOCK) {
      const int32_t n = hw - p0 < PW_BLOCK ? hw - p0 : PW_BLOCK;
      int32_t acc[PW_BLOCK] = {0};
      for (int32_t c = 0; c < cin; c++) {
        const int32_t wv = c < ch ? wt[c] : wf[c - ch];
        const int8_t *xp = x + c * xd.cs + p0;
        for (int32_t q = 0; q < n; q++) acc[q] += ((int32_t)xp[q] - p->x_zero) * wv;
      }
      for (int32_t q = 0; q < n; q++)
        y[o * hw + p0 + q] = requant(acc[q], p->bias[o], p->mult[o], p->y_zero, mask, o * hw + p0 + q);
    }
  }
}

void mt_conv2d(const int8_t *x, mt_dims xd, const mt_conv *p, int8_t *y, mt_dims yd, uint8_t *mask) {
  const int32_t k = p->w.k, ch = p->w.ch, cin = xd.c;
  if (k == 1 && p->stride == 1 && p->pad_top == 0 && p->pad_left == 0 && xd.h == yd.h && xd.w == yd.w &&
      xd.cs == xd.h * xd.w && xd.rs == xd.w && yd.cs == yd.h * yd.w && yd.rs == yd.w) {
    pointwise(x, xd, p, y, yd, mask);
    return;
  }
  for (int32_t o = 0; o < yd.c; o++) {
    for (int32_t oy = 0; oy < yd.h; oy++) {
      for (int32_t ox = 0; ox < yd.w; ox++) {
        int32_t acc = 0;
        for (int32_t c = 0; c < cin; c++) {
          const int8_t *w = c < ch ? p->w.w_train + (o * ch + c) * k * k : p->w.w_frozen + (o * (cin - ch) + c - ch) * k * k;
          for (int32_t i = 0; i < k; i++) {
            const int32_t iy = oy * p->stride - p->pad_top + i;
            if (iy < 0 || iy >= xd.h) continue;
            for (int32_t j = 0; j < k; j++) {
              const int32_t ix = ox * p->stride - p->pad_left + j;
              if (ix < 0 || ix >= xd.w) continue;
              acc += ((int32_t)x[c * xd.cs + iy * xd.rs + ix] - p->x_zero) * w[i * k + j];
            }
          }
        }
        const int32_t i = (o * yd.h + oy) * yd.w + ox;
        y[o * yd.cs + oy * yd.rs + ox] = requant(acc, p->bias[o], p->mult[o], p->y_zero, mask, i);
      }
    }
  }
}
