"""The int8 graph IR: typed tensors with explicit quantization, ops in execution order.

One `Graph` describes a model (and later its training step). The host executor, the memory planner and the C
generator all read this same object, so its fields are deliberately plain: shapes are per-sample (no batch axis),
quantization parameters live on the tensors, and ops are a list in the order they run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from microtrain.ir import ops as opdefs

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
            raise ValueError(f"duplicate tensor name {t.name!r}")
        self.tensors[t.name] = t
        return t

    def add_op(self, op: Op) -> Op:
        if op.kind not in opdefs.OPS:
            raise ValueError(f"unsupported op {op.kind!r}")
        for n in op.inputs:
            if n not in self.tensors:
                raise ValueError(f"op {op.name}: unknown input tensor {n!r}")
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
        if d.get("format") != "microtrain-graph/1":
            raise ValueError(f"unknown graph format {d.get('format')!r}")
        g = cls(name=d["name"], inputs=list(d["inputs"]), outputs=list(d["outputs"]), meta=dict(d.get("meta", {})))
        for n, td in d["tensors"].items():
            scale = td.get("scale")
            if scale == "array":
                scale = arrays[n + "@scale"]
            g.add_tensor(Tensor(n, tuple(td["shape"]), td["dtype"], td["role"], scale, int(td["zero"]),
                                arrays.get(n)))
        for od in d["ops"]:
            g.add_op(Op(od["name"], od["kind"], list(od["inputs"]), list(od["outputs"]), dict(od["attrs"])))
        return g

    @classmethod
    def load(cls, stem: str | Path) -> Graph:
        d = json.loads(Path(f"{stem}.json").read_text())
        with np.load(f"{stem}.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return cls.from_dict(d, arrays)
