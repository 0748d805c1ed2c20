/* conv2d (groups = 1): acc = sum (x - x.zero) * w in int32, y = clamp8(rint(float(acc + b) * m) + y.zero).
 * Padding is real zero (an input outside the view contributes nothing). The trainable slice holds the first `ch`
 * input channels and the frozen part the rest, so each accumulator sums two channel ranges. */
#include "mt_runtime.h"

/* Pointwise stride-1 conv over views, four pixels at a time: the block's inputs are staged once as (x - x.zero) in
 * int16 pairs (channels c, c + 2 and c + 1, c + 3 of each group of four, four pixels each: the layout SMLAD wants
 * against sign-extended weight pairs), then every output channel's four accumulators run over the staged block.
 * Up to PW_CB channels are staged at once; a wider input is staged in chunks for blocks of PW_OB output channels
 * (accumulators in `acc`). A staged part of n channels takes 8 * (n / 4) + 4 * (n % 4) words. Integer sums: exact
 * in any order. */
#define PW_CB 128  /* channels staged at once: 4 pixels x PW_CB x int16 = 1 KB of stack */
#define PW_OB 32

/* Stage channels [0, n) of x (channel stride cs; pixels x[0..np)) into st: per group of four channels eight words
 * (pairs (c, c + 2) for pixels 0..3, then (c + 1, c + 3)), then the n % 4 remaining channels as int32 [4] each.
 * Pixels np..3 (np < 4) are staged as zero. */
static void pw_stage(const int8_t *x, int32_t cs, int32_t n, int32_t np, int32_t z, uint32_t *st) {
  const uint32_t zz = (uint32_t)(uint16_t)(int16_t)z * 0x10001u;
  int32_t c = 0;
  if (np == 4) {
    for (; c + 4 <= n; c += 4, x += 4 * cs, st += 8) {
      const uint32_t u = mt_ld32(x), v = mt_ld32(x + 2 * cs), u1 = mt_ld32(x + cs), v1 = mt_ld32(x + 3 * cs);
      uint32_t su = mt_ssub16(mt_sxtb16(u), zz), sv = mt_ssub16(mt_sxtb16(v), zz);
      st[0] = mt_pkhbt(su, sv), st[2] = mt_pkhtb(su, sv);
      su = mt_ssub16(mt_sxtb16_r8(u), zz), sv = mt_ssub16(mt_sxtb16_r8(v), zz);
      st[1] = mt_pkhbt(su, sv), st[3] = mt_pkhtb(su, sv);
      su = mt_ssub16(mt_sxtb16(u1), zz), sv = mt_ssub16(mt_sxtb16(v1), zz);
      st[4] = mt_pkhbt(su, sv), st[6] = mt_pkhtb(su, sv);
      su = mt_ssub16(mt_sxtb16_r8(u1), zz), sv = mt_ssub16(mt_sxtb16_r8(v1), zz);
      st[5] = mt_pkhbt(su, sv), st[7] = mt_pkhtb(su, sv);
    }
  } else {
    for (; c + 4 <= n; c += 4, x += 4 * cs, st += 8)
      for (int32_t q = 0; q < 4; q++) {
        const int32_t v0 = q < np ? x[q] - z : 0, v1 = q < np ? x[cs + q] - z : 0;
        const int32_t v2 = q < np ? x[2 * cs + q] - z : 0, v3 = q < np ? x[3 * cs + q] - z : 0;
        st[q] = (uint32_t)(uint16_t)v0 | (uint32_t)v2 << 16;
        st[4 + q] = (uint32_t)(uint16_t)v1 | (uint32_t)v3 << 16;
      }
  }
  for (; c < n; c++, x += cs, st += 4)
    for (int32_t q = 0; q < 4; q++) st[q] = (uint32_t)(q < np ? x[q] - z : 0);
}

