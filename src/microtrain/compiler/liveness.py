"""Tensor lifetimes over an op schedule, and the live-bytes curve they imply."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from microtrain.ir.graph import Graph

ARENA_ROLES = ("input", "act", "grad", "mask", "label", "loss")


@dataclass(frozen=True)
class Lifetime:
    tensor: str
    first: int  # step that writes it (-1: live on entry, e.g. the input image)
    last: int  # last step that reads it (len(ops): live on exit)
    nbytes: int


def lifetimes(g: Graph, roles: Iterable[str] = ARENA_ROLES) -> list[Lifetime]:
    """Lifetime of every tensor of the given roles: from its producer (or entry) to its last reader (or exit)."""
    roles = set(roles)
    first: dict[str, int] = {n: -1 for n in g.inputs}
    last: dict[str, int] = {}
    for i, op in enumerate(g.ops):
        for n in op.outputs:
            first.setdefault(n, i)
        for n in op.inputs:
            last[n] = i
    for n in g.outputs:
        last[n] = len(g.ops)
    out = []
    for n, f in first.items():
        t = g.tensors[n]
        if t.role in roles:
            out.append(Lifetime(n, f, last.get(n, f), t.nbytes))
    return out


def live_bytes(g: Graph, lts: list[Lifetime] | None = None) -> list[int]:
    """Bytes live while each op runs (its inputs, its outputs and everything held across it)."""
    lts = lifetimes(g) if lts is None else lts
    curve = [0] * len(g.ops)
    for lt in lts:
        for i in range(max(lt.first, 0), min(lt.last, len(g.ops) - 1) + 1):
            curve[i] += lt.nbytes
    return curve


def inference_peak_bytes(g: Graph) -> int:
    """Peak activation memory of a plain layer-by-layer batch-1 forward pass (no in-place ops, no patching)."""
    return max(live_bytes(g), default=0)
