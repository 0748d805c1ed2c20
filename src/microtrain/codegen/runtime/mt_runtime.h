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

#define MT_DW_KMAX 7  /* depthwise kernels up to 7 x 7 take the register-blocked path */

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

/* The part of the counter hash's input that one step and one parameter share. */
static inline uint32_t mt_sr_base(uint32_t seed, uint32_t step, uint32_t stream) {
  return step * 0x85EBCA77u + stream * 0xC2B2AE3Du + seed * 0x27D4EB2Fu;
}

static inline float mt_sr_uniform_at(uint32_t base, uint32_t index) {
  uint32_t x = index * 0x9E3779B1u + base;
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return (float)(x >> 8) * (1.0f / 16777216.0f);
}

static inline float mt_sr_uniform_inline(uint32_t seed, uint32_t step, uint32_t stream, uint32_t index) {
  return mt_sr_uniform_at(mt_sr_base(seed, step, stream), index);
}

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
/* The same for output channels o0 .. o0 + n - 1, their planes hw apart from g (a batch of pw1 gradient planes). */
void mt_conv2d_grads_rows(const mt_step *s, const float *g, int32_t o0, int32_t n, mt_dims gd, const int8_t *x_saved,
                          mt_dims xd, int32_t x_zero, int32_t k, int32_t stride, int32_t pad, int32_t depthwise,
                          int32_t ch, const mt_param *w, const mt_param *b, float *gw, float *gb);
mt_conv mt_conv_channel(const mt_conv *p, int32_t cin, int32_t o, int32_t depthwise);
void mt_q8_round(float *v, int32_t n);

/* ---- the profile build (mt_profile.c) ------------------------------------------------------------------------ */
#ifdef MT_PROFILE
void mt_prof_mark(int32_t kind);
void mt_prof_report(const char *const *names, int32_t n);
#define MT_PROF(k) mt_prof_mark(k)
#else
#define MT_PROF(k) ((void)0)
#endif

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

/* ---- the DSP extension (Cortex-M4/M7: ACLE) and its portable twin: the same results, bit for bit ---------------
 * mt_sxtb16(x): bytes 0 and 2 of x sign-extended into two int16 halves; mt_sxtb16_r8(x): bytes 1 and 3;
 * mt_smlad(a, b, c) = c + a.lo * b.lo + a.hi * b.hi (int16 halves, int32 wrap-around);
 * mt_pkhbt(a, b) = (a.lo, b.lo), mt_pkhtb(a, b) = (a.hi, b.hi) as (lo, hi); mt_ssat(v, n): clamp to n signed bits;
 * mt_ssub16(a, b) = (a.lo - b.lo, a.hi - b.hi) (int16 halves, wrap-around); mt_qadd(a, b): a + b saturated to int32;
 * mt_rint_i32(v) = rint(v) (ties to even) for |v| <= 65536, saturated beyond (VCVTR under the default rounding
 * mode; NaN gives 0): callers add the zero point with mt_qadd and clamp to int8, so both builds agree everywhere
 * (beyond 2^16 both give the clamp's bound). */
