"""The float32 constants that the op table's semantics derive from a graph's quantization parameters.

Both backends read them from here (the torch engine as tensors, the C generator as tables), so a multiplier or a
QAS divisor can never be computed two ways. Each is computed once, in float64 where the op table says so, and
rounded to float32.
"""

from __future__ import annotations

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
