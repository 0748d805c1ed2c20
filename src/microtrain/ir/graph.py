"""The int8 graph IR: typed tensors with explicit quantization, ops in execution order.

One `Graph` describes a model (and later its training step). The host executor, the memory planner and the C
generator all read this same object, so its fields are deliberately plain: shapes are per-sample (no batch axis),
quantization parameters live on the tensors, and ops are a list in the order they run.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from microtrain.errors import MicrotrainError
from microtrain.ir import ops as opdefs
from microtrain.ir.quant import Requant
from microtrain.ir.trainmeta import check as check_params

DTYPE_BYTES = {"int8": 1, "qint8": 1, "uint8": 1, "int16": 2, "int32": 4, "float32": 4, "bit": 0.125}
ROLES = ("input", "act", "weight", "bias", "const", "label", "loss", "grad", "mask", "state")


@dataclass
class Tensor:
    """A value in the graph. Activations are int8 with per-tensor (scale, zero); weights are int8 with a
    per-output-channel scale array and zero 0; biases are int32 in units of x_scale * w_scale[c]."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    role: str
    scale: float | np.ndarray | None = None
    zero: int = 0
    data: np.ndarray | None = None

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        """Storage bytes; 1-bit masks round up to whole bytes; qint8 = int8 values + a float32 scale per channel."""
        if self.dtype == "qint8":
            return self.numel + 4 * (self.shape[0] if self.shape else 1)
        return int(np.ceil(self.numel * DTYPE_BYTES[self.dtype]))

    def describe(self) -> str:
        q = ""
        if isinstance(self.scale, np.ndarray):
            q = f" s=per-channel[{self.scale.size}]"
        elif self.scale is not None:
            q = f" s={self.scale:.6g} z={self.zero}"
        return f"{self.dtype}[{','.join(map(str, self.shape))}]{q}"