#if defined(__ARM_FEATURE_DSP) && defined(__ARM_FP) && !defined(MT_PORTABLE)
#include <arm_acle.h>
#define MT_DSP 1
static inline uint32_t mt_sxtb16(uint32_t x) { return __sxtb16(x); }
static inline uint32_t mt_sxtb16_r8(uint32_t x) {
  uint32_t r;
  __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(x));
  return r;
}
static inline int32_t mt_smlad(uint32_t a, uint32_t b, int32_t c) { return __smlad(a, b, c); }
static inline uint32_t mt_ssub16(uint32_t a, uint32_t b) { return (uint32_t)__ssub16((int16x2_t)a, (int16x2_t)b); }
static inline uint32_t mt_pkhbt(uint32_t a, uint32_t b) {
  uint32_t r;
  __asm__("pkhbt %0, %1, %2, lsl #16" : "=r"(r) : "r"(a), "r"(b));
  return r;
}
static inline uint32_t mt_pkhtb(uint32_t a, uint32_t b) {
  uint32_t r;
  __asm__("pkhtb %0, %1, %2, asr #16" : "=r"(r) : "r"(b), "r"(a));
  return r;
}
#define mt_ssat(v, n) __ssat((v), (n))
#define mt_qadd(a, b) __qadd((a), (b))
static inline int32_t mt_rint_i32(float v) {
  float r;
  __asm__("vcvtr.s32.f32 %0, %1" : "=t"(r) : "t"(v));
  union { float f; int32_t i; } u = {r};
  return u.i;
}
#else
#define MT_DSP 0
static inline uint32_t mt_sxtb16(uint32_t x) {
  return (uint32_t)(uint16_t)(int16_t)(int8_t)(x & 0xFFu) | (uint32_t)(uint16_t)(int16_t)(int8_t)((x >> 16) & 0xFFu) << 16;
}
static inline uint32_t mt_sxtb16_r8(uint32_t x) { return mt_sxtb16(x >> 8 | x << 24); }
static inline int32_t mt_smlad(uint32_t a, uint32_t b, int32_t c) {
  const int32_t lo = (int32_t)(int16_t)(a & 0xFFFFu) * (int32_t)(int16_t)(b & 0xFFFFu);
  const int32_t hi = (int32_t)(int16_t)(a >> 16) * (int32_t)(int16_t)(b >> 16);
  return (int32_t)((uint32_t)c + (uint32_t)lo + (uint32_t)hi);
}
static inline uint32_t mt_pkhbt(uint32_t a, uint32_t b) { return (a & 0xFFFFu) | (b << 16); }
static inline uint32_t mt_ssub16(uint32_t a, uint32_t b) {
  return ((a - b) & 0xFFFFu) | (((a >> 16) - (b >> 16)) << 16);
}
static inline uint32_t mt_pkhtb(uint32_t a, uint32_t b) { return (a >> 16) | (b & 0xFFFF0000u); }
static inline int32_t mt_ssat_(int32_t v, int32_t n) {
  const int32_t hi = (int32_t)((1u << (n - 1)) - 1u), lo = -hi - 1;
  return v < lo ? lo : v > hi ? hi : v;
}
#define mt_ssat(v, n) mt_ssat_((v), (n))
static inline int32_t mt_qadd(int32_t a, int32_t b) {
  const int64_t r = (int64_t)a + b;
  return r > INT32_MAX ? INT32_MAX : r < INT32_MIN ? INT32_MIN : (int32_t)r;
}
static inline int32_t mt_rint_i32(float v) {
  const float c = v > 65536.0f ? 65536.0f : v < -65536.0f ? -65536.0f : v == v ? v : 0.0f;
  return (int32_t)__builtin_rintf(c);
}
#endif

/* Fully unroll the next fixed-trip loop (its array then lives in registers). */
#define MT_UNROLL _Pragma("GCC unroll 16")

/* Eight consecutive floats p[0..7] into v0..v7: one VLDM on the Cortex-M4 (one instruction), plain loads elsewhere. */
#if MT_DSP
#define MT_LOAD8(p, v)                                                                                          \
  do {                                                                                                          \
    register float l0 __asm__("s24"), l1 __asm__("s25"), l2 __asm__("s26"), l3 __asm__("s27");              \
    register float l4 __asm__("s28"), l5 __asm__("s29"), l6 __asm__("s30"), l7 __asm__("s31");              \
    __asm__("vldmia %8, {s24-s31}" : "=t"(l0), "=t"(l1), "=t"(l2), "=t"(l3), "=t"(l4), "=t"(l5), "=t"(l6),     \
            "=t"(l7) : "r"(p), "m"(*(const float(*)[8])(p)));                                                \
    v[0] = l0, v[1] = l1, v[2] = l2, v[3] = l3, v[4] = l4, v[5] = l5, v[6] = l6, v[7] = l7;                  \
  } while (0)
#else
#define MT_LOAD8(p, v)                                      \
  do {                                                      \
    for (int32_t mt_i_ = 0; mt_i_ < 8; mt_i_++) v[mt_i_] = (p)[mt_i_]; \
  } while (0)
