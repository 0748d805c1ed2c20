"""Reader for float ONNX models (any framework's exporter), parsed with the `onnx` package's protobuf classes:
nothing in the file is executed. The result is a `FloatGraph` (frontends/float_graph.py) that frontends/ptq.py
quantizes.

Supported nodes: Conv (regular; depthwise with group = channels, multiplier 1), BatchNormalization (folded into the
conv before it), Relu / Clip (the producer's clamp), Add of two feature maps, GlobalAveragePool / ReduceMean over
H, W, Flatten / Reshape / Squeeze of the pooled vector, Gemm as the classifier head (the last op),
MaxPool / AveragePool where the IR has windowed pooling, Identity / Dropout (inference). Refused with one line:
external data (weights in a side file), a dynamic or missing spatial size, anything else (named).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from microtrain.frontends.float_graph import FloatBuilder, FloatGraph
from microtrain.frontends.pkl import ModelLoadError, graph_name

MAX_ONNX_BYTES = 256 << 20


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _norm_from_metadata(model: Any, path: Path) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """The input normalization the file states in its metadata (`mean`, `std`: comma-separated floats)."""
    props = {p.key: p.value for p in model.metadata_props}
    out = []
    for key in ("mean", "std"):
        if key not in props:
            out.append(None)
            continue
        try:
            vals = tuple(float(v) for v in props[key].split(","))
        except ValueError:
            raise ModelLoadError(f"{path}: metadata {key}={props[key][:40]!r} is not a list of numbers") from None
        out.append(vals)
    return out[0], out[1]


def _pads(a: dict[str, Any], n: str, kernel: tuple[int, int], stride: tuple[int, int], hw: tuple[int, int],
          path: Path) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) from ONNX `pads` [t, l, b, r] or auto_pad."""
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for size, k, s in zip(hw, kernel, stride, strict=True):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            small = total // 2
            out.append((small, total - small) if auto == "SAME_UPPER" else (total - small, small))
        return out[0][0], out[0][1], out[1][0], out[1][1]
    if auto == "VALID":
        return 0, 0, 0, 0
    if auto != "NOTSET":
        raise ModelLoadError(f"{path}: node {n}: auto_pad {auto!r} is not supported")
    p = [int(v) for v in a.get("pads", [0, 0, 0, 0])]
    if len(p) != 4:
        raise ModelLoadError(f"{path}: node {n}: pads {p} (2-D pads expected)")
    return p[0], p[2], p[1], p[3]


