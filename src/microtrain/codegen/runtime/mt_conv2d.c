/* conv2d (groups = 1): acc = sum (x - x.zero) * w in int32, y = clamp8(rint(float(acc + b) * m) + y.zero).
 * Padding is real zero (an input outside the view contributes nothing). The trainable slice holds the first `ch`
 * input channels and the frozen part the rest, so each accumulator sums two channel ranges. */
#include "mt_runtime.h"

/* sum_c x[c][p + q] * w[c] for q = 0..3, c in [0, n) (channel stride cs) added to a[0..3]: four channels at a time
 * through SMLAD on sign-extended pairs (channels c, c + 2 and c + 1, c + 3), the rest one by one. Integer sums:
 * exact in any order. */
static inline void pw_dot4(const int8_t *x, int32_t cs, const int8_t *w, int32_t n, int32_t *a) {
  int32_t a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3], c = 0;
  for (; c + 4 <= n; c += 4, x += 4 * cs) {
    const uint32_t w4 = mt_ld32(w + c), wa = mt_sxtb16(w4), wb = mt_sxtb16_r8(w4);
    uint32_t u = mt_ld32(x), v = mt_ld32(x + 2 * cs);
    uint32_t su = mt_sxtb16(u), sv = mt_sxtb16(v);
    a0 = mt_smlad(mt_pkhbt(su, sv), wa, a0);
    a2 = mt_smlad(mt_pkhtb(su, sv), wa, a2);
    su = mt_sxtb16_r8(u), sv = mt_sxtb16_r8(v);
    a1 = mt_smlad(mt_pkhbt(su, sv), wa, a1);
    a3 = mt_smlad(mt_pkhtb(su, sv), wa, a3);
    u = mt_ld32(x + cs), v = mt_ld32(x + 3 * cs);
    su = mt_sxtb16(u), sv = mt_sxtb16(v);
    a0 = mt_smlad(mt_pkhbt(su, sv), wb, a0);
    a2 = mt_smlad(mt_pkhtb(su, sv), wb, a2);
    su = mt_sxtb16_r8(u), sv = mt_sxtb16_r8(v);
    a1 = mt_smlad(mt_pkhbt(su, sv), wb, a1);
    a3 = mt_smlad(mt_pkhtb(su, sv), wb, a3);
  }
  for (; c < n; c++, x += cs) {
    const int32_t wv = w[c];
    a0 += x[0] * wv, a1 += x[1] * wv, a2 += x[2] * wv, a3 += x[3] * wv;
  }
  a[0] = a0, a[1] = a1, a[2] = a2, a[3] = a3;
}

/* Pointwise stride-1 conv over views: per output channel and run of pixels (a whole compact tensor, else one row),
 * four pixels at a time (pw_dot4 over the trainable and the frozen channel range), requantized a row at a time.
 * sum (x - z) * w = sum x * w - z * sum w, exactly, in int32 (wrap-around). */
#define PW_ROW 32
static void pointwise(const int8_t *x, mt_dims xd, const mt_conv *p, int8_t *y, mt_dims yd, uint8_t *mask) {
  const int32_t cin = xd.c, ch = p->w.ch, cs = xd.cs;
  const int compact = xd.cs == xd.h * xd.w && xd.rs == xd.w && yd.cs == yd.h * yd.w && yd.rs == yd.w;
  const int32_t runs = compact ? 1 : yd.h, len = compact ? yd.h * yd.w : yd.w;
  for (int32_t o = 0; o < yd.c; o++) {
    const int8_t *wt = p->w.w_train ? p->w.w_train + o * ch : 0;
    const int8_t *wf = p->w.w_frozen ? p->w.w_frozen + o * (cin - ch) : 0;
    int32_t wsum = 0;
    for (int32_t c = 0; c < ch; c++) wsum += wt[c];
    for (int32_t c = ch; c < cin; c++) wsum += wf[c - ch];
    const int32_t bias = (int32_t)((uint32_t)p->bias[o] - (uint32_t)(p->x_zero * wsum));
    const float m = p->mult[o];
    for (int32_t r = 0; r < runs; r++) {
      const int8_t *xr = x + r * xd.rs;
      int8_t *yr = y + o * yd.cs + r * yd.rs;
      const int32_t mi = (o * yd.h + r) * yd.w;  /* mask index of the run's first pixel */
      int32_t acc[PW_ROW];
      for (int32_t r0 = 0; r0 < len; r0 += PW_ROW) {
        const int32_t n = len - r0 < PW_ROW ? len - r0 : PW_ROW;
        int32_t q = 0;
        for (; q + 4 <= n; q += 4) {
          int32_t *a = acc + q;
          a[0] = a[1] = a[2] = a[3] = 0;
          if (ch) pw_dot4(xr + r0 + q, cs, wt, ch, a);
          if (cin > ch) pw_dot4(xr + ch * cs + r0 + q, cs, wf, cin - ch, a);
        }
        for (; q < n; q++) {  /* the last pixels one by one */
          int32_t v = 0;
          for (int32_t c = 0; c < ch; c++) v += xr[c * cs + r0 + q] * wt[c];
          for (int32_t c = ch; c < cin; c++) v += xr[c * cs + r0 + q] * wf[c - ch];
          acc[q] = v;
        }
        mt_requant_row(acc, n, bias, m, p->y_zero, yr + r0, mask, mi + r0);
      }
    }
  }
}

void mt_conv2d(const int8_t *x, mt_dims xd, const mt_conv *p, int8_t *y, mt_dims yd, uint8_t *mask) {
  const int32_t k = p->w.k, ch = p->w.ch, cin = xd.c;
  if (k == 1 && p->stride == 1 && p->pad_top == 0 && p->pad_left == 0 && xd.h == yd.h && xd.w == yd.w) {
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
      mt_requant_row(acc, yd.w, p->bias[o], p->mult[o], p->y_zero, y + o * yd.cs + oy * yd.rs, mask, (o * yd.h + oy) * yd.w);
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