#endif

/* Four int8 at any address as one little-endian word (an unaligned LDR on the Cortex-M4). */
static inline uint32_t mt_ld32(const int8_t *p) {
  uint32_t v;
  __builtin_memcpy(&v, p, 4);
  return v;
}

/* Input row xr (w columns) into d[0, n) as int16: d[j] = xr[j - pl] - z inside the row, 0 outside (pl may be
 * negative: then d starts inside the row). */
static inline void mt_stage_row_i16(const int8_t *xr, int32_t w, int32_t pl, int32_t z, int16_t *d, int32_t n) {
  const uint32_t zz = (uint32_t)(uint16_t)(int16_t)z * 0x10001u;
  int32_t j = 0;
  for (; j < n && j < pl; j++) d[j] = 0;
  const int32_t end = w + pl < n ? w + pl : n;  /* staged columns [j, end) lie inside the row */
  for (; j + 4 <= end; j += 4) {
    const uint32_t u = mt_ld32(xr + j - pl);
    const uint32_t e = mt_ssub16(mt_sxtb16(u), zz), o = mt_ssub16(mt_sxtb16_r8(u), zz);
    const uint32_t lo = mt_pkhbt(e, o), hi = mt_pkhtb(e, o);
    __builtin_memcpy(d + j, &lo, 4), __builtin_memcpy(d + j + 2, &hi, 4);
  }
  for (; j < end; j++) d[j] = (int16_t)(xr[j - pl] - z);
  for (; j < n; j++) d[j] = 0;
}

/* Requantize an int32 accumulator (bias included) with multiplier m: rint(float(acc) * m) + y_zero, clamped to int8;
 * *inside = the pre-clamp value lies in [-128, 127] (the mask bit). The same as clamp8(rint(v) + float(y_zero)). */
static inline int8_t mt_requant(int32_t acc, float m, int32_t y_zero, uint32_t *inside) {
  const int32_t r = mt_qadd(mt_rint_i32((float)acc * m), y_zero);
  *inside = (uint32_t)r + 128u < 256u;
  return (int8_t)mt_ssat(r, 8);
}

/* Requantize one row of accumulators plus the bias (int32 wrap-around) into y[0..n), the mask bits at i .. i + n - 1
 * (packed, when mask is not NULL). */
static inline void mt_requant_row(const int32_t *acc, int32_t n, int32_t bias, float mult, int32_t y_zero, int8_t *y,
                                  uint8_t *mask, int32_t i);
/* Bits [0, n) of `bits` (n <= 25) into the mask at bit positions i .. i + n - 1. */
static inline void mt_mask_put(uint8_t *mask, int32_t i, uint32_t bits, int32_t n) {
  uint8_t *m = mask + (i >> 3);
  const int32_t sh = i & 7;
  uint32_t keep = ~(((1u << n) - 1u) << sh), v = (bits & ((1u << n) - 1u)) << sh;
  for (int32_t b = 0; b < sh + n; b += 8, m++, keep >>= 8, v >>= 8) {
    if ((keep & 0xFFu) == 0) *m = (uint8_t)v;
    else *m = (uint8_t)((*m & keep) | v);
  }
}

static inline int8_t mt_clamp8(float r) { return (int8_t)(r < -128.0f ? -128.0f : r > 127.0f ? 127.0f : r); }

static inline void mt_mask_set(uint8_t *mask, int32_t i, int bit) {
  if (bit) mask[i >> 3] |= (uint8_t)(1u << (i & 7));
  else mask[i >> 3] &= (uint8_t)~(1u << (i & 7));
}

static inline int mt_mask_get(const uint8_t *mask, int32_t i) { return (mask[i >> 3] >> (i & 7)) & 1; }

