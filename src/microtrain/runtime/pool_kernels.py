"""Windowed pooling on torch CPU, batched: maxpool2d / avgpool2d of `ir/ops.py` and their gradients.

Kept apart from `kernels.py` (the convolution and requantization kernels). The forward is integer-exact under both
requantization rules; the gradients are float32 sums whose order torch chooses (the C runtime's order is the one
stated in ir/ops.py; with non-overlapping windows every element has one term, so both agree exactly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from microtrain.ir.ops import pool_pads

NOT_A_TAP = -1.0e9  # below any int8 value (and any float relaxation of one): a padded position never wins a max


def _windows(x: torch.Tensor, attrs: dict, fill: float) -> tuple[torch.Tensor, tuple[int, int]]:
    """x [N,C,H,W] -> its windows [N, C, kh*kw, Ho*Wo] (float32, padded positions = fill), and (Ho, Wo)."""
    t, b, left, r = pool_pads(attrs)
    kh, kw, s = attrs["pool_h"], attrs["pool_w"], attrs["stride"]
    n, c, h, w = x.shape
    xp = F.pad(x.to(torch.float32), (left, r, t, b), value=fill)
    ho, wo = (h + t + b - kh) // s + 1, (w + left + r - kw) // s + 1
    cols = F.unfold(xp.reshape(n * c, 1, *xp.shape[2:]), (kh, kw), stride=s)  # [N*C, kh*kw, Ho*Wo]
    return cols.reshape(n, c, kh * kw, ho * wo), (ho, wo)


def tap_count(h: int, w: int, attrs: dict) -> torch.Tensor:
    """n[oy, ox]: the taps of each window that lie inside the H x W input (TFLite's filter_count), int64."""
    ones = torch.ones((1, 1, h, w))
    cols, (ho, wo) = _windows(ones, attrs, 0.0)
    return cols.sum(dim=2).reshape(ho, wo).to(torch.int64)


def maxpool2d(x: torch.Tensor, attrs: dict, exact: bool = True) -> torch.Tensor:
    """y = clamp(max over the window's taps, act_min, act_max); int8 in, int8 out (float relaxation: float)."""
    cols, (ho, wo) = _windows(x, attrs, NOT_A_TAP)
    y = cols.amax(dim=2).reshape(*x.shape[:2], ho, wo)
    y = y.clamp(attrs.get("act_min", -128), attrs.get("act_max", 127))
    return y.to(torch.int8) if exact else y


def avgpool2d(x: torch.Tensor, attrs: dict, tflite: bool, exact: bool = True) -> torch.Tensor:
    """Window sums over the taps inside x divided by their count: TFLite's (s +- n/2) / n in C integer division
    (ties away from zero), or rint(float(s) / float(n)) under the float32 rule; the float relaxation divides."""
    cols, (ho, wo) = _windows(x, attrs, 0.0)
    n = tap_count(x.shape[2], x.shape[3], attrs).reshape(-1)
    s = cols.sum(dim=2)  # exact: at most 64*64*128 < 2^24
    if not exact:
        return (s / n.to(torch.float32)).reshape(*x.shape[:2], ho, wo)
    if tflite:
        si = s.to(torch.int64)
        v = torch.where(si > 0, torch.div(si + n // 2, n, rounding_mode="trunc"),
                        torch.div(si - n // 2, n, rounding_mode="trunc"))
    else:
        v = torch.round(s / n.to(torch.float32))
    return v.clamp(-128, 127).to(torch.int8).reshape(*x.shape[:2], ho, wo)


def maxpool2d_grad(g: torch.Tensor, x: torch.Tensor, attrs: dict) -> torch.Tensor:
    """g_x: each window's gradient to its argmax (first tap holding the maximum in row-major scan order: torch's
    argmax returns the first maximal index), masked where the fused clamp cut the maximum."""
    n, c, h, w = x.shape
    cols, (ho, wo) = _windows(x, attrs, NOT_A_TAP)
    best = cols.amax(dim=2)  # [N, C, L]
    arg = cols.argmax(dim=2)  # torch documents the first maximal index
    lo, hi = attrs.get("act_min", -128), attrs.get("act_max", 127)
    gm = g.reshape(n, c, ho * wo) * ((best >= lo) & (best <= hi)).to(g.dtype)
    t, _, left, _ = pool_pads(attrs)
    s, kw = attrs["stride"], attrs["pool_w"]
    oy = torch.arange(ho).repeat_interleave(wo)
    ox = torch.arange(wo).repeat(ho)
    iy = oy * s - t + arg // kw  # [N, C, L]
    ix = ox * s - left + arg % kw
    gx = torch.zeros((n, c, h * w), dtype=g.dtype)
    gx.scatter_add_(2, iy * w + ix, gm)
    return gx.reshape(n, c, h, w)


def avgpool2d_grad(g: torch.Tensor, shape: tuple[int, int, int], attrs: dict) -> torch.Tensor:
    """g_x = the sum over the windows holding a tap of g / n (n the window's tap count)."""
    c, h, w = shape
    t, b, left, r = pool_pads(attrs)
    kh, kw, s = attrs["pool_h"], attrs["pool_w"], attrs["stride"]
    ho, wo = g.shape[2], g.shape[3]
    v = g / tap_count(h, w, attrs).to(g.dtype)
    cols = v.reshape(g.shape[0] * c, 1, ho * wo).expand(-1, kh * kw, -1)
    full = F.fold(cols, (h + t + b, w + left + r), (kh, kw), stride=s)  # padded rows/cols fall away below
    return full[:, 0, t:t + h, left:left + w].reshape(g.shape[0], c, h, w).contiguous()
