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


def conv_acc(x: torch.Tensor, x_zero: int, w: torch.Tensor, stride: int, padding: int, groups: int) -> torch.Tensor:
    """Exact int32 accumulator sum (x - x_zero) * w of an int8 conv; x: [N,C,H,W] int8, w: [O,C/g,k,k] int8."""
    xf = x.to(torch.float32) - float(x_zero)  # zero padding below is then real-valued zero padding
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
