"""Integer-exact int8 kernels on torch CPU, batched, one function per op of `ir/ops.py`.

Convolutions run as float32 convs on integer-valued tensors. float32 represents integers exactly up to 2**24, and
one product is at most 255 * 128, so we split the reduction into input-channel chunks whose worst-case partial sum
stays below 2**24 and add the chunks in int32: the accumulator is exact whatever order the backend sums in.
Requantization then follows the op table word for word (float32 multiply by a precomputed float32 multiplier,
round half to even, add zero point, clamp), which is what the C kernels do too.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from microtrain.ir import quant

EXACT_F32 = 1 << 24
MAX_PRODUCT = 255 * 128


def requant_multiplier(x_scale: float, w_scale: np.ndarray, y_scale: float) -> torch.Tensor:
    """m[o] of the op table (ir/quant.py, the very table the C code gets), as a tensor."""
    return torch.from_numpy(quant.requant_multiplier(x_scale, w_scale, y_scale))


def conv_acc(x: torch.Tensor, x_zero: int, w: torch.Tensor, stride: int, padding: int | tuple[int, int, int, int],
             groups: int) -> torch.Tensor:
    """Exact int32 accumulator sum (x - x_zero) * w of an int8 conv; x: [N,C,H,W] int8, w: [O,C/g,k,k] int8;
    padding: symmetric, or (top, bottom, left, right) (ir/ops.py conv_pads)."""
    xf = x.to(torch.float32) - float(x_zero)  # zero padding below is then real-valued zero padding
    if not isinstance(padding, int):
        t, b, left, r = padding
        if t == b == left == r:
            padding = t
        else:
            xf, padding = F.pad(xf, (left, r, t, b)), 0
    wf = w.to(torch.float32)
    per_ch = w.shape[2] * w.shape[3]
    chunk = max(1, (EXACT_F32 - 1) // (MAX_PRODUCT * per_ch))
    cin_g = w.shape[1]
    if groups != 1 or cin_g <= chunk:
        return F.conv2d(xf, wf, None, stride, padding, 1, groups).to(torch.int32)
    acc = None
    for c0 in range(0, cin_g, chunk):
        part = F.conv2d(xf[:, c0:c0 + chunk], wf[:, c0:c0 + chunk], None, stride, padding).to(torch.int32)
        acc = part if acc is None else acc + part
    return acc


def requantize(acc: torch.Tensor, bias: torch.Tensor, m: torch.Tensor, y_zero: int) -> torch.Tensor:
    """int8 y = clamp(rint(float32(acc + b) * m) + y_zero); channel axis is 1."""
    shape = (1, -1) + (1,) * (acc.dim() - 2)
    v = (acc + bias.view(shape)).to(torch.float32) * m.view(shape)
    return (torch.round(v) + y_zero).clamp_(-128, 127).to(torch.int8)


def conv2d_int8(x: torch.Tensor, x_zero: int, w: torch.Tensor, b: torch.Tensor, m: torch.Tensor, y_zero: int,
                stride: int, padding: int, groups: int) -> torch.Tensor:
    return requantize(conv_acc(x, x_zero, w, stride, padding, groups), b, m, y_zero)


def add_int8(a: torch.Tensor, a_zero: int, ra: float, b: torch.Tensor, b_zero: int, rb: float,
             y_zero: int) -> torch.Tensor:
    """ra, rb are float32 ratios a.scale / y.scale and b.scale / y.scale."""
    fa = (a.to(torch.float32) - a_zero) * torch.tensor(ra, dtype=torch.float32)
    fb = (b.to(torch.float32) - b_zero) * torch.tensor(rb, dtype=torch.float32)
    return (torch.round(fa + fb) + y_zero).clamp_(-128, 127).to(torch.int8)


def avgpool_int8(x: torch.Tensor) -> torch.Tensor:
    """Global average pool, rounding to nearest (half to even), same scale and zero point."""
    hw = x.shape[2] * x.shape[3]
    s = x.to(torch.int32).sum(dim=(2, 3)).to(torch.float32)
    return torch.round(s / float(hw)).clamp_(-128, 127).to(torch.int8)


def linear_int8(x: torch.Tensor, x_zero: int, w: torch.Tensor, b: torch.Tensor, m: torch.Tensor,
                y_zero: int) -> torch.Tensor:
    acc = conv_acc(x[:, :, None, None], x_zero, w[:, :, None, None], 1, 0, 1)[:, :, 0, 0]
    return requantize(acc, b, m, y_zero)


# ---- the TFLite requantization rule (ir/quant.py Requant.TFLITE): integer-exact in int64 -------------------------
def srdhm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gemmlowp SaturatingRoundingDoublingHighMul of int32 values held in int64 tensors."""
    ab = a.to(torch.int64) * b.to(torch.int64)
    t = ab + torch.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    r = torch.where(t >= 0, t >> 31, -((-t) >> 31))
    return torch.where((a == quant.INT32_MIN) & (b == quant.INT32_MIN), quant.INT32_MAX, r)


