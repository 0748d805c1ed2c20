"""The op table: for every op kind, its operands, its output shape rule, its MAC count and its integer semantics.

The semantics text is the contract that the torch executor (`runtime/kernels.py`) and the C kernels implement
bit for bit. All float arithmetic below is IEEE float32, evaluated in the order written, with no fused
multiply-add; `rint` is round-half-to-even; `clamp8(v) = min(max(v, -128), 127)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from microtrain.ir.graph import Graph, Op


@dataclass(frozen=True)
class OpDef:
    operands: tuple[str, ...]
    shape: Callable[[Graph, Op], list[tuple[int, ...]]]
    macs: Callable[[Graph, Op], int]
    semantics: str


def _shape(g: Graph, op: Op, i: int) -> tuple[int, ...]:
    return g.tensors[op.inputs[i]].shape


def conv_out_hw(h: int, w: int, k: int, stride: int, pad: int) -> tuple[int, int]:
    return (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1


def _conv_shape(g: Graph, op: Op) -> list[tuple[int, ...]]:
    c, h, w = _shape(g, op, 0)
    o, _, k, _ = _shape(g, op, 1)
    return [(o, *conv_out_hw(h, w, k, op.attrs["stride"], op.attrs["padding"]))]


def _conv_macs(g: Graph, op: Op) -> int:
    o, ci, kh, kw = _shape(g, op, 1)
    _, ho, wo = g.tensors[op.outputs[0]].shape
    return o * ci * kh * kw * ho * wo


OPS: dict[str, OpDef] = {
    "conv2d": OpDef(
        ("x", "w", "b"), _conv_shape, _conv_macs,
        "acc[o,y,x] = sum_{c,i,j} (x[c, y*s+i-p, x*s+j-p] - x.zero) * w[o,c,i,j]   (int32; zero padding in real "
        "terms, i.e. padded x equals x.zero); y = clamp8(rint(float(acc + b[o]) * m[o]) + y.zero) with "
        "m[o] = float32(x.scale * w.scale[o] / y.scale). groups = C_in makes it depthwise."),
    "add": OpDef(
        ("a", "b"), lambda g, op: [_shape(g, op, 0)], lambda g, op: 0,
        "y = clamp8(rint(float(a - a.zero) * ra + float(b - b.zero) * rb) + y.zero) with "
        "ra = float32(a.scale / y.scale), rb = float32(b.scale / y.scale)."),
    "avgpool": OpDef(
        ("x",), lambda g, op: [(_shape(g, op, 0)[0],)], lambda g, op: 0,
        "global average pool: y[c] = clamp8(rint(float(sum_{h,w} x[c,h,w]) / float(H*W))); y keeps x's scale and "
        "zero point."),
    "linear": OpDef(
        ("x", "w", "b"), lambda g, op: [(_shape(g, op, 1)[0],)],
        lambda g, op: _shape(g, op, 1)[0] * _shape(g, op, 1)[1],
        "classification head. int8 weights: the 1x1 conv rule on a [C] vector (int8 logits). float32 weights: "
        "logits = w @ (x - x.zero) * x.scale + b in float32 (the paper's fp32 head)."),
}
