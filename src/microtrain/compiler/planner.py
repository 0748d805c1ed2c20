"""Static memory planner: every arena tensor of a scheduled graph gets a fixed byte offset in one arena.

The schedule is `graph.ops` in order; what it needs at run time is exactly `Plan.arena_bytes` of SRAM, which is what
the C generator allocates and the CLI reports. Two steps:

1. In-place sharing. An op may write an output into the buffer of an input that dies at this op (no later reader,
   not a graph output) when its kind allows it (`INPLACE_OPS`) and both have the same size. Chains merge into one
   buffer whose lifetime is the union of its members'.
2. Greedy placement, as TensorFlow Lite Micro's GreedyMemoryPlanner: buffers by size (largest first), each at the
   lowest aligned offset that overlaps no already-placed buffer whose lifetime overlaps its own.

Lifetimes are inclusive op steps (`compiler/liveness.py`): an op's inputs and outputs are all live while it runs,
so an output never shares bytes with an input unless the pair is an explicit in-place alias.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from microtrain.compiler.liveness import ARENA_ROLES, Lifetime, lifetimes, live_bytes
from microtrain.ir.graph import DTYPE_BYTES, Graph, Op


# ---- in-place legality: one small table keyed by op kind ------------------------------------------------------------
@dataclass(frozen=True)
class InplaceRule:
    """`pairs(g, op)`: (output index, input index) pairs the kernel can run in place, preferred first.
    `scratch(g, op)`: bytes of kernel workspace the in-place kernel needs while it runs (planned as a buffer named
    `<op.name>.scratch`, live for that op only)."""

    pairs: Callable[[Graph, Op], list[tuple[int, int]]]
    scratch: Callable[[Graph, Op], int] = field(default=lambda g, op: 0)


def elementwise(*inputs: int, output: int = 0) -> InplaceRule:
    """y[i] depends on x[i] only: read-then-write of the same element is safe, no workspace."""
    return InplaceRule(lambda g, op: [(output, i) for i in inputs])


def _depthwise_pairs(g: Graph, op: Op) -> list[tuple[int, int]]:
    x, w, y = g.tensors[op.inputs[0]], g.tensors[op.inputs[1]], g.tensors[op.outputs[0]]
    c = x.shape[0]
    dw = op.attrs.get("groups", 1) == c and w.shape[:2] == (c, 1)
    return [(0, 0)] if dw and op.attrs.get("stride", 1) == 1 and y.shape == x.shape else []


def _one_channel(g: Graph, op: Op) -> int:
    y = g.tensors[op.outputs[0]]
    return int(y.shape[1] * y.shape[2] * DTYPE_BYTES[y.dtype])


# A depthwise conv reads a k x k neighbourhood, so writing y over x element by element would clobber inputs still
# needed. Output channel c depends on input channel c only, though, so the kernel computes channel c into a one-channel
# scratch buffer and then copies it over input channel c (TinyEngine's in-place depthwise, MCUNet §3.2): legal for
# stride 1 and same-shape outputs; the scratch is planned. Kernels that run an aliased op must follow this contract.
INPLACE_OPS: dict[str, InplaceRule] = {
    "add": elementwise(0, 1),
    "conv2d": InplaceRule(_depthwise_pairs, _one_channel),
}


# ---- the plan ------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    offsets: dict[str, int]  # tensor -> byte offset in the one arena (aliases share their root's offset)
    arena_bytes: int  # = max(offset + nbytes)
    peak_live_bytes: int  # true max over steps of live bytes (after aliasing)
    lifetimes: list[Lifetime]  # of the planned buffers: alias roots (merged lifetime) and op scratch buffers
    aliases: dict[str, str]  # in-place: tensor -> tensor whose buffer it reuses
    live_curve: list[int]  # live bytes per op step

    @property
    def peak_step(self) -> int:
        return max(range(len(self.live_curve)), key=self.live_curve.__getitem__, default=0)

    def root(self, tensor: str) -> str:
        while tensor in self.aliases:
            tensor = self.aliases[tensor]
        return tensor

    def live_at(self, step: int) -> list[Lifetime]:
        """Buffers live while op `step` runs, largest first: what makes up the peak."""
        live = [lt for lt in self.lifetimes if max(lt.first, 0) <= step <= lt.last]
        return sorted(live, key=lambda lt: -lt.nbytes)


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def _find_aliases(g: Graph, lts: dict[str, Lifetime]) -> tuple[dict[str, str], list[Lifetime]]:
    aliases: dict[str, str] = {}
    scratch: list[Lifetime] = []
    for i, op in enumerate(g.ops):
        rule = INPLACE_OPS.get(op.kind)
        if rule is None:
            continue
        taken: set[str] = set()
        for oi, ii in rule.pairs(g, op):
            out, inp = op.outputs[oi], op.inputs[ii]
            if out in aliases or inp in taken or out not in lts or inp not in lts:
                continue
            if lts[inp].last != i or lts[out].first != i or lts[inp].nbytes != lts[out].nbytes:
                continue  # input still read later (or a graph output), or sizes differ
            aliases[out] = inp
            taken.add(inp)
        if taken and (s := rule.scratch(g, op)) > 0:
            scratch.append(Lifetime(f"{op.name}.scratch", i, i, s))
    return aliases, scratch


def _greedy(buffers: list[Lifetime], align: int) -> dict[str, int]:
    """Largest first; each at the lowest aligned gap among the placed buffers whose lifetimes overlap its own."""
    placed: list[tuple[int, Lifetime]] = []
    offsets: dict[str, int] = {}
    for b in sorted(buffers, key=lambda b: (-b.nbytes, b.first, b.tensor)):
        off = 0
        if b.nbytes > 0:
            clash = sorted(((o, p) for o, p in placed if p.first <= b.last and b.first <= p.last),
                           key=lambda op: op[0])
            for o, p in clash:
                if off + b.nbytes <= o:
                    break
                off = max(off, _align(o + p.nbytes, align))
            placed.append((off, b))
        offsets[b.tensor] = off
    return offsets


def plan_memory(graph: Graph, roles: Iterable[str] = ARENA_ROLES, inplace: bool = True, align: int = 4) -> Plan:
    """Plan every tensor of `roles` into one arena, following the schedule `graph.ops`."""
    lts = {lt.tensor: lt for lt in lifetimes(graph, roles)}
    aliases, scratch = _find_aliases(graph, lts) if inplace else ({}, [])

    def root(t: str) -> str:
        while t in aliases:
            t = aliases[t]
        return t

    last: dict[str, int] = {}
    for t, lt in lts.items():
        r = root(t)
        last[r] = max(last.get(r, lt.last), lt.last)
    buffers = [Lifetime(r, lts[r].first, last[r], lts[r].nbytes) for r in lts if r not in aliases] + scratch
    offsets = _greedy(buffers, align)
    offsets.update({t: offsets[root(t)] for t in aliases})
    curve = live_bytes(graph, buffers)
    return Plan(offsets=offsets,
                arena_bytes=max((offsets[b.tensor] + b.nbytes for b in buffers), default=0),
                peak_live_bytes=max(curve, default=0),
                lifetimes=buffers, aliases=aliases, live_curve=curve)


# ---- picture -------------------------------------------------------------------------------------------------------
ROLE_COLORS = {"input": "tab:gray", "act": "tab:blue", "grad": "tab:red", "mask": "tab:purple", "label": "tab:olive",
               "loss": "tab:brown", "state": "tab:green", "scratch": "tab:orange"}


def plot_plan(plan: Plan, graph: Graph, path: str | Path, title: str | None = None) -> None:
    """Top: each buffer as a rectangle (op steps x arena address). Bottom: live bytes per step, stacked by role,
    with the peak step marked and its largest buffers named."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    def role(name: str) -> str:
        return graph.tensors[name].role if name in graph.tensors else "scratch"

    n = max(len(plan.live_curve), 1)
    peak = plan.peak_step
    fig = Figure(figsize=(12, 8), layout="constrained")
    FigureCanvasAgg(fig)
    ax, bx = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    for lt in plan.lifetimes:
        x0, x1 = max(lt.first, 0), min(lt.last, n - 1) + 1
        if x1 > x0 and lt.nbytes:
            ax.add_patch(Rectangle((x0, plan.offsets[lt.tensor] / 1024), x1 - x0, lt.nbytes / 1024,
                                   facecolor=ROLE_COLORS.get(role(lt.tensor), "tab:cyan"), edgecolor="black",
                                   linewidth=0.3, alpha=0.8))
    ax.set_xlim(0, n)
    ax.set_ylim(0, max(plan.arena_bytes, 1) / 1024 * 1.05)
    ax.axhline(plan.arena_bytes / 1024, color="black", linestyle="--", linewidth=0.8)
    ax.set_ylabel("arena address (KB)")
    ax.set_title(title or f"{graph.name}: arena {plan.arena_bytes / 1024:.1f} KB, "
                          f"peak live {plan.peak_live_bytes / 1024:.1f} KB at op {peak}")
    roles = sorted({role(lt.tensor) for lt in plan.lifetimes})
    ax.legend(handles=[Patch(color=ROLE_COLORS.get(r, "tab:cyan"), label=r) for r in roles], loc="upper right",
              fontsize=8)

    steps = list(range(len(plan.live_curve)))
    stacks = {r: [0.0] * len(steps) for r in roles}
    for lt in plan.lifetimes:
        for s in range(max(lt.first, 0), min(lt.last, len(steps) - 1) + 1):
            stacks[role(lt.tensor)][s] += lt.nbytes / 1024
    if steps:
        bx.stackplot([s + 0.5 for s in steps], *stacks.values(), labels=list(stacks), step="mid",
                     colors=[ROLE_COLORS.get(r, "tab:cyan") for r in stacks], alpha=0.8)
        top = ", ".join(f"{lt.tensor} {lt.nbytes / 1024:.1f}" for lt in plan.live_at(peak)[:4])
        op_name = graph.ops[peak].name if peak < len(graph.ops) else ""
        bx.annotate(f"peak {plan.peak_live_bytes / 1024:.1f} KB at op {peak} ({op_name})\n{top}",
                    (peak + 0.5, plan.peak_live_bytes / 1024), xytext=(0.02, 0.95), textcoords="axes fraction",
                    va="top", fontsize=8, arrowprops={"arrowstyle": "->", "linewidth": 0.6})
    for a in (ax, bx):
        a.axvline(peak + 0.5, color="red", linewidth=0.8)
    bx.set_ylim(0, max(plan.peak_live_bytes, 1) / 1024 * 1.25)
    bx.set_xlabel("op step (schedule order)")
    bx.set_ylabel("live bytes (KB)")
    fig.savefig(str(path), dpi=110)
