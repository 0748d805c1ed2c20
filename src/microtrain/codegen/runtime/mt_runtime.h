/* microtrain C runtime: the kernels of one on-device training step (see src/microtrain/ir/ops.py for the
 * semantics every kernel implements bit for bit, and docs/codegen.md for the conventions).
 *
 * Conventions
 *  - Tensors are CHW, batch 1. An activation is addressed through an `mt_dims` view: element (c, y, x) lives at
 *    c * cs + y * rs + x, so a patch tile or a sub-window of a whole tensor needs no copy.
 *  - No allocation: every buffer is a pointer into the generated program's static arena or state.
 *  - Float arithmetic is IEEE float32 in the order written; the build uses -ffp-contract=off so that no multiply-add
 *    is fused behind our back. Every reduction runs in the order that src/microtrain/ir/ops.py states (chains of
 *    explicit fused multiply-adds, mt_fma, or of additions, in a stated index order), and exp / log / pow are this
 *    runtime's own (mt_math.c): the same bits on any machine, the host twin and the device alike.
 *  - 1-bit masks: bit i of byte i / 8 (LSB first) is element i of the compact output tensor.
 */
#ifndef MT_RUNTIME_H
#define MT_RUNTIME_H

#include <stdint.h>

#include "mt_config.h"

#ifndef MT_ROW_MAX  /* widest output row of a conv (an int32 row of this many lives on the stack) */
#define MT_ROW_MAX 128
#endif

typedef struct {
  int32_t c, h, w;  /* channels, rows, columns */
  int32_t cs, rs;   /* channel stride and row stride, in elements */
} mt_dims;

/* A compact C x H x W tensor. */
static inline mt_dims mt_chw(int32_t c, int32_t h, int32_t w) {
  mt_dims d = {c, h, w, h * w, w};
  return d;
}

/* The weights of one conv: the first `ch` input channels (depthwise: channels) are the trainable slice in SRAM,
 * the rest the frozen part in flash. Normal conv: w_train [O][ch][k][k], w_frozen [O][C-ch][k][k]; depthwise:
 * w_train [ch][1][k][k], w_frozen [C-ch][1][k][k]. A conv that trains nothing has ch = 0, w_train = NULL. */
typedef struct {
  const int8_t *w_train;
  const int8_t *w_frozen;
  int32_t ch, k;
} mt_weights;

typedef struct {
  mt_weights w;
  const int32_t *bias;  /* [O], int32 in units of x.scale * w.scale[o] */
  const float *mult;    /* [O], float32(x.scale * w.scale[o] / y.scale) */
  int32_t stride;
  int32_t pad_top, pad_left;  /* input coordinate of output (0, 0)'s first tap is (-pad_top, -pad_left) */
  int32_t x_zero, y_zero;
} mt_conv;

/* ---- forward (integer-exact) ------------------------------------------------------------------------------- */
void mt_conv2d(const int8_t *x, mt_dims xd, const mt_conv *p, int8_t *y, mt_dims yd, uint8_t *mask);
/* scratch != NULL: y shares x's buffer; each channel is computed into scratch (one output channel) and copied. */
void mt_depthwise_conv2d(const int8_t *x, mt_dims xd, const mt_conv *p, int8_t *y, mt_dims yd, uint8_t *mask,
                         int8_t *scratch);
void mt_add(const int8_t *a, mt_dims ad, int32_t a_zero, float ra, const int8_t *b, mt_dims bd, int32_t b_zero,
            float rb, int8_t *y, mt_dims yd, int32_t y_zero, uint8_t *mask);
void mt_avgpool(const int8_t *x, int32_t c, int32_t hw, int8_t *y);
void mt_slice_channels(const int8_t *x, int32_t nbytes, int8_t *y);
void mt_linear(const int8_t *x, int32_t c, int32_t x_zero, float x_scale, const float *w, const float *b,
               int32_t k, float *logits);

/* ---- loss and backward (float32 gradients in integer units) ------------------------------------------------ */
float mt_softmax_ce(const float *z, int32_t k, int32_t label, float *grad);
void mt_linear_grad_input(const float *g, const float *w, int32_t k, int32_t c, float x_scale, float *gx);
void mt_avgpool_grad(const float *g, int32_t c, int32_t hw, float *gx);
void mt_add_grad(const float *g, const uint8_t *mask, int32_t n, float ra, float rb, float *ga, float *gb);
void mt_grad_add(const float *a, const float *b, int32_t n, float *y);
void mt_conv2d_grad_acc(const float *g, const uint8_t *mask, int32_t c, int32_t hw, const float *mult, float *y);
void mt_conv2d_grad_input(const float *gacc, mt_dims gd, const mt_weights *w, int32_t stride, int32_t pad,
                          float *gx, mt_dims xd);
/* scratch != NULL: gx shares gacc's buffer (one gx channel of scratch; channel order per the planner's contract). */
void mt_depthwise_grad_input(const float *gacc, mt_dims gd, const mt_weights *w, int32_t stride, int32_t pad,
                             float *gx, mt_dims xd, float *scratch);

