/* TensorFlow Lite's int8 arithmetic for graphs whose requantization rule is "tflite-fixed-point" (Requant.TFLITE,
 * ir/ops.py): imported .tflite models compute on the device what TFLite Micro computes. Portable C: int64 products
 * (one SMULL on a Cortex-M), no float. The same integers as runtime/kernels.py and ir/quant.py (the torch engine). */
#ifndef MT_TFLITE_H
#define MT_TFLITE_H

#include "mt_runtime.h"

/* gemmlowp SaturatingRoundingDoublingHighMul: (a * b + nudge) / 2^31 truncated toward zero, nudge = 2^30 when
 * a * b >= 0 else 1 - 2^30; INT32_MIN * INT32_MIN saturates. */
static inline int32_t mt_srdhm(int32_t a, int32_t b) {
  if (a == INT32_MIN && b == INT32_MIN) return INT32_MAX;
  const int64_t ab = (int64_t)a * (int64_t)b;
  const int64_t nudge = ab >= 0 ? ((int64_t)1 << 30) : (1 - ((int64_t)1 << 30));
  return (int32_t)((ab + nudge) / ((int64_t)1 << 31));
}

/* gemmlowp RoundingDivideByPOT: x / 2^e rounded to nearest, ties away from zero (arithmetic shift right). */
static inline int32_t mt_rdbpot(int32_t x, int32_t e) {
  const int32_t mask = (int32_t)((1u << e) - 1u), rem = x & mask, thr = (mask >> 1) + (x < 0);
  return (x >> e) + (rem > thr);
}

/* TFLite MultiplyByQuantizedMultiplier(x, q, shift): x * q * 2^(shift - 31), TFLite's double rounding. */
static inline int32_t mt_mbqm(int32_t x, int32_t q, int32_t shift) {
  const int32_t left = shift > 0 ? shift : 0, right = shift > 0 ? 0 : -shift;
  return mt_rdbpot(mt_srdhm((int32_t)((uint32_t)x << left), q), right);
}

/* clamp(v, lo, hi) as int8; *inside = v lies in [lo, hi] (the mask bit of a fused activation's clamp). */
static inline int8_t mt_clamp_act(int32_t v, int32_t lo, int32_t hi, uint32_t *inside) {
  *inside = v >= lo && v <= hi;
  return (int8_t)(v < lo ? lo : v > hi ? hi : v);
}

/* conv2d / depthwise conv2d of descriptor p (weights in two parts, bias, stride, pad_top/pad_left, zero points; its
 * float32 `mult` is the backward's) with the fixed-point rule: y = clamp(MBQM(acc + b[o], qmult[o], qshift[o]) +
 * y_zero, act_min, act_max). Taps outside x are skipped (zero padding in real terms; the bottom/right padding is
 * whatever yd implies). Depthwise in place (scratch != NULL): as mt_depthwise_conv2d. */
void mt_conv2d_tfl(const int8_t *x, mt_dims xd, const mt_conv *p, const int32_t *qmult, const int32_t *qshift,
                   int32_t act_min, int32_t act_max, int8_t *y, mt_dims yd, uint8_t *mask, int32_t depthwise,
                   int8_t *scratch);
/* TFLite's int8 ADD: va = MBQM((a - a_zero) << 20, qa, sa), vb likewise, y = clamp(MBQM(va + vb, qy, sy) + y_zero). */
void mt_add_tfl(const int8_t *a, mt_dims ad, int32_t a_zero, int32_t qa, int32_t sa, const int8_t *b, mt_dims bd,
                int32_t b_zero, int32_t qb, int32_t sb, int8_t *y, mt_dims yd, int32_t y_zero, int32_t qy, int32_t sy,
                int32_t act_min, int32_t act_max, uint8_t *mask);
/* Global AVERAGE_POOL_2D: s = sum x[c]; y[c] = clamp(s > 0 ? (s + n/2) / n : (s - n/2) / n), n = hw. */
void mt_avgpool_tfl(const int8_t *x, int32_t c, int32_t hw, int32_t act_min, int32_t act_max, int8_t *y);
/* MEAN over H, W: y[c] = clamp(MBQM(sum x[c] - x_zero * hw, q, shift) + y_zero) with the division folded into q. */
void mt_mean_tfl(const int8_t *x, int32_t c, int32_t hw, int32_t x_zero, int32_t q, int32_t shift, int32_t y_zero,
                 int32_t act_min, int32_t act_max, int8_t *y);

#endif
