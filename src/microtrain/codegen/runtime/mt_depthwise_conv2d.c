/* Depthwise conv2d (groups = C_in = C_out): output channel c reads input channel c only.
 * In place (scratch != NULL, y and x start at the same address): each channel is computed into the one-channel
 * scratch buffer, then copied over. With per-channel sizes a (input, x's channel stride) and b (output), writing
 * channel c in ascending order is safe when b <= a (it ends before unread input channel c + 1 starts); when b > a
 * the channels go in descending order (compiler/planner.py, INPLACE_OPS). */
#include <string.h>

#include "mt_runtime.h"

/* Four interior output pixels (every tap inside the row): a[q] += sum_{i, j} x[i][q * S + j] * w[i][j] over rows
 * [0, rows), the x_zero term left to the caller. K and S are constants where it pays (unrolled, loads shared). */
MT_INLINE void interior4(const int8_t *xr, int32_t rs, const int32_t *w, int32_t rows, int32_t K, int32_t S,
                         int32_t *a) {
  int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  for (int32_t i = 0; i < rows; i++) {
    const int8_t *r = xr + i * rs;
    const int32_t *wr = w + i * K;
    for (int32_t j = 0; j < K; j++) {
      const int32_t wv = wr[j];
      a0 += r[j] * wv, a1 += r[S + j] * wv, a2 += r[2 * S + j] * wv, a3 += r[3 * S + j] * wv;
    }
  }
  a[0] = a0, a[1] = a1, a[2] = a2, a[3] = a3;
}

/* One output channel, a row at a time into an int32 row: columns whose taps all lie inside the input four at a time
 * with sum x * w - x.zero * sum w over the valid tap rows, the border columns tap by tap with (x - x.zero) * w.
 * Integer sums: exact in any order. */
static void channel(const int8_t *x, mt_dims xd, const mt_conv *p, int32_t c, int8_t *out, int32_t rs,
                    uint8_t *mask, int32_t mask_base, int32_t oh, int32_t ow) {
  const int32_t k = p->w.k, ch = p->w.ch, s = p->stride, z = p->x_zero, pl = p->pad_left;
  const int8_t *w = c < ch ? p->w.w_train + c * k * k : p->w.w_frozen + (c - ch) * k * k;
  const int8_t *xc = x + c * xd.cs;
  int32_t wk[MT_DW_KMAX * MT_DW_KMAX];
  const int fast = k <= MT_DW_KMAX;
  if (fast)
    for (int32_t t = 0; t < k * k; t++) wk[t] = w[t];
  /* interior columns: ox * s - pl >= 0 and ox * s - pl + k <= xd.w */
  int32_t lo = pl <= 0 ? 0 : (pl + s - 1) / s, hi = xd.w - k + pl < 0 ? 0 : (xd.w - k + pl) / s + 1;
  if (!fast) lo = hi = 0;
  if (hi > ow) hi = ow;
  if (lo > hi) lo = hi;
  int32_t acc[MT_ROW_MAX];
  for (int32_t oy = 0; oy < oh; oy++) {
    const int32_t y0 = oy * s - p->pad_top;
    const int32_t i0 = y0 < 0 ? -y0 : 0, i1 = y0 + k > xd.h ? xd.h - y0 : k;
    const int8_t *xr = xc + (y0 + i0) * xd.rs;  /* the first tap row inside the input */
    const int32_t *wr = wk + i0 * k, n = i1 - i0;
    int32_t wsum = 0;
    for (int32_t i = i0; i < i1; i++)
      for (int32_t j = 0; j < k; j++) wsum += w[i * k + j];
    const int32_t corr = -z * wsum;
    int32_t ox = lo;
    for (; ox + 4 <= hi; ox += 4) {
      const int8_t *r = xr + ox * s - pl;
      int32_t *a = acc + ox;
      if (k == 3 && s == 1) interior4(r, xd.rs, wr, n, 3, 1, a);
      else if (k == 3 && s == 2) interior4(r, xd.rs, wr, n, 3, 2, a);
      else if (k == 5 && s == 1) interior4(r, xd.rs, wr, n, 5, 1, a);
      else if (k == 5 && s == 2) interior4(r, xd.rs, wr, n, 5, 2, a);
      else if (k == 7 && s == 1) interior4(r, xd.rs, wr, n, 7, 1, a);
      else if (k == 7 && s == 2) interior4(r, xd.rs, wr, n, 7, 2, a);
      else interior4(r, xd.rs, wr, n, k, s, a);
      a[0] += corr, a[1] += corr, a[2] += corr, a[3] += corr;
    }
    for (int32_t b = 0; b < ow; b++) {  /* the border columns and the interior's last ones */
      if (b == lo) b = ox;
      if (b >= ow) break;
      int32_t jl, jh, v = 0;
      const int32_t x0 = b * s - pl;
      jl = x0 < 0 ? -x0 : 0, jh = x0 + k > xd.w ? xd.w - x0 : k;
      for (int32_t i = i0; i < i1; i++)
        for (int32_t j = jl; j < jh; j++) v += ((int32_t)xr[(i - i0) * xd.rs + x0 + j] - z) * w[i * k + j];
      acc[b] = v;
    }
    mt_requant_row(acc, ow, p->bias[c], p->mult[c], p->y_zero, out + oy * rs, mask, mask_base + oy * ow);
  }
}