/* a[0..3] += the staged block (n channels) times the weights w[0..n). On the Cortex-M4 the loop over groups of four
 * channels is written out (ACLE has no LDM): per group one weight word, two SXTB16, two LDM of four staged words,
 * eight SMLAD. */
MT_INLINE void pw_dot(const uint32_t *st, const int8_t *w, int32_t n, int32_t *a) {
  int32_t a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3], c = n & ~3;
#if MT_DSP
  if (c) {
    const int8_t *wend = w + c;
    uint32_t t0, t1;
    __asm__ volatile(
        "1:\n\t"
        "ldr %[t0], [%[w]], #4\n\t"
        "ldmia %[st]!, {r8, r9, r10, r11}\n\t"
        "sxtb16 %[t1], %[t0]\n\t"
        "sxtb16 %[t0], %[t0], ror #8\n\t"
        "smlad %[a0], r8, %[t1], %[a0]\n\t"
        "smlad %[a1], r9, %[t1], %[a1]\n\t"
        "smlad %[a2], r10, %[t1], %[a2]\n\t"
        "smlad %[a3], r11, %[t1], %[a3]\n\t"
        "ldmia %[st]!, {r8, r9, r10, r11}\n\t"
        "cmp %[w], %[wend]\n\t"
        "smlad %[a0], r8, %[t0], %[a0]\n\t"
        "smlad %[a1], r9, %[t0], %[a1]\n\t"
        "smlad %[a2], r10, %[t0], %[a2]\n\t"
        "smlad %[a3], r11, %[t0], %[a3]\n\t"
        "bne 1b"
        : [a0] "+r"(a0), [a1] "+r"(a1), [a2] "+r"(a2), [a3] "+r"(a3), [w] "+r"(w), [st] "+r"(st),
          [t0] "=&r"(t0), [t1] "=&r"(t1)
        : [wend] "r"(wend), "m"(*(const uint32_t(*)[2 * c])st)
        : "r8", "r9", "r10", "r11", "cc");
    w -= c;
  }
#else
  for (int32_t g = 0; g < c; g += 4, st += 8) {
    const uint32_t w4 = mt_ld32(w + g), wa = mt_sxtb16(w4), wb = mt_sxtb16_r8(w4);
    a0 = mt_smlad(st[0], wa, a0), a1 = mt_smlad(st[1], wa, a1);
    a2 = mt_smlad(st[2], wa, a2), a3 = mt_smlad(st[3], wa, a3);
    a0 = mt_smlad(st[4], wb, a0), a1 = mt_smlad(st[5], wb, a1);
    a2 = mt_smlad(st[6], wb, a2), a3 = mt_smlad(st[7], wb, a3);
  }
#endif
  for (; c < n; c++, st += 4) {
    const int32_t wv = w[c];
    a0 += (int32_t)st[0] * wv, a1 += (int32_t)st[1] * wv, a2 += (int32_t)st[2] * wv, a3 += (int32_t)st[3] * wv;
  }
  a[0] = a0, a[1] = a1, a[2] = a2, a[3] = a3;
}

/* Requantize a[0..np) (bias included) into y[0..np), their mask bits at i .. i + np - 1. */
MT_INLINE void pw_out(const int32_t *a, int32_t np, float m, int32_t y_zero, int8_t *y, uint8_t *mask,
                          int32_t i) {
  uint32_t bits = 0, in;
  if (!mask) {  /* no mask bits to compute */
    for (int32_t q = 0; q < np; q++) y[q] = (int8_t)mt_ssat(mt_qadd(mt_rint_i32((float)a[q] * m), y_zero), 8);
    return;
  }
  for (int32_t q = 0; q < np; q++) {
    y[q] = mt_requant(a[q], m, y_zero, &in);
    bits |= in << q;
  }
  if (mask) mt_mask_put(mask, i, bits, np);
}

/* One requantized output (bias included) and its mask bit (in range: 1) at bit b of *bits. */
MT_INLINE int8_t pw_req(int32_t a, float m, int32_t y_zero, uint32_t *bits, int32_t b) {
  uint32_t in;
  const int8_t v = mt_requant(a, m, y_zero, &in);
  *bits |= in << b;
  return v;
}

