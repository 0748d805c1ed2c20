/* conv2d (groups = 1) backward w.r.t. its input: gx[c, y, x] = sum_{o, i, j} gacc[o, oy, ox] * w[o, c, i, j] over
 * the taps with y = oy * s - p + i, x = ox * s - p + j, w the full weight (trainable slice + frozen rest) as read
 * before this step's update. Each sum is one chain of fused multiply-adds from 0 over the taps (i, j) in row-major
 * order and, for each tap, o = 0..O-1 (ir/ops.py conv2d_grad_input); a pointwise conv's chain is over o alone. */
#include "mt_runtime.h"

static inline float weight(const mt_weights *w, int32_t cin, int32_t o, int32_t c, int32_t t) {
  const int32_t kk = w->k * w->k;
  return c < w->ch ? (float)w->w_train[(o * w->ch + c) * kk + t] : (float)w->w_frozen[(o * (cin - w->ch) + c - w->ch) * kk + t];
}

/* Element i of gacc channel o: float32 (gq == NULL), or qint8 (float)gq[i] * gacc[o] (gacc: the scales). */
MT_INLINE float grad(const float *gacc, const int8_t *gq, int32_t o, int32_t i) {
  return gq ? (float)gq[i] * gacc[o] : gacc[i];
}

#define PW_BLOCK 16

/* The Cortex-M4 build: the next MT_LOAD8 from p (into s24-s31) only after the eight chains a[0..7] took the last
 * load's values (else the compiler hoists it and copies those values away first). No code. */
#if MT_DSP
#define AFTER8(a, p)                                                                                           \
  __asm__ volatile("" : "+t"((a)[0]), "+t"((a)[1]), "+t"((a)[2]), "+t"((a)[3]), "+t"((a)[4]), "+t"((a)[5]),     \
                   "+t"((a)[6]), "+t"((a)[7]), "+r"(p))
#define AFTER8_REGS(v0, v1, v2, v3, v4, v5, v6, v7, p)                                                           \
  __asm__ volatile("" : "+t"(v0), "+t"(v1), "+t"(v2), "+t"(v3), "+t"(v4), "+t"(v5), "+t"(v6), "+t"(v7), "+r"(p))
#else
#define AFTER8(a, p) ((void)0)
#endif

/* Pointwise, float32 gacc: pixels [p0, p0 + 16) of input channel c, out[p] = chain_o fma(gacc[o, p], w[o, c]):
 * sixteen chains held in registers, gacc loaded eight at a time (VLDM), the weight converted once per o. */
static void pw_block16(const float *g, int32_t hw, const int8_t *w, int32_t wstride, int32_t n, float *acc) {
  float a[16];
  MT_UNROLL
  for (int32_t q = 0; q < 16; q++) a[q] = acc[q];
  for (int32_t o = 0; o < n; o++, g += hw, w += wstride) {
    const float wv = (float)*w;
    const float *g8 = g + 8;
    float v[8];
    MT_LOAD8(g, v);
    MT_UNROLL
    for (int32_t q = 0; q < 8; q++) a[q] = mt_fma(v[q], wv, a[q]);
    AFTER8(a, g8);
    MT_LOAD8(g8, v);
    MT_UNROLL
    for (int32_t q = 0; q < 8; q++) a[8 + q] = mt_fma(v[q], wv, a[8 + q]);
  }
  MT_UNROLL
  for (int32_t q = 0; q < 16; q++) acc[q] = a[q];
}