static inline void mt_requant_row(const int32_t *acc, int32_t n, int32_t bias, float mult, int32_t y_zero, int8_t *y,
                                  uint8_t *mask, int32_t i) {
  int32_t q = 0;
  if (!mask) {  /* no mask bits to compute; four outputs a pass (the loop's own cost was a sixth of the row's) */
    for (; q + 4 <= n; q += 4)
      for (int32_t b = 0; b < 4; b++) {
        const int32_t v = (int32_t)((uint32_t)acc[q + b] + (uint32_t)bias);
        y[q + b] = (int8_t)mt_ssat(mt_qadd(mt_rint_i32((float)v * mult), y_zero), 8);
      }
    for (; q < n; q++) {
      const int32_t r = mt_qadd(mt_rint_i32((float)(int32_t)((uint32_t)acc[q] + (uint32_t)bias) * mult), y_zero);
      y[q] = (int8_t)mt_ssat(r, 8);
    }
    return;
  }
  for (; q + 8 <= n; q += 8) {
    uint32_t bits = 0, in;
    for (int32_t b = 0; b < 8; b++) {
      y[q + b] = mt_requant((int32_t)((uint32_t)acc[q + b] + (uint32_t)bias), mult, y_zero, &in);
      bits |= in << b;
    }
    if (mask) mt_mask_put(mask, i + q, bits, 8);
  }
  if (q < n) {  /* the last n % 8: their bits in one mask write */
    const int32_t q8 = q;
    uint32_t bits = 0, in;
    for (; q < n; q++) {
      y[q] = mt_requant((int32_t)((uint32_t)acc[q] + (uint32_t)bias), mult, y_zero, &in);
      bits |= in << (q - q8);
    }
    if (mask) mt_mask_put(mask, i + q8, bits, n - q8);
  }
}

/* floor(r), exactly (floorf without a library call): r itself when |r| >= 2^23 (already integral), inf or NaN. */
static inline float mt_floor(float r) {
  if (!(__builtin_fabsf(r) < 8388608.0f)) return r;
  const float t = (float)(int32_t)r;
  return t > r ? t - 1.0f : t;
}

/* clamp8(floor(r)) with integer instructions: r's truncation t (exact inside (-256, 256)), less one where t > r, then
 * saturated to int8 (SSAT); outside that range the clamp's bound, and 0 for a NaN (what the float cast of the
 * float-compare form gave on both builds). Equal to mt_clamp8(mt_floor(r)) for every float. */
static inline int8_t mt_floor_clamp8(float r) {
  if (!(r > -256.0f && r < 256.0f)) return (int8_t)(r != r ? 0 : r < 0.0f ? -128 : 127);
  const int32_t t = (int32_t)r;
  return (int8_t)mt_ssat(t - ((float)t > r), 8);
}

/* One element of the update (mt_update.c states it; inlined into the fused weight-gradient loops). */
static inline void mt_update_one(const mt_step *s, const mt_param *p, int32_t i, float grad) {
  const mt_optimizer *opt = s->opt;
  const float g = p->qas ? grad / p->qas[i / p->row] : grad;
  float delta;
  if (opt->optimizer == MT_SGD) {
    delta = s->lr * g;
  } else if (opt->optimizer == MT_SGDM) {
    p->m[i] = p->m[i] * opt->momentum + g;
    delta = s->lr * p->m[i];
  } else {
    p->m[i] = mt_fma(opt->one_minus_beta1, g, p->m[i] * opt->beta1);
    p->v[i] = mt_fma(opt->one_minus_beta2 * g, g, p->v[i] * opt->beta2);
    delta = s->lr * (p->m[i] / s->bc1) / (__builtin_sqrtf(p->v[i] / s->bc2) + opt->eps);
  }
  if (p->dtype == MT_I8) {
    int8_t *w = (int8_t *)p->data;
    const float u = mt_sr_uniform_inline(opt->seed, s->step, p->stream, (uint32_t)i);
    w[i] = mt_floor_clamp8((float)w[i] - delta + u);
  } else if (p->dtype == MT_I32) {
    int32_t *b = (int32_t *)p->data;
    float r = mt_rint(delta);
    r = r < -2147483520.0f ? -2147483520.0f : r > 2147483520.0f ? 2147483520.0f : r;  /* keep the cast defined */
    b[i] = (int32_t)((uint32_t)b[i] - (uint32_t)(int32_t)r);
  } else {
    float *f = (float *)p->data;
    f[i] = f[i] - delta;
  }
}