MT_INLINE int8_t pw_req_nomask(int32_t a, float m, int32_t y_zero) {
  return (int8_t)mt_ssat(mt_qadd(mt_rint_i32((float)a * m), y_zero), 8);
}

/* Every output channel over one block of eight pixels (two staged blocks of four, sta and stb), the accumulators in
 * registers: a channel's per-block cost (the bias, the weight rows, the multiplier, the mask byte) is paid once per
 * eight pixels. Each staged block holds the trainable part's `ch` channels, then the frozen part's at offset `off`.
 * `has_train` and `has_mask` are constants at each call (the loop is specialised, no per-channel tests), and every
 * address is computed from o (a multiply-add each) rather than carried as pointers: the narrow layers' blocks are
 * short, and a pointer per operand spilled to the stack cost more than their MACs. */
MT_INLINE void pw_block8_full(const uint32_t *sta, const uint32_t *stb, int32_t off, const mt_conv *p, int32_t ch,
                              int32_t cf, int32_t oc, int8_t *y, int32_t ycs, uint8_t *mask, int32_t mi, int32_t hw,
                              const int has_train, const int has_mask) {
  const int8_t *wt = p->w.w_train, *wf = p->w.w_frozen;
  const int32_t *bias = p->bias, y_zero = p->y_zero;
  const float *mult = p->mult;
  for (int32_t o = 0; o < oc; o++) {
    const int32_t bo = bias[o];
    int32_t a[4] = {bo, bo, bo, bo}, b[4] = {bo, bo, bo, bo};  /* constant indices only: kept in registers */
    if (has_train) pw_dot(sta, wt + o * ch, ch, a);
    if (cf) pw_dot(sta + off, wf + o * cf, cf, a);
    const float m = mult[o];
    int8_t *yo = y + o * ycs;
    uint32_t bits = 0;
    if (!has_mask) {
      yo[0] = pw_req_nomask(a[0], m, y_zero), yo[1] = pw_req_nomask(a[1], m, y_zero);
      yo[2] = pw_req_nomask(a[2], m, y_zero), yo[3] = pw_req_nomask(a[3], m, y_zero);
    } else {
      yo[0] = pw_req(a[0], m, y_zero, &bits, 0), yo[1] = pw_req(a[1], m, y_zero, &bits, 1);
      yo[2] = pw_req(a[2], m, y_zero, &bits, 2), yo[3] = pw_req(a[3], m, y_zero, &bits, 3);
    }
    if (has_train) pw_dot(stb, wt + o * ch, ch, b);
    if (cf) pw_dot(stb + off, wf + o * cf, cf, b);
    if (!has_mask) {
      yo[4] = pw_req_nomask(b[0], m, y_zero), yo[5] = pw_req_nomask(b[1], m, y_zero);
      yo[6] = pw_req_nomask(b[2], m, y_zero), yo[7] = pw_req_nomask(b[3], m, y_zero);
      continue;
    }
    yo[4] = pw_req(b[0], m, y_zero, &bits, 4), yo[5] = pw_req(b[1], m, y_zero, &bits, 5);
    yo[6] = pw_req(b[2], m, y_zero, &bits, 6), yo[7] = pw_req(b[3], m, y_zero, &bits, 7);
    const int32_t mo = mi + o * hw;
    if ((mo & 7) == 0) mask[mo >> 3] = (uint8_t)bits;
    else mt_mask_put(mask, mo, bits, 8);
  }
}

