"""Integer-exact int8 kernels on torch CPU, batched, one function per op of `ir/ops.py`.

Convolutions run as float32 convs on integer-valued tensors. float32 represents integers exactly up to 2**24, and
one product is at most 255 * 128, so we split the reduction into input-channel chunks whose worst-case partial sum
stays below 2**24 and add the chunks in int32: the accumulator is exact whatever order the backend sums in.
Requantization then follows the op table word for word (float32 multiply by a precomputed float32 multiplier,
round half to even, add zero point, clamp), which is what the C kernels do too.
"""

from __future__ import annotations

import math

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


def centered(x: torch.Tensor, x_zero: int) -> torch.Tensor:
    """float32(x - x_zero) of an int8 activation in channels_last layout: the operand of the float-path kernels
    (integer-valued, so exact; channels_last is the layout torch's CPU convolutions and elementwise passes run
    fastest in here)."""
    xf = x.to(dtype=torch.float32, memory_format=torch.channels_last) if x.dim() == 4 else x.to(torch.float32)
    return xf.sub_(float(x_zero)) if x_zero else xf


def max_centered(x_zero: int) -> int:
    """The largest |x - x_zero| an int8 x can give."""
    return max(127 - x_zero, x_zero + 128)


class FloatConv:
    """An int8 conv's weight and bias prepared for the float32 path (`conv_acc_f32`), and whether it is exact.

    The float32 convolution of integer-valued operands is exact in any summation order while every partial sum stays
    below 2**24 in magnitude; |x - x_zero| <= max_centered(x_zero), so sum |w[o]| * that bounds the bias-free sums
    of output channel o (`exact`). A bias b[o] is added inside the convolution where |b[o]| + that bound is also
    below 2**24; the other channels (e.g. a dead channel's saturated bias near 2**31) get their bias afterwards in
    int32, wrapping as `conv_acc(...) + b` does, then converted: float32(acc + b) bit for bit on every channel."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor, x_zero: int):
        self.w = w.to(torch.float32)  # int8 values (a float32 w holding them is kept as is, not copied)
        fan = math.prod(w.shape[1:])
        static = 128 * fan * max_centered(x_zero)  # |w| <= 128: a bound for any int8 weight
        if static < EXACT_F32:  # exact whatever the weight: no pass over it (a looser room classes more biases
            self.exact, self.room = True, float(EXACT_F32 - static)  # as big, which gives the same values)
        else:
            bound = self.w.abs().sum(dim=tuple(range(1, w.dim()))).mul_(max_centered(x_zero)).to(torch.float64)
            self.exact = bool(bound.max() < EXACT_F32) if bound.numel() else True
            self.room = EXACT_F32 - bound  # a bias below this (in magnitude) is added inside the convolution exactly
        self.big_mask: torch.Tensor | None = None
        self.set_bias(b)

    def set_bias(self, b: torch.Tensor) -> None:
        """(Re)place the int32 bias (the weight, hence the bound, unchanged)."""
        if isinstance(self.room, float):  # one scalar room: the bias's extremes decide (no abs: INT32_MIN)
            lo, hi = torch.aminmax(b) if b.numel() else (torch.tensor(0), torch.tensor(0))
            if -self.room < float(lo) and float(hi) < self.room:
                self.b, self.big, self.big_b, self.big_mask = b.to(torch.float32), None, None, None
                return
        big = b.to(torch.float64).abs_() >= self.room
        if not bool(big.any()):
            self.b, self.big, self.big_b, self.big_mask = b.to(torch.float32), None, None, None
            return
        if self.big_mask is None or not torch.equal(big, self.big_mask):
            self.big_mask, self.big = big, big.nonzero().flatten()
        self.b = b.masked_fill(big, 0).to(torch.float32)
        self.big_b = b[self.big].view(1, -1, 1, 1)


def conv_acc_f32(xc: torch.Tensor, fc: FloatConv, stride: int, padding: int | tuple[int, int, int, int],
                 groups: int) -> torch.Tensor:
    """float32(acc + b) of an int8 conv from the centered input `xc` (see `centered`), bit for bit, when `fc.exact`
    (else use `conv_acc`)."""
    if not isinstance(padding, int):
        t, b, left, r = padding
        if t == b == left == r:
            padding = t
        else:
            xc, padding = F.pad(xc, (left, r, t, b)), 0
    v = F.conv2d(xc, fc.w, fc.b, stride, padding, 1, groups)
    if fc.big is not None:
        v[:, fc.big] = (v[:, fc.big].to(torch.int32) + fc.big_b).to(torch.float32)
    return v


def requant_f32(v: torch.Tensor, m: torch.Tensor | None, y_zero: int, lo: int, hi: int,
                mask: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The requantization tail of the op table on float32(acc + b) (or an add's float32 sum when m is None), in
    place on `v`: r = rint(v * m[o]); y = clamp(r + y_zero, lo, hi). Returns (y as int8, y - y_zero as float32 for
    the next kernel, and the mask lo <= r + y_zero <= hi when asked). Same multiply, same rounding as `requantize`:
    only where the values live differs (r + y_zero is compared as r against lo - y_zero, exact on integers)."""
    if m is not None:
        v.mul_(m.view((1, -1) + (1,) * (v.dim() - 2)))
    v.round_()
    if mask:
        yc = v.clamp(lo - y_zero, hi - y_zero)
        keep = yc.eq(v)
    else:
        yc, keep = v.clamp_(lo - y_zero, hi - y_zero), None
    y = (yc + y_zero if y_zero else yc).to(torch.int8)
    return y, yc, keep


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


