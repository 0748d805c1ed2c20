/* fp32 head, gradient w.r.t. its int8 input: gx[c] = (sum_k g[k] * w[k, c]) * x.scale, each sum in the host BLAS's
 * order when it was measured (trees), else a chain of fused multiply-adds. */
#include "mt_runtime.h"

void mt_linear_grad_input(const float *g, const float *w, int32_t k, int32_t c, float x_scale, float *gx,
                          const mt_tree *trees) {
  for (int32_t i = 0; i < c; i++) {
    float acc = 0.0f;
    if (trees) {
      acc = mt_dot_tree(g, w + i, c, &trees[i]);
    } else {
      for (int32_t o = 0; o < k; o++) acc = mt_fma(g[o], w[o * c + i], acc);
    }
    gx[i] = acc * x_scale;
  }
}
