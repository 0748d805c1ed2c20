"""The op table: for every op kind, its operands, its output shape rule, its MAC count and its semantics, integer
and floating point.

The semantics text is the contract. The C runtime (`codegen/runtime/`) is its reference implementation, one step
of one image at a time: built for the host it is the device twin, bit-identical to the chip. The torch engine
(`runtime/`) is the fast batched trainer: bit-exact wherever the arithmetic is integer (the int8 forward, the int8
weight/bias storage given the same float update), and within the tolerance stated in `docs/semantics.md` elsewhere,
because it lets torch choose its own float summation orders.

Conventions of the text: all float arithmetic is IEEE float32 (round to nearest even), evaluated in the order
written; `a * b + c` is two roundings, `fma(a, b, c)` one. A reduction is spelled out as a *chain*:
`chain_{i in I} fma(a_i, b_i)` means `acc = 0; for i in I in the order given: acc = fma(a_i, b_i, acc)`, and
`chain_{i in I} add(a_i)` means `acc = 0; for i in I: acc = acc + a_i`; multi-index orders are lexicographic, the
last index innermost. `rint` is round-half-to-even; `clamp8(v) = min(max(v, -128), 127)`; `expf` / `logf` are the
runtime's own functions (`mt_math.c`: a fixed sequence of float32 operations each), never the C library's.
The device runs batch 1; sums over a batch exist only in the torch engine.

Requantization rule (`Graph.requant`, `meta["requant"]`, ir/quant.py `Requant`). The forward semantics below are
the "float32-multiplier" rule of the zoo models. Under "tflite-fixed-point" (imported .tflite models) the forward
int8 ops compute exactly what TensorFlow Lite (Micro)'s reference kernels compute, in integers only:
MBQM(v, q, s) = rdbpot(srdhm(v * 2^max(s,0), q), max(-s,0)) with srdhm(a, b) = (a*b + (a*b >= 0 ? 2^30 : 1-2^30))
/ 2^31 truncated toward zero (saturating INT32_MIN^2) and rdbpot(v, e) = v / 2^e rounded to nearest, ties away
from zero; (q, s) = QuantizeMultiplier(real) (frac of frexp rounded half away from zero to 31 bits).
  conv2d / int8 linear: y = clamp(MBQM(acc + b[o], q[o], s[o]) + y.zero, act_min, act_max), (q[o], s[o]) of
    double(x.scale) * double(w.scale[o]) / double(y.scale); act_min/act_max (attrs, default -128/127) are the fused
    RELU/RELU6 clamps; the mask bit is "pre-clamp value inside [act_min, act_max]".
  add: t = 2 * max(a.scale, b.scale); va = MBQM((a - a.zero) * 2^20, qa, sa), vb likewise with a.scale / t and
    b.scale / t; y = clamp(MBQM(va + vb, qy, sy) + y.zero, act_min, act_max) with t / (2^20 * y.scale).
  avgpool: s = sum x[c]; y[c] = clamp(s > 0 ? (s + n/2) / n : (s - n/2) / n) (C division, n = H*W); with attr
    mean (TFLite's MEAN): y[c] = clamp(MBQM(s - x.zero * n, q', s') + y.zero), (q, sh) of x.scale / y.scale,
    k = min(bit_length(n) - 1, 32, 31 + sh), q' = (q << k) // n, s' = sh - k.
  avgpool2d: s and n are the sum and the count of the window's taps inside x (TFLite's filter_count);
    y = clamp8(s > 0 ? (s + n/2) / n : (s - n/2) / n) (C division: ties away from zero; no fused activation).
  maxpool2d: the same as under float32-multiplier (integer max, clamp to act_min/act_max).
The backward (STE) uses the float32 multiplier m[o] of the conv2d text in both rules.
A conv's `padding` is its top and left padding; optional pad_bottom / pad_right (default `padding`) the bottom and
right padding (TF's SAME padding at stride 2); the output size follows from all four. A conv with attr `fc` is an
imported FULLY_CONNECTED (on a (C,1,1) vector, or an H x H kernel over the map it flattened): the same arithmetic,
exported back as a FULLY_CONNECTED. A pool's `padding` is its top padding; pad_left (default `padding`), pad_bottom
(default top) and pad_right (default left) the others (ops.pool_pads).
A `qint8` gradient tensor (--int8-grads) stores channel c of the float32 result v as q = clamp(rint(v / s), -127,
127) with s = max|v[c]| / 127 (1 when 0), and is read back as float(q) * s.
"""