/* ---- qint8 activation gradients (--int8-grads) ------------------------------------------------------------------
 * A qint8 tensor of C channels lives at its planned offset as float32 s[C] (one scale per channel, first so that it
 * is aligned) followed by int8 q[C][n]: element (c, i) is (float)q[c][i] * s[c], the float32 value the host trains
 * with. The *_q8 kernels take such tensors by that base pointer, read every element as its value, compute float32
 * results exactly as the float kernels do, and quantize each output channel v[n] as the host does
 * (runtime/trainstep.py: quantize_per_channel): s = max|v| / 127 (1 when that is 0), q = clamp(rint(v / s), +-127).
 * Per-element kernels compute a channel twice (its maximum, then its values); the conv kernels keep one float32
 * channel in `plane`, a workspace the planner counts (`<op>.scratch`). In place (the planner's aliases) every
 * channel's scale and values are read before that channel is written. */
void mt_linear_grad_input_q8(const float *g, const float *w, int32_t k, int32_t c, float x_scale, float *gx);
void mt_avgpool_grad_q8(const float *g, int32_t c, int32_t hw, float *gx);
void mt_add_grad_q8(const float *g, const uint8_t *mask, int32_t c, int32_t hw, float ra, float rb, float *ga,
                    float *gb);
void mt_grad_add_q8(const float *a, const float *b, int32_t c, int32_t hw, float *y);
void mt_conv2d_grad_acc_q8(const float *g, const uint8_t *mask, int32_t c, int32_t hw, const float *mult, float *y);
void mt_conv2d_grad_input_q8(const float *gacc, mt_dims gd, const mt_weights *w, int32_t stride, int32_t pad,
                             float *gx, mt_dims xd, float *plane);
/* gx may be gacc (in place): channels in the planner's order. */
void mt_depthwise_grad_input_q8(const float *gacc, mt_dims gd, const mt_weights *w, int32_t stride, int32_t pad,
                                float *gx, mt_dims xd, float *plane);
/* Quantize one channel v[n] into q[n]; returns its scale. */
float mt_q8_quantize(const float *v, int32_t n, int8_t *q);

static inline float mt_q8_scale(float maxabs) {
  const float s = maxabs / 127.0f;
  return s > 0.0f ? s : 1.0f;
}

static inline int8_t mt_q8(float v, float s) {
  const float r = __builtin_rintf(v / s);
  return (int8_t)(r >= -127.0f ? (r <= 127.0f ? r : 127.0f) : -127.0f);  /* NaN: -127, never an undefined cast */
}

static inline float mt_absmax(float m, float v) {
  const float a = __builtin_fabsf(v);
  return a > m ? a : m;
}

/* ---- updates --------------------------------------------------------------------------------------------- */
enum { MT_SGD = 0, MT_SGDM = 1, MT_ADAM = 2 };
enum { MT_I8 = 0, MT_I32 = 1, MT_F32 = 2 };

typedef struct {
  int32_t optimizer;  /* MT_SGD | MT_SGDM | MT_ADAM */
  float momentum;     /* the host's Python floats, rounded to float32 where it rounds them */
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps;
  double beta1_d, beta2_d;  /* Adam's bias corrections 1 - beta^step are computed in double (mt_powi) */
  uint32_t seed;      /* stochastic rounding seed */
} mt_optimizer;

/* One trainable tensor: where it lives, how it is stored and how its update is scaled. */
typedef struct {
  void *data;          /* int8_t / int32_t / float [n] */
  int32_t dtype;       /* MT_I8 | MT_I32 | MT_F32 */
  int32_t n;
  float *m, *v;        /* optimizer slots [n] or NULL */
  const float *qas;    /* per-row QAS divisor float32(s[o] * s[o]) or NULL (no QAS) */
  int32_t row;         /* elements per QAS row */
  uint32_t stream;     /* stochastic-rounding stream: index of the tensor among the sorted state names */
} mt_param;

/* Per-step values of the update: learning rate, step number (1-based), Adam's bias corrections. */
typedef struct {
  const mt_optimizer *opt;
  float lr;
  uint32_t step;
  float bc1, bc2;  /* float32(1 - beta1^step), float32(1 - beta2^step) */
} mt_step;

float mt_sr_uniform(uint32_t seed, uint32_t step, uint32_t stream, uint32_t index);
void mt_update_element(const mt_step *s, const mt_param *p, int32_t i, float grad);
void mt_apply_update(const mt_step *s, const mt_param *p, const float *grad);
/* Fused weight gradient + update (operator reordering): no gradient tensor is ever stored. w or b may be NULL. */
void mt_conv2d_update(const mt_step *s, const float *gacc, mt_dims gd, const int8_t *x_saved, mt_dims xd,
                      int32_t x_zero, int32_t k, int32_t stride, int32_t pad, int32_t depthwise,
                      const mt_param *w, const mt_param *b);
