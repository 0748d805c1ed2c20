/* Residual add: y = clamp8(rint(float(a - a.zero) * ra + float(b - b.zero) * rb) + y.zero); two products, then one
 * sum (never fused). Element-wise, so y may share a's or b's buffer (each element is read before it is written). */
#include "mt_runtime.h"

void mt_add(const int8_t *a, mt_dims ad, int32_t a_zero, float ra, const int8_t *b, mt_dims bd, int32_t b_zero,
            float rb, int8_t *y, mt_dims yd, int32_t y_zero, uint8_t *mask) {
  for (int32_t c = 0; c < yd.c; c++) {
    for (int32_t r = 0; r < yd.h; r++) {
      for (int32_t x = 0; x < yd.w; x++) {
        const float fa = (float)((int32_t)a[c * ad.cs + r * ad.rs + x] - a_zero) * ra;
        const float fb = (float)((int32_t)b[c * bd.cs + r * bd.rs + x] - b_zero) * rb;
        const float v = mt_rint(fa + fb) + (float)y_zero;
        if (mask) mt_mask_set(mask, (c * yd.h + r) * yd.w + x, v >= -128.0f && v <= 127.0f);
        y[c * yd.cs + r * yd.rs + x] = mt_clamp8(v);
      }
    }
  }
}
