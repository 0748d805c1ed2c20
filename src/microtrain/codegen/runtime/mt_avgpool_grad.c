/* Global average pool backward: gx[c, h, w] = g[c] / float(H * W). */
#include "mt_runtime.h"

void mt_avgpool_grad(const float *g, int32_t c, int32_t hw, float *gx) {
  for (int32_t i = 0; i < c; i++) {
    const float v = g[i] / (float)hw;
    for (int32_t j = 0; j < hw; j++) gx[i * hw + j] = v;
  }
}
