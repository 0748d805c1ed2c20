"""The float network that `microtrain import` reads from ONNX or a `torch.export` program, before quantization.

Both importers (frontends/onnx_import.py, frontends/torch_import.py) build a `FloatGraph` through one
`FloatBuilder`, so the rules live once: BatchNorm folds into the convolution it follows, ReLU / ReLU6 / Clip become
the clamp of the op that produces their input (the int8 graph expresses it through that op's output quantization,
frontends/ptq.py), Flatten / Reshape / Squeeze of a pooled vector are names for the same values, and anything
else is a one-line `ModelLoadError` naming the op. `run_float` executes the graph with torch in float32: it is the
reference for calibration and for the float-vs-int8 agreement that `microtrain import` prints.

Shapes are per sample, as in the IR: feature maps (C, H, W), vectors (C,).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from microtrain.frontends.pkl import ModelLoadError
from microtrain.ir import ops as opdefs

MAX_KERNEL = 11
MAX_CHANNELS = 8192
MAX_SIDE = 1024


@dataclass
class FloatNode:
    """One float op: conv (w OIHW, b, stride, pads (top, bottom, left, right), groups), add, gap (mean over H, W),
    linear (the classifier head) and fc (a fully-connected layer before it; w [K, C*H*W] on its flattened input),
    maxpool / avgpool (kernel, stride, pads); `clamp` = (lo, hi) of a fused ReLU / ReLU6 /
    Clip."""

    kind: str
    name: str
    inputs: list[str]
    output: str
    w: np.ndarray | None = None
    b: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    clamp: tuple[float, float] | None = None


@dataclass
class FloatGraph:
    name: str
    input: str
    input_shape: tuple[int, int, int]
    nodes: list[FloatNode]
    output: str
    shapes: dict[str, tuple[int, ...]]
    source: str
    mean: tuple[float, ...] | None = None  # the input normalization the file states, if it does
    std: tuple[float, ...] | None = None

    def producer(self, t: str) -> FloatNode | None:
        return next((n for n in self.nodes if n.output == t), None)

    def consumers(self, t: str) -> list[FloatNode]:
        return [n for n in self.nodes if t in n.inputs]


def window_supported() -> bool:
    """Whether the IR has the windowed pooling op kinds (maxpool2d / avgpool2d) that MaxPool / AveragePool map to."""
    return "maxpool2d" in opdefs.OPS and "avgpool2d" in opdefs.OPS


class FloatBuilder:
    """Collects a FloatGraph op by op, checking each against what the int8 IR can express. `uses[t]` is how many
    ops (and graph outputs) of the source model read tensor t: a clamp or a BatchNorm folds into its producer only
    when nothing else reads the unclamped / unnormalized value."""

    def __init__(self, path: Any, name: str, source: str, uses: dict[str, int]):
        self.path, self.name, self.source, self.uses = path, name, source, uses
        self.nodes: list[FloatNode] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.alias: dict[str, str] = {}  # source tensor -> the FloatGraph tensor holding its values
        self.input: str | None = None
        self.input_shape: tuple[int, int, int] | None = None
        self.flat: dict[str, str] = {}  # a flattened C x H x W map -> the map (read only by a fully-connected layer)

    def err(self, msg: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {msg}")

    def t(self, name: str, what: str) -> str:
        """The graph tensor behind source tensor `name` (an activation produced by an earlier supported op)."""
        if name in self.flat:
            raise self.err(f"{what}: reads a flattened {'x'.join(map(str, self.shapes[self.flat[name]]))} map (only a "
                           "fully-connected layer may)")
        name = self.alias.get(name, name)
        if name not in self.shapes:
            raise self.err(f"{what}: input {str(name)[:60]!r} is not an activation of a supported op")
        return name

    def _node(self, node: FloatNode, shape: tuple[int, ...]) -> None:
        self.nodes.append(node)
        self.shapes[node.output] = shape
        self.alias[node.output] = node.output

    def set_input(self, name: str, shape: tuple[int, ...]) -> None:
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise self.err(f"input {name!r} has per-sample shape {list(shape)}; an image C x H x W with C = 1 or 3 "
                           "is supported")
        if not all(isinstance(s, int) and s > 0 for s in shape) or max(shape[1:]) > MAX_SIDE:
            raise self.err(f"input {name!r}: shape {list(shape)} is not a fixed image size up to {MAX_SIDE}")
        self.input, self.input_shape = name, (int(shape[0]), int(shape[1]), int(shape[2]))
        self.shapes[name] = self.input_shape
        self.alias[name] = name

    def producer(self, t: str) -> FloatNode | None:
        return next((n for n in self.nodes if n.output == t), None)

    # ---- ops --------------------------------------------------------------------------------------------------
    def conv(self, name: str, x: str, out: str, w: np.ndarray, b: np.ndarray | None, stride: tuple[int, int],
             pads: tuple[int, int, int, int], groups: int, dilation: tuple[int, int] = (1, 1)) -> None:
        what = f"{name} (Conv)"
        xn = self.t(x, what)
        shape = self.shapes[xn]
        if len(shape) != 3:
            raise self.err(f"{what}: input is not a C x H x W feature map")
        c, h, wd = shape
        w = np.asarray(w, np.float64)
        if w.ndim != 4:
            raise self.err(f"{what}: weight of rank {w.ndim} (a 2-D convolution is supported)")
        o, ci, kh, kw = w.shape
        if tuple(dilation) != (1, 1):
            raise self.err(f"{what}: dilation {list(dilation)} is not supported")
        if stride[0] != stride[1] or not 1 <= stride[0] <= 16:
            raise self.err(f"{what}: strides {list(stride)} (equal strides 1..16 are supported)")
        if kh != kw or kh % 2 == 0 or kh > MAX_KERNEL:
            raise self.err(f"{what}: kernel {kh}x{kw} (square odd kernels up to {MAX_KERNEL} are supported)")
        if groups != 1 and not (groups == c and o == c and ci == 1):
            raise self.err(f"{what}: groups={groups} on {c} -> {o} channels (regular, or depthwise with multiplier 1)")
        if ci * groups != c or o > MAX_CHANNELS:
            raise self.err(f"{what}: weight {list(w.shape)} does not fit {c} input channels")
        t, bt, left, r = (int(p) for p in pads)
        if t != left:
            raise self.err(f"{what}: top padding {t} differs from left padding {left} (not supported)")
        if min(pads) < 0 or max(pads) > 64:
            raise self.err(f"{what}: paddings {list(pads)} (0..64 are supported)")
        ho, wo = opdefs.conv_out_hw(h, wd, kh, stride[0], t, bt, r)
        if ho < 1 or wo < 1:
            raise self.err(f"{what}: kernel larger than its padded input")
        bias = np.zeros(o) if b is None else np.asarray(b, np.float64).reshape(-1)
        if bias.shape != (o,):
            raise self.err(f"{what}: bias of shape {list(np.shape(b))} for {o} channels")
        self._check_finite(what, w, bias)
        self._node(FloatNode("conv", name, [xn], out, w, bias, {"stride": int(stride[0]), "pads": (t, bt, left, r),
                                                                 "groups": int(groups)}), (o, ho, wo))

    def batchnorm(self, name: str, x: str, out: str, gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray,
                  var: np.ndarray, eps: float) -> None:
        """y = (x - mean) / sqrt(var + eps) * gamma + beta, folded into the conv that produced x."""
        what = f"{name} (BatchNorm)"
        xn = self.t(x, what)
        p = self.producer(xn)
        if p is None or p.kind != "conv" or p.clamp is not None or self.uses.get(x, 0) != 1:
            raise self.err(f"{what}: only a BatchNorm right after a convolution (its only reader) can be folded")
        o = p.w.shape[0]
        arrs = [np.asarray(a, np.float64).reshape(-1) for a in (gamma, beta, mean, var)]
        if any(a.shape != (o,) for a in arrs):
            raise self.err(f"{what}: parameters do not have {o} channels")
        gamma, beta, mean, var = arrs
        self._check_finite(what, *arrs)
        if not np.isfinite(eps) or (var + eps <= 0).any():
            raise self.err(f"{what}: variance + eps is not positive")
        k = gamma / np.sqrt(var + eps)
        p.w = p.w * k[:, None, None, None]
        p.b = (p.b - mean) * k + beta
        self._rename(p, out)

    def clamp(self, name: str, kind: str, x: str, out: str, lo: float, hi: float) -> None:
        """ReLU (0, inf), ReLU6 / Clip (lo, hi) fused into the producing conv / add (its output quantization)."""
        what = f"{name} ({kind})"
        xn = self.t(x, what)
        p = self.producer(xn)
        if p is None or p.kind not in ("conv", "add", "linear") or self.uses.get(x, 0) != 1:
            raise self.err(f"{what}: a clamp is supported only on the output of a convolution, an add or a "
                           "fully-connected layer that nothing else reads")
        if not (lo <= 0.0 <= hi) or np.isnan(lo) or np.isnan(hi):
            raise self.err(f"{what}: clamp range [{lo}, {hi}] must contain 0")
        plo, phi = p.clamp or (-np.inf, np.inf)
        p.clamp = (max(plo, float(lo)), min(phi, float(hi)))
        self._rename(p, out)

    def add(self, name: str, a: str, b: str, out: str) -> None:
        what = f"{name} (Add)"
        an, bn = self.t(a, what), self.t(b, what)
        if self.shapes[an] != self.shapes[bn] or len(self.shapes[an]) != 3:
            raise self.err(f"{what}: operands {list(self.shapes[an])} and {list(self.shapes[bn])} (an add of two "
                           "feature maps of the same shape is supported, no broadcasting)")
        self._node(FloatNode("add", name, [an, bn], out), self.shapes[an])

    def gap(self, name: str, x: str, out: str) -> None:
        what = f"{name} (global average pool)"
        xn = self.t(x, what)
        if len(self.shapes[xn]) != 3:
            raise self.err(f"{what}: input is not a feature map")
        self._node(FloatNode("gap", name, [xn], out), (self.shapes[xn][0],))

    def flatten(self, name: str, kind: str, x: str, out: str, numel: int | None = None) -> None:
        """Flatten / Reshape / Squeeze to a vector: of a (C,) or (C, 1, 1) value the same values; of a C x H x W map
        the input of a fully-connected layer (the only op that may read it)."""
        xn = self.t(x, f"{name} ({kind})")
        s = self.shapes[xn]
        if numel is not None and numel != int(np.prod(s)):
            raise self.err(f"{name} ({kind}): reshapes {'x'.join(map(str, s))} values to {numel}")
        if int(np.prod(s)) != s[0]:
            self.flat[out] = xn
            return
        self.alias[out] = xn

    def identity(self, x: str, out: str) -> None:
        self.alias[out] = self.alias.get(x, x)

    def linear(self, name: str, x: str, out: str, w: np.ndarray, b: np.ndarray | None) -> None:
        """Gemm / Linear on a vector or on a flattened map. The last one is the classifier head; `finish` makes any
        other a fully-connected layer (`fc`: an int8 conv2d on (C,1,1), or an H x H kernel on the map it flattens)."""
        what = f"{name} (Gemm/Linear)"
        xn = self.flat[x] if x in self.flat else self.t(x, what)
        s = self.shapes[xn]
        w = np.asarray(w, np.float64)
        n_in = int(np.prod(s))
        if len(s) == 3 and n_in == s[0]:
            raise self.err(f"{what}: input is an unflattened {'x'.join(map(str, s))} value")
        if len(s) == 3 and x not in self.flat:
            raise self.err(f"{what}: input is an unflattened {'x'.join(map(str, s))} feature map")
        if w.ndim != 2 or w.shape[1] != n_in or w.shape[0] > MAX_CHANNELS:
            raise self.err(f"{what}: weight {list(w.shape)} does not fit {n_in} features")
        bias = np.zeros(w.shape[0]) if b is None else np.asarray(b, np.float64).reshape(-1)
        if bias.shape != (w.shape[0],):
            raise self.err(f"{what}: bias of shape {list(np.shape(b))} for {w.shape[0]} outputs")
        self._check_finite(what, w, bias)
        self._node(FloatNode("linear", name, [xn], out, w, bias), (w.shape[0],))

    def pool(self, name: str, kind: str, x: str, out: str, kernel: tuple[int, int], stride: tuple[int, int],
             pads: tuple[int, int, int, int], count_include_pad: bool = False, ceil_mode: bool = False) -> None:
        """MaxPool / AveragePool windows: the IR's maxpool2d / avgpool2d (padded taps are not taps)."""
        what = f"{name} ({kind})"
        if not window_supported():
            raise self.err(f"{what}: unsupported op {kind} (this microtrain has no windowed pooling)")
        xn = self.t(x, what)
        if len(self.shapes[xn]) != 3:
            raise self.err(f"{what}: input is not a feature map")
        c, h, w = self.shapes[xn]
        t, bt, left, r = (int(p) for p in pads)
        if stride[0] != stride[1] or ceil_mode:
            raise self.err(f"{what}: strides {list(stride)}{' with ceil_mode' if ceil_mode else ''} (equal strides, "
                           "floor mode are supported)")
        if kind == "AveragePool" and count_include_pad and max(pads) > 0:
            raise self.err(f"{what}: count_include_pad with padding (padded taps are not counted in microtrain)")
        if max(t, bt) >= kernel[0] or max(left, r) >= kernel[1] or min(pads) < 0:
            raise self.err(f"{what}: padding {list(pads)} as large as the window {list(kernel)}")
        ho, wo = (h + t + bt - kernel[0]) // stride[0] + 1, (w + left + r - kernel[1]) // stride[0] + 1
        if ho < 1 or wo < 1:
            raise self.err(f"{what}: window larger than its input")
        if (kernel[0], kernel[1], t, bt, left, r) == (h, w, 0, 0, 0, 0) and kind == "AveragePool":
            self.gap(name, x, out)  # a window over the whole map is the global pool
            return
        self._node(FloatNode("maxpool" if kind == "MaxPool" else "avgpool", name, [xn], out,
                             attrs={"kernel": (int(kernel[0]), int(kernel[1])), "stride": int(stride[0]),
                                    "pads": (t, bt, left, r)}), (c, ho, wo))

    def finish(self, output: str, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> FloatGraph:
        if self.input is None or self.input_shape is None:
            raise self.err("no image input")
        out = self.alias.get(output, output)
        if not self.nodes or self.nodes[-1].output != out or self.nodes[-1].kind != "linear":
            raise self.err("the model must end in a Gemm / Linear classifier on pooled features (its output is "
                           "the graph's only output)")
        head = self.nodes[-1]
        if len(self.shapes[head.inputs[0]]) == 3:
            hw = "x".join(map(str, self.shapes[head.inputs[0]][1:]))
            raise self.err(f"{head.name}: a classifier head on an unpooled {hw} map is not supported (pool first, or "
                           "add a fully-connected layer before the head)")
        for n in self.nodes[:-1]:
            if n.kind == "linear":  # a fully-connected layer inside the network: an int8 conv2d (frontends/ptq.py)
                s = self.shapes[n.inputs[0]]
                if len(s) == 3 and (s[1] != s[2] or s[1] % 2 == 0 or s[1] > MAX_KERNEL):
                    raise self.err(f"{n.name}: a fully-connected layer on a flattened {s[1]}x{s[2]} map (square odd "
                                   f"maps up to {MAX_KERNEL}x{MAX_KERNEL} and vectors are supported)")
                n.kind = "fc"
        return FloatGraph(self.name, self.input, self.input_shape, self.nodes, out, dict(self.shapes), self.source,
                          mean, std)

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _rename(self, p: FloatNode, out: str) -> None:
        """Producer p now computes `out` (a folded BatchNorm or clamp): its old output name stays an alias."""
        self.shapes[out] = self.shapes.pop(p.output)
        self.alias[p.output] = out
        p.output = out
        self.alias[out] = out

    def _check_finite(self, what: str, *arrays: np.ndarray) -> None:
        if not all(np.isfinite(a).all() for a in arrays):
            raise self.err(f"{what}: parameters hold NaN or infinite values")


# ---- execution ---------------------------------------------------------------------------------------------------
def run_float(fg: FloatGraph, x: torch.Tensor, observe: Callable[[str, torch.Tensor], None] | None = None
              ) -> torch.Tensor:
    """The graph in float32 on a batch of normalized inputs [N, C, H, W]; `observe(tensor, value)` sees every
    op's output (after its clamp): the calibration statistics. Returns the logits [N, K]."""
    env = {fg.input: x.to(torch.float32)}
    for n in fg.nodes:
        v = env[n.inputs[0]]
        if n.kind == "conv":
            t, b, left, r = n.attrs["pads"]
            v = F.conv2d(F.pad(v, (left, r, t, b)), torch.from_numpy(n.w.astype(np.float32)),
                         torch.from_numpy(n.b.astype(np.float32)), n.attrs["stride"], groups=n.attrs["groups"])
        elif n.kind == "add":
            v = v + env[n.inputs[1]]
        elif n.kind == "gap":
            v = v.mean(dim=(2, 3))
        elif n.kind in ("linear", "fc"):
            v = F.linear(v.flatten(1), torch.from_numpy(n.w.astype(np.float32)),
                         torch.from_numpy(n.b.astype(np.float32)))
        elif n.kind == "maxpool":
            t, b, left, r = n.attrs["pads"]
            v = F.max_pool2d(F.pad(v, (left, r, t, b), value=-float("inf")), n.attrs["kernel"], n.attrs["stride"])
        elif n.kind == "avgpool":
            t, b, left, r = n.attrs["pads"]
            ones = torch.ones_like(v[:1, :1])
            s = F.avg_pool2d(F.pad(v, (left, r, t, b)), n.attrs["kernel"], n.attrs["stride"], divisor_override=1)
            cnt = F.avg_pool2d(F.pad(ones, (left, r, t, b)), n.attrs["kernel"], n.attrs["stride"], divisor_override=1)
            v = s / cnt
        else:  # pragma: no cover - the builder makes no other kind
            raise ModelLoadError(f"{n.name}: unknown float op {n.kind}")
        if n.clamp is not None:
            v = torch.clamp(v, n.clamp[0], n.clamp[1])
        env[n.output] = v
        if observe is not None:
            observe(n.output, v)
    return env[fg.output]