/* The same channel through staged rows: each input row the taps reach is staged once, as (x - x.zero) in int16 with
 * the padding as zeros, into a ring of k rows; then every output column runs the same loop, four at a time, tap
 * pairs (j, j + 1) through SMLAD against the weight pairs (w[i][j], w[i][j + 1]) (a zero weight past the last
 * column). Returns 0 (nothing done) when the ring does not fit. Integer sums: exact in any order. */
#define DW_RING 512  /* int16 elements (1 KB of stack) */

MT_INLINE void staged_row(const int16_t *const *rows, int32_t ow, const uint32_t *wp, int32_t K, int32_t S,
                          int32_t *acc) {
  const int32_t kp = (K + 1) / 2;
  for (int32_t q = 0; q < ow; q += 4) {
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (int32_t i = 0; i < K; i++) {
      const int16_t *r = rows[i] + q * S;
      for (int32_t j = 0; j < kp; j++) {
        const uint32_t w2 = wp[i * kp + j];
        uint32_t v0, v1, v2, v3;
        __builtin_memcpy(&v0, r + 2 * j, 4), __builtin_memcpy(&v1, r + S + 2 * j, 4);
        __builtin_memcpy(&v2, r + 2 * S + 2 * j, 4), __builtin_memcpy(&v3, r + 3 * S + 2 * j, 4);
        a0 = mt_smlad(v0, w2, a0), a1 = mt_smlad(v1, w2, a1), a2 = mt_smlad(v2, w2, a2), a3 = mt_smlad(v3, w2, a3);
      }
    }
    acc[q] = a0, acc[q + 1] = a1, acc[q + 2] = a2, acc[q + 3] = a3;
  }
}

/* staged_row with K and S constants for the common kernels (unrolled, loads shared). */
MT_INLINE void staged_row_ks(const int16_t *const *rows, int32_t ow, const uint32_t *wp, int32_t k, int32_t s,
                             int32_t *acc) {
  if (k == 3 && s == 1) staged_row(rows, ow, wp, 3, 1, acc);
  else if (k == 3 && s == 2) staged_row(rows, ow, wp, 3, 2, acc);
  else if (k == 5 && s == 1) staged_row(rows, ow, wp, 5, 1, acc);
  else if (k == 5 && s == 2) staged_row(rows, ow, wp, 5, 2, acc);
  else if (k == 7 && s == 1) staged_row(rows, ow, wp, 7, 1, acc);
  else if (k == 7 && s == 2) staged_row(rows, ow, wp, 7, 2, acc);
  else staged_row(rows, ow, wp, k, s, acc);
}

