/* TFLite's flatten of a map for a FULLY_CONNECTED (ir/ops.py flatten): CHW -> NHWC order. */
#include "mt_pool.h"

void mt_flatten(const int8_t *x, int32_t c, int32_t hw, int8_t *y) {
  for (int32_t ch = 0; ch < c; ch++)
    for (int32_t i = 0; i < hw; i++) y[i * c + ch] = x[ch * hw + i];
}
