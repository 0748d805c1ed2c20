/* Global average pool: y[c] = clamp8(rint(float(sum x[c]) / float(H * W))), same scale and zero point. */
#include "mt_runtime.h"

void mt_avgpool(const int8_t *x, int32_t c, int32_t hw, int8_t *y) {
  for (int32_t i = 0; i < c; i++) {
    int32_t s = 0;
    for (int32_t j = 0; j < hw; j++) s += x[i * hw + j];
    y[i] = mt_clamp8(mt_rint((float)s / (float)hw));
  }
}