/* Pointwise: input channel c of gx, gx[c, p] = sum_o gacc[o, p] * w[o, c], into out (hw floats). */
static void pw_channel(const float *gacc, const int8_t *gq, mt_dims gd, const mt_weights *w, int32_t cin, int32_t c,
                       int32_t hw, float *out) {
  int32_t p0 = 0;
  if (!gq) {  /* the trainable rows' weights, then the frozen ones: o ascending either way */
    const int32_t ch = w->ch, o_split = c < ch ? gd.c : 0;
    for (; p0 + 16 <= hw; p0 += 16) {
      float acc[16];
      for (int32_t q = 0; q < 16; q++) acc[q] = 0.0f;
      if (o_split) pw_block16(gacc + p0, hw, w->w_train + c, ch, gd.c, acc);
      else pw_block16(gacc + p0, hw, w->w_frozen + (c - ch), cin - ch, gd.c, acc);
      for (int32_t q = 0; q < 16; q++) out[p0 + q] = acc[q];
    }
  }
  for (; p0 < hw; p0 += PW_BLOCK) {
    const int32_t n = hw - p0 < PW_BLOCK ? hw - p0 : PW_BLOCK;
    float acc[PW_BLOCK];
    for (int32_t q = 0; q < PW_BLOCK; q++) acc[q] = 0.0f;
    for (int32_t o = 0; o < gd.c; o++) {
      const float wv = weight(w, cin, o, c, 0);
      const float *gp = gacc + o * hw + p0;
      float gv[PW_BLOCK];
      if (gq) {  /* qint8: the block of channel o dequantized first (a loop of its own: it vectorizes too) */
        const int8_t *qp = gq + o * hw + p0;
        if (n == PW_BLOCK) {
          for (int32_t q = 0; q < PW_BLOCK; q++) gv[q] = (float)qp[q] * gacc[o];
        } else {
          for (int32_t q = 0; q < n; q++) gv[q] = (float)qp[q] * gacc[o];
        }
        gp = gv;
      }
      if (n == PW_BLOCK) {  /* a fixed trip count: vectorized (each element stays its own chain) */
        for (int32_t q = 0; q < PW_BLOCK; q++) acc[q] = mt_fma(gp[q], wv, acc[q]);
      } else {
        for (int32_t q = 0; q < n; q++) acc[q] = mt_fma(gp[q], wv, acc[q]);
      }
    }
    for (int32_t q = 0; q < n; q++) out[p0 + q] = acc[q];
  }
}

/* The kernel for both storages: with plane == NULL gx is float32; else gx is qint8 and each channel is computed into
 * plane, then quantized. */
MT_INLINE void grad_input(const float *gacc, const int8_t *gq, mt_dims gd, const mt_weights *w, int32_t stride,
                          int32_t pad, float *gx, mt_dims xd, float *plane) {
  const int32_t k = w->k, cin = xd.c, hw = xd.h * xd.w;
  int8_t *xq = plane ? (int8_t *)(gx + cin) : 0;
  if (k == 1 && stride == 1 && pad == 0) {  /* pointwise */
    for (int32_t c = 0; c < cin; c++) {
      pw_channel(gacc, gq, gd, w, cin, c, hw, plane ? plane : gx + c * hw);
      if (plane) gx[c] = mt_q8_quantize(plane, hw, xq + c * hw);
    }
    return;
  }
  for (int32_t c = 0; c < cin; c++) {
    float *out = plane ? plane : gx + c * xd.cs;
    for (int32_t y = 0; y < xd.h; y++) {
      for (int32_t x = 0; x < xd.w; x++) {
        float acc = 0.0f;
        for (int32_t i = 0; i < k; i++) {
          const int32_t ty = y + pad - i;
          if (ty < 0 || ty % stride || ty / stride >= gd.h) continue;
          for (int32_t j = 0; j < k; j++) {
            const int32_t tx = x + pad - j;
            if (tx < 0 || tx % stride || tx / stride >= gd.w) continue;
            for (int32_t o = 0; o < gd.c; o++)
              acc = mt_fma(grad(gacc, gq, o, o * gd.cs + (ty / stride) * gd.w + tx / stride),
                           weight(w, cin, o, c, i * k + j), acc);
          }
        }
        out[y * xd.w + x] = acc;
      }
    }
    if (plane) gx[c] = mt_q8_quantize(plane, hw, xq + c * hw);
  }
}

void mt_conv2d_grad_input(const float *gacc, mt_dims gd, const mt_weights *w, int32_t stride, int32_t pad,
                          float *gx, mt_dims xd) {
  grad_input(gacc, 0, gd, w, stride, pad, gx, xd, 0);
}

/* qint8 gacc and gx; plane: one float32 channel of gx (xd.h * xd.w). */
void mt_conv2d_grad_input_q8(const float *gacc, mt_dims gd, const mt_weights *w, int32_t stride, int32_t pad,
                             float *gx, mt_dims xd, float *plane) {
  grad_input(gacc, (const int8_t *)(gacc + gd.c), gd, w, stride, pad, gx, xd, plane);
}

/* ---- the channel-serial block backward (compiler/blockgrad.py) ---------------------------------------------------- */

