/* Softmax cross-entropy of one sample (ir/ops.py softmax_ce): m = max z; e[i] = mt_expf(z[i] - m);
 * s = e[0] + e[1] + ... in index order; grad[i] = e[i] * (1 / s) - [i == label]; loss = -((z[label] - m) - mt_logf(s)). */
#include "mt_runtime.h"

float mt_softmax_ce(const float *z, int32_t k, int32_t label, float *grad) {
  float mx = z[0];
  for (int32_t i = 1; i < k; i++) mx = z[i] > mx ? z[i] : mx;
  for (int32_t i = 0; i < k; i++) grad[i] = mt_expf(z[i] - mx);
  float sum = grad[0];
  for (int32_t i = 1; i < k; i++) sum = sum + grad[i];
  const float inv = 1.0f / sum;
  for (int32_t i = 0; i < k; i++) grad[i] = grad[i] * inv - (i == label ? 1.0f : 0.0f);
  return -((z[label] - mx) - mt_logf(sum));
}
