"""The float32 constants that the op table's semantics derive from a graph's quantization parameters.

Both backends read them from here (the torch engine as tensors, the C generator as tables), so a multiplier or a
QAS divisor can never be computed two ways. Each is computed once, in float64 where the op table says so, and
rounded to float32.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np


def requant_multiplier(x_scale: float, w_scale: np.ndarray, y_scale: float) -> np.ndarray:
    """m[o] = float32(x.scale * w.scale[o] / y.scale), evaluated in float64 (conv2d / int8 linear)."""
    return (float(x_scale) * np.asarray(w_scale, np.float64) / float(y_scale)).astype(np.float32)


def add_ratios(a_scale: float, b_scale: float, y_scale: float) -> tuple[float, float]:
    """float32 multipliers of the int8 add: float32(a.scale / y.scale), float32(b.scale / y.scale)."""
    return float(np.float32(a_scale / y_scale)), float(np.float32(b_scale / y_scale))


def qas_divisor(w_scale: np.ndarray, rows: int, x_scale: float | None = None) -> np.ndarray:
    """QAS divisor of the first `rows` output channels: s[o]^2 with s = float32(w.scale[o]) for a weight, and
    s = float32(w.scale[o]) * float32(x.scale) (one float32 product) for a bias; then s * s in float32."""
    s = np.asarray(w_scale, np.float32)[:rows]
    if x_scale is not None:
        s = s * np.float32(x_scale)
    return (s * s).astype(np.float32)


# ---- the requantization rule of a graph (`Graph.requant`) ------------------------------------------------------------
class Requant(StrEnum):
    """How an int32 accumulator becomes int8, stated in `ir/ops.py`:

    FLOAT32: the zoo models' rule, `clamp8(rint(float32(acc) * m) + y.zero)` with a float32 multiplier.
    TFLITE:  TensorFlow Lite (Micro)'s rule, `clamp(MBQM(acc, q, shift) + y.zero, act_min, act_max)` with an int32
             fixed-point multiplier q and a power-of-two shift (gemmlowp's SaturatingRoundingDoublingHighMul then
             RoundingDivideByPOT, `multiply_by_quantized_multiplier`); the int8 add and the average pool follow
             TFLite's reference kernels too (`tflite_add`, `tflite_avgpool`).
    """

    FLOAT32 = "float32-multiplier"
    TFLITE = "tflite-fixed-point"


INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


def quantize_multiplier(m: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """TFLite's QuantizeMultiplier of real multipliers m >= 0 (float64): m = q * 2^(shift - 31) with q an int32 in
    [2^30, 2^31) (q = round-half-away(frac * 2^31) of frexp(m); 2^31 becomes 2^30 with shift + 1); m = 0 gives
    (0, 0); a shift below -31 gives (0, 0) as TFLite does."""
    m = np.atleast_1d(np.asarray(m, np.float64))
    if not (np.isfinite(m).all() and (m >= 0).all()):
        raise ValueError("requantization multipliers must be finite and non-negative")
    frac, exp = np.frexp(m)
    q = np.floor(frac * float(1 << 31) + 0.5).astype(np.int64)  # std::round of a positive value
    over = q == (1 << 31)
    q[over] //= 2
    exp = exp + over
    zero = (m == 0) | (exp < -31)
    q[zero], exp[zero] = 0, 0
    if (exp > 30).any():
        raise ValueError("requantization multiplier too large (shift above 30)")
    return q.astype(np.int32), exp.astype(np.int32)


def conv_fixed_point(x_scale: float, w_scale: np.ndarray, y_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(q[o], shift[o]) of a conv / fully-connected op: QuantizeMultiplier(double(x.scale) * double(w.scale[o]) /
    double(y.scale)), the scales as the float32 values the model stores (TFLite's PopulateConvolutionQuantization
    Params)."""
    s = np.float64(np.float32(x_scale)) * np.asarray(w_scale, np.float32).astype(np.float64)
    return quantize_multiplier(s / np.float64(np.float32(y_scale)))


ADD_LEFT_SHIFT = 20


def add_fixed_point(a_scale: float, b_scale: float, y_scale: float) -> tuple[int, int, int, int, int, int]:
    """(qa, sa, qb, sb, qy, sy) of TFLite's int8 ADD: twice = 2 * max(a.scale, b.scale); a and b are scaled by
    a.scale / twice and b.scale / twice after a left shift of 20, the sum by twice / (2^20 * y.scale)."""
    a, b, y = (np.float64(np.float32(v)) for v in (a_scale, b_scale, y_scale))
    twice = 2.0 * max(a, b)
    (qa,), (sa,) = quantize_multiplier(a / twice)
    (qb,), (sb,) = quantize_multiplier(b / twice)
    (qy,), (sy,) = quantize_multiplier(twice / (float(1 << ADD_LEFT_SHIFT) * y))
    return int(qa), int(sa), int(qb), int(sb), int(qy), int(sy)


def srdhm(a: np.ndarray, b: np.ndarray | int) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul on int32 values held in int64 arrays: (a*b + nudge) / 2^31
    truncated toward zero, nudge = 2^30 for a*b >= 0 else 1 - 2^30; INT32_MIN * INT32_MIN saturates."""
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    ab = a * b
    t = ab + np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    r = np.where(t >= 0, t >> 31, -((-t) >> 31))
    return np.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, r)


def rdbpot(x: np.ndarray, exponent: np.ndarray | int) -> np.ndarray:
    """gemmlowp RoundingDivideByPOT: x / 2^e rounded to nearest, ties away from zero."""
    x = np.asarray(x, np.int64)
    e = np.asarray(exponent, np.int64)
    mask = (np.int64(1) << e) - 1
    rem = x & mask
    thr = (mask >> 1) + (x < 0)
    return (x >> e) + (rem > thr)


def multiply_by_quantized_multiplier(x: np.ndarray, q: np.ndarray | int, shift: np.ndarray | int) -> np.ndarray:
    """TFLite's MultiplyByQuantizedMultiplier (double rounding): rdbpot(srdhm(x * 2^max(shift, 0), q),
    max(-shift, 0)); x * 2^left wraps as int32 like the C code's unsigned multiply."""
    shift = np.asarray(shift, np.int64)
    left = np.maximum(shift, 0)
    xs = np.asarray(x, np.int64) << left
    xs = ((xs + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)  # int32 wrap-around
    return rdbpot(srdhm(xs, q), np.maximum(-shift, 0))


def mean_fixed_point(x_scale: float, y_scale: float, n: int) -> tuple[int, int]:
    """(q', shift') of TFLite's int8 MEAN over n elements: (q, s) = QuantizeMultiplier(x.scale / y.scale), then the
    division folded in: k = min(bit_length(n) - 1, 32, 31 + s), q' = (q << k) // n, shift' = s - k."""
    (q,), (s,) = quantize_multiplier(np.float64(np.float32(x_scale)) / np.float64(np.float32(y_scale)))
    k = min(int(n).bit_length() - 1, 32, 31 + int(s))
    return (int(q) << k) // int(n), int(s) - k
