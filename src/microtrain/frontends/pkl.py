"""Reader for the tiny-training `.pkl` model files, without ever running pickled code.

The files are `torch.save` zip archives whose `archive/data.pkl` holds a plain dict of numpy arrays. We read that
pickle with an unpickler that admits only numpy array reconstruction; any other global (os.system, builtins.eval,
a torch storage, ...) is refused before it can be called. The dict is then checked against the expected schema and
converted to the project's graph IR.
"""

from __future__ import annotations

import codecs
import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from microtrain.errors import MicrotrainError
from microtrain.ir.graph import Graph, GraphFormatError, Op, Tensor, check_graph, one_line

MAX_PICKLE_BYTES = 256 << 20  # the paper's models are a few MB


class ModelLoadError(MicrotrainError):
    """A model file could not be read; the message names the file and the reason on one line."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


def _safe_dtype(*args: Any) -> np.dtype:
    dt = np.dtype(*args)
    if dt.hasobject:
        raise pickle.UnpicklingError("object arrays are not allowed")
    return dt


_ALLOWED = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("_codecs", "encode"): codecs.encode,
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name} (only numpy arrays are allowed)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused persistent reference (torch storages are not allowed)")


def read_pkl(path: str | Path) -> dict[str, Any]:
    """Return the model dict of a tiny-training `.pkl` (zip archive or raw pickle), refusing any code."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_PICKLE_BYTES:
            raise ModelLoadError(f"{path}: larger than {MAX_PICKLE_BYTES >> 20} MB")
        raw = path.read_bytes()
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read file ({e.strerror})") from None
    try:
        if raw[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(io.BytesIO(raw)) as z:
                names = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
                if not names:
                    raise ModelLoadError(f"{path}: zip archive has no data.pkl")
                size = z.getinfo(names[0]).file_size
                if size > MAX_PICKLE_BYTES:  # a zip bomb is refused by its declared size, before inflating
                    raise ModelLoadError(f"{path}: data.pkl inflates to {size >> 20} MB (at most "
                                         f"{MAX_PICKLE_BYTES >> 20} MB)")
                with z.open(names[0]) as f:
                    payload = f.read(MAX_PICKLE_BYTES + 1)
                if len(payload) > MAX_PICKLE_BYTES:
                    raise ModelLoadError(f"{path}: data.pkl is larger than it declares")
        elif raw[:1] == b"\x80":
            payload = raw
        else:
            raise ModelLoadError(f"{path}: not a model file (neither a zip archive nor a pickle)")
        obj = _NumpyOnlyUnpickler(io.BytesIO(payload)).load()
    except ModelLoadError:
        raise
    except (zipfile.BadZipFile, EOFError) as e:
        raise ModelLoadError(f"{path}: truncated or corrupt archive ({e})") from None
    except pickle.UnpicklingError as e:
        raise ModelLoadError(f"{path}: unsafe or corrupt pickle: {e}") from None
    except Exception as e:  # any other decoding failure of hostile bytes
        raise ModelLoadError(f"{path}: corrupt model file ({type(e).__name__}: {e})") from None
    _check_schema(path, obj)
    return obj


MAX_RESOLUTION = 1024  # in_shape of the stem (a larger image could never be trained in 256 KB anyway)
MAX_CHANNELS = 8192
MAX_KERNEL = 11
MAX_PARAMS = 1 << 26


def _num(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_schema(path: Path, d: Any) -> None:
    """Every key, type, shape, dtype, group count and finite value the converter reads, and size caps, before any
    array is derived from the file."""
    def fail(why: str) -> None:
        raise ModelLoadError(f"{path}: not a tiny-training model ({why})")

    if not isinstance(d, dict) or not {"first_conv", "blocks", "classifier"} <= set(d):
        fail("expected a dict with first_conv, blocks, classifier")
    if not isinstance(d["first_conv"], dict):
        fail("first_conv is not a dict")
    h = d["first_conv"].get("in_shape")
    if not _int(h) or not 1 <= h <= MAX_RESOLUTION:
        fail(f"first_conv.in_shape {str(h)[:40]} is not an integer in [1, {MAX_RESOLUTION}]")
    convs = [("first_conv", d["first_conv"]), ("classifier", d["classifier"])]
    if not isinstance(d["blocks"], list):
        fail("blocks is not a list")
    for i, b in enumerate(d["blocks"]):
        if not isinstance(b, dict) or not b.get("depthwise") or not b.get("pointwise2"):
            fail(f"block {i} lacks depthwise/pointwise2")
        if b.get("se") is not None:
            fail(f"block {i}: squeeze-excitation is an unsupported op")
        convs += [(f"blocks[{i}].{k}", b[k]) for k in ("pointwise1", "depthwise", "pointwise2") if b.get(k)]
        if b.get("residual"):
            r = b["residual"].get("params") if isinstance(b["residual"], dict) else None
            if not isinstance(r, dict):
                fail(f"blocks[{i}].residual has no params")
            _check_quant(fail, f"blocks[{i}].residual", r)
    if d.get("feature_mix") is not None:
        fail("feature_mix is an unsupported op")
    total = 0
    for where, c in convs:
        p = c.get("params") if isinstance(c, dict) else None
        if not isinstance(p, dict):
            fail(f"{where} has no params")
        w, b, s = p.get("weight"), p.get("bias"), p.get("w_scales")
        if not (isinstance(w, np.ndarray) and w.dtype == np.int8 and w.ndim == 4):
            fail(f"{where}.weight is not an int8 OIHW array")
        o, ci, kh, kw = w.shape
        if not (0 < o <= MAX_CHANNELS and 0 < ci <= MAX_CHANNELS and kh == kw and kh % 2 == 1 and kh <= MAX_KERNEL):
            fail(f"{where}.weight shape {list(w.shape)} (channels <= {MAX_CHANNELS}, square odd kernel <= "
                 f"{MAX_KERNEL})")
        total += w.size
        if not (isinstance(b, np.ndarray) and b.dtype == np.int32 and b.shape == (o,)):
            fail(f"{where}.bias is not int32 [{o}]")
        if not (isinstance(s, np.ndarray) and s.dtype.kind == "f" and s.shape == (o,)):
            fail(f"{where}.w_scales is not float [{o}]")
        if not (np.isfinite(s).all() and (s > 0).all()):
            fail(f"{where}.w_scales holds values that are not finite and positive")
        _check_quant(fail, where, p)
        if where == "classifier":
            if kh != 1:
                fail(f"classifier kernel is {kh}x{kw}, not 1x1")
            continue
        stride, groups = c.get("stride"), c.get("groups")
        if not _int(stride) or not 1 <= stride <= 4:
            fail(f"{where}.stride {str(stride)[:40]} is not an integer in [1, 4]")
        if not _int(groups) or not 1 <= groups <= MAX_CHANNELS or o % groups:
            fail(f"{where}.groups {str(groups)[:40]} does not divide its {o} output channels")
    if total > MAX_PARAMS:
        fail(f"{total} weights (at most {MAX_PARAMS})")


def _check_quant(fail: Any, where: str, p: dict[str, Any]) -> None:
    for k in ("x_scale", "y_scale"):
        v = p.get(k)
        if not (_num(v) and np.isfinite(v) and v > 0):
            fail(f"{where}.{k} {str(v)[:40]} is missing or not a finite positive number")
    for k in ("x_zero", "y_zero"):
        v = p.get(k)
        if not ((_int(v) or (_num(v) and float(v).is_integer())) and -128 <= v <= 127):
            fail(f"{where}.{k} {str(v)[:40]} is missing or not an integer in [-128, 127]")


def graph_name(stem: str) -> str:
    """A graph name from a file name: characters outside the name grammar (ir/graph.py NAME_RE) become _."""
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", stem)[:100]
    return name if name and (name[0].isalnum() or name[0] == "_") else f"m_{name}"


def load_pkl_model(path: str | Path) -> Graph:
    """A tiny-training `.pkl` as a checked graph: one-line ModelLoadError for anything the schema or the op table
    refuses (channel counts that do not chain, groups, quantization that does not match its producer)."""
    path = Path(path)
    d = read_pkl(path)
    try:
        g = pkl_to_graph(d, name=graph_name(path.stem))
        check_graph(g)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    except (GraphFormatError, KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ModelLoadError(f"{path}: not a valid model ({type(e).__name__}: {e})") from None
    return g


def pkl_to_graph(d: dict[str, Any], name: str) -> Graph:
    """Convert a tiny-training model dict to the IR (stem, blocks of pw1/dw/pw2 [+add], pool, int8 head)."""
    g = Graph(name=name)
    stem = d["first_conv"]
    h = int(stem["in_shape"])
    x = g.add_tensor(Tensor("input", (3, h, h), "int8", "input", float(stem["params"]["x_scale"]),
                            int(stem["params"]["x_zero"])))
    g.inputs.append(x.name)
    index = 0

    def conv(opname: str, c: dict[str, Any], xin: Tensor) -> Tensor:
        nonlocal index
        p = c["params"]
        w = g.add_tensor(Tensor(f"{opname}.w", tuple(p["weight"].shape), "int8", "weight",
                                np.asarray(p["w_scales"], np.float32), 0, p["weight"]))
        b = g.add_tensor(Tensor(f"{opname}.b", tuple(p["bias"].shape), "int32", "bias", data=p["bias"]))
        k = int(p["weight"].shape[2])
        attrs = {"stride": int(c["stride"]), "padding": k // 2, "groups": int(c["groups"]), "conv_index": index}
        index += 1
        op = Op(opname, "conv2d", [xin.name, w.name, b.name], [f"{opname}.y"], attrs)
        (shape,) = _shape_of(g, op)
        y = g.add_tensor(Tensor(f"{opname}.y", shape, "int8", "act", float(p["y_scale"]), int(p["y_zero"])))
        _check_input_quant(xin, p, opname)
        g.add_op(op)
        return y

    cur = conv("stem", stem, x)
    for i, b in enumerate(d["blocks"], start=1):
        blk_in = cur
        if b.get("pointwise1"):
            cur = conv(f"b{i}.pw1", b["pointwise1"], cur)
        cur = conv(f"b{i}.dw", b["depthwise"], cur)
        cur = conv(f"b{i}.pw2", b["pointwise2"], cur)
        if b.get("residual"):
            r = b["residual"]["params"]
            _check_input_quant(blk_in, r, f"b{i}.add")
            y = g.add_tensor(Tensor(f"b{i}.add.y", cur.shape, "int8", "act", float(r["y_scale"]), int(r["y_zero"])))
            g.add_op(Op(f"b{i}.add", "add", [cur.name, blk_in.name], [y.name]))
            cur = y
    pooled = g.add_tensor(Tensor("pool.y", (cur.shape[0],), "int8", "act", cur.scale, cur.zero))
    g.add_op(Op("pool", "avgpool", [cur.name], [pooled.name]))
    c = d["classifier"]
    p = c["params"]
    _check_input_quant(pooled, p, "head")
    w = g.add_tensor(Tensor("head.w", p["weight"].shape[:2], "int8", "weight",
                            np.asarray(p["w_scales"], np.float32), 0, p["weight"].reshape(p["weight"].shape[:2])))
    bias = g.add_tensor(Tensor("head.b", tuple(p["bias"].shape), "int32", "bias", data=p["bias"]))
    logits = g.add_tensor(Tensor("head.y", (w.shape[0],), "int8", "act", float(p["y_scale"]), int(p["y_zero"])))
    g.add_op(Op("head", "linear", [pooled.name, w.name, bias.name], [logits.name]))
    g.outputs.append(logits.name)
    g.meta.update({"source": "tiny-training pkl", "num_convs": index, "resolution": h})
    return g


def _shape_of(g: Graph, op: Op) -> list[tuple[int, ...]]:
    from microtrain.ir.ops import OPS

    return OPS[op.kind].shape(g, op)


def _check_input_quant(xin: Tensor, p: dict[str, Any], where: str) -> None:
    """The graph chains tensors; the file stores each conv's input quantization again. They must agree."""
    if not (np.isclose(float(p["x_scale"]), float(xin.scale)) and int(p["x_zero"]) == xin.zero):
        raise ModelLoadError(f"{where}: input quantization ({p['x_scale']}, {p['x_zero']}) does not match the "
                             f"producer of {xin.name} ({xin.scale}, {xin.zero})")
