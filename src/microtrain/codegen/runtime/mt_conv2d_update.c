/* The weight and bias gradients of a conv (integer units) and, fused, their update (operator reordering):
 *   G_w[o, c, i, j] = sum_{oy, ox} gacc[o, oy, ox] * (x_saved[c, oy * s - p + i, ox * s - p + j] - x.zero)
 *   G_b[o] = sum_{oy, ox} gacc[o, oy, ox]
 * over the trainable channels c < ch (depthwise: channel c of gacc with channel c of x_saved). Each G_w element is a
 * chain of fused multiply-adds over the output pixels in row-major order from 0; G_b a chain of additions in the same
 * order (mt_sum). A qint8
 * gacc (the _q8 variants) is read one channel at a time, dequantized into `plane`, and then summed the same way. */
#include "mt_runtime.h"

#if MT_DSP
/* The float whose bits are b, less 12582912 (exact for the bits 0x4B400000 + d, |d| < 2^22: d). */
static inline float mt_magic_f(uint32_t b) {
  float f;
  __builtin_memcpy(&f, &b, 4);
  return f - 12582912.0f;
}
/* a + sign-extended byte r of x (SXTAB with a rotation: one instruction). */
static inline uint32_t mt_sxtab(uint32_t a, uint32_t x, int32_t r) {
  uint32_t v;
  if (r == 0) __asm__("sxtab %0, %1, %2" : "=r"(v) : "r"(a), "r"(x));
  else if (r == 1) __asm__("sxtab %0, %1, %2, ror #8" : "=r"(v) : "r"(a), "r"(x));
  else if (r == 2) __asm__("sxtab %0, %1, %2, ror #16" : "=r"(v) : "r"(a), "r"(x));
  else __asm__("sxtab %0, %1, %2, ror #24" : "=r"(v) : "r"(a), "r"(x));
  return v;
}
#endif

static float weight_grad(const float *g, mt_dims gd, const int8_t *x, mt_dims xd, int32_t x_zero, int32_t i,
                         int32_t j, int32_t stride, int32_t pad) {
  int32_t y0, y1, x0, x1;
  mt_tap_range(gd.h, xd.h, stride, pad, i, &y0, &y1);
  mt_tap_range(gd.w, xd.w, stride, pad, j, &x0, &x1);
  float acc = 0.0f;
  for (int32_t oy = y0; oy < y1; oy++) {
    const float *gr = g + oy * gd.w;
    const int8_t *xr = x + (oy * stride - pad + i) * xd.w;
    for (int32_t ox = x0; ox < x1; ox++) acc = mt_fma(gr[ox], (float)((int32_t)xr[ox * stride - pad + j] - x_zero), acc);
  }
  return acc;
}

/* Output channel o: its gradient plane g (float32), every gradient element visited once: emit(index, value) into a
 * buffer (gw, gb) or straight into the update (w, b). */
