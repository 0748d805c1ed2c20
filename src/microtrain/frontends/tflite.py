"""Reader for int8 TensorFlow Lite models (`.tflite`), parsed with the `tflite` package's flatbuffer schema classes:
nothing in the file is executed, and everything read from it is checked (here and again by `Graph.from_dict`).

The result is an ordinary microtrain forward graph in CHW layout whose requantization rule is TFLite's fixed-point
one (`meta["requant"] = "tflite-fixed-point"`, ir/ops.py), so it computes what TFLite Micro computes. Supported:
CONV_2D, DEPTHWISE_CONV_2D (depth multiplier 1), ADD, AVERAGE_POOL_2D (global: avgpool; windowed: avgpool2d),
MAX_POOL_2D (maxpool2d), MEAN over the whole image, RESHAPE of a vector or a flatten feeding a FULLY_CONNECTED, PAD
folded into the convolution that reads it, FULLY_CONNECTED as the classifier head (the last op) or anywhere else (a
conv2d with `fc: true` on the (C,1,1) vector, on the odd square map it flattens, or on a `flatten` of any other
map), SOFTMAX and DEQUANTIZE at the end, QUANTIZE at the start; a float32 classifier head: DEQUANTIZE of the int8
features, then a FULLY_CONNECTED with float32 weights and bias as the last op (what `microtrain export` writes: a
`linear` with float32 weights and float32 logits, the head training builds and the device runs); fused NONE / RELU /
RELU6 / RELU_N1_TO_1 become the int8 clamps act_min / act_max; SAME padding including TF's extra bottom/right row at
stride 2. Anything else (any other float tensor or op) is a one-line error naming the problem.

Input encoding: images map RGB (or gray) 0..255 onto the whole int8 range, `pixel - 128`, which is the model's own
input range under its input quantization (e.g. scale 1/255, zero -128 for [0, 1] inputs).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from microtrain.frontends.pkl import ModelLoadError
from microtrain.ir.graph import Graph, GraphFormatError
from microtrain.ir.quant import Requant

MAX_TFLITE_BYTES = 256 << 20

_NP = {9: np.int8, 2: np.int32, 0: np.float32, 3: np.uint8, 7: np.int16, 4: np.int64}  # TensorType -> numpy


def _builtin_names() -> dict[int, str]:
    import tflite

    return {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_") and isinstance(v, int)}


class _Reader:
    """The model's subgraph as plain Python values, every access bounds-checked."""

    def __init__(self, buf: bytes, path: Path):
        import tflite

        self.path, self.buf = path, buf
        if len(buf) < 8 or buf[4:8] != b"TFL3":
            raise ModelLoadError(f"{path}: not a TFLite model (no TFL3 identifier)")
        m = tflite.Model.GetRootAs(buf, 0)
        if m.SubgraphsLength() != 1:
            raise ModelLoadError(f"{path}: {m.SubgraphsLength()} subgraphs (exactly one is supported)")
        self.model, self.sg = m, m.Subgraphs(0)
        names = _builtin_names()
        self.codes = []
        for i in range(m.OperatorCodesLength()):
            oc = m.OperatorCodes(i)
            code = max(int(oc.BuiltinCode()), int(oc.DeprecatedBuiltinCode()))
            name = names.get(code, f"builtin {code}")
            if name == "CUSTOM":
                custom = oc.CustomCode()
                name = f"CUSTOM {custom.decode('ascii', 'replace')[:40] if custom else ''}".strip()
            self.codes.append(name)
        self.n_tensors = self.sg.TensorsLength()

    def tensor(self, i: int) -> Any:
        if not 0 <= i < self.n_tensors:
            raise ModelLoadError(f"{self.path}: tensor index {i} out of range")
        return self.sg.Tensors(i)

    def shape(self, i: int) -> tuple[int, ...]:
        t = self.tensor(i)
        s = tuple(int(v) for v in (t.ShapeAsNumpy() if t.ShapeLength() else ()))
        if any(v <= 0 for v in s):
            raise ModelLoadError(f"{self.path}: tensor {i} has a dynamic or empty shape {list(s)}")
        return s

    def dtype(self, i: int) -> int:
        return int(self.tensor(i).Type())

    def quant(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        q = self.tensor(i).Quantization()
        if q is None or q.ScaleLength() == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        s = np.asarray(q.ScaleAsNumpy(), np.float32)
        z = np.asarray(q.ZeroPointAsNumpy(), np.int64) if q.ZeroPointLength() else np.zeros(s.size, np.int64)
        return s, z

    def data(self, i: int) -> np.ndarray | None:
        """The constant array of tensor i (None for an activation), its size checked against shape and type."""
        t = self.tensor(i)
        b = int(t.Buffer())
        if b <= 0:
            return None
        if b >= self.model.BuffersLength():
            raise ModelLoadError(f"{self.path}: tensor {i} names buffer {b} of {self.model.BuffersLength()}")
        buf = self.model.Buffers(b)
        off, size = int(buf.Offset()), int(buf.Size())
        if off > 1:  # large models keep the bytes after the flatbuffer
            if off + size > len(self.buf):
                raise ModelLoadError(f"{self.path}: buffer {b} lies outside the file")
            raw = self.buf[off:off + size]
        elif buf.DataLength() == 0:
            return None
        else:
            raw = buf.DataAsNumpy().tobytes()
        typ = _NP.get(self.dtype(i))
        if typ is None:
            raise ModelLoadError(f"{self.path}: tensor {i} has unsupported type {self.dtype(i)}")
        shape = self.shape(i)
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(typ).itemsize
        if len(raw) != want:
            raise ModelLoadError(f"{self.path}: tensor {i}: buffer of {len(raw)} bytes for shape {list(shape)}")
        return np.frombuffer(raw, typ).reshape(shape).copy()

    def ops(self) -> list[tuple[str, list[int], list[int], Any]]:
        out = []
        for k in range(self.sg.OperatorsLength()):
            op = self.sg.Operators(k)
            idx = int(op.OpcodeIndex())
            if not 0 <= idx < len(self.codes):
                raise ModelLoadError(f"{self.path}: operator {k} has opcode index {idx} out of range")
            ins = [int(v) for v in (op.InputsAsNumpy() if op.InputsLength() else [])]
            outs = [int(v) for v in (op.OutputsAsNumpy() if op.OutputsLength() else [])]
            out.append((self.codes[idx], ins, outs, op))
        return out


def _round_away(v: float) -> int:
    return int(np.sign(v) * np.floor(abs(v) + 0.5))


def _act_range(act: int, scale: float, zero: int, what: str) -> dict[str, int]:
    """TFLite's CalculateActivationRangeQuantized: the fused activation as an int8 clamp (omitted when it is the
    whole int8 range)."""
    s = np.float32(scale)

    def q(v: float) -> int:  # zero + TfLiteRound(v / scale) in float32, saturated to the int8 range
        with np.errstate(over="ignore", divide="ignore"):
            r = np.float32(v) / s
        return int(np.clip(zero + (_round_away(float(r)) if np.isfinite(r) else np.sign(r) * 1024), -1024, 1024))

    if act == 0:  # NONE
        lo, hi = -128, 127
    elif act == 1:  # RELU
        lo, hi = max(-128, zero), 127
    elif act == 3:  # RELU6
        lo, hi = max(-128, zero), min(127, q(6.0))
    elif act == 2:  # RELU_N1_TO_1
        lo, hi = max(-128, q(-1.0)), min(127, q(1.0))
    else:
        raise ModelLoadError(f"{what}: fused activation {act} is not supported (NONE, RELU, RELU6, RELU_N1_TO_1)")
    out = {}
    if lo != -128:
        out["act_min"] = lo
    if hi != 127:
        out["act_max"] = hi
    return out


def _same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


class _Builder:
    """Collects the graph description that `Graph.from_dict` checks."""

    def __init__(self, reader: _Reader, name: str):
        self.r, self.path = reader, reader.path
        self.tensors: dict[str, dict] = {}
        self.arrays: dict[str, np.ndarray] = {}
        self.ops: list[dict] = []
        self.name_of: dict[int, str] = {}  # TFLite tensor index -> graph tensor
        self.pads: dict[int, tuple[str, tuple[int, int, int, int]]] = {}  # PAD outputs, folded into their conv
        self.dequantized: dict[int, str] = {}  # the float head's DEQUANTIZE output -> its int8 input tensor
        self.convs = 0
        self.name = name

    def err(self, msg: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {msg}")

    def act_quant(self, i: int) -> tuple[float, int]:
        if self.r.dtype(i) != 9:
            raise self.err(f"tensor {i} is not int8 (type {self.r.dtype(i)}); only int8 models are supported")
        s, z = self.r.quant(i)
        if s.size != 1 or z.size != 1:
            raise self.err(f"activation tensor {i} is not quantized per tensor")
        if not (np.isfinite(s[0]) and s[0] > 0 and -128 <= z[0] <= 127):
            raise self.err(f"activation tensor {i}: scale {s[0]} / zero point {z[0]} out of range")
        return float(s[0]), int(z[0])

    def activation(self, i: int, shape: tuple[int, ...], role: str = "act") -> str:
        s, z = self.act_quant(i)
        name = f"t{i}"
        self.tensors[name] = {"shape": list(shape), "dtype": "int8", "role": role, "zero": z, "scale": s}
        self.name_of[i] = name
        return name

    def src(self, i: int, what: str) -> str:
        if i in self.pads:
            raise self.err(f"{what}: reads a PAD output; PAD is supported only before a convolution")
        if i not in self.name_of:
            raise self.err(f"{what}: input tensor {i} is not produced by an earlier supported op")
        return self.name_of[i]

    def chw(self, i: int, what: str) -> tuple[int, int, int]:
        shape = self.r.shape(i)
        if len(shape) != 4 or shape[0] != 1:
            raise self.err(f"{what}: tensor {i} has shape {list(shape)}, not 1xHxWxC")
        return shape[3], shape[1], shape[2]

    def const(self, i: int, what: str) -> np.ndarray:
        a = self.r.data(i)
        if a is None:
            raise self.err(f"{what}: tensor {i} is not a constant")
        return a

    def weight_scales(self, i: int, o: int, what: str) -> np.ndarray:
        s, z = self.r.quant(i)
        if s.size not in (1, o) or (z != 0).any():
            raise self.err(f"{what}: weights are not symmetric int8 per tensor or per output channel")
        s = np.broadcast_to(s, (o,)).astype(np.float32)
        if not (np.isfinite(s).all() and (s > 0).all()):
            raise self.err(f"{what}: weight scales must be finite and positive")
        return s

    def bias(self, ins: list[int], o: int, what: str) -> np.ndarray:
        if len(ins) < 3 or ins[2] < 0:
            return np.zeros(o, np.int32)
        b = self.const(ins[2], what)
        if b.dtype != np.int32 or b.shape != (o,):
            raise self.err(f"{what}: bias is not int32 [{o}]")
        return b

    def add_op(self, name: str, kind: str, inputs: list[str], outputs: list[str], attrs: dict) -> None:
        self.ops.append({"name": name, "kind": kind, "inputs": inputs, "outputs": outputs, "attrs": attrs})

    def param(self, name: str, a: np.ndarray, role: str, scale: np.ndarray | None = None) -> str:
        d: dict[str, Any] = {"shape": list(a.shape), "dtype": str(a.dtype), "role": role, "zero": 0}
        if scale is not None:
            d["scale"] = "array"
            self.arrays[name + "@scale"] = scale
        self.tensors[name] = d
        self.arrays[name] = a
        return name

    # ---- ops ----------------------------------------------------------------------------------------------------
    def conv(self, k: int, kind: str, ins: list[int], outs: list[int], opt: Any) -> None:
        import tflite

        what = f"operator {k} ({kind})"
        dw = kind == "DEPTHWISE_CONV_2D"
        o_cls = tflite.DepthwiseConv2DOptions if dw else tflite.Conv2DOptions
        if opt is None:
            raise self.err(f"{what}: options are missing")
        opts = o_cls()
        opts.Init(opt.Bytes, opt.Pos)
        if opts.DilationHFactor() != 1 or opts.DilationWFactor() != 1:
            raise self.err(f"{what}: dilation is not supported")
        if opts.StrideH() != opts.StrideW() or not 1 <= opts.StrideH() <= 16:
            raise self.err(f"{what}: strides {opts.StrideH()}x{opts.StrideW()} (equal strides 1..16 are supported)")
        if dw and opts.DepthMultiplier() != 1:
            raise self.err(f"{what}: depth multiplier {opts.DepthMultiplier()} (only 1 is supported)")
        x_idx = ins[0]
        folded = (0, 0, 0, 0)
        if x_idx in self.pads:
            x_name, folded = self.pads[x_idx]
            c, h, w = (self.tensors[x_name]["shape"][j] for j in range(3))
        else:
            x_name = self.src(x_idx, what)
            c, h, w = self.chw(x_idx, what)
        wt = self.const(ins[1], what)
        if wt.dtype != np.int8 or wt.ndim != 4:
            raise self.err(f"{what}: weights are not int8 4-D")
        if dw:  # [1, kh, kw, C]
            if wt.shape[0] != 1 or wt.shape[3] != c:
                raise self.err(f"{what}: depthwise weights {list(wt.shape)} do not fit {c} channels")
            wt = np.ascontiguousarray(wt.transpose(3, 0, 1, 2))
        else:  # [O, kh, kw, C]
            if wt.shape[3] != c:
                raise self.err(f"{what}: weights {list(wt.shape)} do not fit {c} input channels")
            wt = np.ascontiguousarray(wt.transpose(0, 3, 1, 2))
        o, kh, kw = wt.shape[0], wt.shape[2], wt.shape[3]
        if kh != kw or kh % 2 == 0:
            raise self.err(f"{what}: kernel {kh}x{kw} (square odd kernels are supported)")
        s = opts.StrideH()
        if opts.Padding() == tflite.Padding.SAME:
            (t, b), (lf, r) = _same_pads(h, kh, s), _same_pads(w, kw, s)
        else:
            t = b = lf = r = 0
        t, b, lf, r = t + folded[0], b + folded[1], lf + folded[2], r + folded[3]
        if t != lf:
            raise self.err(f"{what}: top padding {t} differs from left padding {lf} (not supported)")
        attrs: dict[str, Any] = {"stride": s, "padding": t, "groups": c if dw else 1, "conv_index": self.convs}
        if b != t:
            attrs["pad_bottom"] = b
        if r != t:
            attrs["pad_right"] = r
        yc, yh, yw = self.chw(outs[0], what)
        ys, yz = self.act_quant(outs[0])
        attrs.update(_act_range(opts.FusedActivationFunction(), ys, yz, what))
        if (yc, yh, yw) != (o, (h + t + b - kh) // s + 1, (w + lf + r - kw) // s + 1):
            raise self.err(f"{what}: output {yh}x{yw}x{yc} does not follow from its input and padding")
        name = f"conv{self.convs}"
        self.convs += 1
        wn = self.param(f"{name}.w", wt, "weight", self.weight_scales(ins[1], o, what))
        bn = self.param(f"{name}.b", self.bias(ins, o, what), "bias")
        y = self.activation(outs[0], (o, yh, yw))
        self.add_op(name, "conv2d", [x_name, wn, bn], [y], attrs)

    def pad(self, k: int, ins: list[int], outs: list[int]) -> None:
        what = f"operator {k} (PAD)"
        x = self.src(ins[0], what)
        p = self.const(ins[1], what).astype(np.int64)
        if p.shape != (4, 2) or (p[0] != 0).any() or (p[3] != 0).any() or (p < 0).any() or (p > 64).any():
            raise self.err(f"{what}: paddings {p.tolist()} (only 0..64 rows and columns are supported)")
        if self.act_quant(ins[0]) != self.act_quant(outs[0]):
            raise self.err(f"{what}: input and output quantization differ")
        if len(ins) > 2 and ins[2] >= 0:
            v = self.const(ins[2], what)
            if v.size != 1 or int(v.reshape(-1)[0]) != self.act_quant(ins[0])[1]:
                raise self.err(f"{what}: pads with a value other than the zero point")
        self.pads[outs[0]] = (x, (int(p[1, 0]), int(p[1, 1]), int(p[2, 0]), int(p[2, 1])))

    def add(self, k: int, ins: list[int], outs: list[int], opt: Any) -> None:
        import tflite

        what = f"operator {k} (ADD)"
        a, b = self.src(ins[0], what), self.src(ins[1], what)
        if self.r.shape(ins[0]) != self.r.shape(ins[1]) or self.r.shape(ins[0]) != self.r.shape(outs[0]):
            raise self.err(f"{what}: broadcasting add is not supported")
        act = 0
        if opt is not None:
            o = tflite.AddOptions()
            o.Init(opt.Bytes, opt.Pos)
            act = o.FusedActivationFunction()
        ys, yz = self.act_quant(outs[0])
        y = self.activation(outs[0], tuple(self.tensors[a]["shape"]))
        self.add_op(f"add{k}", "add", [a, b], [y], _act_range(act, ys, yz, what))

    def window(self, k: int, kind: str, ins: list[int], outs: list[int], o: Any) -> None:
        """MAX_POOL_2D / a windowed AVERAGE_POOL_2D: maxpool2d / avgpool2d with TFLite's SAME or VALID padding."""
        import tflite

        what = f"operator {k} ({kind})"
        x = self.src(ins[0], what)
        c, h, w = self.chw(ins[0], what)
        kh, kw, s = int(o.FilterHeight()), int(o.FilterWidth()), int(o.StrideH())
        if s != o.StrideW() or not 1 <= s <= 16:
            raise self.err(f"{what}: strides {o.StrideH()}x{o.StrideW()} (equal strides 1..16 are supported)")
        if not (1 <= kh <= h + 64 and 1 <= kw <= w + 64):
            raise self.err(f"{what}: a {kh}x{kw} window on {h}x{w}")
        if o.Padding() == tflite.Padding.SAME:
            (t, b), (left, r) = _same_pads(h, kh, s), _same_pads(w, kw, s)
        else:
            t = b = left = r = 0
        if self.act_quant(ins[0]) != self.act_quant(outs[0]):
            raise self.err(f"{what}: input and output quantization differ (not supported)")
        ys, yz = self.act_quant(outs[0])
        act = _act_range(o.FusedActivationFunction(), ys, yz, what)
        if kind == "AVERAGE_POOL_2D" and act:
            raise self.err(f"{what}: a fused activation on a windowed average pool is not supported")
        ho, wo = (h + t + b - kh) // s + 1, (w + left + r - kw) // s + 1
        if self.chw(outs[0], what) != (c, ho, wo):
            raise self.err(f"{what}: output {list(self.r.shape(outs[0]))} does not follow from its input and window")
        attrs: dict[str, Any] = {"pool_h": kh, "pool_w": kw, "stride": s, "padding": t, **act}
        for key, v in (("pad_left", left), ("pad_bottom", b), ("pad_right", r)):
            if v != {"pad_left": t, "pad_bottom": t, "pad_right": left}[key]:
                attrs[key] = v
        y = self.activation(outs[0], (c, ho, wo))
        self.add_op(f"pool{k}", "maxpool2d" if kind == "MAX_POOL_2D" else "avgpool2d", [x], [y], attrs)

    def pool(self, k: int, kind: str, ins: list[int], outs: list[int], opt: Any) -> None:
        import tflite

        what = f"operator {k} ({kind})"
        c, h, w = self.chw(ins[0], what)
        act = 0
        if kind in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
            if opt is None:
                raise self.err(f"{what}: options are missing")
            o = tflite.Pool2DOptions()
            o.Init(opt.Bytes, opt.Pos)
            whole = (o.FilterHeight(), o.FilterWidth()) == (h, w) and int(np.prod(self.r.shape(outs[0]))) == c
            if kind == "MAX_POOL_2D" or not whole:
                return self.window(k, kind, ins, outs, o)
            act = o.FusedActivationFunction()
        x = self.src(ins[0], what)
        if kind == "MEAN":
            axes = sorted(int(v) for v in self.const(ins[1], what).reshape(-1))
            if axes != [1, 2]:
                raise self.err(f"{what}: axes {axes} (only the spatial axes [1, 2] are supported)")
        if int(np.prod(self.r.shape(outs[0]))) != c:
            raise self.err(f"{what}: output shape {list(self.r.shape(outs[0]))} is not C")
        if self.act_quant(ins[0]) != self.act_quant(outs[0]):
            raise self.err(f"{what}: input and output quantization differ (not supported)")
        ys, yz = self.act_quant(outs[0])
        y = self.activation(outs[0], (c,))
        attrs = _act_range(act, ys, yz, what)
        if kind == "MEAN":
            attrs["mean"] = True  # TFLite's MEAN rounds through a folded fixed-point multiplier (ir/ops.py)
        self.add_op(f"pool{k}", "avgpool", [x], [y], attrs)

    def reshape_op(self, x: str, shape: tuple[int, ...], k: int) -> str:
        """A `reshape` op (C,) <-> (C,1,1) of graph tensor x: its output's name."""
        t = self.tensors[x]
        y = f"{x}.r{len(shape)}"
        if y not in self.tensors:
            self.tensors[y] = {**t, "shape": list(shape), "role": "act"}
            self.add_op(f"reshape{k}", "reshape", [x], [y], {"to": len(shape)})
        return y

    def flatten_op(self, x: str, k: int) -> str:
        """A `flatten` op of map x (TFLite's NHWC order): its (H*W*C, 1, 1) output's name."""
        c, h, w = self.tensors[x]["shape"]
        y = f"{x}.flat"
        self.tensors[y] = {**self.tensors[x], "shape": [c * h * w, 1, 1], "role": "act"}
        self.add_op(f"flatten{k}", "flatten", [x], [y], {})
        return y

    def fc_activation(self, opt: Any, what: str) -> int:
        """A FULLY_CONNECTED's fused activation (NONE without options); its weights must be in the default format."""
        import tflite

        if opt is None:
            return 0
        o = tflite.FullyConnectedOptions()
        o.Init(opt.Bytes, opt.Pos)
        if o.WeightsFormat() != 0:
            raise self.err(f"{what}: shuffled weights format {o.WeightsFormat()} is not supported")
        return int(o.FusedActivationFunction())

    def fc(self, k: int, ins: list[int], outs: list[int], opt: Any, last: bool) -> None:
        """The last FULLY_CONNECTED is the classifier head (`linear`, replaced by training's new head); any other
        is a `conv2d` on (C,1,1) (1x1), or on the H x W map it flattens when H = W is odd (an H x H kernel: TFLite's
        NHWC flatten order becomes the weight's (c, i, j) order), so it trains, plans and compiles like any conv.
        Other maps (and a head on a map) are flattened by a `flatten` op first."""

        what = f"operator {k} (FULLY_CONNECTED)"
        if ins[0] in self.dequantized:
            if not last:
                raise self.err(f"{what}: reads a DEQUANTIZE output; a float FULLY_CONNECTED is supported only as "
                               "the classifier head (the last op)")
            return self.float_head(k, ins, outs, opt)
        x = self.src(ins[0], what)
        xs = tuple(self.tensors[x]["shape"])
        c, hh, ww = (*xs, 1, 1) if len(xs) == 1 else xs
        wt = self.const(ins[1], what)
        if wt.dtype == np.float32:
            raise self.err(f"{what}: float32 weights (a float FULLY_CONNECTED is supported only as the last op, "
                           "reading a DEQUANTIZE of int8 features)")
        if wt.dtype != np.int8 or wt.ndim != 2 or wt.shape[1] != c * hh * ww:
            raise self.err(f"{what}: weights {list(wt.shape)} do not fit {c * hh * ww} features")
        if hh * ww > 1 and (last or hh != ww or hh % 2 == 0):  # a `flatten` op, then a 1x1 conv (or the head)
            x = self.flatten_op(x, k)
            c, hh, ww = c * hh * ww, 1, 1
        o = wt.shape[0]
        act = self.fc_activation(opt, what)
        ys, yz = self.act_quant(outs[0])
        if int(np.prod(self.r.shape(outs[0]))) != o:
            raise self.err(f"{what}: output shape {list(self.r.shape(outs[0]))} is not [{o}]")
        scales, bias = self.weight_scales(ins[1], o, what), self.bias(ins, o, what)
        if not last:
            if len(xs) == 1:
                x = self.reshape_op(x, (c, 1, 1), k)
            name = f"conv{self.convs}"
            w4 = np.ascontiguousarray(wt.reshape(o, hh, ww, c).transpose(0, 3, 1, 2))
            wn = self.param(f"{name}.w", w4, "weight", scales)
            bn = self.param(f"{name}.b", bias, "bias")
            y = self.activation(outs[0], (o, 1, 1))
            self.add_op(name, "conv2d", [x, wn, bn], [y], {"stride": 1, "padding": 0, "groups": 1,
                                                           "conv_index": self.convs, "fc": True,
                                                           **_act_range(act, ys, yz, what)})
            self.convs += 1
            return
        if len(self.tensors[x]["shape"]) == 3:
            x = self.reshape_op(x, (c,), k)
        name = f"fc{k}"
        wn = self.param(f"{name}.w", np.ascontiguousarray(wt), "weight", scales)
        bn = self.param(f"{name}.b", bias, "bias")
        y = self.activation(outs[0], (o,))
        self.add_op(name, "linear", [x, wn, bn], [y], _act_range(act, ys, yz, what))

    def dequantize(self, k: int, ins: list[int], outs: list[int]) -> None:
        """A DEQUANTIZE of int8 features whose only reader is the last op, a float32 FULLY_CONNECTED head (what
        `microtrain export` writes): the float head's input, the int8 tensor itself (the head dequantizes)."""
        what = f"operator {k} (DEQUANTIZE)"
        x = self.src(ins[0], what)
        self.act_quant(ins[0])
        if self.r.dtype(outs[0]) != 0:
            raise self.err(f"{what}: output tensor {outs[0]} is not float32 (type {self.r.dtype(outs[0])})")
        if int(np.prod(self.r.shape(outs[0]), dtype=np.int64)) != int(np.prod(self.tensors[x]["shape"])):
            raise self.err(f"{what}: output shape {list(self.r.shape(outs[0]))} does not hold its input's "
                           f"{int(np.prod(self.tensors[x]['shape']))} values")
        self.dequantized[outs[0]] = x

    def float_head(self, k: int, ins: list[int], outs: list[int], opt: Any) -> None:
        """DEQUANTIZE + FULLY_CONNECTED with float32 weights [K, C] and bias [K] as the last op: the float32 head
        (`linear` with float32 weights, float32 logits), as training builds it and the device runs it."""

        what = f"operator {k} (FULLY_CONNECTED)"
        x = self.dequantized[ins[0]]
        xs = tuple(self.tensors[x]["shape"])
        wt = self.const(ins[1], what)
        c = int(np.prod(xs))
        if wt.dtype != np.float32 or wt.ndim != 2 or wt.shape[1] != c:
            raise self.err(f"{what}: a float head needs float32 weights [K, {c}], got {wt.dtype}{list(wt.shape)}")
        if self.r.quant(ins[1])[0].size:
            raise self.err(f"{what}: float32 weights carry quantization parameters (hybrid models are not supported)")
        o = wt.shape[0]
        if len(ins) >= 3 and ins[2] >= 0:
            bias = self.const(ins[2], what)
            if bias.dtype != np.float32 or bias.shape != (o,):
                raise self.err(f"{what}: bias of a float head is not float32 [{o}]")
        else:
            bias = np.zeros(o, np.float32)
        if not (np.isfinite(wt).all() and np.isfinite(bias).all()):
            raise self.err(f"{what}: float weights or bias hold NaN or infinite values")
        if self.fc_activation(opt, what) != 0:
            raise self.err(f"{what}: a fused activation on the float head is not supported")
        if self.r.dtype(outs[0]) != 0 or int(np.prod(self.r.shape(outs[0]), dtype=np.int64)) != o:
            raise self.err(f"{what}: output is not float32 [{o}]")
        if len(xs) == 3 and xs[1] * xs[2] > 1:
            x = self.flatten_op(x, k)
        if len(self.tensors[x]["shape"]) == 3:
            x = self.reshape_op(x, (c,), k)
        name = f"fc{k}"
        wn = self.param(f"{name}.w", np.ascontiguousarray(wt), "weight")
        bn = self.param(f"{name}.b", np.ascontiguousarray(bias), "bias")
        y = f"t{outs[0]}"
        self.tensors[y] = {"shape": [o], "dtype": "float32", "role": "act", "zero": 0}
        self.name_of[outs[0]] = y
        self.add_op(name, "linear", [x, wn, bn], [y], {})


def tflite_to_graph(buf: bytes, path: Path) -> Graph:
    r = _Reader(buf, path)
    stem = re.sub(r"[^A-Za-z0-9_.+-]", "_", path.stem)[:100] or "model"
    bld = _Builder(r, stem if stem[0].isalnum() else f"m{stem}")
    sg = r.sg
    g_in = [int(v) for v in (sg.InputsAsNumpy() if sg.InputsLength() else [])]
    g_out = [int(v) for v in (sg.OutputsAsNumpy() if sg.OutputsLength() else [])]
    if len(g_in) != 1 or len(g_out) != 1:
        raise bld.err(f"{len(g_in)} inputs and {len(g_out)} outputs (one image in, one output supported)")
    ops = r.ops()
    # the tail that does not change the argmax: SOFTMAX, DEQUANTIZE (and a final RESHAPE of the logits)
    while ops and ops[-1][0] in ("SOFTMAX", "DEQUANTIZE", "RESHAPE") and len(ops) > 1:
        ops.pop()
    c, h, w = bld.chw(g_in[0], "model input")
    start = 0
    if ops and ops[0][0] == "QUANTIZE" and ops[0][1] == [g_in[0]]:
        if r.dtype(g_in[0]) != 0:
            raise bld.err("QUANTIZE at the input reads a non-float32 tensor")
        bld.activation(ops[0][2][0], (c, h, w), "input")
        start = 1
    else:
        bld.activation(g_in[0], (c, h, w), "input")
    inp = bld.name_of[ops[0][2][0] if start else g_in[0]]
    for k, (kind, ins, outs, op) in enumerate(ops[start:], start):
        if not outs or not ins:
            raise bld.err(f"operator {k} ({kind}) has no inputs or outputs")
        opt = op.BuiltinOptions()
        if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            bld.conv(k, kind, ins, outs, opt)
        elif kind == "PAD":
            bld.pad(k, ins, outs)
        elif kind == "ADD":
            bld.add(k, ins, outs, opt)
        elif kind in ("AVERAGE_POOL_2D", "MAX_POOL_2D", "MEAN"):
            bld.pool(k, kind, ins, outs, opt)
        elif kind == "RESHAPE":  # a vector, or a map flattened for the FULLY_CONNECTED that must read it next
            x = bld.src(ins[0], f"operator {k} (RESHAPE)")
            xs = bld.tensors[x]["shape"]
            out = r.shape(outs[0])
            nxt = [o for o in ops[k + 1:] if outs[0] in o[1]]
            flat = len(out) == 2 and out[0] == 1 and all(o[0] == "FULLY_CONNECTED" and o[1][0] == outs[0] for o in nxt)
            if int(np.prod(out)) != int(np.prod(xs)) or bld.act_quant(outs[0]) != bld.act_quant(ins[0]) or not (
                    len(xs) == 1 or int(np.prod(xs[1:])) == 1 or flat):
                raise bld.err(f"operator {k} (RESHAPE): only reshaping a vector, or flattening a map for a "
                              "FULLY_CONNECTED, is supported")
            bld.name_of[outs[0]] = x
        elif kind == "FULLY_CONNECTED":
            bld.fc(k, ins, outs, opt, last=k == len(ops) - 1)
        elif kind == "DEQUANTIZE" and k == len(ops) - 2 and ops[-1][0] == "FULLY_CONNECTED" and ops[-1][1][:1] == \
                outs[:1] and outs[0] not in ops[-1][1][1:]:  # the float head's input (export's default head)
            bld.dequantize(k, ins, outs)
        else:
            raise bld.err(f"operator {k}: unsupported op {kind}")
    if not bld.ops or bld.ops[-1]["kind"] != "linear":
        raise bld.err("the model does not end in a FULLY_CONNECTED classifier head (after SOFTMAX/DEQUANTIZE)")
    desc = {"format": "microtrain-graph/1", "name": bld.name, "inputs": [inp], "outputs": [bld.ops[-1]["outputs"][0]],
            "meta": {"requant": Requant.TFLITE.value, "source": "tflite"}, "tensors": bld.tensors, "ops": bld.ops}
    try:
        return Graph.from_dict(desc, bld.arrays)
    except GraphFormatError as e:
        raise ModelLoadError(f"{path}: {e}") from None


def load_tflite(path: str | Path) -> Graph:
    """A `.tflite` int8 model as a forward graph (one-line `ModelLoadError` on anything unsupported or corrupt)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_TFLITE_BYTES:
            raise ModelLoadError(f"{path}: larger than {MAX_TFLITE_BYTES >> 20} MB")
        buf = path.read_bytes()
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return tflite_to_graph(buf, path)
    except ModelLoadError:
        raise
    except Exception as e:  # the flatbuffer reader raises many types on hostile bytes
        raise ModelLoadError(f"{path}: corrupt TFLite file ({type(e).__name__}: {str(e)[:80]})") from None
