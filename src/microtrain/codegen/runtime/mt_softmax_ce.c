/* Softmax cross-entropy of one sample: loss = logsumexp(z) - z[label], grad = softmax(z) - onehot(label).
 * Same steps as torch's softmax kernel: max, exp(z - max) (SLEEF's expf), their sum in vec::reduce_all's order (fewer
 * than MT_SOFTMAX_LANES terms: in order; else lane-wise over vectors, the tail into the first lanes, then a butterfly
 * over the lanes), loss = -((z[label] - max) - log(sum)), softmax = e * (1 / sum). */
#include "mt_runtime.h"

static float reduce_all(const float *x, int32_t n) {
  if (n < MT_SOFTMAX_LANES) {
    float s = x[0];
    for (int32_t i = 1; i < n; i++) s = s + x[i];
    return s;
  }
  float acc[MT_SOFTMAX_LANES];
  int32_t d = MT_SOFTMAX_LANES;
  for (int32_t l = 0; l < MT_SOFTMAX_LANES; l++) acc[l] = x[l];
  for (; d + MT_SOFTMAX_LANES <= n; d += MT_SOFTMAX_LANES)
    for (int32_t l = 0; l < MT_SOFTMAX_LANES; l++) acc[l] = acc[l] + x[d + l];
  for (int32_t l = 0; d + l < n; l++) acc[l] = acc[l] + x[d + l];
  for (int32_t h = MT_SOFTMAX_LANES / 2; h >= 1; h /= 2) {
    float next[MT_SOFTMAX_LANES];
    for (int32_t l = 0; l < MT_SOFTMAX_LANES; l++) next[l] = acc[l] + acc[l ^ h];
    for (int32_t l = 0; l < MT_SOFTMAX_LANES; l++) acc[l] = next[l];
  }
  return acc[0];
}

float mt_softmax_ce(const float *z, int32_t k, int32_t label, float *grad) {
  float mx = z[0];
  for (int32_t i = 1; i < k; i++) mx = z[i] > mx ? z[i] : mx;
  for (int32_t i = 0; i < k; i++) grad[i] = mt_expf(z[i] - mx);
  const float sum = reduce_all(grad, k);
  const float inv = 1.0f / sum;
  for (int32_t i = 0; i < k; i++) grad[i] = grad[i] * inv - (i == label ? 1.0f : 0.0f);
  return -((z[label] - mx) - mt_logf(sum));
}
