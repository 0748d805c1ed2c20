/* exp as torch's softmax computes it (SLEEF's expf, 1-ulp variant with fused multiply-adds: sleefsimdsp.c xexpf),
 * so that the softmax gradient is the host's bit for bit; log through double precision (the loss value only).
 * Neither depends on the C library, so the host and the Cortex-M4 builds agree bit for bit. */
#include <math.h>

#include "mt_runtime.h"

static float pow2i(int32_t e) {  /* 2^e for -126 <= e <= 127 */
  union { uint32_t u; float f; } v = {(uint32_t)(e + 127) << 23};
  return v.f;
}

float mt_expf(float d) {
  const float q = mt_rint(d * 1.442695040888963407359924681001892137f);
  const int32_t qi = (int32_t)q;
  float s = mt_fma(q, -0.693145751953125f, d);
  s = mt_fma(q, -1.428606765330187045e-06f, s);
  float u = 0.000198527617612853646278381f;
  u = mt_fma(u, s, 0.00139304355252534151077271f);
  u = mt_fma(u, s, 0.00833336077630519866943359f);
  u = mt_fma(u, s, 0.0416664853692054748535156f);
  u = mt_fma(u, s, 0.166666671633720397949219f);
  u = mt_fma(u, s, 0.5f);
  u = 1.0f + mt_fma(s * s, u, s);
  if (d < -104.0f) return 0.0f;
  if (d > 100.0f) return INFINITY;
  return u * pow2i(qi >> 1) * pow2i(qi - (qi >> 1));
}

float mt_logf(float x) { return (float)log((double)x); }

/* torch's float32 sum of a contiguous row (aten/src/ATen/native/cpu/SumKernel.cpp, cascade_sum): rows of at least
 * MT_SUM_LANES elements are summed as MT_SUM_LANES-wide vectors, shorter ones element by element; either way in 4
 * interleaved accumulators, each a cascade of 4 levels that flushes every 2^p additions. Same order, same bits.
 * row_sum: `size` items of `w` lanes each (item i = x[i * w .. i * w + w - 1]), result per lane. */
static void row_sum(const float *x, int32_t size, int32_t w, float *out) {
  float acc[4][4][MT_SUM_LANES] = {{{0}}};  /* [level][accumulator][lane] */
  const int32_t rows = size / 4;
  int32_t p = 0;
  for (uint32_t v = rows > 2 ? (uint32_t)rows - 1 : 1; v; v >>= 1) p++;  /* CeilLog2 (1 for rows <= 2) */
  p = p / 4 > 4 ? p / 4 : 4;
  const int32_t step = 1 << p, mask = step - 1;
  int32_t i = 0;
  while (i + step <= rows) {
    for (int32_t j = 0; j < step; j++, i++)
      for (int32_t k = 0; k < 4; k++)
        for (int32_t l = 0; l < w; l++) acc[0][k][l] += x[(i * 4 + k) * w + l];
    for (int32_t j = 1; j < 4; j++) {
      for (int32_t k = 0; k < 4; k++)
        for (int32_t l = 0; l < w; l++) {
          acc[j][k][l] += acc[j - 1][k][l];
          acc[j - 1][k][l] = 0.0f;
        }
      if (i & (mask << (j * p))) break;
    }
  }
  for (; i < rows; i++)
    for (int32_t k = 0; k < 4; k++)
      for (int32_t l = 0; l < w; l++) acc[0][k][l] += x[(i * 4 + k) * w + l];
  for (int32_t j = 1; j < 4; j++)
    for (int32_t k = 0; k < 4; k++)
      for (int32_t l = 0; l < w; l++) acc[0][k][l] += acc[j][k][l];
  for (i = rows * 4; i < size; i++)
    for (int32_t l = 0; l < w; l++) acc[0][0][l] += x[i * w + l];
  for (int32_t k = 1; k < 4; k++)
    for (int32_t l = 0; l < w; l++) acc[0][0][l] += acc[0][k][l];
  for (int32_t l = 0; l < w; l++) out[l] = acc[0][0][l];
}

float mt_sum(const float *x, int32_t n) {
  float s;
  if (n >= MT_SUM_LANES) {  /* vectorized_inner_sum: whole vectors, then the tail, then the lanes */
    float lanes[MT_SUM_LANES];
    const int32_t nv = n / MT_SUM_LANES;
    row_sum(x, nv, MT_SUM_LANES, lanes);
    s = 0.0f;
    for (int32_t i = nv * MT_SUM_LANES; i < n; i++) s += x[i];
    for (int32_t l = 0; l < MT_SUM_LANES; l++) s += lanes[l];
  } else {  /* scalar_inner_sum */
    row_sum(x, n, 1, &s);
  }
  return 0.0f + s;  /* the output starts at zero and accumulates the row's sum */
}