static void row(const float *g, int32_t o, mt_dims gd, const int8_t *x_saved, int32_t xc0, mt_dims xd,
                int32_t x_zero, int32_t k, int32_t stride, int32_t pad, int32_t depthwise, int32_t ch,
                const mt_step *s, const mt_param *w, const mt_param *b, float *gw, float *gb) {
  const int32_t hw = gd.h * gd.w, kk = k * k;
  if (b || gb) {
    const float v = mt_sum(g, hw);
    if (gb) gb[o] = v;
    else mt_update_one(s, b, o, v);
  }
  if (!(w || gw) || (depthwise && o >= ch)) return;
  const int32_t c0 = depthwise ? o : 0, c1 = depthwise ? o + 1 : ch;
  if (!depthwise && k == 1 && stride == 1 && pad == 0 && gd.h == xd.h && gd.w == xd.w) {
    /* pointwise: four channels' chains at a time share each g[p] load; each chain runs over p in order */
    int32_t c = c0;
    for (; c + 4 <= c1; c += 4) {
      const int8_t *x0 = x_saved + (c - xc0) * hw, *x1 = x0 + hw, *x2 = x1 + hw, *x3 = x2 + hw;
      float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
      int32_t q = 0;
#if MT_DSP
      /* eight pixels at a time: g through one VLDM, x four bytes a load; x - x.zero as a float without VCVT: the bits
       * 0x4B400000 + (x - z) are 12582912 + (x - z) exactly (SXTAB), less 12582912 gives x - z exactly. */
      const uint32_t mg = 0x4B400000u - (uint32_t)x_zero;
      for (; q + 8 <= hw; q += 8) {
        float gv[8];
        MT_LOAD8(g + q, gv);
        const uint32_t u[8] = {mt_ld32(x0 + q), mt_ld32(x0 + q + 4), mt_ld32(x1 + q), mt_ld32(x1 + q + 4),
                               mt_ld32(x2 + q), mt_ld32(x2 + q + 4), mt_ld32(x3 + q), mt_ld32(x3 + q + 4)};
        MT_UNROLL
        for (int32_t t = 0; t < 8; t++) {
          const int32_t r = t & 3, h = t >> 2;
          a0 = mt_fma(gv[t], mt_magic_f(mt_sxtab(mg, u[h], r)), a0);
          a1 = mt_fma(gv[t], mt_magic_f(mt_sxtab(mg, u[2 + h], r)), a1);
          a2 = mt_fma(gv[t], mt_magic_f(mt_sxtab(mg, u[4 + h], r)), a2);
          a3 = mt_fma(gv[t], mt_magic_f(mt_sxtab(mg, u[6 + h], r)), a3);
        }
      }
#endif
      for (; q < hw; q++) {
        const float gv = g[q];
        a0 = mt_fma(gv, (float)((int32_t)x0[q] - x_zero), a0);
        a1 = mt_fma(gv, (float)((int32_t)x1[q] - x_zero), a1);
        a2 = mt_fma(gv, (float)((int32_t)x2[q] - x_zero), a2);
        a3 = mt_fma(gv, (float)((int32_t)x3[q] - x_zero), a3);
      }
      const float v[4] = {a0, a1, a2, a3};
      if (gw) {
        for (int32_t u = 0; u < 4; u++) gw[o * ch + c + u] = v[u];
      } else {
        mt_update_run(s, w, o * ch + c, v, 4);
      }
    }
    for (; c < c1; c++) {
      const int8_t *xc = x_saved + (c - xc0) * hw;
      float a = 0.0f;
      for (int32_t q = 0; q < hw; q++) a = mt_fma(g[q], (float)((int32_t)xc[q] - x_zero), a);
      if (gw) gw[o * ch + c] = a;
      else mt_update_one(s, w, o * ch + c, a);
    }
    return;
  }
  for (int32_t c = c0; c < c1; c++) {
    for (int32_t t = 0; t < kk; t++) {
      const float v = weight_grad(g, gd, x_saved + (c - xc0) * xd.h * xd.w, xd, x_zero, t / k, t % k, stride, pad);
      const int32_t idx = depthwise ? o * kk + t : (o * ch + c) * kk + t;
      if (gw) gw[idx] = v;
      else mt_update_one(s, w, idx, v);
    }
  }
}

/* Pointwise weight gradients of four output channels o0..o0+3 (planes g0..g3) against input channels [0, ch), four
 * input channels at a time: 16 chains in registers, each over the pixels in order from 0 (the same chains as row's),
 * so each x byte is converted once for four output channels and each g value loaded once for four input channels. */
