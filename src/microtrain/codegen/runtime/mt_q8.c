/* The host's per-channel quantizer of qint8 gradients (runtime/trainstep.py: quantize_per_channel): one channel
 * v[n] becomes s = max|v| / 127 (1 when that is 0) and q[i] = clamp(rint(v[i] / s), -127, 127). */
#include "mt_runtime.h"

float mt_q8_quantize(const float *v, int32_t n, int8_t *q) {
  float m = 0.0f;
  for (int32_t i = 0; i < n; i++) m = mt_absmax(m, v[i]);
  const float s = mt_q8_scale(m);
  for (int32_t i = 0; i < n; i++) q[i] = mt_q8(v[i], s);
  return s;
}

/* In place: v[n] becomes the values its qint8 channel holds, q[i] * s (the channel-serial block backward keeps a
 * qint8 gradient's channel as these float32 values). */
void mt_q8_round(float *v, int32_t n) {
  float m = 0.0f;
  for (int32_t i = 0; i < n; i++) m = mt_absmax(m, v[i]);
  const float s = mt_q8_scale(m);
  for (int32_t i = 0; i < n; i++) v[i] = (float)mt_q8(v[i], s) * s;
}
