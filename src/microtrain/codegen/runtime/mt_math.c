/* exp and log through double precision: the float32 result is the correctly rounded one (up to a double rounding
 * that practically never happens), so the host and the Cortex-M4 builds agree bit for bit whatever their libm. */
#include <math.h>

#include "mt_runtime.h"

float mt_expf(float x) { return (float)exp((double)x); }
float mt_logf(float x) { return (float)log((double)x); }

/* Sequential float32 sum (the order of torch's reduction of a short row). */
float mt_sum(const float *x, int32_t n) {
  float s = 0.0f;
  for (int32_t i = 0; i < n; i++) s += x[i];
  return s;
}
