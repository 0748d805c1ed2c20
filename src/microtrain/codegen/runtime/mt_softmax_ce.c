/* Softmax cross-entropy of one sample: loss = logsumexp(z) - z[label], grad = softmax(z) - onehot(label).
 * Same steps as torch: max, exp(z - max), their sum, loss = -((z[label] - max) - log(sum)), softmax = e * (1 / sum). */
#include "mt_runtime.h"

float mt_softmax_ce(const float *z, int32_t k, int32_t label, float *grad) {
  float mx = z[0];
  for (int32_t i = 1; i < k; i++) mx = z[i] > mx ? z[i] : mx;
  for (int32_t i = 0; i < k; i++) grad[i] = mt_expf(z[i] - mx);
  const float sum = mt_sum(grad, k);
  const float inv = 1.0f / sum;
  for (int32_t i = 0; i < k; i++) grad[i] = grad[i] * inv - (i == label ? 1.0f : 0.0f);
  return -((z[label] - mx) - mt_logf(sum));
}