/* The run's last, partial block (na + nb < 8 pixels): the same sums, requantized pixel by pixel. */
static void pw_block_partial(const uint32_t *sta, const uint32_t *stb, int32_t off, int32_t na, int32_t nb,
                             const mt_conv *p, int32_t ch, int32_t cf, int32_t oc, int8_t *y, int32_t ycs,
                             uint8_t *mask, int32_t mi, int32_t hw) {
  for (int32_t o = 0; o < oc; o++) {
    const int32_t bo = p->bias[o];
    int32_t t[4] = {bo, bo, bo, bo};
    if (ch) pw_dot(sta, p->w.w_train + o * ch, ch, t);
    if (cf) pw_dot(sta + off, p->w.w_frozen + o * cf, cf, t);
    pw_out(t, na, p->mult[o], p->y_zero, y + o * ycs, mask, mi + o * hw);
    if (nb) {
      t[0] = t[1] = t[2] = t[3] = bo;
      if (ch) pw_dot(stb, p->w.w_train + o * ch, ch, t);
      if (cf) pw_dot(stb + off, p->w.w_frozen + o * cf, cf, t);
      pw_out(t, nb, p->mult[o], p->y_zero, y + o * ycs + 4, mask, mi + o * hw + 4);
    }
  }
}

static void pw_block8(const uint32_t *sta, const uint32_t *stb, int32_t off, int32_t na, int32_t nb, const mt_conv *p,
                      int32_t ch, int32_t cf, int32_t oc, int8_t *y, int32_t ycs, uint8_t *mask, int32_t mi,
                      int32_t hw) {
  if (na + nb < 8) pw_block_partial(sta, stb, off, na, nb, p, ch, cf, oc, y, ycs, mask, mi, hw);
  else if (ch && mask) pw_block8_full(sta, stb, off, p, ch, cf, oc, y, ycs, mask, mi, hw, 1, 1);
  else if (ch) pw_block8_full(sta, stb, off, p, ch, cf, oc, y, ycs, mask, mi, hw, 1, 0);
  else if (mask) pw_block8_full(sta, stb, off, p, ch, cf, oc, y, ycs, mask, mi, hw, 0, 1);
  else pw_block8_full(sta, stb, off, p, ch, cf, oc, y, ycs, mask, mi, hw, 0, 0);
}

static void pointwise(const int8_t *x, mt_dims xd, const mt_conv *p, int8_t *y, mt_dims yd, uint8_t *mask) {
  const int32_t cin = xd.c, ch = p->w.ch, cf = cin - ch, cs = xd.cs, z = p->x_zero;
  const int8_t *wt = p->w.w_train, *wf = p->w.w_frozen;
  const int compact = xd.cs == xd.h * xd.w && xd.rs == xd.w && yd.cs == yd.h * yd.w && yd.rs == yd.w;
  const int32_t runs = compact ? 1 : yd.h, len = compact ? yd.h * yd.w : yd.w, hw = yd.h * yd.w;
  int32_t acc[PW_OB * 4];
  if (cin <= PW_CB) {  /* both weight parts staged at once, eight pixels (two blocks) a pass */
    const int32_t off = 8 * (ch / 4) + 4 * (ch % 4), words = off + 8 * (cf / 4) + 4 * (cf % 4);
    uint32_t st[2 * (PW_CB * 2 + 16)];
    uint32_t *stb = st + words;
    for (int32_t r = 0; r < runs; r++) {
      const int8_t *xr = x + r * xd.rs;
      for (int32_t q0 = 0; q0 < len; q0 += 8) {
        const int32_t na = len - q0 < 4 ? len - q0 : 4, nb = len - q0 - 4 < 0 ? 0 : len - q0 - 4 < 4 ? len - q0 - 4 : 4;
        pw_stage(xr + q0, cs, ch, na, z, st);
        pw_stage(xr + ch * cs + q0, cs, cf, na, z, st + off);
        if (nb) {
          pw_stage(xr + q0 + 4, cs, ch, nb, z, stb);
          pw_stage(xr + ch * cs + q0 + 4, cs, cf, nb, z, stb + off);
        }
        pw_block8(st, stb, off, na, nb, p, ch, cf, yd.c, y + r * yd.rs + q0, yd.cs, mask, r * yd.w + q0, hw);
      }
    }
    return;
  }
  uint32_t st[PW_CB * 2 + 16];  /* two parts of up to three remaining channels take four words each */
  for (int32_t r = 0; r < runs; r++) {
    const int8_t *xr = x + r * xd.rs;
    for (int32_t q0 = 0; q0 < len; q0 += 4) {
      const int32_t np = len - q0 < 4 ? len - q0 : 4;
      int8_t *yq = y + r * yd.rs + q0;
      const int32_t mi = r * yd.w + q0;  /* mask index of the block's first pixel in channel 0 */
      for (int32_t ob = 0; ob < yd.c; ob += PW_OB) {  /* wide input: chunks of channels per block of outputs */
        const int32_t nb = yd.c - ob < PW_OB ? yd.c - ob : PW_OB;
        for (int32_t i = 0; i < 4 * nb; i++) acc[i] = p->bias[ob + i / 4];
        for (int32_t c0 = 0; c0 < cin;) {
          const int32_t end = c0 < ch ? ch : cin, n = end - c0 < PW_CB ? end - c0 : PW_CB;
          pw_stage(xr + c0 * cs + q0, cs, n, np, z, st);
          for (int32_t o = ob; o < ob + nb; o++)
            pw_dot(st, c0 < ch ? wt + o * ch + c0 : wf + o * cf + (c0 - ch), n, acc + 4 * (o - ob));
          c0 += n;
        }
        for (int32_t o = ob; o < ob + nb; o++)
          pw_out(acc + 4 * (o - ob), np, p->mult[o], p->y_zero, yq + o * yd.cs, mask, o * hw + mi);
      }
    }
  }
}

