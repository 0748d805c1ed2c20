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

/* Pointwise stride-1 conv over compact tensors, PW_BLOCK pixels at a time so the inner loop streams one input row
 * (a fixed trip count: the compiler vectorizes it). sum (x - z) * w = sum x * w - z * sum w, exactly, in int32. */
#define PW_BLOCK 16
static void pointwise_block(const int8_t *x, int32_t cs, int32_t cin, const int8_t *wt, const int8_t *wf, int32_t ch,
                            int32_t *acc) {
  for (int32_t q = 0; q < PW_BLOCK; q++) acc[q] = 0;
  for (int32_t c = 0; c < cin; c++) {
    const int32_t wv = c < ch ? wt[c] : wf[c - ch];
    const int8_t *xp = x + c * cs;
    for (int32_t q = 0; q < PW_BLOCK; q++) acc[q] += xp[q] * wv;
  }
}

static void pointwise(const int8_t *x, mt_dims xd, const mt_conv *p, int8_t *y, mt_dims yd, uint8_t *mask) {
  const int32_t hw = yd.h * yd.w, cin = xd.c, ch = p->w.ch;
  for (int32_t o = 0; o < yd.c; o++) {
    const int8_t *wt = p->w.w_train ? p->w.w_train + o * ch : 0;
    const int8_t *wf = p->w.w_frozen ? p->w.w_frozen + o * (cin - ch) : 0;
    int32_t wsum = 0;
    for (int32_t c = 0; c < cin; c++) wsum += c < ch ? wt[c] : wf[c - ch];
    const int32_t bias = (int32_t)((uint32_t)p->bias[o] - (uint32_t)(p->x_zero * wsum));
    int32_t p0 = 0, acc[PW_BLOCK];
    for (; p0 + PW_BLOCK <= hw; p0 += PW_BLOCK) {
      pointwise_block(x + p0, xd.cs, cin, wt, wf, ch, acc);
      for (int32_t q = 0; q < PW_BLOCK; q++)
        y[o * hw + p0 + q] = requant(acc[q], bias, p->mult[o], p->y_zero, mask, o * hw + p0 + q);
    }
    for (; p0 < hw; p0++) {  /* the last pixels one by one */
      int32_t a = 0;
      for (int32_t c = 0; c < cin; c++) a += x[c * xd.cs + p0] * (c < ch ? wt[c] : wf[c - ch]);
      y[o * hw + p0] = requant(a, bias, p->mult[o], p->y_zero, mask, o * hw + p0);
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
  int32_t acc[MT_ROW_MAX];  /* one output row: each tap accumulates over the columns it reaches (exact in int32) */
  for (int32_t o = 0; o < yd.c; o++) {
    for (int32_t oy = 0; oy < yd.h; oy++) {
      const int32_t y0 = oy * p->stride - p->pad_top;
      const int32_t i0 = y0 < 0 ? -y0 : 0, i1 = y0 + k > xd.h ? xd.h - y0 : k;
      for (int32_t ox = 0; ox < yd.w; ox++) acc[ox] = 0;
      for (int32_t c = 0; c < cin; c++) {
        const int8_t *w = c < ch ? p->w.w_train + (o * ch + c) * k * k : p->w.w_frozen + (o * (cin - ch) + c - ch) * k * k;
        for (int32_t i = i0; i < i1; i++) {
          const int8_t *xr = x + c * xd.cs + (y0 + i) * xd.rs;
          for (int32_t j = 0; j < k; j++) {
            int32_t lo, hi;
            mt_tap_range(yd.w, xd.w, p->stride, p->pad_left, j, &lo, &hi);
            const int32_t wv = w[i * k + j], off = j - p->pad_left;
            for (int32_t ox = lo; ox < hi; ox++) acc[ox] += ((int32_t)xr[ox * p->stride + off] - p->x_zero) * wv;
          }
        }
      }
      for (int32_t ox = 0; ox < yd.w; ox++)
        y[o * yd.cs + oy * yd.rs + ox] = requant(acc[ox], p->bias[o], p->mult[o], p->y_zero, mask,
                                                 (o * yd.h + oy) * yd.w + ox);
    }
  }
}

/* The conv restricted to output channel o, a descriptor of one output channel (the channel-serial block backward
 * recomputes pw1 and dw one channel at a time): groups = 1, row o of both weight parts (cin input channels);
 * depthwise, channel o's weights alone. Its bias and multiplier are o's. */
mt_conv mt_conv_channel(const mt_conv *p, int32_t cin, int32_t o, int32_t depthwise) {
  mt_conv c = *p;
  const int32_t kk = p->w.k * p->w.k, ch = p->w.ch;
  c.bias = p->bias + o;
  c.mult = p->mult + o;
  if (depthwise) {
    c.w.w_train = o < ch ? p->w.w_train + o * kk : 0;
    c.w.w_frozen = o < ch ? 0 : p->w.w_frozen + (o - ch) * kk;
    c.w.ch = o < ch ? 1 : 0;
  } else {
    c.w.w_train = p->w.w_train ? p->w.w_train + o * ch * kk : 0;
    c.w.w_frozen = p->w.w_frozen ? p->w.w_frozen + o * (cin - ch) * kk : 0;
  }
  return c;
}
