/* The parameter update, one element at a time: QAS, the optimizer, and the storage rounding.
 *   g = grad / qas[row]              (QAS: divide by the squared per-channel scale; no QAS: qas = NULL)
 *   sgd:   delta = lr * g
 *   sgd-m: m = m * momentum + g; delta = lr * m
 *   adam:  m = fma(1 - b1, g, m * b1); v = fma((1 - b2) * g, g, v * b2)   (torch's fused add_ / addcmul_)
 *          delta = lr * (m / bc1) / (sqrt(v / bc2) + eps)
 *   int8:  p = clamp8(floor(p - delta + u)), u = the counter hash of (seed, step, stream, element)
 *   int32: p = p - rint(delta);   float32: p = p - delta */
#include <math.h>

#include "mt_runtime.h"

/* n uniforms in [0, 1) from a counter hash; identical to runtime/trainstep.py:sr_uniform. */
float mt_sr_uniform(uint32_t seed, uint32_t step, uint32_t stream, uint32_t index) {
  uint32_t x = index * 0x9E3779B1u + (step * 0x85EBCA77u + stream * 0xC2B2AE3Du + seed * 0x27D4EB2Fu);
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return (float)(x >> 8) * (1.0f / 16777216.0f);
}

void mt_update_element(const mt_step *s, const mt_param *p, int32_t i, float grad) {
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
    delta = s->lr * (p->m[i] / s->bc1) / (sqrtf(p->v[i] / s->bc2) + opt->eps);
  }
  if (p->dtype == MT_I8) {
    int8_t *w = (int8_t *)p->data;
    const float u = mt_sr_uniform(opt->seed, s->step, p->stream, (uint32_t)i);
    const float r = floorf((float)w[i] - delta + u);
    w[i] = mt_clamp8(r);
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

void mt_apply_update(const mt_step *s, const mt_param *p, const float *grad) {
  for (int32_t i = 0; i < p->n; i++) mt_update_element(s, p, i, grad[i]);
}