/* A small-kernel conv (the stem: few input channels), a row segment at a time: the cin x k input rows one output row
 * segment reads are staged as (x - x.zero) in int16 with the padding as zeros, so that every output column runs the
 * same loop: per staged row, pairs of taps (j, j + 1) through SMLAD against the weight pairs (w[j], w[j + 1]) (a
 * zero weight past the kernel's last column). Four output columns at a time. Integer sums: exact in any order. */
#define RS_STAGE 640  /* int16 staged elements (1.25 KB of stack) */
#define RS_WP 288     /* weight pairs: every output channel's when they fit (a stem), else one channel's */

MT_INLINE void rows_block(const int16_t *sr, int32_t wst, int32_t nrows, const uint32_t *wp, int32_t K, int32_t S,
                          int32_t *a) {
  const int32_t np = (K + 1) / 2;
  int32_t a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
  for (int32_t r = 0; r < nrows; r++, sr += wst, wp += np)
    for (int32_t j = 0; j < np; j++) {
      const uint32_t w2 = wp[j];
      uint32_t v0, v1, v2, v3;
      __builtin_memcpy(&v0, sr + 2 * j, 4), __builtin_memcpy(&v1, sr + S + 2 * j, 4);
      __builtin_memcpy(&v2, sr + 2 * S + 2 * j, 4), __builtin_memcpy(&v3, sr + 3 * S + 2 * j, 4);
      a0 = mt_smlad(v0, w2, a0), a1 = mt_smlad(v1, w2, a1), a2 = mt_smlad(v2, w2, a2), a3 = mt_smlad(v3, w2, a3);
    }
  a[0] = a0, a[1] = a1, a[2] = a2, a[3] = a3;
}

/* Output channel o's weight pairs (w[c][i][j], w[c][i][j + 1]) (0 past the last column) into wp[cin * k * kp]. */
static void rs_weights(const mt_conv *p, int32_t cin, int32_t o, uint32_t *wp) {
  const int32_t k = p->w.k, ch = p->w.ch, kp = (k + 1) / 2;
  for (int32_t c = 0; c < cin; c++) {
    const int8_t *w = c < ch ? p->w.w_train + (o * ch + c) * k * k : p->w.w_frozen + (o * (cin - ch) + c - ch) * k * k;
    for (int32_t i = 0; i < k; i++)
      for (int32_t j = 0; j < kp; j++) {
        const int32_t lo = w[i * k + 2 * j], hi = 2 * j + 1 < k ? w[i * k + 2 * j + 1] : 0;
        wp[(c * k + i) * kp + j] = (uint32_t)(uint16_t)lo | (uint32_t)hi << 16;
      }
  }
}

