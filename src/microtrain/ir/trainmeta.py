"""Typed roles of a training graph's parameters: written once by `autodiff/build.py` into
`g.meta["train"]["params"]`, read here by every consumer (the torch engine, the C generator, the memory report,
export, the fleet) instead of re-deriving roles from tensor names.

`meta["train"]["params"]` maps a tensor name to a JSON object:

- `kind`: `weight_slice` (a conv's trainable weight slice), `bias` (a conv's trainable bias), `head_weight` /
  `head_bias` (the new fp32 classifier; listed also when the scheme freezes it), `slot` (an optimizer slot);
- `op`: the forward op the parameter belongs to (a conv, or the head); for a slot, its parameter's op;
- `slot_of`, `slot`: for a slot, the parameter it belongs to and which slot it is (`m`: momentum / Adam's first
  moment, `v`: Adam's second moment); null otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KINDS = ("weight_slice", "bias", "head_weight", "head_bias", "slot")
SLOTS = ("m", "v")


@dataclass(frozen=True)
class Param:
    """One entry of `meta["train"]["params"]`."""

    name: str
    kind: str
    op: str
    slot_of: str | None = None
    slot: str | None = None

    @property
    def is_slot(self) -> bool:
        return self.kind == "slot"

    @property
    def is_head(self) -> bool:
        return self.kind in ("head_weight", "head_bias")

    @property
    def conv(self) -> str | None:
        """The conv a (non-slot) parameter belongs to; None for the head: QAS and the trainable slices are per conv."""
        return None if self.is_head else self.op

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "op": self.op, "slot_of": self.slot_of, "slot": self.slot}


def params(g) -> dict[str, Param]:
    """Every parameter entry of training graph `g` (its trainable slices, biases, head and optimizer slots)."""
    return {n: Param(n, d["kind"], d["op"], d.get("slot_of"), d.get("slot"))
            for n, d in g.meta["train"]["params"].items()}


def param(g, name: str) -> Param:
    """The entry of tensor `name` (KeyError when it is no parameter of `g`)."""
    d = g.meta["train"]["params"][name]
    return Param(name, d["kind"], d["op"], d.get("slot_of"), d.get("slot"))


def slots_of(g, name: str) -> dict[str, str]:
    """The optimizer slots of parameter `name`: slot ("m", "v") -> tensor name, in slot order."""
    found = {p.slot: p.name for p in params(g).values() if p.is_slot and p.slot_of == name}
    return {s: found[s] for s in SLOTS if s in found}


def trainable(g) -> list[str]:
    """The state tensors that are parameters (no optimizer slots), in the state's order."""
    ps = g.meta["train"]["params"]
    return [n for n in g.meta["train"]["state"] if ps[n]["kind"] != "slot"]


def head(g) -> tuple[str, str]:
    """(weight, bias) tensor names of the new classifier head."""
    ps = params(g)
    return (next(n for n, p in ps.items() if p.kind == "head_weight"),
            next(n for n, p in ps.items() if p.kind == "head_bias"))


def check(meta_params: Any, tensors, state: list[str]) -> str | None:
    """Why `meta["train"]["params"]` of a loaded graph is malformed (None when it is well formed): an object of the
    graph's tensors with a valid kind and op, slots naming a parameter, and an entry for every state tensor."""
    if not isinstance(meta_params, dict):
        return "meta.train.params is not an object"
    for n, d in meta_params.items():
        if n not in tensors or not isinstance(d, dict):
            return f"meta.train.params: {str(n)[:40]!r} is not a tensor of the graph with an object"
        if d.get("kind") not in KINDS or not isinstance(d.get("op"), str):
            return f"meta.train.params.{n[:40]}: kind {str(d.get('kind'))[:40]!r} / op is not valid"
        slot = d.get("kind") == "slot"
        of = d.get("slot_of")
        if slot != (d.get("slot") in SLOTS) or slot != (isinstance(of, str) and of in meta_params):
            return f"meta.train.params.{n[:40]}: slot / slot_of do not match its kind"
        if slot and meta_params[d["slot_of"]].get("kind") == "slot":
            return f"meta.train.params.{n[:40]}: a slot of a slot"
    missing = [n for n in state if n not in meta_params]
    if missing:
        return f"meta.train.params has no entry for state tensor {missing[0][:40]!r}"
    return None
