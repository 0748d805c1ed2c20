/* Depthwise conv backward w.r.t. its input: gx[c, y, x] = sum_{i, j} gacc[c, oy, ox] * w[c, i, j] over the taps with
 * y = oy * s - p + i, x = ox * s - p + j. Channel c reads gacc channel c only, so with scratch != NULL gx shares
 * gacc's buffer: each channel goes to the one-channel scratch, then over, ascending when a gx channel is no larger
 * than a gacc channel and descending otherwise (the planner's in-place contract). */
#include <string.h>

#include "mt_runtime.h"

/* One channel; its gacc is float32 g (q == NULL) or qint8 (float)q[i] * s. */
MT_INLINE void channel(const float *g, const int8_t *q, float s, mt_dims gd, const int8_t *w, int32_t k,
                       int32_t stride, int32_t pad, float *out, int32_t h, int32_t wd) {
  for (int32_t y = 0; y < h; y++) {
    /* taps i with (y + pad - i) a multiple of stride and the quotient a row of gacc: i ascending by stride */
    int32_t i0 = (y + pad) % stride, i_lo = y + pad - (gd.h - 1) * stride;
    while (i0 < i_lo) i0 += stride;
    const int32_t i1 = y + pad + 1 < k ? y + pad + 1 : k;
    for (int32_t x = 0; x < wd; x++) {
      int32_t j0 = (x + pad) % stride, j_lo = x + pad - (gd.w - 1) * stride;
      while (j0 < j_lo) j0 += stride;
      const int32_t j1 = x + pad + 1 < k ? x + pad + 1 : k;
      float acc = 0.0f;
      for (int32_t i = i0; i < i1; i += stride) {
        const int32_t r = ((y + pad - i) / stride) * gd.w;
        for (int32_t j = j0; j < j1; j += stride) {
          const int32_t e = r + (x + pad - j) / stride;
          acc = mt_fma(q ? (float)q[e] * s : g[e], (float)w[i * k + j], acc);
        }
      }
      out[y * wd + x] = acc;
    }
  }
}

/* The float32 channel through staged rows: each gacc row the taps reach is staged once, zero-padded left and right,
 * into a ring, so that every gx column runs the same loop: four columns x0 + stride * t of one parity at a time,
 * each its own chain over the same taps as above (i ascending, j ascending; a tap whose gacc column lies outside adds
 * fma(0, w, acc), which leaves acc as it is: acc starts at +0 and never becomes -0). Returns 0 when the ring does
 * not fit. */
#define DG_RING 512  /* floats (2 KB of stack) */

MT_INLINE void dg_block(const float *row, int32_t c0, const float *wr, int32_t jp, int32_t k, int32_t s, float *a) {
  float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
  for (int32_t j = jp, c = c0; j < k; j += s, c--) {  /* gacc column of output t: c + t */
    const float wv = wr[j];
    a0 = mt_fma(row[c], wv, a0), a1 = mt_fma(row[c + 1], wv, a1);
    a2 = mt_fma(row[c + 2], wv, a2), a3 = mt_fma(row[c + 3], wv, a3);
  }
  a[0] = a0, a[1] = a1, a[2] = a2, a[3] = a3;
}

/* One gx row into o4[0 .. xb): four columns of one stride phase at a time through dg_block over the nv tap rows
 * (rows[v] with weight row wrs[v], i ascending); gacc column c lives at row column c + pl. */
MT_INLINE void gx_row(const float *const *rows, const float *const *wrs, int32_t nv, int32_t xb, int32_t k,
                      int32_t s, int32_t pad, int32_t pl, float *o4) {
    for (int32_t xq = 0; xq < xb; xq += 4 * s)
      for (int32_t par = 0; par < s; par++) {
        const int32_t x0 = xq + par, jp = (x0 + pad) % s, c0 = pl + (x0 + pad - jp) / s;
        float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int32_t v = 0; v < nv; v++) {
          if (k == 3 && s == 1) dg_block(rows[v], c0, wrs[v], jp, 3, 1, a);
          else if (k == 5 && s == 1) dg_block(rows[v], c0, wrs[v], jp, 5, 1, a);
          else if (k == 7 && s == 1) dg_block(rows[v], c0, wrs[v], jp, 7, 1, a);
          else if (k == 3 && s == 2) dg_block(rows[v], c0, wrs[v], jp, 3, 2, a);
          else dg_block(rows[v], c0, wrs[v], jp, k, s, a);
        }
        for (int32_t t = 0; t < 4; t++) o4[x0 + s * t] = a[t];
      }
}

