/* The parameter update, one element at a time: QAS, the optimizer, and the storage rounding.
 *   g = grad / qas[row]              (QAS: divide by the squared per-channel scale; no QAS: qas = NULL)
 *   sgd:   delta = lr * g
 *   sgd-m: m = m * momentum + g; delta = lr * m
 *   adam:  m = fma(1 - b1, g, m * b1); v = fma((1 - b2) * g, g, v * b2)   (torch's fused add_ / addcmul_)
 *          delta = lr * (m / bc1) / (sqrt(v / bc2) + eps)
 *   int8:  p = clamp8(floor(p - delta + u)), u = the counter hash of (seed, step, stream, element)
 *   int32: p = p - rint(delta);   float32: p = p - delta */
#include "mt_runtime.h"

/* n uniforms in [0, 1) from a counter hash; identical to runtime/trainstep.py:sr_uniform. */
float mt_sr_uniform(uint32_t seed, uint32_t step, uint32_t stream, uint32_t index) {
  return mt_sr_uniform_inline(seed, step, stream, index);
}

void mt_update_element(const mt_step *s, const mt_param *p, int32_t i, float grad) { mt_update_one(s, p, i, grad); }

void mt_apply_update(const mt_step *s, const mt_param *p, const float *grad) {
  for (int32_t i = 0; i < p->n; i++) mt_update_one(s, p, i, grad[i]);
}