def rdbpot(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """gemmlowp RoundingDivideByPOT (ties away from zero)."""
    mask = (torch.ones_like(e) << e) - 1
    thr = (mask >> 1) + (x < 0).to(torch.int64)
    return (x >> e) + ((x & mask) > thr).to(torch.int64)


def mbqm(x: torch.Tensor, q: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """TFLite MultiplyByQuantizedMultiplier; q, shift broadcast against x (int64 results)."""
    shift = shift.to(torch.int64)
    xs = x.to(torch.int64) << shift.clamp(min=0)
    xs = ((xs + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)  # the int32 wrap-around of the C multiply
    return rdbpot(srdhm(xs, q.to(torch.int64)), (-shift).clamp(min=0))


def fixed_point(x_scale: float, w_scale: np.ndarray, y_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(q[o], shift[o]) of ir/quant.py conv_fixed_point (the C tables), as int64 tensors."""
    q, s = quant.conv_fixed_point(x_scale, w_scale, y_scale)
    return torch.from_numpy(q.astype(np.int64)), torch.from_numpy(s.astype(np.int64))


def requantize_fx(acc: torch.Tensor, bias: torch.Tensor, q: torch.Tensor, shift: torch.Tensor, y_zero: int,
                  act: tuple[int, int] = (-128, 127)) -> torch.Tensor:
    """Pre-clamp int64 value MBQM(acc + b, q[o], shift[o]) + y_zero of the TFLite rule; channel axis 1. Clamp it with
    `clamp_act`."""
    shape = (1, -1) + (1,) * (acc.dim() - 2)
    v = acc.to(torch.int64) + bias.to(torch.int64).view(shape)
    v = ((v + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)  # int32 accumulator wrap-around, as in C
    return mbqm(v, q.view(shape), shift.view(shape)) + y_zero


def clamp_act(v: torch.Tensor, act: tuple[int, int]) -> torch.Tensor:
    return v.clamp(act[0], act[1]).to(torch.int8)


def add_tflite_pre(a: torch.Tensor, a_zero: int, b: torch.Tensor, b_zero: int, params: tuple[int, ...],
                   y_zero: int) -> torch.Tensor:
    """Pre-clamp int64 value of TFLite's int8 ADD (ir/quant.py add_fixed_point gives `params`)."""
    qa, sa, qb, sb, qy, sy = (torch.tensor(v, dtype=torch.int64) for v in params)
    va = mbqm((a.to(torch.int64) - a_zero) << quant.ADD_LEFT_SHIFT, qa, sa)
    vb = mbqm((b.to(torch.int64) - b_zero) << quant.ADD_LEFT_SHIFT, qb, sb)
    return mbqm(va + vb, qy, sy) + y_zero


def avgpool_tflite(x: torch.Tensor, act: tuple[int, int] = (-128, 127)) -> torch.Tensor:
    """Global average pool of TFLite's reference kernel: the sum divided by H*W in C integer division after adding
    (sum >= 0) or subtracting half the count (rounds ties away from zero)."""
    n = x.shape[2] * x.shape[3]
    s = x.to(torch.int64).sum(dim=(2, 3))
    v = torch.where(s > 0, torch.div(s + n // 2, n, rounding_mode="trunc"),
                    torch.div(s - n // 2, n, rounding_mode="trunc"))
    return clamp_act(v, act)


def mean_tflite(x: torch.Tensor, x_zero: int, y_zero: int, params: tuple[int, int],
                act: tuple[int, int] = (-128, 127)) -> torch.Tensor:
    """TFLite's int8 MEAN over H and W: clamp(MBQM(sum(x) - x.zero * H*W, q', shift') + y.zero) with (q', shift')
    of ir/quant.py mean_fixed_point."""
    n = x.shape[2] * x.shape[3]
    acc = x.to(torch.int64).sum(dim=(2, 3)) - x_zero * n
    q, s = (torch.tensor(v, dtype=torch.int64) for v in params)
    return clamp_act(mbqm(acc, q, s) + y_zero, act)