static int channel_staged(const float *g, mt_dims gd, const int8_t *w, int32_t k, int32_t stride, int32_t pad,
                          float *out, int32_t h, int32_t wd) {
  const int32_t s = stride, pl = (k - 1 + s - 1) / s;  /* gacc column c lives at ring column c + pl */
  const int32_t xb = (wd + 4 * s - 1) / (4 * s) * (4 * s);  /* gx columns computed (the extra ones not stored) */
  int32_t pr = (xb - 1 + pad) / s - (gd.w - 1);
  if (pr < 0) pr = 0;
  const int32_t rw = pl + gd.w + pr, nr = (k + s - 1) / s + 1;  /* ring rows: the gacc rows one gx row reads */
  if (k > MT_DW_KMAX || nr * rw > DG_RING || xb > MT_ROW_MAX + 8) return 0;
  float ring[DG_RING], wf[MT_DW_KMAX * MT_DW_KMAX], o4[MT_ROW_MAX + 4 * 2];
  int32_t tag[MT_DW_KMAX + 1];
  for (int32_t t = 0; t < k * k; t++) wf[t] = (float)w[t];
  for (int32_t t = 0; t < nr; t++) tag[t] = -1;
  for (int32_t y = 0; y < h; y++) {
    int32_t i0 = (y + pad) % stride, i_lo = y + pad - (gd.h - 1) * stride;
    while (i0 < i_lo) i0 += stride;
    const int32_t i1 = y + pad + 1 < k ? y + pad + 1 : k;
    const float *rows[MT_DW_KMAX], *wrs[MT_DW_KMAX];
    int32_t nv = 0;
    for (int32_t i = i0; i < i1; i += stride, nv++) {  /* the valid taps' rows, i ascending, staged */
      const int32_t r = (y + pad - i) / stride;
      float *row = ring + (r % nr) * rw;
      if (tag[r % nr] != r) {
        tag[r % nr] = r;
        const float *gr = g + r * gd.w;
        for (int32_t c = 0; c < pl; c++) row[c] = 0.0f;
        for (int32_t c = 0; c < gd.w; c++) row[pl + c] = gr[c];
        for (int32_t c = 0; c < pr; c++) row[pl + gd.w + c] = 0.0f;
      }
      rows[nv] = row, wrs[nv] = wf + i * k;
    }
    gx_row(rows, wrs, nv, xb, k, s, pad, pl, o4);
    for (int32_t x = 0; x < wd; x++) out[y * wd + x] = o4[x];
  }
  return 1;
}

/* A small channel whole: the gacc plane staged once with zero rows and columns around it, so that every gx row reads
 * every tap row i of its parity (a row outside gacc is zeros: fma(0, w, acc) leaves acc as it is, as for the
 * columns above) and no row is staged twice. The late blocks' 8x8 and 4x4 channels spent more in channel_staged's
 * per-row ring bookkeeping than in their MACs. The same chains as channel_staged. Returns 0 when it does not fit. */