/* The same gradients, materialised (reorder off): gw [w->n] and gb [O] (either may be NULL). */
void mt_conv2d_weight_grad(const float *gacc, mt_dims gd, const int8_t *x_saved, mt_dims xd, int32_t x_zero,
                           int32_t k, int32_t stride, int32_t pad, int32_t depthwise, int32_t ch, float *gw,
                           float *gb);
void mt_linear_update(const mt_step *s, const float *g, const int8_t *x, int32_t c, int32_t x_zero, float x_scale,
                      int32_t k, const mt_param *w, const mt_param *b);
void mt_linear_weight_grad(const float *g, const int8_t *x, int32_t c, int32_t x_zero, float x_scale, int32_t k,
                           float *gw, float *gb);
/* The same from a qint8 g_acc (its channel o dequantized into plane[gd.h * gd.w] first). */
void mt_conv2d_update_q8(const mt_step *s, const float *gacc, mt_dims gd, const int8_t *x_saved, mt_dims xd,
                         int32_t x_zero, int32_t k, int32_t stride, int32_t pad, int32_t depthwise,
                         const mt_param *w, const mt_param *b, float *plane);
void mt_conv2d_weight_grad_q8(const float *gacc, mt_dims gd, const int8_t *x_saved, mt_dims xd, int32_t x_zero,
                              int32_t k, int32_t stride, int32_t pad, int32_t depthwise, int32_t ch, float *gw,
                              float *gb, float *plane);

/* ---- the channel-serial block backward (compiler/blockgrad.py): one expanded channel at a time ----------------
 * The generated code runs an inverted-residual block's backward channel by channel through two float32 planes; each
 * helper is the per-channel body of the op-by-op kernel above (same arithmetic, same order). A qint8 gradient's
 * channel is kept as the float32 values it holds (mt_q8_round). */
void mt_pw_grad_input_channel(const float *gacc, mt_dims gd, const mt_weights *w, int32_t cin, int32_t c, int32_t hw,
                              int32_t q8, float *out);
#define MT_BLOCK_BATCH 4  /* the most channel planes one accumulate pass takes (compiler/blockgrad.py BATCH) */
void mt_pw_grad_input_accumulate(const float *g, int32_t n, const mt_weights *w, int32_t cin, int32_t e0, int32_t hw,
                                 float *total);
void mt_depthwise_grad_input_channel(const float *g, mt_dims gd, const mt_weights *w, int32_t c, int32_t stride,
                                     int32_t pad, float *out, mt_dims xd);
void mt_conv2d_grad_acc_plane(float *g, const uint8_t *mask, int32_t c, int32_t hw, float mult);
void mt_conv2d_grads_row(const mt_step *s, const float *g, int32_t o, mt_dims gd, const int8_t *x_saved, int32_t xc0,
                         mt_dims xd, int32_t x_zero, int32_t k, int32_t stride, int32_t pad, int32_t depthwise,
                         int32_t ch, const mt_param *w, const mt_param *b, float *gw, float *gb);
mt_conv mt_conv_channel(const mt_conv *p, int32_t cin, int32_t o, int32_t depthwise);
void mt_q8_round(float *v, int32_t n);

/* ---- helpers shared by the kernels ------------------------------------------------------------------------- */
/* Inlined into each caller, so that a kernel shared by the float32 and the qint8 variants is specialised. */
#define MT_INLINE static inline __attribute__((always_inline))
float mt_expf(float x);
float mt_logf(float x);
float mt_sum(const float *x, int32_t n);  /* one chain of additions in index order */
double mt_powi(double b, uint32_t n);

static inline float mt_fma(float a, float b, float c) {
#if defined(__FP_FAST_FMAF)
  return __builtin_fmaf(a, b, c);
#else
  extern float fmaf(float, float, float);
  return fmaf(a, b, c);
#endif
}

/* The output positions o in [lo, hi) of [0, n) whose tap t (input position o * stride - pad + t) lies in [0, size). */
static inline void mt_tap_range(int32_t n, int32_t size, int32_t stride, int32_t pad, int32_t t, int32_t *lo,
                                int32_t *hi) {
  const int32_t a = pad - t, b = size - 1 + pad - t;  /* a <= o * stride <= b */
  *lo = a <= 0 ? 0 : (a + stride - 1) / stride;
  *hi = b < 0 ? 0 : b / stride + 1;
  if (*hi > n) *hi = n;
  if (*lo > *hi) *lo = *hi;
}

/* Round to nearest, ties to even (the default IEEE rounding mode; never changed by this runtime). */
static inline float mt_rint(float v) { return __builtin_rintf(v); }

static inline int8_t mt_clamp8(float r) { return (int8_t)(r < -128.0f ? -128.0f : r > 127.0f ? 127.0f : r); }

static inline void mt_mask_set(uint8_t *mask, int32_t i, int bit) {
  if (bit) mask[i >> 3] |= (uint8_t)(1u << (i & 7));
  else mask[i >> 3] &= (uint8_t)~(1u << (i & 7));
}

static inline int mt_mask_get(const uint8_t *mask, int32_t i) { return (mask[i >> 3] >> (i & 7)) & 1; }

#endif
