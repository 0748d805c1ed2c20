/* mt_floor_clamp8_4 (four conversions under round-towards-minus-infinity on the Cortex-M4) and mt_floor_clamp8
 * against an independent reference, clamp8(floor(r)) with NaN -> 0 through newlib's floorf, on every float bit
 * pattern in steps of STRIDE (-DSTRIDE=1: all 2^32) plus the edges. Prints "checked N mismatches M". */
#include <math.h>
#include <string.h>

#include "mt_io.h"
#include "mt_runtime.h"

#ifndef STRIDE
#define STRIDE 4093u  /* a prime: every exponent, both signs, varied mantissas */
#endif

static int8_t reference(float r) {
  if (r != r) return 0;
  const float f = floorf(r);
  return (int8_t)(f < -128.0f ? -128 : f > 127.0f ? 127 : (int32_t)f);
}

/* "<label><n>" into the console (no stdio: the harness links no heap). */
static void put(const char *label, uint64_t n) {
  char buf[32];
  int32_t i = 31;
  buf[i] = 0;
  do buf[--i] = (char)('0' + n % 10), n /= 10;
  while (n);
  io_print(label);
  io_print(buf + i);
}

static float from_bits(uint32_t b) {
  float f;
  memcpy(&f, &b, 4);
  return f;
}

int harness_main(int argc, char **argv) {
  (void)argc, (void)argv;
  static const float edges[] = {0.0f, -0.0f, 0.5f, -0.5f, 1.0f, -1.0f, 126.99999f, 127.0f, 127.5f, 128.0f, -128.0f,
                                -128.00002f, -128.5f, -129.0f, 255.99998f, 256.0f, -256.0f, -255.99998f, 1e9f, -1e9f,
                                2147483648.0f, -2147483648.0f, 1e-45f, -1e-45f, INFINITY, -INFINITY, NAN, -NAN};
  uint64_t checked = 0, bad = 0;
  float r[4];
  int32_t k = 0;
  const size_t ne = sizeof edges / sizeof edges[0];
  for (uint64_t i = 0;; i++) {
    float v;
    if (i < ne) v = edges[i];
    else {
      const uint64_t b = (i - ne) * (uint64_t)STRIDE;
      if (b > 0xFFFFFFFFu) break;
      v = from_bits((uint32_t)b);
    }
    r[k++] = v;
    if (k < 4) continue;
    int8_t w[4];
    mt_floor_clamp8_4(r, w);
    for (int32_t t = 0; t < 4; t++) {
      const int8_t want = reference(r[t]);
      if (w[t] != want || mt_floor_clamp8(r[t]) != want) {
        if (bad < 8) {
          uint32_t b;
          memcpy(&b, &r[t], 4);
          put("mismatch bits ", b), put(" fast+128 ", (uint64_t)(w[t] + 128));
          put(" scalar+128 ", (uint64_t)(mt_floor_clamp8(r[t]) + 128)), put(" want+128 ", (uint64_t)(want + 128));
          io_print("\n");
        }
        bad++;
      }
    }
    checked += 4;
    k = 0;
  }
  put("checked ", checked), put(" mismatches ", bad), io_print("\n");
  return bad != 0;
}