static int channel_plane(const float *g, mt_dims gd, const int8_t *w, int32_t k, int32_t stride, int32_t pad,
                         float *out, int32_t h, int32_t wd) {
  const int32_t s = stride, pl = (k - 1 + s - 1) / s;  /* gacc (row, column) (r, c) lives at (r + pl, c + pl) */
  const int32_t xb = (wd + 4 * s - 1) / (4 * s) * (4 * s);
  int32_t pr = (xb - 1 + pad) / s - (gd.w - 1), pb = (h - 1 + pad) / s - (gd.h - 1);
  if (pr < 0) pr = 0;
  if (pb < 0) pb = 0;
  const int32_t rw = pl + gd.w + pr, nrows = pl + gd.h + pb;
  if (k > MT_DW_KMAX || nrows * rw > DG_RING || xb > MT_ROW_MAX + 8 || pad - (k - 1) < -pl * s) return 0;
  float plane[DG_RING], wf[MT_DW_KMAX * MT_DW_KMAX], o4[MT_ROW_MAX + 4 * 2];
  for (int32_t t = 0; t < k * k; t++) wf[t] = (float)w[t];
  for (int32_t t = 0; t < nrows * rw; t++) plane[t] = 0.0f;
  for (int32_t r = 0; r < gd.h; r++) {
    float *d = plane + (pl + r) * rw + pl;
    const float *gr = g + r * gd.w;
    for (int32_t c = 0; c < gd.w; c++) d[c] = gr[c];
  }
  for (int32_t y = 0; y < h; y++) {
    const float *rows[MT_DW_KMAX], *wrs[MT_DW_KMAX];
    int32_t nv = 0;
    for (int32_t i = (y + pad) % s; i < k; i += s, nv++)  /* (y + pad - i) is a multiple of s: exact division */
      rows[nv] = plane + (pl + (y + pad - i) / s) * rw, wrs[nv] = wf + i * k;
    gx_row(rows, wrs, nv, xb, k, s, pad, pl, o4);
    for (int32_t x = 0; x < wd; x++) out[y * wd + x] = o4[x];
  }
  return 1;
}

/* One float32 channel by the fastest path that fits. */
static void channel_any(const float *g, mt_dims gd, const int8_t *w, int32_t k, int32_t stride, int32_t pad,
                        float *out, int32_t h, int32_t wd) {
  if (channel_plane(g, gd, w, k, stride, pad, out, h, wd)) return;
  if (channel_staged(g, gd, w, k, stride, pad, out, h, wd)) return;
  channel(g, 0, 0.0f, gd, w, k, stride, pad, out, h, wd);
}

static const int8_t *channel_weights(const mt_weights *w, int32_t c) {
  const int32_t kk = w->k * w->k;
  return c < w->ch ? w->w_train + c * kk : w->w_frozen + (c - w->ch) * kk;
}

void mt_depthwise_grad_input(const float *gacc, mt_dims gd, const mt_weights *w, int32_t stride, int32_t pad,
                             float *gx, mt_dims xd, float *scratch) {
  const int32_t hw = xd.h * xd.w;
  const int descending = scratch && hw > gd.cs;
  for (int32_t n = 0; n < xd.c; n++) {
    const int32_t c = descending ? xd.c - 1 - n : n;
    float *out = scratch ? scratch : gx + c * hw;
    channel_any(gacc + c * gd.cs, gd, channel_weights(w, c), w->k, stride, pad, out, xd.h, xd.w);
    if (scratch) memcpy(gx + c * hw, scratch, (size_t)hw * sizeof(float));
  }
}

/* qint8 gacc and gx: channel c is computed into plane (one float32 gx channel), then quantized into gx channel c.
 * gx may be gacc (in place: the same scales, the values from the same offset), hence the planner's channel order. */
void mt_depthwise_grad_input_q8(const float *gacc, mt_dims gd, const mt_weights *w, int32_t stride, int32_t pad,
                                float *gx, mt_dims xd, float *plane) {
  const int32_t hw = xd.h * xd.w;
  const int8_t *gq = (const int8_t *)(gacc + gd.c);
  int8_t *xq = (int8_t *)(gx + xd.c);
  const int descending = hw > gd.cs;
  for (int32_t n = 0; n < xd.c; n++) {
    const int32_t c = descending ? xd.c - 1 - n : n;
    channel(0, gq + c * gd.cs, gacc[c], gd, channel_weights(w, c), w->k, stride, pad, plane, xd.h, xd.w);
    gx[c] = mt_q8_quantize(plane, hw, xq + c * hw);
  }
}

/* Channel c alone (the channel-serial block backward): gacc channel g (float32), gx channel into out. */
void mt_depthwise_grad_input_channel(const float *g, mt_dims gd, const mt_weights *w, int32_t c, int32_t stride,
                                     int32_t pad, float *out, mt_dims xd) {
  channel_any(g, gd, channel_weights(w, c), w->k, stride, pad, out, xd.h, xd.w);
}
