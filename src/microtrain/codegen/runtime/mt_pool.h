/* Windowed pooling (maxpool2d / avgpool2d of src/microtrain/ir/ops.py) and their gradients, and the (C,) <-> (C,1,1)
 * reshape: one kernel per file (mt_maxpool2d.c, mt_avgpool2d.c, mt_maxpool2d_grad.c, mt_avgpool2d_grad.c,
 * mt_reshape.c). Compact CHW tensors; window (oy, ox) covers rows oy * stride - pad_top + i (i < kh) and columns
 * ox * stride - pad_left + j (j < kw); taps outside the input are not taps. Also the two layout ops of
 * fully-connected layers: reshape and flatten. */
#ifndef MT_POOL_H
#define MT_POOL_H

#include "mt_runtime.h"

typedef struct {
  int32_t c, h, w;         /* input */
  int32_t ho, wo;          /* output */
  int32_t kh, kw, stride;  /* window */
  int32_t pad_top, pad_left;
  int32_t act_min, act_max;  /* maxpool2d's fused clamp */
} mt_pool;

/* y = clamp(max over the window's taps, act_min, act_max). */
void mt_maxpool2d(const int8_t *x, const mt_pool *p, int8_t *y);
/* y = the window's sum over its n taps divided by n: TFLite's (s +- n/2) / n (tflite != 0) or rint(float(s) /
 * float(n)) (the float32-multiplier rule). */
void mt_avgpool2d(const int8_t *x, const mt_pool *p, int32_t tflite, int8_t *y);
/* g_x: each window's g to its argmax (first maximal tap in row-major scan order, recomputed from x), where the
 * maximum lies inside [act_min, act_max]; sums in (oy, ox) row-major order. q8: g and gx are qint8 (float32 scales
 * [C] then int8 values), channel by channel through the float32 plane [H*W]. */
void mt_maxpool2d_grad(const float *g, const int8_t *x, const mt_pool *p, float *gx, int32_t q8, float *plane);
/* g_x = sum over the windows holding the tap of g / float(n), in (oy, ox) row-major order; q8 as above. */
void mt_avgpool2d_grad(const float *g, const mt_pool *p, float *gx, int32_t q8, float *plane);
/* dst = src (nbytes), nothing when the planner put both at one offset. */
void mt_reshape(const void *src, void *dst, uint32_t nbytes);
/* TFLite's flatten (NHWC order) of an int8 C x H x W map: y[(h * W + w) * C + c] = x[c, h, w] (mt_flatten.c). */
void mt_flatten(const int8_t *x, int32_t c, int32_t hw, int8_t *y);
/* Its gradient: gx[c, h, w] = g[(h * W + w) * C + c]; q8: g is qint8 with one element per channel and gx qint8 per
 * channel c, through the float32 plane [H*W] (mt_flatten_grad.c). */
void mt_flatten_grad(const float *g, int32_t c, int32_t hw, float *gx, int32_t q8, float *plane);

/* Element i of channel c of a gradient, float32 or qint8 (n elements per channel, `c_count` channels). */
static inline float mt_grad_at(const float *g, int32_t q8, int32_t c_count, int32_t c, int32_t n, int32_t i) {
  return q8 ? (float)((const int8_t *)(g + c_count))[c * n + i] * g[c] : g[c * n + i];
}

#endif