def onnx_to_float(model: Any, path: Path) -> FloatGraph:
    """A checked `onnx.ModelProto` as a FloatGraph (one-line ModelLoadError on anything unsupported)."""
    from onnx import TensorProto, numpy_helper

    g = model.graph
    for t in g.initializer:
        if t.data_location == TensorProto.EXTERNAL or t.external_data:
            raise ModelLoadError(f"{path}: initializer {t.name[:60]!r} uses external data (a side file); only a "
                                 "self-contained .onnx is supported")
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    inputs = [i for i in g.input if i.name not in consts]
    if len(inputs) != 1 or len(g.output) != 1:
        raise ModelLoadError(f"{path}: {len(inputs)} inputs and {len(g.output)} outputs (one image in, one output "
                             "supported)")
    inp = inputs[0]
    tt = inp.type.tensor_type
    if tt.elem_type != TensorProto.FLOAT:
        raise ModelLoadError(f"{path}: input {inp.name[:60]!r} is not float32 (element type {tt.elem_type})")
    dims = list(tt.shape.dim)
    if len(dims) != 4:
        raise ModelLoadError(f"{path}: input {inp.name[:60]!r} has rank {len(dims)}, not N x C x H x W")
    shape = []
    for axis, d in zip(("channel", "height", "width"), dims[1:], strict=True):
        if not d.HasField("dim_value") or d.dim_value <= 0:
            sym = d.dim_param or "unknown"
            raise ModelLoadError(f"{path}: input {inp.name[:60]!r} has a dynamic {axis} ({sym!r}); export it with "
                                 "a fixed C x H x W (only the batch axis may be dynamic)")
        shape.append(int(d.dim_value))
    uses = Counter(n for node in g.node for n in node.input if n)
    uses.update(o.name for o in g.output)
    stem = graph_name(path.stem)
    b = FloatBuilder(path, stem, "onnx", uses)
    b.set_input(inp.name, tuple(shape))

    def const(name: str, what: str) -> np.ndarray:
        if name not in consts:
            raise ModelLoadError(f"{path}: {what}: {name[:60]!r} is not a constant (weights must be initializers)")
        return consts[name]

    def scalar(name: str, what: str, default: float) -> float:
        if not name:
            return default
        v = const(name, what).reshape(-1)
        if v.size != 1:
            raise ModelLoadError(f"{path}: {what}: {name[:60]!r} is not a scalar")
        return float(v[0])

    for k, node in enumerate(g.node):
        op = node.op_type
        n = node.name or f"node{k}"
        what = f"node {n[:60]} ({op})"
        if node.domain not in ("", "ai.onnx"):
            raise ModelLoadError(f"{path}: {what}: unsupported op {node.domain}.{op}")
        a = _attrs(node)
        ins, outs = list(node.input), list(node.output)
        if op == "Constant":
            if "value" not in a:
                raise ModelLoadError(f"{path}: {what}: only tensor constants are supported")
            consts[outs[0]] = numpy_helper.to_array(a["value"])
        elif op == "Conv":
            w = const(ins[1], what)
            xs = b.shapes.get(b.alias.get(ins[0], ins[0]), (0, 0, 0))
            kernel = tuple(int(v) for v in a.get("kernel_shape", w.shape[2:]))
            stride = tuple(int(v) for v in a.get("strides", [1, 1]))
            pads = _pads(a, n, kernel, stride, tuple(xs[1:3]) if len(xs) == 3 else (0, 0), path)
            bias = const(ins[2], what) if len(ins) > 2 and ins[2] else None
            b.conv(n, ins[0], outs[0], w, bias, stride, pads, int(a.get("group", 1)),
                   tuple(int(v) for v in a.get("dilations", [1, 1])))
        elif op == "BatchNormalization":
            if a.get("training_mode", 0) or len([o for o in outs if o]) > 1:
                raise ModelLoadError(f"{path}: {what}: training-mode BatchNormalization is not supported")
            b.batchnorm(n, ins[0], outs[0], *(const(i, what) for i in ins[1:5]), float(a.get("epsilon", 1e-5)))
        elif op == "Relu":
            b.clamp(n, op, ins[0], outs[0], 0.0, np.inf)
        elif op == "Clip":
            lo = scalar(ins[1] if len(ins) > 1 else "", what, float(a.get("min", -np.inf)))
            hi = scalar(ins[2] if len(ins) > 2 else "", what, float(a.get("max", np.inf)))
            b.clamp(n, op, ins[0], outs[0], lo, hi)
        elif op == "Add":
            if ins[0] in consts or ins[1] in consts:
                raise ModelLoadError(f"{path}: {what}: an add of a constant is not supported")
            b.add(n, ins[0], ins[1], outs[0])
        elif op == "GlobalAveragePool":
            b.gap(n, ins[0], outs[0])
        elif op == "ReduceMean":
            axes = a.get("axes")
            if len(ins) > 1 and ins[1]:
                axes = const(ins[1], what).reshape(-1).tolist()
            if axes is None or sorted(int(v) % 4 for v in axes) != [2, 3]:
                raise ModelLoadError(f"{path}: {what}: mean over axes {axes} (only H, W [2, 3] is supported)")
            b.gap(n, ins[0], outs[0])
        elif op in ("Flatten", "Squeeze"):
            if op == "Flatten" and int(a.get("axis", 1)) != 1:
                raise ModelLoadError(f"{path}: {what}: axis {a.get('axis')} (only 1 is supported)")
            b.flatten(n, op, ins[0], outs[0])
        elif op == "Reshape":
            target = const(ins[1], what).reshape(-1).astype(np.int64)
            if target.size != 2:
                raise ModelLoadError(f"{path}: {what}: reshape to {target.tolist()} (only to N x C is supported)")
            b.flatten(n, op, ins[0], outs[0], None if target[1] <= 0 else int(target[1]))
        elif op == "Gemm":
            if a.get("transA", 0) or len(ins) < 2:
                raise ModelLoadError(f"{path}: {what}: transA is not supported")
            w = const(ins[1], what) * float(a.get("alpha", 1.0))
            w = w if a.get("transB", 0) else w.T
            bias = const(ins[2], what) * float(a.get("beta", 1.0)) if len(ins) > 2 and ins[2] else None
            b.linear(n, ins[0], outs[0], w, bias)
        elif op in ("MaxPool", "AveragePool"):
            xs = b.shapes.get(b.alias.get(ins[0], ins[0]), (0, 0, 0))
            kernel = tuple(int(v) for v in a.get("kernel_shape", [1, 1]))
            stride = tuple(int(v) for v in a.get("strides", [1, 1]))
            if tuple(int(v) for v in a.get("dilations", [1, 1])) != (1, 1) or len([o for o in outs if o]) > 1:
                raise ModelLoadError(f"{path}: {what}: dilation or an indices output is not supported")
            pads = _pads(a, n, kernel, stride, tuple(xs[1:3]) if len(xs) == 3 else (0, 0), path)
            b.pool(n, op, ins[0], outs[0], kernel, stride, pads, bool(a.get("count_include_pad", 0)),
                   bool(a.get("ceil_mode", 0)))
        elif op in ("Identity", "Dropout"):
            b.identity(ins[0], outs[0])
        else:
            raise ModelLoadError(f"{path}: {what}: unsupported op {op}")
    mean, std = _norm_from_metadata(model, path)
    return b.finish(g.output[0].name, mean, std)


def load_onnx(path: str | Path) -> FloatGraph:
    """A float `.onnx` file as a FloatGraph; one-line ModelLoadError on a corrupt, unsafe or unsupported file."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    try:
        if path.stat().st_size > MAX_ONNX_BYTES:
            raise ModelLoadError(f"{path}: larger than {MAX_ONNX_BYTES >> 20} MB")
        buf = path.read_bytes()
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        model = onnx.load_model_from_string(buf)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{path}: not an ONNX model ({type(e).__name__}: {str(e)[:80]})") from None
    if not model.graph.node:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph nodes)")
    try:
        return onnx_to_float(model, path)
    except ModelLoadError:
        raise
    except Exception as e:  # hostile protobuf contents: wrong types, shapes, indices
        raise ModelLoadError(f"{path}: malformed ONNX model ({type(e).__name__}: {str(e)[:80]})") from None