/* Returns 0 (nothing done) when the conv does not fit the staging buffers. */
/* rows_block for a 3x3 stride-2 kernel (the stem). On the Cortex-M4 one loop over the staged rows in assembly: per
 * row the two weight pairs through one LDM, the five staged words the four outputs read through an LDM and an LDRD
 * (each used by the one or two tap pairs that need it), eight SMLAD. GCC kept a pointer per row on the stack instead.
 * Integer sums: the same as rows_block's. */
MT_INLINE void rows_block_k3s2(const int16_t *sr, int32_t wst, int32_t nrows, const uint32_t *wp, int32_t *a) {
#if MT_DSP
  int32_t a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
  if (nrows > 0) {
    const uint32_t *wend = wp + 2 * nrows;
    const int32_t step = wst * (int32_t)sizeof(int16_t);
    __asm__ volatile(  /* LDM fills its list in register order: fixed registers, w r8-r9, staged words r10-r12 */
        "1:\n\t"
        "ldmia %[wp]!, {r8, r9}\n\t"
        "ldmia %[sr], {r10, r11, r12}\n\t"
        "smlad %[a0], r10, r8, %[a0]\n\t"
        "smlad %[a1], r11, r8, %[a1]\n\t"
        "smlad %[a2], r12, r8, %[a2]\n\t"
        "smlad %[a0], r11, r9, %[a0]\n\t"
        "smlad %[a1], r12, r9, %[a1]\n\t"
        "ldrd r10, r11, [%[sr], #12]\n\t"
        "smlad %[a3], r10, r8, %[a3]\n\t"
        "smlad %[a2], r10, r9, %[a2]\n\t"
        "smlad %[a3], r11, r9, %[a3]\n\t"
        "add %[sr], %[sr], %[step]\n\t"
        "cmp %[wp], %[wend]\n\t"
        "bne 1b"
        : [a0] "+r"(a0), [a1] "+r"(a1), [a2] "+r"(a2), [a3] "+r"(a3), [wp] "+r"(wp), [sr] "+r"(sr)
        : [wend] "r"(wend), [step] "r"(step), "m"(*(const int16_t(*)[RS_STAGE])sr),
          "m"(*(const uint32_t(*)[RS_WP])wp)
        : "r8", "r9", "r10", "r11", "r12", "cc");
  }
  a[0] = a0, a[1] = a1, a[2] = a2, a[3] = a3;
#else
  rows_block(sr, wst, nrows, wp, 3, 2, a);
#endif
}