static int channel_staged(const int8_t *x, mt_dims xd, const mt_conv *p, int32_t c, int8_t *out, int32_t rs,
                          uint8_t *mask, int32_t mask_base, int32_t oh, int32_t ow) {
  const int32_t k = p->w.k, ch = p->w.ch, s = p->stride, z = p->x_zero, kp = (k + 1) / 2;
  const int32_t ow4 = (ow + 3) / 4 * 4, wst = (((ow4 - 1) * s + k + 2) & ~1);
  if (k > MT_DW_KMAX || ow > MT_ROW_MAX || k * wst > DW_RING) return 0;
  const int8_t *w = c < ch ? p->w.w_train + c * k * k : p->w.w_frozen + (c - ch) * k * k;
  const int8_t *xc = x + c * xd.cs;
  int16_t ring[DW_RING];
  uint32_t wp[MT_DW_KMAX * 4];
  const int16_t *rows[MT_DW_KMAX];
  int32_t acc[MT_ROW_MAX + 4];
  for (int32_t i = 0; i < k; i++)
    for (int32_t j = 0; j < kp; j++) {
      const int32_t lo = w[i * k + 2 * j], hi = 2 * j + 1 < k ? w[i * k + 2 * j + 1] : 0;
      wp[i * kp + j] = (uint32_t)(uint16_t)lo | (uint32_t)hi << 16;
    }
  int32_t next = -p->pad_top;  /* the next input row to stage (rows before it are in the ring) */
  for (int32_t oy = 0; oy < oh; oy++) {
    const int32_t y0 = oy * s - p->pad_top;
    if (next < y0) next = y0;
    for (; next < y0 + k; next++) {
      int16_t *d = ring + ((next + p->pad_top) % k) * wst;
      if (next < 0 || next >= xd.h) {
        for (int32_t j = 0; j < wst; j++) d[j] = 0;
      } else {
        mt_stage_row_i16(xc + next * xd.rs, xd.w, p->pad_left, z, d, wst);
      }
    }
    for (int32_t i = 0; i < k; i++) rows[i] = ring + ((y0 + i + p->pad_top) % k) * wst;
    staged_row_ks(rows, ow, wp, k, s, acc);
    mt_requant_row(acc, ow, p->bias[c], p->mult[c], p->y_zero, out + oy * rs, mask, mask_base + oy * ow);
  }
  return 1;
}

/* A small channel whole: every input row the taps reach (the padding rows and columns as zeros) staged once into
 * one buffer, then every output row runs staged_row from it, and the channel's accumulators are requantized in one
 * pass when its output rows are contiguous. The late layers (8x8, 4x4 planes) and the patch stage's tiles (10x10) have
 * channels this small: there the ring's per-row bookkeeping cost more than the MACs. Returns 0 when it does not
 * fit. Integer sums: exact in any order; the same accumulators as channel_staged. */
#define DW_PLANE_ACC 256  /* int32 accumulators of one channel (1 KB of stack) */

