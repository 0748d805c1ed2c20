/* The runtime's own exp, log, integer power and sum: fixed sequences of IEEE float32 (and, for mt_powi, float64)
 * operations, so their results depend on nothing but the arguments: the host twin and the Cortex-M4 agree bit for
 * bit whatever C library either links (src/microtrain/ir/ops.py states them). */
#include "mt_runtime.h"

static float pow2i(int32_t e) {  /* 2^e for -126 <= e <= 127 */
  union { uint32_t u; float f; } v = {(uint32_t)(e + 127) << 23};
  return v.f;
}

/* exp: q = rint(d * log2(e)), s = d - q * ln2 in two fused steps (Cody-Waite), a degree-6 polynomial in s by fused
 * multiply-adds, scaled by 2^q in two halves (so 2^q may leave float's exponent range only at the very end). */
float mt_expf(float d) {
  const float q = mt_rint(d * 1.442695040888963407359924681001892137f);
  const int32_t qi = (int32_t)q;
  float s = mt_fma(q, -0.693145751953125f, d);
  s = mt_fma(q, -1.428606765330187045e-06f, s);
  float u = 0.000198527617612853646278381f;
  u = mt_fma(u, s, 0.00139304355252534151077271f);
  u = mt_fma(u, s, 0.00833336077630519866943359f);
  u = mt_fma(u, s, 0.0416664853692054748535156f);
  u = mt_fma(u, s, 0.166666671633720397949219f);
  u = mt_fma(u, s, 0.5f);
  u = 1.0f + mt_fma(s * s, u, s);
  if (d < -104.0f) return 0.0f;
  if (d > 100.0f) return __builtin_inff();
  return u * pow2i(qi >> 1) * pow2i(qi - (qi >> 1));
}

/* log for x > 0 (the loss value only): x = 2^e * m with m in [sqrt(1/2), sqrt(2)), f = m - 1, then
 * log(1 + f) = f - f^2/2 + f^3 * P(f) (a degree-8 minimax polynomial, Horner, no fused operations) and e * ln2 added
 * in two parts. Non-positive or non-finite x: -inf, NaN or +inf as IEEE log would give. */
float mt_logf(float x) {
  if (!(x > 0.0f)) return x == 0.0f ? -__builtin_inff() : __builtin_nanf("");
  if (x == __builtin_inff()) return x;
  union { float f; uint32_t u; } v = {x};
  int32_t e = 0;
  if (v.u < 0x00800000u) {  /* subnormal: scale into the normal range first */
    v.f = x * 16777216.0f;
    e = -24;
  }
  e += (int32_t)(v.u >> 23) - 126;
  v.u = (v.u & 0x007FFFFFu) | 0x3F000000u;  /* m in [0.5, 1) */
  float m = v.f;
  if (m < 0.707106781186547524f) {
    e -= 1;
    m = m + m - 1.0f;
  } else {
    m = m - 1.0f;
  }
  const float z = m * m;
  float p = 7.0376836292e-2f;
  p = p * m + -1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m + -1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m + -1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m + -2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  float y = p * m * z;
  const float fe = (float)e;
  y = y + fe * -2.12194440e-4f;
  y = y + -0.5f * z;
  return (m + y) + fe * 0.693359375f;
}

/* b^n by squaring (float64 multiplications in a fixed order): Adam's bias corrections 1 - beta^step. */
double mt_powi(double b, uint32_t n) {
  double r = 1.0;
  while (n) {
    if (n & 1u) r = r * b;
    b = b * b;
    n >>= 1;
  }
  return r;
}

/* sum_i x[i]: one chain of float32 additions in index order, from 0. */
float mt_sum(const float *x, int32_t n) {
  float s = 0.0f;
  for (int32_t i = 0; i < n; i++) s = s + x[i];
  return s;
}