@dataclass
class Op:
    """One operation: `outputs = kind(inputs, **attrs)`; attribute meaning is documented in `ir/ops.py`."""

    name: str
    kind: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Graph:
    name: str
    tensors: dict[str, Tensor] = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- building -------------------------------------------------------------------------------------------
    def add_tensor(self, t: Tensor) -> Tensor:
        if t.name in self.tensors:
            raise GraphFormatError(f"duplicate tensor name {t.name!r}")
        self.tensors[t.name] = t
        return t

    def add_op(self, op: Op) -> Op:
        if op.kind not in opdefs.OPS:
            raise GraphFormatError(f"op {op.name}: unsupported op kind {str(op.kind)[:40]!r}")
        for n in op.inputs:
            if n not in self.tensors:
                raise GraphFormatError(f"op {op.name}: unknown input tensor {str(n)[:60]!r}")
        self.ops.append(op)
        return op

    # ---- queries --------------------------------------------------------------------------------------------
    def op(self, name: str) -> Op:
        for o in self.ops:
            if o.name == name:
                return o
        raise KeyError(name)

    def producer(self, tensor: str) -> Op | None:
        for o in self.ops:
            if tensor in o.outputs:
                return o
        return None

    def consumers(self, tensor: str) -> list[Op]:
        return [o for o in self.ops if tensor in o.inputs]

    def convs(self) -> list[Op]:
        """Backbone convolutions in forward order, indexed as in the paper (stem = 0; classifier excluded)."""
        cs = [o for o in self.ops if o.kind == "conv2d" and o.attrs.get("conv_index") is not None]
        return sorted(cs, key=lambda o: o.attrs["conv_index"])

    @property
    def requant(self) -> Requant:
        """The graph's requantization rule (`ir/quant.py` Requant, stated in `ir/ops.py`): `meta["requant"]`, the
        zoo models' float32 multiplier when absent. Kept in meta so every graph derived from this one inherits it."""
        return Requant(self.meta.get("requant", Requant.FLOAT32.value))

    def params(self) -> list[Tensor]:
        return [t for t in self.tensors.values() if t.role in ("weight", "bias")]

    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values() if t.role in ("weight", "bias"))

    def macs(self) -> int:
        return sum(opdefs.OPS[o.kind].macs(self, o) for o in self.ops)

    def const_bytes(self) -> int:
        """Bytes of frozen constants a device keeps in flash: int8 weights, int32 biases, float32 channel scales."""
        total = 0
        for t in self.tensors.values():
            if t.role in ("weight", "bias", "const"):
                total += t.nbytes
                if isinstance(t.scale, np.ndarray):
                    total += t.scale.size * 4
        return total

    # ---- printing -------------------------------------------------------------------------------------------
    def __str__(self) -> str:
        lines = [f"graph {self.name}(" + ", ".join(f"%{n}: {self.tensors[n].describe()}" for n in self.inputs) + ")"]
        for o in self.ops:
            attrs = " ".join(f"{k}={v}" for k, v in o.attrs.items() if not isinstance(v, (list, dict, np.ndarray)))
            outs = ", ".join(f"%{n}" for n in o.outputs)
            ins = ", ".join(f"%{n}" for n in o.inputs)
            typ = ", ".join(self.tensors[n].describe() for n in o.outputs)
            lhs = f"{outs} = " if outs else ""
            lines.append(f"  {lhs}{o.kind}({ins}) {attrs}  # {o.name}: {typ}".rstrip())
        lines.append("  return " + ", ".join(f"%{n}" for n in self.outputs))
        return "\n".join(lines)

    # ---- serialisation: JSON description + npz arrays (never pickle) ------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def tdict(t: Tensor) -> dict[str, Any]:
            d: dict[str, Any] = {"shape": list(t.shape), "dtype": t.dtype, "role": t.role, "zero": t.zero}
            if isinstance(t.scale, np.ndarray):
                d["scale"] = "array"
            elif t.scale is not None:
                d["scale"] = float(t.scale)
            return d

        return {
            "format": "microtrain-graph/1",
            "name": self.name,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "meta": self.meta,
            "tensors": {n: tdict(t) for n, t in self.tensors.items()},
            "ops": [{"name": o.name, "kind": o.kind, "inputs": o.inputs, "outputs": o.outputs, "attrs": o.attrs}
                    for o in self.ops],
        }

    def arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for n, t in self.tensors.items():
            if t.data is not None:
                out[n] = t.data
            if isinstance(t.scale, np.ndarray):
                out[n + "@scale"] = t.scale
        return out

    def save(self, stem: str | Path) -> None:
        """Write `stem.json` and `stem.npz`."""
        Path(f"{stem}.json").write_text(json.dumps(self.to_dict(), indent=1))
        with open(f"{stem}.npz", "wb") as f:  # a file object: savez must not append a second suffix
            np.savez_compressed(f, **self.arrays())

    @classmethod
    def from_dict(cls, d: dict[str, Any], arrays: dict[str, np.ndarray]) -> Graph:
        """A graph from its JSON description and arrays, checked before anything is allocated or run: every key,
        name (the identifier grammar `NAME_RE`), shape, dtype, role, quantization parameter, array and op against
        the op table (`check_graph`). Raises `GraphFormatError` (one line) on anything else."""
        try:
            return cls._from_checked(d, arrays)
        except GraphFormatError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, ZeroDivisionError,
                RecursionError) as e:  # a check this validator does not name: still one line, never a traceback
            raise GraphFormatError(f"malformed graph ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_checked(cls, d: Any, arrays: dict[str, np.ndarray]) -> Graph:
        d = _check_description(d)
        g = cls(name=d["name"], inputs=list(d["inputs"]), outputs=list(d["outputs"]), meta=dict(d["meta"]))
        known = set(d["tensors"]) | {n + "@scale" for n in d["tensors"]}
        extra = sorted(set(arrays) - known)
        if extra:
            raise GraphFormatError(f"array {extra[0]!r} belongs to no tensor")
        for n, td in d["tensors"].items():
            scale = td.get("scale")
            if scale == "array":
                if n + "@scale" not in arrays:
                    raise GraphFormatError(f"tensor {n}: scale array {n + '@scale'!r} is missing")
                scale = arrays[n + "@scale"]
            g.add_tensor(Tensor(n, tuple(td["shape"]), td["dtype"], td["role"], scale, td["zero"], arrays.get(n)))
        for od in d["ops"]:
            g.add_op(Op(od["name"], od["kind"], list(od["inputs"]), list(od["outputs"]), dict(od["attrs"])))
        check_graph(g)
        return g

    @classmethod
    def load(cls, stem: str | Path) -> Graph:
        """`stem.json` + `stem.npz`, size-capped before reading (a zip bomb is refused by its declared sizes)."""
        jpath, npath = Path(f"{stem}.json"), Path(f"{stem}.npz")
        try:
            if jpath.stat().st_size > MAX_JSON_BYTES:
                raise GraphFormatError(f"{jpath}: larger than {MAX_JSON_BYTES >> 20} MB")
            d = json.loads(jpath.read_text(encoding="utf-8"))
            arrays = _read_npz(npath)
            return cls.from_dict(d, arrays)
        except GraphFormatError as e:
            raise GraphFormatError(f"{jpath}: {e}" if not str(e).startswith(str(jpath)) else str(e)) from None
        except FileNotFoundError as e:
            raise GraphFormatError(f"{e.filename}: no such file") from None
        except OSError as e:
            raise GraphFormatError(f"{jpath}: cannot read ({e.strerror or e})") from None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise GraphFormatError(f"{jpath}: not a JSON model ({e})") from None
        except (ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
            raise GraphFormatError(f"{npath}: corrupt arrays ({type(e).__name__}: {e})") from None


# ---- validation: everything a model file says is checked before it is used ------------------------------------------
class GraphFormatError(MicrotrainError, ValueError):
    """A graph description or its arrays break the format; the message is one line (values quoted from the file
    have their control characters escaped)."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


def one_line(text: str) -> str:
    """`text` with every non-printable character (newlines included) written as its escape."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@#+-]{0,199}")  # graph, tensor and op names; nothing that C or a
# shell could read as syntax (no quotes, slashes, stars, spaces, backslashes, control characters)
MAX_DIM = 1 << 16  # any one axis
MAX_SPATIAL = 2048  # H, W of an activation
MAX_ELEMENTS = 1 << 26  # of any one tensor (256 MB of float32)
MAX_TOTAL_ELEMENTS = 1 << 28  # of all tensors together
MAX_TENSORS, MAX_OPS = 100_000, 100_000
MAX_JSON_BYTES = 64 << 20
MAX_NPZ_BYTES = 512 << 20  # uncompressed, as declared by the archive (zero optimizer slots compress 1000x)
ARRAY_DTYPES = {"int8": "int8", "int32": "int32", "float32": "float32", "uint8": "uint8", "int16": "int16"}
INT_ATTRS = {"stride": (1, 16), "padding": (0, 64), "groups": (1, MAX_DIM), "conv_index": (0, MAX_OPS),
             "train_channels": (0, MAX_DIM), "split_axis": (0, 3), "kernel": (1, 64), "channels": (0, MAX_DIM),
             "scratch_bytes": (0, 1 << 31), "grid": (1, 64), "macs": (0, 1 << 62), "pad_bottom": (0, 64),
             "pad_right": (0, 64), "act_min": (-128, 127), "act_max": (-128, 127), "pool_h": (1, MAX_SPATIAL),
             "pool_w": (1, MAX_SPATIAL), "pad_left": (0, 64), "to": (1, 3)}
TRAIN_CONFIG_TYPES = {"optimizer": str, "momentum": float, "betas": list, "eps": float, "qas": bool, "reorder": bool,
                      "update_storage": str, "int8_grads": bool, "seed": int}


def check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        shown = repr(name)[:60]
        raise GraphFormatError(f"{what} {shown} is not a valid name (letters, digits and _ . : @ # + -, at most 200, "
                               "not starting with - . : @ # +)")
    return name


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _check_description(d: Any) -> dict[str, Any]:
    """The JSON skeleton: keys and their types, names, shapes, dtypes, roles and scalar quantization parameters."""
    if not isinstance(d, dict):
        raise GraphFormatError(f"expected a JSON object, got {type(d).__name__}")
    if d.get("format") != "microtrain-graph/1":
        raise GraphFormatError(f"unknown graph format {str(d.get('format'))[:60]!r}")
    for key, typ in (("name", str), ("inputs", list), ("outputs", list), ("tensors", dict), ("ops", list)):
        if not isinstance(d.get(key), typ):
            raise GraphFormatError(f"key {key!r} is missing or not a {typ.__name__}")
    meta = d.get("meta", {})
    if not isinstance(meta, dict):
        raise GraphFormatError("key 'meta' is not an object")
    check_name(d["name"], "graph name")
    if len(d["tensors"]) > MAX_TENSORS or len(d["ops"]) > MAX_OPS:
        raise GraphFormatError(f"more than {MAX_TENSORS} tensors or {MAX_OPS} ops")
    total = 0
    for n, td in d["tensors"].items():
        check_name(n, "tensor")
        if not isinstance(td, dict):
            raise GraphFormatError(f"tensor {n}: not an object")
        shape = td.get("shape")
        if not isinstance(shape, list) or len(shape) > 4 or not all(_is_int(s) and 0 < s <= MAX_DIM for s in shape):
            raise GraphFormatError(f"tensor {n}: shape {str(shape)[:60]} is not a list of at most 4 sizes in "
                                   f"[1, {MAX_DIM}]")
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if numel > MAX_ELEMENTS:
            raise GraphFormatError(f"tensor {n}: {numel} elements (at most {MAX_ELEMENTS})")
        total += numel
        if not isinstance(td.get("dtype"), str) or td["dtype"] not in DTYPE_BYTES:
            raise GraphFormatError(f"tensor {n}: unknown dtype {str(td.get('dtype'))[:40]!r}")
        if not isinstance(td.get("role"), str) or td["role"] not in ROLES:
            raise GraphFormatError(f"tensor {n}: unknown role {str(td.get('role'))[:40]!r}")
        if not _is_int(td.get("zero")) or not -128 <= td["zero"] <= 255:
            raise GraphFormatError(f"tensor {n}: zero point {str(td.get('zero'))[:40]} is not an integer in "
                                   "[-128, 255]")
        scale = td.get("scale")
        if scale is not None and scale != "array" and not (_is_num(scale) and np.isfinite(scale) and scale > 0):
            raise GraphFormatError(f"tensor {n}: scale {str(scale)[:40]} is not a finite positive number")
        if td["role"] == "act" and len(shape) == 3 and max(shape[1:]) > MAX_SPATIAL:
            raise GraphFormatError(f"tensor {n}: {shape[1]}x{shape[2]} is larger than {MAX_SPATIAL}x{MAX_SPATIAL}")
    if total > MAX_TOTAL_ELEMENTS:
        raise GraphFormatError(f"{total} elements in all (at most {MAX_TOTAL_ELEMENTS})")
    for key in ("inputs", "outputs"):
        for n in d[key]:
            if not isinstance(n, str) or n not in d["tensors"]:
                raise GraphFormatError(f"graph {key[:-1]} {str(n)[:60]!r} is not a tensor")
    seen: set[str] = set()
    for i, od in enumerate(d["ops"]):
        if not isinstance(od, dict):
            raise GraphFormatError(f"op {i}: not an object")
        for key, typ in (("name", str), ("kind", str), ("inputs", list), ("outputs", list), ("attrs", dict)):
            if not isinstance(od.get(key), typ):
                raise GraphFormatError(f"op {i}: key {key!r} is missing or not a {typ.__name__}")
        name = check_name(od["name"], "op")
        if name in seen:
            raise GraphFormatError(f"duplicate op name {name!r}")
        seen.add(name)
        for n in (*od["inputs"], *od["outputs"]):
            if not isinstance(n, str) or n not in d["tensors"]:
                raise GraphFormatError(f"op {name}: operand {str(n)[:60]!r} is not a tensor")
        for k, v in od["attrs"].items():
            _check_attr(name, k, v)
    _check_meta(meta, d["tensors"])
    return d


def _check_attr(op: str, key: str, v: Any) -> None:
    if not isinstance(key, str) or not NAME_RE.fullmatch(key):
        raise GraphFormatError(f"op {op}: attribute name {str(key)[:40]!r} is not a valid name")
    if key in INT_ATTRS:
        lo, hi = INT_ATTRS[key]
        if not _is_int(v) or not lo <= v <= hi:
            raise GraphFormatError(f"op {op}: attribute {key}={str(v)[:40]} is not an integer in [{lo}, {hi}]")
        return

    def ok(x: Any, depth: int) -> bool:
        if x is None or isinstance(x, bool) or _is_int(x):
            return True
        if isinstance(x, float):
            return bool(np.isfinite(x))
        if isinstance(x, str):
            return bool(NAME_RE.fullmatch(x))
        if isinstance(x, list) and depth < 3 and len(x) <= MAX_OPS:
            return all(ok(y, depth + 1) for y in x)
        return False

    if not ok(v, 0):
        raise GraphFormatError(f"op {op}: attribute {key}={str(v)[:40]!r} is not a number, flag, name or list of them")


def _check_meta(meta: dict[str, Any], tensors: dict[str, Any]) -> None:
    """The parts of `meta` the trainer, planner and C generator read: the training description."""
    rq = meta.get("requant", Requant.FLOAT32.value)
    if rq not in {r.value for r in Requant}:
        raise GraphFormatError(f"meta.requant {str(rq)[:40]!r} is not one of {', '.join(r.value for r in Requant)}")
    tr = meta.get("train")
    if tr is None:
        return
    if not isinstance(tr, dict):
        raise GraphFormatError("meta.train is not an object")
    k = tr.get("num_classes")
    if not _is_int(k) or not 1 <= k <= MAX_DIM:
        raise GraphFormatError(f"meta.train.num_classes {str(k)[:40]} is not an integer in [1, {MAX_DIM}]")
    state = tr.get("state")
    if not isinstance(state, list) or not all(isinstance(n, str) and n in tensors for n in state):
        raise GraphFormatError("meta.train.state is not a list of the graph's tensors")
    if len(set(state)) != len(state):
        raise GraphFormatError("meta.train.state names a tensor twice")
    if not (isinstance(tr.get("pooled"), str) and tr["pooled"] in tensors):
        raise GraphFormatError("meta.train.pooled is not a tensor of the graph")
    why = check_params(tr.get("params"), tensors, state)
    if why:
        raise GraphFormatError(why)
    cfg = tr.get("config")
    if not isinstance(cfg, dict):
        raise GraphFormatError("meta.train.config is not an object")
    for key, v in cfg.items():
        typ = TRAIN_CONFIG_TYPES.get(key)
        if typ is None:
            raise GraphFormatError(f"meta.train.config: unknown key {str(key)[:40]!r}")
        good = (_is_num(v) and np.isfinite(v)) if typ is float else _is_int(v) if typ is int else isinstance(v, typ)
        if typ is list:
            good = len(v) == 2 and all(_is_num(b) and 0 <= b < 1 for b in v)
        if not good:
            raise GraphFormatError(f"meta.train.config.{key} = {str(v)[:40]!r} is not a valid {typ.__name__}")
    scheme = tr.get("scheme")
    if not isinstance(scheme, dict) or not isinstance(scheme.get("name"), str):
        raise GraphFormatError("meta.train.scheme is not a scheme description")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an npz, refusing pickled objects, names that are not tensor names, and archives that declare
    more than MAX_NPZ_BYTES uncompressed."""
    try:
        with zipfile.ZipFile(path) as z:
            declared = sum(i.file_size for i in z.infolist())
    except OSError:
        raise
    except Exception as e:  # zipfile raises BadZipFile, NotImplementedError, ValueError, ... on hostile bytes
        raise GraphFormatError(f"{path}: corrupt arrays ({type(e).__name__}: {e})") from None
    if declared > MAX_NPZ_BYTES:
        raise GraphFormatError(f"{path}: inflates to {declared >> 20} MB (at most {MAX_NPZ_BYTES >> 20} MB)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # hostile bytes: zipfile, zlib and numpy's format reader raise many types
        raise GraphFormatError(f"{path}: corrupt arrays ({type(e).__name__}: {e})") from None


def check_graph(g: Graph) -> None:
    """Semantic checks of a graph against the op table: tensors' arrays (dtype, shape, finite values), per-channel
    scales, operand counts, and for every forward op its weights' and outputs' shapes."""
    for n, t in g.tensors.items():
        check_name(n, "tensor")
        if not all(_is_int(s) and 0 < s <= MAX_DIM for s in t.shape) or t.numel > MAX_ELEMENTS:
            raise GraphFormatError(f"tensor {n}: shape {list(t.shape)} is empty or too large")
        if t.data is not None:
            a = t.data
            want = ARRAY_DTYPES.get(t.dtype)
            if want is None or a.dtype != np.dtype(want) or tuple(a.shape) != tuple(t.shape):
                raise GraphFormatError(f"tensor {n}: array {a.dtype}{list(a.shape)} does not match its declared "
                                       f"{t.dtype}{list(t.shape)}")
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise GraphFormatError(f"tensor {n}: array holds NaN or infinite values")
        elif t.role in ("weight", "bias", "const"):
            raise GraphFormatError(f"tensor {n}: a {t.role} without its array")
        if isinstance(t.scale, np.ndarray):
            s = t.scale
            if s.dtype.kind != "f" or s.shape != (t.shape[0] if t.shape else 1,):
                raise GraphFormatError(f"tensor {n}: scale array {s.dtype}{list(s.shape)} is not one float per "
                                       "channel")
            if not (np.isfinite(s).all() and (s > 0).all()):
                raise GraphFormatError(f"tensor {n}: scale array holds values that are not finite and positive")
    check_name(g.name, "graph name")
    for op in g.ops:
        check_name(op.name, "op")
        opdef = opdefs.OPS[op.kind]
        named = [o for o in opdef.operands if o != "..."]
        if op.kind in _FORWARD_CHECKS and op.kind != "conv2d" and len(op.inputs) != len(named):  # training ops vary
            # (slots, bias-only); a conv's weight may come in two parts (checked in _check_conv)
            raise GraphFormatError(f"op {op.name}: {op.kind} takes operands ({', '.join(opdef.operands)}), got "
                                   f"{len(op.inputs)}")
        if op.kind in _FORWARD_CHECKS:
            _FORWARD_CHECKS[op.kind](g, op)
        if op.kind == "conv2d":  # its shape is checked above, including split weights
            continue
        try:
            shapes = opdef.shape(g, op)
            macs = opdef.macs(g, op)
        except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as e:
            raise GraphFormatError(f"op {op.name}: operands do not fit a {op.kind} ({type(e).__name__}: {e})") from None
        if len(shapes) > len(op.outputs) or any(tuple(s) != g.tensors[o].shape for s, o in zip(shapes, op.outputs,
                                                                                               strict=False)):
            raise GraphFormatError(f"op {op.name}: declared outputs "
                                   f"{[list(g.tensors[o].shape) for o in op.outputs]} do not match the op table's "
                                   f"{[list(s) for s in shapes]}")
        if macs < 0:
            raise GraphFormatError(f"op {op.name}: negative size")


def _need(cond: bool, op: Op, why: str) -> None:
    if not cond:
        raise GraphFormatError(f"op {op.name}: {why}")


def _check_conv(g: Graph, op: Op) -> None:
    """x, weight (one array, or a training graph's trainable and frozen parts split along `split_axis`), bias."""
    x, b = g.tensors[op.inputs[0]], g.tensors[op.inputs[-1]]
    parts = [g.tensors[n] for n in op.inputs[1:-1]]
    a = op.attrs
    for k in ("stride", "padding", "groups"):
        _need(k in a, op, f"attribute {k} is missing")
    _need(len(parts) in (1, 2), op, f"{len(op.inputs)} operands (x, weight or its two parts, bias)")
    _need(len(x.shape) == 3 and x.dtype == "int8" and x.scale is not None, op, "input is not an int8 CxHxW activation")
    for w in parts:
        _need(len(w.shape) == 4 and w.dtype in ("int8", "float32") and isinstance(w.scale, np.ndarray), op,
              "weight is not int8 OIHW (or its float32 shadow) with per-channel scales")
    shape = list(parts[0].shape)
    if len(parts) == 2:
        axis = a.get("split_axis")
        _need(axis in (0, 1), op, "a split weight without split_axis 0 or 1")
        other = list(parts[1].shape)
        _need(shape[:axis] + shape[axis + 1:] == other[:axis] + other[axis + 1:], op, "weight parts do not fit")
        shape[axis] += other[axis]
    o, ci, kh, kw = shape
    _need(kh == kw and kh % 2 == 1, op, f"kernel {kh}x{kw} is not square and odd")
    _need(ci * a["groups"] == x.shape[0] and o % a["groups"] == 0, op,
          f"groups={a['groups']} does not fit {x.shape[0]} input / {o} output channels with {ci} per group")
    _need(b.shape == (o,) and b.dtype == "int32", op, f"bias is not int32 [{o}]")
    pb, pr = a.get("pad_bottom", a["padding"]), a.get("pad_right", a["padding"])
    _need(x.shape[1] + a["padding"] + pb >= kh and x.shape[2] + a["padding"] + pr >= kw, op, "kernel larger than input")
    _check_act_range(g, op)
    y = g.tensors[op.outputs[0]]
    want = (o, *opdefs.conv_out_hw(x.shape[1], x.shape[2], kh, a["stride"], a["padding"], pb, pr))
    _need(y.shape == want and y.dtype == "int8" and y.scale is not None, op,
          f"output {y.dtype}{list(y.shape)} is not the int8 activation {list(want)} the op table gives")


def _check_act_range(g: Graph, op: Op) -> None:
    """act_min / act_max (a fused activation's int8 clamp) exist only under the TFLite rule."""
    a = op.attrs
    if "act_min" in a or "act_max" in a:
        _need(g.requant == Requant.TFLITE, op, "act_min/act_max need meta.requant = tflite-fixed-point")
        _need(a.get("act_min", -128) <= a.get("act_max", 127), op, "act_min is above act_max")


def _check_linear(g: Graph, op: Op) -> None:
    _check_act_range(g, op)
    x, w, b = (g.tensors[n] for n in op.inputs)
    _need(len(x.shape) == 1 and len(w.shape) == 2 and w.shape[1] == x.shape[0], op,
          f"weight {list(w.shape)} does not fit input {list(x.shape)}")
    _need(b.shape == (w.shape[0],), op, f"bias is not [{w.shape[0]}]")
    _need(x.scale is not None, op, "input has no quantization")
    if w.dtype == "int8":
        _need(isinstance(w.scale, np.ndarray) and b.dtype == "int32", op, "int8 head without per-channel scales or "
              "with a non-int32 bias")


def _check_add(g: Graph, op: Op) -> None:
    _check_act_range(g, op)
    a, b = (g.tensors[n] for n in op.inputs)
    _need(a.shape == b.shape, op, f"operands {list(a.shape)} and {list(b.shape)} differ")
    _need(a.scale is not None and b.scale is not None and g.tensors[op.outputs[0]].scale is not None, op,
          "operands without quantization")


def _check_pool(g: Graph, op: Op) -> None:
    _need(len(g.tensors[op.inputs[0]].shape) == 3, op, "input is not CxHxW")
    _check_act_range(g, op)
    _need(not op.attrs.get("mean") or g.requant == Requant.TFLITE, op, "mean needs meta.requant = tflite-fixed-point")


def _check_window(g: Graph, op: Op) -> None:
    """maxpool2d / avgpool2d: int8 CxHxW in and out with the same quantization, a window inside the padded input
    whose every position holds at least one tap (TFLite's SAME / VALID never make an empty window)."""
    x, y = g.tensors[op.inputs[0]], g.tensors[op.outputs[0]]
    a = op.attrs
    for k in ("pool_h", "pool_w", "stride", "padding"):
        _need(k in a, op, f"attribute {k} is missing")
    _need(len(x.shape) == 3 and x.dtype == "int8" and x.scale is not None, op, "input is not an int8 CxHxW activation")
    _need(y.dtype == "int8" and y.scale == x.scale and y.zero == x.zero, op, "output quantization differs from the "
          "input's")
    t, b, left, r = opdefs.pool_pads(a)
    _need(max(t, b) < a["pool_h"] and max(left, r) < a["pool_w"], op, "padding as large as the window")
    _need(x.shape[1] + t + b >= a["pool_h"] and x.shape[2] + left + r >= a["pool_w"], op, "window larger than input")
    _check_act_range(g, op)
    _need(op.kind == "maxpool2d" or not ("act_min" in a or "act_max" in a), op, "avgpool2d takes no fused activation")


def _check_reshape(g: Graph, op: Op) -> None:
    x, y = g.tensors[op.inputs[0]], g.tensors[op.outputs[0]]
    _need(x.shape in ((x.shape[0],), (x.shape[0], 1, 1)) and x.dtype == y.dtype and x.scale == y.scale
          and x.zero == y.zero, op, "reshape is only (C,) <-> (C,1,1) of one tensor type")


def _check_flatten(g: Graph, op: Op) -> None:
    x, y = g.tensors[op.inputs[0]], g.tensors[op.outputs[0]]
    _need(len(x.shape) == 3 and x.dtype == "int8" and y.dtype == "int8" and x.scale == y.scale and x.zero == y.zero,
          op, "flatten takes an int8 CxHxW activation and keeps its quantization")


_FORWARD_CHECKS = {"conv2d": _check_conv, "linear": _check_linear, "add": _check_add, "avgpool": _check_pool,
                   "maxpool2d": _check_window, "avgpool2d": _check_window, "reshape": _check_reshape,
                   "flatten": _check_flatten}