static void pw_rows4(const float *g0, int32_t o0, int32_t hw, const int8_t *x_saved, int32_t x_zero, int32_t ch,
                     const mt_step *s, const mt_param *w, float *gw) {
  const float *g1 = g0 + hw, *g2 = g1 + hw, *g3 = g2 + hw;
  int32_t c = 0;
  for (; c + 4 <= ch; c += 4) {
    const int8_t *x0 = x_saved + c * hw, *x1 = x0 + hw, *x2 = x1 + hw, *x3 = x2 + hw;
    float a[4][4] = {{0.0f}};
    int32_t q = 0;
#if MT_DSP
    const uint32_t mg = 0x4B400000u - (uint32_t)x_zero;
    for (; q + 4 <= hw; q += 4) {
      const uint32_t u0 = mt_ld32(x0 + q), u1 = mt_ld32(x1 + q), u2 = mt_ld32(x2 + q), u3 = mt_ld32(x3 + q);
      MT_UNROLL
      for (int32_t t = 0; t < 4; t++) {
        const float v0 = mt_magic_f(mt_sxtab(mg, u0, t)), v1 = mt_magic_f(mt_sxtab(mg, u1, t));
        const float v2 = mt_magic_f(mt_sxtab(mg, u2, t)), v3 = mt_magic_f(mt_sxtab(mg, u3, t));
        const float h[4] = {g0[q + t], g1[q + t], g2[q + t], g3[q + t]};
        MT_UNROLL
        for (int32_t u = 0; u < 4; u++) {
          a[u][0] = mt_fma(h[u], v0, a[u][0]), a[u][1] = mt_fma(h[u], v1, a[u][1]);
          a[u][2] = mt_fma(h[u], v2, a[u][2]), a[u][3] = mt_fma(h[u], v3, a[u][3]);
        }
      }
    }
#endif
    for (; q < hw; q++) {
      const float v[4] = {(float)((int32_t)x0[q] - x_zero), (float)((int32_t)x1[q] - x_zero),
                          (float)((int32_t)x2[q] - x_zero), (float)((int32_t)x3[q] - x_zero)};
      const float h[4] = {g0[q], g1[q], g2[q], g3[q]};
      MT_UNROLL
      for (int32_t u = 0; u < 4; u++)
        for (int32_t i = 0; i < 4; i++) a[u][i] = mt_fma(h[u], v[i], a[u][i]);
    }
    for (int32_t u = 0; u < 4; u++) {
      const float v[4] = {a[u][0], a[u][1], a[u][2], a[u][3]};  /* a copy: `a` stays in registers */
      if (gw) {
        for (int32_t i = 0; i < 4; i++) gw[(o0 + u) * ch + c + i] = v[i];
      } else {
        mt_update_run(s, w, (o0 + u) * ch + c, v, 4);
      }
    }
  }
  for (; c < ch; c++) {
    const int8_t *xc = x_saved + c * hw;
    for (int32_t u = 0; u < 4; u++) {
      const float *g = g0 + u * hw;
      float acc = 0.0f;
      for (int32_t q = 0; q < hw; q++) acc = mt_fma(g[q], (float)((int32_t)xc[q] - x_zero), acc);
      if (gw) gw[(o0 + u) * ch + c] = acc;
      else mt_update_one(s, w, (o0 + u) * ch + c, acc);
    }
  }
}

/* Output channels o0 .. o0 + n - 1 (the channel-serial block backward's batch of pw1 gradient planes, hw = gd.h *
 * gd.w apart from g): the same gradients and updates as n calls of mt_conv2d_grads_row, a pointwise conv's four
 * channels at a time through pw_rows4. */
void mt_conv2d_grads_rows(const mt_step *s, const float *g, int32_t o0, int32_t n, mt_dims gd, const int8_t *x_saved,
                          mt_dims xd, int32_t x_zero, int32_t k, int32_t stride, int32_t pad, int32_t depthwise,
                          int32_t ch, const mt_param *w, const mt_param *b, float *gw, float *gb) {
  const int32_t hw = gd.h * gd.w;
  const int pw = !depthwise && k == 1 && stride == 1 && pad == 0 && gd.h == xd.h && gd.w == xd.w && (w || gw);
  if (!pw || n != 4) {
    for (int32_t u = 0; u < n; u++)
      row(g + u * hw, o0 + u, gd, x_saved, 0, xd, x_zero, k, stride, pad, depthwise, ch, s, w, b, gw, gb);
    return;
  }
  for (int32_t u = 0; u < n; u++) {
    if (b || gb) {
      const float v = mt_sum(g + u * hw, hw);
      if (gb) gb[o0 + u] = v;
      else mt_update_one(s, b, o0 + u, v);
    }
  }
  pw_rows4(g, o0, hw, x_saved, x_zero, ch, s, w, gw);
}