# ---- float32 backward fast paths (speed only: same sums as torch's convolution backward, other summation orders) ----
CL = torch.channels_last


def nhwc(t: torch.Tensor) -> torch.Tensor:
    """t in channels_last memory (a no-op when it already is)."""
    return t if t.is_contiguous(memory_format=CL) else t.contiguous(memory_format=CL)


def rows(t: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> the [N*H*W, C] matrix of its channels_last memory (a view once `nhwc`)."""
    return nhwc(t).permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def from_rows(m: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """The [N, C, H, W] channels_last view of an [N*H*W, C] matrix."""
    return m.view(n, h, w, m.shape[1]).permute(0, 3, 1, 2)


def pointwise_grad_input(gacc: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Input gradient of a 1x1, stride-1, unpadded, ungrouped conv: one matrix product (channels_last out)."""
    n, _, h, wd = gacc.shape
    return from_rows(rows(gacc) @ w.view(w.shape[0], w.shape[1]), n, h, wd)


def pointwise_grad_weight(gacc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Weight gradient [O, I, 1, 1] of a 1x1, stride-1, unpadded, ungrouped conv: one matrix product."""
    return (rows(gacc).t() @ rows(x)).view(gacc.shape[1], x.shape[1], 1, 1)


def depthwise_grad_input(gacc: torch.Tensor, w: torch.Tensor, pad: int) -> torch.Tensor:
    """Input gradient of a stride-1 depthwise conv with symmetric padding `pad` <= k - 1: the forward convolution
    of the output gradient with the flipped kernel (mkldnn's forward depthwise kernel, several times faster here than
    its backward one)."""
    k = w.shape[2]
    return F.conv2d(nhwc(gacc), w.flip(2, 3), None, 1, k - 1 - pad, 1, w.shape[0])


_TAPS: dict[tuple, torch.Tensor] = {}


def _tap_index(h: int, w: int, k: int, stride: int, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """idx[t, o]: for kernel tap t and output position o, the flat (o, input position) index into an
    [Ho*Wo, H*W] matrix, or Ho*Wo*H*W (a zero slot) where the tap falls into the padding."""
    key = (h, w, k, stride, pads)
    idx = _TAPS.get(key)
    if idx is None:
        t, b, left, r = pads
        ho, wo = (h + t + b - k) // stride + 1, (w + left + r - k) // stride + 1
        oy, ox = torch.meshgrid(torch.arange(ho), torch.arange(wo), indexing="ij")
        ky, kx = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
        iy = oy.reshape(1, -1) * stride + ky.reshape(-1, 1) - t  # [k*k, Ho*Wo]
        ix = ox.reshape(1, -1) * stride + kx.reshape(-1, 1) - left
        inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
        o = torch.arange(ho * wo).reshape(1, -1)
        idx = torch.where(inside, o * (h * w) + iy * w + ix, torch.full_like(iy, ho * wo * h * w)).reshape(-1)
        _TAPS[key] = idx
    return idx


def depthwise_grad_weight_small(x: torch.Tensor, gacc: torch.Tensor, k: int, stride: int,
                                pads: tuple[int, int, int, int]) -> torch.Tensor:
    """Weight gradient [C, 1, k, k] of a depthwise conv on a small map (H*W <= k*k): per channel the products of
    every output position with every input position summed over the batch (one batched matrix product,
    [C, Ho*Wo, N] @ [C, N, H*W]), then each tap sums the entries it connects. Fewer multiplies than the k*k taps
    when H*W <= k*k, and far faster than mkldnn's depthwise weight gradient for 5x5 kernels on 4x4 maps."""
    n, c, h, w = x.shape
    ho, wo = gacc.shape[2], gacc.shape[3]
    g3 = gacc.permute(1, 2, 3, 0).contiguous().view(c, ho * wo, n)  # bmm loops over strided batches: copy once
    x3 = x.permute(1, 0, 2, 3).contiguous().view(c, n, h * w)
    m = (torch.bmm(g3, x3) if n > 1 else g3 * x3).view(c, -1)  # one image: the outer products (bmm is slow there)
    m = torch.cat([m, m.new_zeros(c, 1)], dim=1)
    idx = _tap_index(h, w, k, stride, pads)
    return m.index_select(1, idx).view(c, k * k, ho * wo).sum(dim=2).view(c, 1, k, k)