/* w[t] = mt_floor_clamp8(r[t]) for t < 4. On the Cortex-M4, VCVTR under round-towards-minus-infinity (FPSCR RMode =
 * 0b10, set for these four conversions alone, in one asm block so that no other float operation runs under it) is
 * floor, saturating at the int32 range with NaN -> 0, then SSAT: the same int8 as mt_floor_clamp8 for every float. */
static inline void mt_floor_clamp8_4(const float *r, int8_t *w) {
#if MT_DSP
  float f0 = r[0], f1 = r[1], f2 = r[2], f3 = r[3];
  uint32_t sv, tmp;
  __asm__ volatile(
      "vmrs %[sv], fpscr\n\t"
      "bic %[tmp], %[sv], #0xC00000\n\t"
      "orr %[tmp], %[tmp], #0x800000\n\t"
      "vmsr fpscr, %[tmp]\n\t"
      "vcvtr.s32.f32 %[f0], %[f0]\n\t"
      "vcvtr.s32.f32 %[f1], %[f1]\n\t"
      "vcvtr.s32.f32 %[f2], %[f2]\n\t"
      "vcvtr.s32.f32 %[f3], %[f3]\n\t"
      "vmsr fpscr, %[sv]"
      : [f0] "+t"(f0), [f1] "+t"(f1), [f2] "+t"(f2), [f3] "+t"(f3), [sv] "=&r"(sv), [tmp] "=&r"(tmp));
  int32_t v0, v1, v2, v3;
  __builtin_memcpy(&v0, &f0, 4), __builtin_memcpy(&v1, &f1, 4), __builtin_memcpy(&v2, &f2, 4);
  __builtin_memcpy(&v3, &f3, 4);
  w[0] = (int8_t)mt_ssat(v0, 8), w[1] = (int8_t)mt_ssat(v1, 8), w[2] = (int8_t)mt_ssat(v2, 8);
  w[3] = (int8_t)mt_ssat(v3, 8);
#else
  for (int32_t t = 0; t < 4; t++) w[t] = mt_floor_clamp8(r[t]);
#endif
}

/* Elements i0 .. i0 + n - 1 of p, their gradients grad[0..n): n calls of mt_update_one. For plain SGD on int8 weights
 * within one QAS row (the fused weight-gradient loops' runs) the step's constants are loaded once (through
 * mt_update_one every int8 store may alias them, so each element reloaded about a dozen of them) and four results
 * are floored and clamped at a time. Same arithmetic. */
static inline void mt_update_run(const mt_step *s, const mt_param *p, int32_t i0, const float *grad, int32_t n) {
  const mt_optimizer *opt = s->opt;
  if (opt->optimizer != MT_SGD || p->dtype != MT_I8 || (p->qas && i0 / p->row != (i0 + n - 1) / p->row)) {
    for (int32_t t = 0; t < n; t++) mt_update_one(s, p, i0 + t, grad[t]);
    return;
  }
  const float lr = s->lr, *qas = p->qas ? p->qas + i0 / p->row : 0;
  const uint32_t base = mt_sr_base(opt->seed, s->step, p->stream);
  int8_t *w = (int8_t *)p->data + i0;
  int32_t t = 0;
  for (; t + 4 <= n; t += 4) {
    float r[4];
    for (int32_t e = 0; e < 4; e++) {
      const float g = qas ? grad[t + e] / *qas : grad[t + e];
      r[e] = (float)w[t + e] - lr * g + mt_sr_uniform_at(base, (uint32_t)(i0 + t + e));
    }
    mt_floor_clamp8_4(r, w + t);
  }
  for (; t < n; t++) {
    const float g = qas ? grad[t] / *qas : grad[t];
    w[t] = mt_floor_clamp8((float)w[t] - lr * g + mt_sr_uniform_at(base, (uint32_t)(i0 + t)));
  }
}

#endif