/* Every output channel; gacc is float32, or with plane != NULL qint8 (scales, then values) dequantized per channel. */
static void grads(const float *gacc, mt_dims gd, const int8_t *x_saved, mt_dims xd, int32_t x_zero, int32_t k,
                  int32_t stride, int32_t pad, int32_t depthwise, int32_t ch, const mt_step *s, const mt_param *w,
                  const mt_param *b, float *gw, float *gb, float *plane) {
  const int32_t hw = gd.h * gd.w;
  const int8_t *gq = (const int8_t *)(gacc + gd.c);
  for (int32_t o = 0; o < gd.c; o++) {
    const float *g = gacc + o * hw;
    if (plane) {
      for (int32_t i = 0; i < hw; i++) plane[i] = (float)gq[o * hw + i] * gacc[o];
      g = plane;
    }
    row(g, o, gd, x_saved, 0, xd, x_zero, k, stride, pad, depthwise, ch, s, w, b, gw, gb);
  }
}

/* One output channel o (the channel-serial block backward): its float32 gradient plane g; the update (s, w, b) or
 * the gradient buffers (gw, gb) of the whole parameters. x_saved holds input channels xc0 onwards (a depthwise conv's
 * recomputed input channel o alone: xc0 = o). */
void mt_conv2d_grads_row(const mt_step *s, const float *g, int32_t o, mt_dims gd, const int8_t *x_saved, int32_t xc0,
                         mt_dims xd, int32_t x_zero, int32_t k, int32_t stride, int32_t pad, int32_t depthwise,
                         int32_t ch, const mt_param *w, const mt_param *b, float *gw, float *gb) {
  row(g, o, gd, x_saved, xc0, xd, x_zero, k, stride, pad, depthwise, ch, s, w, b, gw, gb);
}

void mt_conv2d_update(const mt_step *s, const float *gacc, mt_dims gd, const int8_t *x_saved, mt_dims xd,
                      int32_t x_zero, int32_t k, int32_t stride, int32_t pad, int32_t depthwise,
                      const mt_param *w, const mt_param *b) {
  const int32_t ch = w ? (depthwise ? w->n / (k * k) : w->n / (gd.c * k * k)) : 0;
  grads(gacc, gd, x_saved, xd, x_zero, k, stride, pad, depthwise, ch, s, w, b, 0, 0, 0);
}

void mt_conv2d_weight_grad(const float *gacc, mt_dims gd, const int8_t *x_saved, mt_dims xd, int32_t x_zero,
                           int32_t k, int32_t stride, int32_t pad, int32_t depthwise, int32_t ch, float *gw,
                           float *gb) {
  grads(gacc, gd, x_saved, xd, x_zero, k, stride, pad, depthwise, ch, 0, 0, 0, gw, gb, 0);
}

void mt_conv2d_update_q8(const mt_step *s, const float *gacc, mt_dims gd, const int8_t *x_saved, mt_dims xd,
                         int32_t x_zero, int32_t k, int32_t stride, int32_t pad, int32_t depthwise,
                         const mt_param *w, const mt_param *b, float *plane) {
  const int32_t ch = w ? (depthwise ? w->n / (k * k) : w->n / (gd.c * k * k)) : 0;
  grads(gacc, gd, x_saved, xd, x_zero, k, stride, pad, depthwise, ch, s, w, b, 0, 0, plane);
}

void mt_conv2d_weight_grad_q8(const float *gacc, mt_dims gd, const int8_t *x_saved, mt_dims xd, int32_t x_zero,
                              int32_t k, int32_t stride, int32_t pad, int32_t depthwise, int32_t ch, float *gw,
                              float *gb, float *plane) {
  grads(gacc, gd, x_saved, xd, x_zero, k, stride, pad, depthwise, ch, 0, 0, 0, gw, gb, plane);
}