static int rows_staged(const int8_t *x, mt_dims xd, const mt_conv *p, int8_t *y, mt_dims yd, uint8_t *mask) {
  const int32_t k = p->w.k, cin = xd.c, s = p->stride, z = p->x_zero, kp = (k + 1) / 2;
  const int32_t nrows = cin * k;
  if (nrows * kp > RS_WP) return 0;  /* not even one output channel's */
  int32_t seg = yd.w;  /* output columns per segment: the staged rows hold (seg - 1) * s + k + 1 columns, even */
  if (seg % 4) seg += 4 - seg % 4;  /* staged columns for whole blocks of four (the extra ones read, not stored) */
  while (seg > 4 && nrows * (((seg - 1) * s + k + 2) & ~1) > RS_STAGE) seg = (seg / 2 + 3) / 4 * 4;
  const int32_t wmax = ((seg - 1) * s + k + 2) & ~1;
  if (nrows * wmax > RS_STAGE) return 0;
  int16_t sbuf[RS_STAGE] __attribute__((aligned(8)));  /* LDM and LDRD (rows_block_k3s2) need word alignment */
  uint32_t wpall[RS_WP];  /* every output channel's weight pairs when they fit, else one channel's */
  const int all = yd.c * nrows * kp <= RS_WP;
  if (all)
    for (int32_t o = 0; o < yd.c; o++) rs_weights(p, cin, o, wpall + o * nrows * kp);
  for (int32_t oy = 0; oy < yd.h; oy++) {
    const int32_t y0 = oy * s - p->pad_top;
    for (int32_t q0 = 0; q0 < yd.w; q0 += seg) {
      const int32_t n = yd.w - q0 < seg ? yd.w - q0 : seg, wst = (((n + 3) / 4 * 4 - 1) * s + k + 2) & ~1;
      const int32_t x0 = q0 * s - p->pad_left;  /* input column of staged column 0 */
      for (int32_t c = 0; c < cin; c++)
        for (int32_t i = 0; i < k; i++) {
          int16_t *d = sbuf + (c * k + i) * wst;
          const int32_t yy = y0 + i;
          if (yy < 0 || yy >= xd.h) {
            for (int32_t j = 0; j < wst; j++) d[j] = 0;
            continue;
          }
          mt_stage_row_i16(x + c * xd.cs + yy * xd.rs, xd.w, -x0, z, d, wst);
        }
      for (int32_t o = 0; o < yd.c; o++) {
        const uint32_t *wp = all ? wpall + o * nrows * kp : wpall;
        if (!all) rs_weights(p, cin, o, wpall);
        int8_t *yr = y + o * yd.cs + oy * yd.rs + q0;
        const int32_t mi = (o * yd.h + oy) * yd.w + q0;
        if (k == 3 && s == 2 && !mask) {  /* the stem: whole blocks without a mask, then the generic tail */
          const int32_t bo = p->bias[o], yz = p->y_zero, n4 = n & ~3;
          const float m = p->mult[o];
          for (int32_t q = 0; q < n4; q += 4) {
            int32_t a[4] = {bo, bo, bo, bo};
            rows_block_k3s2(sbuf + q * 2, wst, nrows, wp, a);
            yr[q] = pw_req_nomask(a[0], m, yz), yr[q + 1] = pw_req_nomask(a[1], m, yz);
            yr[q + 2] = pw_req_nomask(a[2], m, yz), yr[q + 3] = pw_req_nomask(a[3], m, yz);
          }
          if (n4 < n) {
            int32_t a[4] = {bo, bo, bo, bo};
            rows_block_k3s2(sbuf + n4 * 2, wst, nrows, wp, a);
            pw_out(a, n - n4, m, yz, yr + n4, mask, mi + n4);
          }
          continue;
        }
        for (int32_t q = 0; q < n; q += 4) {
          int32_t a[4];
          a[0] = a[1] = a[2] = a[3] = p->bias[o];
          const int16_t *sr = sbuf + q * s;
          if (k == 3 && s == 2) rows_block_k3s2(sr, wst, nrows, wp, a);
          else if (k == 3 && s == 1) rows_block(sr, wst, nrows, wp, 3, 1, a);
          else rows_block(sr, wst, nrows, wp, k, s, a);
          pw_out(a, n - q < 4 ? n - q : 4, p->mult[o], p->y_zero, yr + q, mask, mi + q);
        }
      }
    }
  }
  return 1;
}

void mt_conv2d(const int8_t *x, mt_dims xd, const mt_conv *p, int8_t *y, mt_dims yd, uint8_t *mask) {
  const int32_t k = p->w.k, ch = p->w.ch, cin = xd.c;
  if (k == 1 && p->stride == 1 && p->pad_top == 0 && p->pad_left == 0 && xd.h == yd.h && xd.w == yd.w) {
    pointwise(x, xd, p, y, yd, mask);
    return;
  }
  if (rows_staged(x, xd, p, y, yd, mask)) return;
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