/* Input channel c of a pointwise conv's input gradient into out (hw floats); gacc float32, or qint8 when q8. */
void mt_pw_grad_input_channel(const float *gacc, mt_dims gd, const mt_weights *w, int32_t cin, int32_t c, int32_t hw,
                              int32_t q8, float *out) {
  pw_channel(gacc, q8 ? (const int8_t *)(gacc + gd.c) : 0, gd, w, cin, c, hw, out);
}

/* Output channels e0 .. e0 + n - 1 of a pointwise conv's gradient (n planes g, hw floats each) join the input
 * gradient's sums, total[c, p] = fma(g[e - e0][p], w[e, c], total[c, p]) for e in order: the chains pw_channel runs,
 * so the channel-serial backward computes the op-by-op kernel's bits. One pass over the accumulator takes all n
 * channels (the same fused multiply-adds in the same order, less memory traffic). total starts zeroed. */
/* One input channel's sums a[0..hw) += the n planes g (hw apart) times wv[0..n), each sum's chain in channel order.
 * Inlined with n = MT_BLOCK_BATCH, the usual batch: the weights stay in registers and the per-channel tests go. */
MT_INLINE void accumulate_channel(const float *g, int32_t n, const float *wv, int32_t hw, float *a) {
  int32_t p0 = 0;
  for (; p0 + 8 <= hw; p0 += 8) {  /* eight sums held in registers across the n channels, loaded eight at once */
    float v[8], t[8];
#if MT_DSP
    /* the sums in s16-s23: one VLDM in, one VSTM out, no copies out of the g loads' s24-s31 */
    register float v0 __asm__("s16"), v1 __asm__("s17"), v2 __asm__("s18"), v3 __asm__("s19");
    register float v4 __asm__("s20"), v5 __asm__("s21"), v6 __asm__("s22"), v7 __asm__("s23");
    float *ap = a + p0;
    __asm__ volatile("vldmia %8, {s16-s23}" : "=t"(v0), "=t"(v1), "=t"(v2), "=t"(v3), "=t"(v4), "=t"(v5),
                     "=t"(v6), "=t"(v7) : "r"(ap), "m"(*(const float(*)[8])ap));
    for (int32_t i = 0; i < n; i++) {
      const float wi = wv[i];
      const float *gp = g + i * hw + p0;
      AFTER8_REGS(v0, v1, v2, v3, v4, v5, v6, v7, gp);
      MT_LOAD8(gp, t);
      v0 = mt_fma(t[0], wi, v0), v1 = mt_fma(t[1], wi, v1), v2 = mt_fma(t[2], wi, v2), v3 = mt_fma(t[3], wi, v3);
      v4 = mt_fma(t[4], wi, v4), v5 = mt_fma(t[5], wi, v5), v6 = mt_fma(t[6], wi, v6), v7 = mt_fma(t[7], wi, v7);
    }
    __asm__ volatile("vstmia %9, {s16-s23}" : "=m"(*(float(*)[8])ap) : "t"(v0), "t"(v1), "t"(v2), "t"(v3),
                     "t"(v4), "t"(v5), "t"(v6), "t"(v7), "r"(ap));
    (void)v;
#else
    MT_LOAD8(a + p0, v);
    for (int32_t i = 0; i < n; i++) {
      const float wi = wv[i];
      MT_LOAD8(g + i * hw + p0, t);
      MT_UNROLL
      for (int32_t q = 0; q < 8; q++) v[q] = mt_fma(t[q], wi, v[q]);
    }
    MT_UNROLL
    for (int32_t q = 0; q < 8; q++) a[p0 + q] = v[q];
#endif
  }
  for (; p0 < hw; p0++) {
    float v = a[p0];
    for (int32_t i = 0; i < n; i++) v = mt_fma(g[i * hw + p0], wv[i], v);
    a[p0] = v;
  }
}

void mt_pw_grad_input_accumulate(const float *g, int32_t n, const mt_weights *w, int32_t cin, int32_t e0, int32_t hw,
                                 float *total) {
  for (int32_t c = 0; c < cin; c++) {
    float wv[MT_BLOCK_BATCH];
    for (int32_t i = 0; i < n; i++) wv[i] = weight(w, cin, e0 + i, c, 0);
    if (n == MT_BLOCK_BATCH) accumulate_channel(g, MT_BLOCK_BATCH, wv, hw, total + c * hw);
    else accumulate_channel(g, n, wv, hw, total + c * hw);
  }
}
