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
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from microtrain.errors import MicrotrainError
from microtrain.ir.graph import Graph, Op, Tensor


class ModelLoadError(MicrotrainError):
    """A model file could not be read; the message names the file and the reason on one line."""


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
        raw = path.read_bytes()
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read file ({e.strerror})") from None
    try:
        if raw[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(io.BytesIO(raw)) as z:
                names = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
                if not names:
                    raise ModelLoadError(f"{path}: zip archive has no data.pkl")
                payload = z.read(names[0])
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


def _check_schema(path: Path, d: Any) -> None:
    def fail(why: str) -> None:
        raise ModelLoadError(f"{path}: not a tiny-training model ({why})")

    if not isinstance(d, dict) or not {"first_conv", "blocks", "classifier"} <= set(d):
        fail("expected a dict with first_conv, blocks, classifier")
    convs = [("first_conv", d["first_conv"]), ("classifier", d["classifier"])]
    if not isinstance(d["blocks"], list):
        fail("blocks is not a list")
    for i, b in enumerate(d["blocks"]):
        if not isinstance(b, dict) or "depthwise" not in b or "pointwise2" not in b:
            fail(f"block {i} lacks depthwise/pointwise2")
        if b.get("se") is not None:
            fail(f"block {i}: squeeze-excitation is an unsupported op")
        convs += [(f"blocks[{i}].{k}", b[k]) for k in ("pointwise1", "depthwise", "pointwise2") if b.get(k)]
    if d.get("feature_mix") is not None:
        fail("feature_mix is an unsupported op")
    for where, c in convs:
        p = c.get("params") if isinstance(c, dict) else None
        if not isinstance(p, dict):
            fail(f"{where} has no params")
        w, b, s = p.get("weight"), p.get("bias"), p.get("w_scales")
        if not (isinstance(w, np.ndarray) and w.dtype == np.int8 and w.ndim == 4):
            fail(f"{where}.weight is not an int8 OIHW array")
        if not (isinstance(b, np.ndarray) and b.dtype == np.int32 and b.shape == (w.shape[0],)):
            fail(f"{where}.bias is not int32 [{w.shape[0]}]")
        if not (isinstance(s, np.ndarray) and s.shape == (w.shape[0],)):
            fail(f"{where}.w_scales is not [{w.shape[0]}]")
        for k in ("x_scale", "x_zero", "y_scale", "y_zero"):
            if not isinstance(p.get(k), (int, float, np.integer, np.floating)):
                fail(f"{where}.{k} missing")


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