from __future__ import annotations

import math
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


def conv_out_hw(h: int, w: int, k: int, stride: int, pad: int, pad_bottom: int | None = None,
                pad_right: int | None = None) -> tuple[int, int]:
    """Output size with `pad` rows/columns before and pad_bottom / pad_right (default `pad`) after."""
    pb = pad if pad_bottom is None else pad_bottom
    pr = pad if pad_right is None else pad_right
    return (h + pad + pb - k) // stride + 1, (w + pad + pr - k) // stride + 1


def conv_pads(attrs: dict) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding of a conv: `padding` before, pad_bottom / pad_right (default
    `padding`) after (TF's SAME padding at stride 2 puts the odd row and column at the end)."""
    p = attrs["padding"]
    return p, attrs.get("pad_bottom", p), p, attrs.get("pad_right", p)


def pool_pads(attrs: dict) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a windowed pool: `padding` top, pad_left (default `padding`), pad_bottom /
    pad_right (default top / left). Padded taps are not taps: they are outside the window, not zeros."""
    t = attrs["padding"]
    left = attrs.get("pad_left", t)
    return t, attrs.get("pad_bottom", t), left, attrs.get("pad_right", left)


def _pool_shape(g: Graph, op: Op) -> list[tuple[int, ...]]:
    c, h, w = _shape(g, op, 0)
    a = op.attrs
    t, b, left, r = pool_pads(a)
    return [(c, (h + t + b - a["pool_h"]) // a["stride"] + 1, (w + left + r - a["pool_w"]) // a["stride"] + 1)]


def _pool_macs(g: Graph, op: Op) -> int:
    """Window taps visited (one compare or add each; counted like MACs so the cost model sees pooling)."""
    c, ho, wo = g.tensors[op.outputs[0]].shape
    return c * ho * wo * op.attrs["pool_h"] * op.attrs["pool_w"]


def _reshape_shape(g: Graph, op: Op) -> list[tuple[int, ...]]:
    """(C,) <-> (C,1,1): `attrs.to` is the output's rank; the bytes are the same (CHW with H = W = 1)."""
    c = _shape(g, op, 0)[0]
    return [(c, 1, 1) if op.attrs.get("to", 1) == 3 else (c,)]


def _flatten_shape(g: Graph, op: Op) -> list[tuple[int, ...]]:
    return [(math.prod(_shape(g, op, 0)), 1, 1)]


def _conv_shape(g: Graph, op: Op) -> list[tuple[int, ...]]:
    c, h, w = _shape(g, op, 0)
    o, _, k, _ = _shape(g, op, 1)
    a = op.attrs
    return [(o, *conv_out_hw(h, w, k, a["stride"], a["padding"], a.get("pad_bottom"), a.get("pad_right")))]


def _conv_macs(g: Graph, op: Op) -> int:
    """Every weight part counts: a conv whose weight is split into a trainable slice and a frozen rest (operands
    x, w_train, w_frozen, b) runs the MACs of both."""
    _, ho, wo = g.tensors[op.outputs[0]].shape
    return sum(math.prod(g.tensors[n].shape) for n in op.inputs[1:-1]) * ho * wo


def _declared(g: Graph, op: Op) -> list[tuple[int, ...]]:
    """Training ops are built with explicit output tensors; their shapes are whatever the builder declared."""
    return [g.tensors[n].shape for n in op.outputs]


def _none(g: Graph, op: Op) -> int:
    return 0


def _grad_input_macs(g: Graph, op: Op) -> int:
    o, h, w = g.tensors[op.inputs[0]].shape
    ws = [g.tensors[n].shape for n in op.inputs[1:]]
    k = ws[0][2] * ws[0][3]
    return h * w * k * sum(s[0] * s[1] for s in ws)


def _weight_grad_macs(g: Graph, op: Op) -> int:
    """MACs of the trainable weight slice's gradient (a bias-only update is a plain sum: 0 MACs)."""
    o, h, w = g.tensors[op.inputs[0]].shape
    ch = op.attrs["channels"]
    k = op.attrs["kernel"]
    return h * w * k * k * ch * (1 if op.attrs["depthwise"] else o)


# What a model file holds (frontends produce these; autodiff gives each a gradient rule), and the kinds that exist
# only in planning views (compiler/memory.py: their member ops run, each with its own kernels).
FORWARD_KINDS = ("conv2d", "add", "avgpool", "linear", "maxpool2d", "avgpool2d", "reshape", "flatten")
PLANNING_KINDS = ("patch_stage", "block_grad")

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
        "logits[k] = chain_{c=0..C-1} fma(float(x[c] - x.zero) * x.scale, w[k,c]) + b[k] (the paper's fp32 head)."),
    "maxpool2d": OpDef(
        ("x",), _pool_shape, _pool_macs,
        "windowed max pool (TFLite MAX_POOL_2D): window (oy, ox) covers rows oy*stride - top + i, i < pool_h, and "
        "columns ox*stride - left + j, j < pool_w; taps outside x are not taps (never padding values). y[c,oy,ox] = "
        "clamp(max of x over the window's taps, act_min, act_max); y keeps x's scale and zero point. Integer: the "
        "same under both requantization rules. Its argmax is the first tap holding the maximum in row-major (i, j) "
        "scan order (the gradient goes there only)."),
    "avgpool2d": OpDef(
        ("x",), _pool_shape, _pool_macs,
        "windowed average pool (TFLite AVERAGE_POOL_2D), the window of maxpool2d: s = sum of x over the n taps "
        "inside x (int32); y = clamp8(rint(float(s) / float(n))) (float32 rule; the TFLite rule above); y keeps "
        "x's scale and zero point."),
    "reshape": OpDef(
        ("x",), _reshape_shape, _none,
        "y = x as (C,) <-> (C,1,1) (`attrs.to` = the output's rank): the same bytes in the same order (also for a "
        "gradient, float32 or qint8: one scale per channel either way). Connects a fully-connected layer imported as "
        "a 1x1 conv2d on (C,1,1) with vectors (pooled features, the head's input)."),
    "flatten": OpDef(
        ("x",), _flatten_shape, _none,
        "TFLite's flatten of a C x H x W map for a FULLY_CONNECTED: y[(h*W + w)*C + c, 0, 0] = x[c, h, w] (NHWC "
        "order), same scale and zero point. The fully-connected layer that reads it is a 1x1 conv2d."),
    # ---- training ops (built by autodiff/; float32 gradients in integer units: g_t = dL/dt_q) ----------------
    "slice_channels": OpDef(
        ("x",), _declared, _none,
        "y = x[:ch] (a contiguous copy of the first ch channels, saved for a weight gradient so x can die)."),
    "softmax_ce": OpDef(
        ("logits", "label"), _declared, _none,
        "batch 1: m = max_k z[k]; e[k] = expf(z[k] - m); s = e[0] + e[1] + ... + e[K-1] (in index order, from e[0]); "
        "g[k] = e[k] * (1 / s) - [k == label]; loss = -((z[label] - m) - logf(s)). (torch engine, batch N: the "
        "mean over the batch, g divided by N.)"),
    "linear_grad_input": OpDef(
        ("g", "w"), _declared, lambda g, op: g.tensors[op.inputs[1]].numel,
        "fp32 head: g_x[c] = chain_{k=0..K-1} fma(g[k], w[k,c]) * x.scale."),
    "avgpool_grad": OpDef(
        ("g",), _declared, _none, "g_x[c,h,w] = g[c] / float(H*W) (one division per channel)."),
    "maxpool2d_grad": OpDef(
        ("g", "x"), _declared, _none,
        "g_x[c,y,x] = chain_{(oy,ox) row-major} add(g[c,oy,ox]) over the windows whose argmax (maxpool2d's scan "
        "order, recomputed from the saved input x) is (y, x) and whose maximum lies inside [act_min, act_max] (the "
        "fused clamp's STE mask); 0 elsewhere. Ties: the first tap in row-major (i, j) order takes it all."),
    "avgpool2d_grad": OpDef(
        ("g",), _declared, _none,
        "g_x[c,y,x] = chain_{(oy,ox) row-major} add(g[c,oy,ox] / float(n[oy,ox])) over the windows that have (y, x) "
        "as a tap, n the window's tap count (one division per output element)."),
    "flatten_grad": OpDef(
        ("g",), _declared, _none,
        "g_x[c, h, w] = g[(h*W + w)*C + c] (the inverse permutation; a qint8 g_x is quantized per channel c from "
        "those float32 values)."),
    "add_grad": OpDef(
        ("g", "mask"), _declared, _none,
        "g_a = (g * float(mask)) * ra, g_b = (g * float(mask)) * rb (mask 1 where the add's pre-clamp value was "
        "inside [-128, 127], else 0)."),
    "grad_add": OpDef(("a", "b"), _declared, _none, "g = a + b (two consumers' gradient contributions)."),
    "conv2d_grad_acc": OpDef(
        ("g", "mask"), _declared, _none,
        "g_acc[o] = (g[o] * float(mask[o])) * m[o]: the gradient w.r.t. the int32 accumulator (STE through rint)."),
    "conv2d_grad_input": OpDef(
        ("g_acc", "w", "..."), _declared, _grad_input_macs,
        "g_x = conv_transpose(g_acc, W) with W = the conv's full weight (trainable slice + frozen rest), read "
        "before the update of this step: g_x[c,y,x] = chain_{(i,j) row-major, o=0..O-1} fma(g_acc[o,oy,ox], "
        "float(W[o,c,i,j])) over the taps with oy*s = y+p-i, ox*s = x+p-j inside g_acc (depthwise: o = c only). "
        "The channel-serial block backward (block_grad) runs this very chain, channel o by channel o."),
    "conv2d_weight_grad": OpDef(
        ("g_acc", "x_saved"), _declared, _weight_grad_macs,
        "G_w[o,c,i,j] = chain_{(y,x) row-major} fma(g_acc[o,y,x], float(x_saved[c, y*s+i-p, x*s+j-p] - x.zero)) over "
        "the trainable channels and the taps inside x; G_b[o] = chain_{(y,x) row-major} add(g_acc[o,y,x])."),
    "conv2d_update": OpDef(
        ("g_acc", "x_saved", "w_train", "b"), _declared, _weight_grad_macs,
        "fused conv2d_weight_grad + apply_update (operator reordering: no gradient tensor outlives this op)."),
    "linear_weight_grad": OpDef(
        ("g", "x"), _declared, lambda g, op: g.tensors[op.outputs[0]].numel,
        "fp32 head: G_w[k,c] = g[k] * (float(x[c] - x.zero) * x.scale), G_b = g (torch engine: summed over the "
        "batch)."),
    "linear_update": OpDef(
        ("g", "x", "w", "b"), _declared, lambda g, op: g.tensors[op.inputs[2]].numel,
        "fp32 head: apply_update of linear_weight_grad's G_w and G_b, element by element."),
    "patch_stage": OpDef(
        ("x", "..."), _declared, lambda g, op: int(op.attrs.get("macs", 0)),
        "the frozen early-stage ops `attrs.ops` (conv2d/add) run tile by tile over a grid x grid split of their output "
        "(compiler/patch.py): bit-identical to running them whole. Only in planning views: the tile intermediates "
        "live in the op's scratch buffer (`attrs.scratch_bytes`, laid out by the tile plan in the graph's meta)."),
    "block_grad": OpDef(
        ("...",), _declared, _none,
        "the backward ops `attrs.ops` of one inverted-residual block (pw2's input gradient through pw1's) run one "
        "expanded channel at a time (compiler/blockgrad.py): bit-identical to running them op by op. Only in planning "
        "views: the channel planes and pw1's input-gradient accumulators live in the op's scratch buffer."),
    "apply_update": OpDef(
        ("param", "grad"), _declared, _none,
        "per element: g = G / qas[o] (QAS: ir/quant.py qas_divisor; without QAS g = G); sgd: d = lr * g; sgd-m: "
        "m = m * momentum + g, d = lr * m; adam: m = fma(1 - b1, g, m * b1), v = fma((1 - b2) * g, g, v * b2), "
        "d = lr * (m / bc1) / (sqrt(v / bc2) + eps) with bc = float32(1 - beta^step), beta^step by squaring in "
        "float64. int8 weights: p = clamp8(floor(float(p) - d + u)), u the counter hash of (seed, step, stream, "
        "element) (stochastic rounding); int32 biases: p = p - rint(d); float32: p = p - d."),
}
