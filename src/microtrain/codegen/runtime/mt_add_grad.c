/* Residual add backward: gm = g * mask, ga = gm * ra, gb = gm * rb (either output may be NULL). Per element, and
 * each g[i] is read before ga[i] / gb[i] is written, so either output may share g's buffer. */
#include "mt_runtime.h"

void mt_add_grad(const float *g, const uint8_t *mask, int32_t n, float ra, float rb, float *ga, float *gb) {
  for (int32_t i = 0; i < n; i++) {
    const float gm = g[i] * (float)mt_mask_get(mask, i);
    if (ga) ga[i] = gm * ra;
    if (gb) gb[i] = gm * rb;
  }
}