static int channel_plane(const int8_t *x, mt_dims xd, const mt_conv *p, int32_t c, int8_t *out, int32_t rs,
                         uint8_t *mask, int32_t mask_base, int32_t oh, int32_t ow) {
  const int32_t k = p->w.k, ch = p->w.ch, s = p->stride, z = p->x_zero, kp = (k + 1) / 2;
  const int32_t ow4 = (ow + 3) / 4 * 4, wst = (((ow4 - 1) * s + k + 2) & ~1), nr = (oh - 1) * s + k;
  if (k > MT_DW_KMAX || nr * wst > DW_RING || oh * ow + 4 > DW_PLANE_ACC) return 0;
  const int8_t *w = c < ch ? p->w.w_train + c * k * k : p->w.w_frozen + (c - ch) * k * k;
  const int8_t *xc = x + c * xd.cs;
  int16_t buf[DW_RING];
  uint32_t wp[MT_DW_KMAX * 4];
  int32_t acc[DW_PLANE_ACC];
  for (int32_t i = 0; i < k; i++)
    for (int32_t j = 0; j < kp; j++) {
      const int32_t lo = w[i * k + 2 * j], hi = 2 * j + 1 < k ? w[i * k + 2 * j + 1] : 0;
      wp[i * kp + j] = (uint32_t)(uint16_t)lo | (uint32_t)hi << 16;
    }
  /* the whole buffer zeroed once (padding rows and columns), then each input row's columns converted in place */
  __builtin_memset(buf, 0, (size_t)(nr * wst) * sizeof(int16_t));
  const int32_t pl = p->pad_left, j0 = pl > 0 ? pl : 0, j1 = xd.w + pl < wst ? xd.w + pl : wst;
  const uint32_t zz = (uint32_t)(uint16_t)(int16_t)z * 0x10001u;
  const int32_t r0 = p->pad_top > 0 ? p->pad_top : 0, r1 = xd.h + p->pad_top < nr ? xd.h + p->pad_top : nr;
  for (int32_t r = r0; r < r1; r++) {
    const int8_t *xr = xc + (r - p->pad_top) * xd.rs - pl;
    int16_t *d = buf + r * wst;
    int32_t j = j0;
    for (; j + 4 <= j1; j += 4) {
      const uint32_t u = mt_ld32(xr + j);
      const uint32_t e = mt_ssub16(mt_sxtb16(u), zz), o = mt_ssub16(mt_sxtb16_r8(u), zz);
      const uint32_t lo = mt_pkhbt(e, o), hi = mt_pkhtb(e, o);
      __builtin_memcpy(d + j, &lo, 4), __builtin_memcpy(d + j + 2, &hi, 4);
    }
    for (; j < j1; j++) d[j] = (int16_t)(xr[j] - z);
  }
  for (int32_t oy = 0; oy < oh; oy++) {  /* row oy's four-column blocks spill into row oy + 1's, written next */
    const int16_t *base = buf + oy * s * wst;
    const int16_t *rows[MT_DW_KMAX];
    for (int32_t i = 0; i < k; i++) rows[i] = base + i * wst;
    int32_t *a = acc + oy * ow;
    staged_row_ks(rows, ow, wp, k, s, a);
  }
  if (rs == ow) {
    mt_requant_row(acc, oh * ow, p->bias[c], p->mult[c], p->y_zero, out, mask, mask_base);
  } else {
    for (int32_t oy = 0; oy < oh; oy++)
      mt_requant_row(acc + oy * ow, ow, p->bias[c], p->mult[c], p->y_zero, out + oy * rs, mask, mask_base + oy * ow);
  }
  return 1;
}

/* One channel by the fastest path that fits. */
static void channel_any(const int8_t *x, mt_dims xd, const mt_conv *p, int32_t c, int8_t *out, int32_t rs,
                        uint8_t *mask, int32_t mask_base, int32_t oh, int32_t ow) {
  if (channel_plane(x, xd, p, c, out, rs, mask, mask_base, oh, ow)) return;
  if (channel_staged(x, xd, p, c, out, rs, mask, mask_base, oh, ow)) return;
  channel(x, xd, p, c, out, rs, mask, mask_base, oh, ow);
}

void mt_depthwise_conv2d(const int8_t *x, mt_dims xd, const mt_conv *p, int8_t *y, mt_dims yd, uint8_t *mask,
                         int8_t *scratch) {
  const int32_t hw = yd.h * yd.w;
  if (!scratch) {
    for (int32_t c = 0; c < yd.c; c++) channel_any(x, xd, p, c, y + c * yd.cs, yd.rs, mask, c * hw, yd.h, yd.w);
    return;
  }
  const int descending = yd.cs > xd.cs;
  for (int32_t n = 0; n < yd.c; n++) {
    const int32_t c = descending ? yd.c - 1 - n : n;
    channel_any(x, xd, p, c, scratch, yd.w, mask, c * hw, yd.h, yd.w);
    if (yd.rs == yd.w) memcpy(y + c * yd.cs, scratch, (size_t)hw);
    else
      for (int32_t oy = 0; oy < yd.h; oy++) memcpy(y + c * yd.cs + oy * yd.rs, scratch + oy * yd.w, (size_t)yd.w);
  }
}
