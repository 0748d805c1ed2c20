"""Post-training quantization of a `FloatGraph` into microtrain's int8 graph (the rule of the zoo models).

- Weights: int8, symmetric, per output channel: s[o] = max|w[o]| / 127, q = clamp(rint(w / s), -127, 127).
- Biases: int32 in units of x.scale * w.scale[o] (what conv2d / linear add to the accumulator, ir/ops.py).
- Activations: int8 per tensor, asymmetric, from the range observed on calibration images (`RangeObserver`),
  widened to contain 0 and narrowed to a fused clamp: a ReLU output gets zero point -128 (its clamp is the int8
  clamp itself), a ReLU6 output at most [0, 6]. Pooling keeps its input's quantization (the op table's rule).
- Requantization: the graph keeps the zoo models' float32-multiplier rule (`Requant.FLOAT32`), under which a clamp
  is expressed by the output quantization alone (no act_min / act_max, which only the TFLite rule has).
- Input: microtrain feeds images as int8 `pixel - 128`. A model trained on `(pixel / 255 - mean[c]) / std[c]`
  gets a per-tensor input quantization (scale 1 / (255 sigma0), zero point round(255 m0) - 128 with sigma0, m0 the
  channel averages, m0 rounded to a whole pixel) and the per-channel remainder `u[c] = a[c] g + d[c]` folded into
  the first convolution (weights times a[c], bias plus the weights' sum times d[c]). That is exact except at the
  first convolution's zero-padded border, where the model saw 0 and the folded conv sees -d[c] (d is 0 when mean
  and std are the same for all channels, up to the whole-pixel rounding of the mean).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from microtrain.frontends.float_graph import FloatGraph, FloatNode
from microtrain.frontends.pkl import ModelLoadError
from microtrain.ir.graph import Graph, GraphFormatError
from microtrain.ir.quant import Requant

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAMPLES_PER_BATCH = 1 << 16  # values kept per tensor and batch for percentile calibration


@dataclass(frozen=True)
class InputQuant:
    """The graph input's quantization (scale, zero) and the per-channel affine a[c], d[c] with
    normalized[c] = a[c] * real + d[c], real = (q - zero) * scale, q = pixel - 128."""

    scale: float
    zero: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    gain: tuple[float, ...]
    offset: tuple[float, ...]

    @property
    def exact(self) -> bool:
        return all(a == 1.0 for a in self.gain) and all(d == 0.0 for d in self.offset)


def input_quant(mean: tuple[float, ...], std: tuple[float, ...], channels: int) -> InputQuant:
    """The input quantization for a model trained on (pixel / 255 - mean) / std (one value or one per channel)."""
    mean = tuple(float(v) for v in mean)
    std = tuple(float(v) for v in std)
    for what, v in (("mean", mean), ("std", std)):
        if len(v) not in (1, channels):
            raise ModelLoadError(f"--{what} has {len(v)} values for a {channels}-channel input (give 1 or {channels})")
    mean = mean * channels if len(mean) == 1 else mean
    std = std * channels if len(std) == 1 else std
    if not all(np.isfinite(s) and s > 0 for s in std) or not all(np.isfinite(m) and -1 <= m <= 2 for m in mean):
        raise ModelLoadError(f"input normalization mean {list(mean)} / std {list(std)}: std must be positive, mean in "
                             "[-1, 2] (pixels scaled to [0, 1])")
    z = int(np.clip(round(255.0 * float(np.mean(mean))) - 128, -128, 127))
    m0 = (z + 128) / 255.0
    s0 = float(np.mean(std)) if len(set(std)) > 1 else std[0]
    gain = tuple(1.0 if s == s0 else s0 / s for s in std)
    offset = tuple((m0 - m) / s for m, s in zip(mean, std, strict=True))
    return InputQuant(1.0 / (255.0 * s0), z, mean, std, gain, offset)


def normalize(x: torch.Tensor, iq: InputQuant) -> torch.Tensor:
    """int8 images (pixel - 128) [N, C, H, W] as the float input the model was trained on."""
    mean = torch.tensor(iq.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(iq.std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x.to(torch.float32) + 128.0) / 255.0 - mean) / std


def dequantize_input(x: torch.Tensor, iq: InputQuant) -> torch.Tensor:
    """int8 images as the real values the quantized graph's input stands for (the folded graph's input)."""
    return (x.to(torch.float32) - iq.zero) * iq.scale


def fold_input(fg: FloatGraph, iq: InputQuant) -> FloatGraph:
    """fg with the per-channel input affine folded into the convolution that reads the input (a copy)."""
    if iq.exact:
        return fg
    out = copy.deepcopy(fg)
    readers = out.consumers(out.input)
    if len(readers) != 1 or readers[0].kind != "conv" or readers[0].attrs["groups"] != 1:
        raise ModelLoadError(f"input normalization mean {list(iq.mean)} / std {list(iq.std)} differs between "
                             "channels (or from a whole pixel), which folds only into one regular convolution "
                             "reading the input: give --mean/--std with one value each")
    n = readers[0]
    a = np.asarray(iq.gain)[None, :, None, None]
    d = np.asarray(iq.offset)[None, :, None, None]
    n.b = n.b + (n.w * d).sum(axis=(1, 2, 3))
    n.w = n.w * a
    return out


class RangeObserver:
    """Per-tensor ranges over calibration batches: `minmax` (the extremes seen: nothing seen is clipped) or
    `percentile` (the p-th / (100-p)-th percentile of a per-batch sample of the values: outliers clipped)."""

    def __init__(self, method: str = "minmax", percentile: float = 99.99, seed: int = 0):
        if method not in ("minmax", "percentile"):
            raise ModelLoadError(f"calibration method {method!r} is not minmax or percentile")
        if not 50.0 < percentile <= 100.0:
            raise ModelLoadError(f"percentile {percentile} is not in (50, 100]")
        self.method, self.p = method, percentile
        self.lo: dict[str, float] = {}
        self.hi: dict[str, float] = {}
        self.samples: dict[str, list[np.ndarray]] = {}
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, name: str, v: torch.Tensor) -> None:
        v = v.detach()
        self.lo[name] = min(self.lo.get(name, np.inf), float(v.min()))
        self.hi[name] = max(self.hi.get(name, -np.inf), float(v.max()))
        if self.method == "percentile":
            flat = v.reshape(-1)
            if flat.numel() > SAMPLES_PER_BATCH:
                flat = flat[torch.randint(flat.numel(), (SAMPLES_PER_BATCH,), generator=self.gen)]
            self.samples.setdefault(name, []).append(flat.numpy().astype(np.float32))

    def range(self, name: str) -> tuple[float, float]:
        if name not in self.lo:
            raise ModelLoadError(f"tensor {name}: no calibration values were observed")
        if self.method == "minmax":
            return self.lo[name], self.hi[name]
        vals = np.concatenate(self.samples[name])
        return float(np.percentile(vals, 100.0 - self.p)), float(np.percentile(vals, self.p))


def act_quant(lo: float, hi: float, clamp: tuple[float, float] | None) -> tuple[float, int]:
    """(scale, zero) of an int8 tensor covering [lo, hi] within a fused clamp, widened to contain 0 (so that zero
    padding and ReLU's 0 are exact)."""
    if clamp is not None:
        lo, hi = max(lo, clamp[0]), min(hi, clamp[1])
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-6:
        hi = lo + 1e-6
    scale = (hi - lo) / 255.0
    zero = int(np.clip(round(-128.0 - lo / scale), -128, 127))
    return float(scale), zero


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric int8: (q, scales)."""
    m = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    s = np.where(m > 0, m / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / s.astype(np.float64).reshape(-1, *([1] * (w.ndim - 1)))), -127, 127).astype(np.int8)
    return q, s


def quantize_bias(b: np.ndarray, x_scale: float, w_scale: np.ndarray) -> np.ndarray:
    q = np.rint(b / (np.float64(x_scale) * w_scale.astype(np.float64)))
    return np.clip(q, -(1 << 31), (1 << 31) - 1).astype(np.int32)


def quantize(fg: FloatGraph, iq: InputQuant, obs: RangeObserver, meta: dict) -> Graph:
    """The folded float graph `fg` (fold_input) as a checked int8 Graph, activations quantized from `obs`."""
    tensors: dict[str, dict] = {}
    arrays: dict[str, np.ndarray] = {}
    ops: list[dict] = []
    name_of: dict[str, str] = {fg.input: "input"}
    tensors["input"] = {"shape": list(fg.input_shape), "dtype": "int8", "role": "input", "scale": iq.scale,
                        "zero": iq.zero}
    counts: dict[str, int] = {}
    convs = 0  # conv_index: convolutions and fully-connected layers, in order

    def opname(kind: str) -> str:
        counts[kind] = counts.get(kind, 0) + 1
        return f"{kind}{counts[kind] - 1}"

    def act(n: FloatNode, op: str, shape: tuple[int, ...], quant: tuple[float, int]) -> str:
        name = f"{op}.y"
        tensors[name] = {"shape": list(shape), "dtype": "int8", "role": "act", "scale": quant[0], "zero": quant[1]}
        name_of[n.output] = name
        return name

    def param(name: str, a: np.ndarray, scale: np.ndarray | None = None) -> str:
        d = {"shape": list(a.shape), "dtype": str(a.dtype), "role": "weight" if scale is not None else "bias",
             "zero": 0}
        if scale is not None:
            d["scale"] = "array"
            arrays[name + "@scale"] = scale
        tensors[name] = d
        arrays[name] = a
        return name

    def reshape(name: str, shape: tuple[int, ...]) -> str:
        """A `reshape` op (C,) <-> (C,1,1) of graph tensor `name`: its output's name."""
        y = f"{name}.r{len(shape)}"
        if y not in tensors:
            tensors[y] = {**tensors[name], "shape": list(shape), "role": "act"}
            ops.append({"name": f"reshape{len(ops)}", "kind": "reshape", "inputs": [name], "outputs": [y],
                        "attrs": {"to": len(shape)}})
        return y

    for n in fg.nodes:
        xs = [name_of[i] for i in n.inputs]
        x = tensors[xs[0]]
        shape = fg.shapes[n.output]
        if n.kind in ("conv", "linear", "fc"):
            op = {"linear": "head", "conv": f"conv{convs}", "fc": f"fc{convs}"}[n.kind]
            w = n.w
            if n.kind == "fc":  # a fully-connected layer inside the network: a conv2d on (C,1,1) or on its map
                if len(x["shape"]) == 1:
                    xs[0] = reshape(xs[0], (x["shape"][0], 1, 1))
                c, h, wd = tensors[xs[0]]["shape"]
                w = n.w.reshape(n.w.shape[0], c, h, wd)  # torch / ONNX flatten order: (c, i, j)
            elif n.kind == "linear" and len(x["shape"]) == 3:
                xs[0] = reshape(xs[0], (x["shape"][0],))
            qw, sw = quantize_weight(w)
            wn = param(f"{op}.w", qw, sw)
            bn = param(f"{op}.b", quantize_bias(n.b, x["scale"], sw))
            y = act(n, op, (w.shape[0], 1, 1) if n.kind == "fc" else shape, act_quant(*obs.range(n.output), n.clamp))
            attrs: dict = {}
            if n.kind != "linear":
                t, b, _, r = n.attrs["pads"] if n.kind == "conv" else (0, 0, 0, 0)
                attrs = {"stride": n.attrs.get("stride", 1), "padding": t, "groups": n.attrs.get("groups", 1),
                         "conv_index": convs}
                if n.kind == "fc":
                    attrs["fc"] = True
                convs += 1
                if b != t:
                    attrs["pad_bottom"] = b
                if r != t:
                    attrs["pad_right"] = r
            ops.append({"name": op, "kind": "linear" if n.kind == "linear" else "conv2d", "inputs": [xs[0], wn, bn],
                        "outputs": [y], "attrs": attrs})
        elif n.kind == "add":
            op = opname("add")
            y = act(n, op, shape, act_quant(*obs.range(n.output), n.clamp))
            ops.append({"name": op, "kind": "add", "inputs": xs, "outputs": [y], "attrs": {}})
        elif n.kind == "gap":
            op = opname("pool")
            y = act(n, op, shape, (x["scale"], x["zero"]))
            ops.append({"name": op, "kind": "avgpool", "inputs": xs, "outputs": [y], "attrs": {}})
        elif n.kind in ("maxpool", "avgpool"):
            op = opname(n.kind)
            y = act(n, op, shape, (x["scale"], x["zero"]))
            t, b, left, r = n.attrs["pads"]
            attrs = {"pool_h": n.attrs["kernel"][0], "pool_w": n.attrs["kernel"][1], "stride": n.attrs["stride"],
                     "padding": t}
            for k, v, default in (("pad_left", left, t), ("pad_bottom", b, t), ("pad_right", r, left)):
                if v != default:
                    attrs[k] = v
            ops.append({"name": op, "kind": f"{n.kind}2d", "inputs": xs, "outputs": [y], "attrs": attrs})
        else:  # pragma: no cover - FloatBuilder makes no other kind
            raise ModelLoadError(f"{n.name}: no int8 form for float op {n.kind}")
    desc = {"format": "microtrain-graph/1", "name": fg.name, "inputs": ["input"], "outputs": [name_of[fg.output]],
            "meta": {"requant": Requant.FLOAT32.value, "source": fg.source, "num_convs": convs,
                     "input_norm": {"mean": list(iq.mean), "std": list(iq.std)}, **meta},
            "tensors": tensors, "ops": ops}
    try:
        return Graph.from_dict(desc, arrays)
    except GraphFormatError as e:
        raise ModelLoadError(f"{fg.name}: {e}") from None
