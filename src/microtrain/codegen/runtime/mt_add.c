/* Residual add: y = clamp8(rint(float(a - a.zero) * ra + float(b - b.zero) * rb) + y.zero); two products, then one
 * sum (never fused). Element-wise, so y may share a's or b's buffer (each element is read before it is written). */
#include "mt_runtime.h"

/* One element: rint(fa + fb) through VCVTR (mt_rint_i32 saturates beyond 2^16, far outside int8 after the zero
 * point, so the clamp and the mask bit are rint's), plus the zero point, clamped; *inside = the mask bit. */
static inline int8_t add_one(int32_t xa, int32_t xb, int32_t a_zero, float ra, int32_t b_zero, float rb, int32_t y_zero,
                             uint32_t *inside) {
  const float fa = (float)(xa - a_zero) * ra, fb = (float)(xb - b_zero) * rb;
  const int32_t r = mt_qadd(mt_rint_i32(fa + fb), y_zero);
  *inside = (uint32_t)r + 128u < 256u;
  return (int8_t)mt_ssat(r, 8);
}

void mt_add(const int8_t *a, mt_dims ad, int32_t a_zero, float ra, const int8_t *b, mt_dims bd, int32_t b_zero,
            float rb, int8_t *y, mt_dims yd, int32_t y_zero, uint8_t *mask) {
  const int32_t n = yd.c * yd.h * yd.w;
  uint32_t in;
  if (ad.cs == yd.h * yd.w && ad.rs == yd.w && bd.cs == ad.cs && bd.rs == ad.rs && yd.cs == ad.cs && yd.rs == ad.rs) {
    int32_t i = 0;  /* all three compact: one run, the mask a byte at a time */
    if (mask)
      for (; i + 8 <= n; i += 8) {
        uint32_t bits = 0;
        for (int32_t t = 0; t < 8; t++) {
          y[i + t] = add_one(a[i + t], b[i + t], a_zero, ra, b_zero, rb, y_zero, &in);
          bits |= in << t;
        }
        mt_mask_put(mask, i, bits, 8);
      }
    for (; i < n; i++) {
      y[i] = add_one(a[i], b[i], a_zero, ra, b_zero, rb, y_zero, &in);
      if (mask) mt_mask_set(mask, i, (int)in);
    }
    return;
  }
  for (int32_t c = 0; c < yd.c; c++) {
    for (int32_t r = 0; r < yd.h; r++) {
      for (int32_t x = 0; x < yd.w; x++) {
        y[c * yd.cs + r * yd.rs + x] = add_one(a[c * ad.cs + r * ad.rs + x], b[c * bd.cs + r * bd.rs + x], a_zero, ra,
                                               b_zero, rb, y_zero, &in);
        if (mask) mt_mask_set(mask, (c * yd.h + r) * yd.w + x, (int)in);
      }
    }
  }
}
