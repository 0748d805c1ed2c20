/* The fp32 head: logits[k] = sum_c w[k, c] * f[c] + b[k] with f[c] = float(x[c] - x.zero) * x.scale, each sum in
 * the host BLAS's order when it was measured (trees), else a chain of fused multiply-adds. */
#include "mt_runtime.h"

void mt_linear(const int8_t *x, int32_t c, int32_t x_zero, float x_scale, const float *w, const float *b,
               int32_t k, float *logits, const mt_tree *trees) {
  for (int32_t o = 0; o < k; o++) {
    float acc = 0.0f;
    if (trees) {
      acc = mt_dot_tree_q8(x, x_zero, x_scale, w + o * c, 1, &trees[o]);
    } else {
      for (int32_t i = 0; i < c; i++) acc = mt_fma((float)((int32_t)x[i] - x_zero) * x_scale, w[o * c + i], acc);
    }
    logits[o] = acc + b[o];
  }
}
