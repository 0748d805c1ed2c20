"""Static memory planner: every arena tensor of a scheduled graph gets a fixed byte offset in one arena.

The schedule is `graph.ops` in order; what it needs at run time is exactly `Plan.arena_bytes` of SRAM, which is what
the C generator allocates and the CLI reports. Two steps:

1. In-place sharing. An op may write an output into the buffer of an input that dies at this op (no later reader,
   not a graph output) when its kind allows it (`INPLACE_OPS`) and both have the same size, or, for rules marked
   `resize` (depthwise convs of any stride and their backward), different sizes at the same start offset. Chains
   merge into one buffer whose lifetime is the union of its members' and whose size is its largest member's.
2. Greedy placement, as TensorFlow Lite Micro's GreedyMemoryPlanner: buffers by size (largest first), each at the
   lowest aligned offset that overlaps no already-placed buffer whose lifetime overlaps its own.

Lifetimes are inclusive op steps (`compiler/liveness.py`): an op's inputs and outputs are all live while it runs,
so an output never shares bytes with an input unless the pair is an explicit in-place alias.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
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
    resize: bool = False  # the output may be larger or smaller than the input it overwrites (same start offset)


def elementwise(*inputs: int, output: int = 0) -> InplaceRule:
    """y[i] depends on x[i] only: read-then-write of the same element is safe, no workspace."""
    return InplaceRule(lambda g, op: [(output, i) for i in inputs])


def _depthwise_pairs(g: Graph, op: Op) -> list[tuple[int, int]]:
    x, y = g.tensors[op.inputs[0]], g.tensors[op.outputs[0]]
    ws = [g.tensors[n].shape for n in op.inputs[1:-1]]  # [w], or a training graph's [w_train, w_frozen] (axis 0)
    c = x.shape[0]
    dw = op.attrs.get("groups", 1) == c == y.shape[0] and sum(w[0] for w in ws) == c and all(w[1] == 1 for w in ws)
    return [(0, 0)] if dw else []


def _one_channel(g: Graph, op: Op) -> int:
    """One output channel as the kernel computes it: int8 forward, float32 backward (a qint8 gradient too: its
    channel is quantized from float32)."""
    y = g.tensors[op.outputs[0]]
    return int(y.shape[1] * y.shape[2] * (4 if y.dtype == "qint8" else DTYPE_BYTES[y.dtype]))


def _declared(op: Op) -> int:
    return int(op.attrs.get("scratch_bytes", 0))


def _depthwise_grad_pairs(g: Graph, op: Op) -> list[tuple[int, int]]:
    """conv2d_grad_input of a depthwise conv: g_x[c] = conv_transpose(g_acc[c], W[c]) reads channel c only."""
    gacc, gx = g.tensors[op.inputs[0]], g.tensors[op.outputs[0]]
    c = gacc.shape[0]
    dw = op.attrs.get("groups", 1) == c == gx.shape[0] and sum(g.tensors[n].shape[0] for n in op.inputs[1:]) == c
    return [(0, 0)] if dw else []


def _all_outputs_on_input(i: int) -> InplaceRule:
    """Per-element kernels with several outputs (add_grad: g_a, g_b from g): each element of input i is read once
    before any output element at that index is written, so any one output may take the input's buffer."""
    return InplaceRule(lambda g, op: [(o, i) for o in range(len(op.outputs))])


# A depthwise conv reads a k x k neighbourhood, so writing y over x element by element would clobber inputs still
# needed. Output channel c depends on input channel c only, though, so the kernel computes channel c into a one-channel
# scratch buffer and then copies it to output channel c (TinyEngine's in-place depthwise, MCUNet §3.2); the scratch is
# planned. With per-channel sizes a (input) and b (output) and both tensors starting at the same offset, output channel
# c occupies [c*b, (c+1)*b) and input channel c' [c'*a, (c'+1)*a):
#   b <= a (same shape, or stride 2 forward): channels in ascending order; writing channel c ends at (c+1)*b <=
#          (c+1)*a, the start of every unread input channel c' > c.
#   b >  a (the backward of a strided conv: g_x larger than g_acc): channels in descending order; writing channel c
#          starts at c*b >= c*a, the end of every unread input channel c' < c.
# Its backward (`conv2d_grad_input`, groups = C) has the same structure and the same rule. The other backward kinds are
# per element. Kernels that run an aliased op must follow this contract (order included).
INPLACE_OPS: dict[str, InplaceRule] = {
    "add": elementwise(0, 1),
    "conv2d": InplaceRule(_depthwise_pairs, _one_channel, resize=True),
    "conv2d_grad_acc": elementwise(0),  # g_acc = g * mask * m[o]
    "grad_add": elementwise(0, 1),
    "add_grad": _all_outputs_on_input(0),  # g_a = g * mask * ra, g_b = g * mask * rb
    "conv2d_grad_input": InplaceRule(_depthwise_grad_pairs, _one_channel, resize=True),
    "reshape": elementwise(0),  # (C,) <-> (C,1,1): the same bytes, so aliasing makes it free
}

# The op kinds that never run in place, and why (tests/test_op_registry.py: every kind is in one of the two tables).
NOT_INPLACE: dict[str, str] = {
    **dict.fromkeys(("avgpool", "linear", "linear_grad_input", "softmax_ce"), "the output is smaller or of another "
                    "type than its input (a reduction)"),
    **dict.fromkeys(("maxpool2d", "avgpool2d"), "a window reads neighbours that a row-order write would clobber"),
    **dict.fromkeys(("avgpool_grad", "maxpool2d_grad", "avgpool2d_grad"), "the output is larger than its input"),
    "slice_channels": "its input stays alive for the forward pass (it is the saved copy)",
    **dict.fromkeys(("flatten", "flatten_grad"), "a permutation: writing in output order clobbers unread input"),
    **dict.fromkeys(("conv2d_weight_grad", "linear_weight_grad"), "parameter gradients are not activations"),
    **dict.fromkeys(("conv2d_update", "linear_update", "apply_update"), "writes no arena tensor (updates the state)"),
    **dict.fromkeys(("patch_stage", "block_grad"), "planning-view ops: their members' rules and their own scratch "
                    "apply"),
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


def _root(aliases: dict[str, str], t: str) -> str:
    while t in aliases:
        t = aliases[t]
    return t


def _buffers(lts: dict[str, Lifetime], aliases: dict[str, str]) -> list[Lifetime]:
    """One buffer per alias chain: the union of its members' lifetimes, the size of its largest member."""
    last: dict[str, int] = {}
    size: dict[str, int] = {}
    for t, lt in lts.items():
        r = _root(aliases, t)
        last[r] = max(last.get(r, lt.last), lt.last)
        size[r] = max(size.get(r, 0), lt.nbytes)
    return [Lifetime(r, lts[r].first, last[r], size[r]) for r in lts if r not in aliases]


def _find_aliases(g: Graph, lts: dict[str, Lifetime], rules: Mapping[str, InplaceRule]
                  ) -> tuple[dict[str, str], list[Lifetime]]:
    """Pass 1 takes every legal same-size pair (it only ever removes bytes). Pass 2 takes a resizing pair only where
    the merged buffer (largest member's size over the union of lifetimes) does not raise the live bytes of the steps
    it spans: it saves the smaller tensor at the hand-off step but holds the larger size over the whole chain."""
    aliases: dict[str, str] = {}
    scratch: dict[int, Lifetime] = {}
    taken: set[str] = set()

    def legal(i: int, out: str, inp: str) -> bool:
        return (out not in aliases and inp not in taken and out in lts and inp in lts
                and lts[inp].last == i and lts[out].first == i)  # input dies here (not a graph output)

    resizable: list[tuple[int, Op, str, str]] = []
    for i, op in enumerate(g.ops):
        rule = rules.get(op.kind)
        for oi, ii in rule.pairs(g, op) if rule else []:
            out, inp = op.outputs[oi], op.inputs[ii]
            if not legal(i, out, inp):
                continue
            if lts[inp].nbytes != lts[out].nbytes:
                if rule.resize:
                    resizable.append((i, op, out, inp))
                continue
            aliases[out] = inp
            taken.add(inp)
            if (sb := max(rule.scratch(g, op), _declared(op))) > 0:  # one workspace serves both
                scratch[i] = Lifetime(f"{op.name}.scratch", i, i, sb)
    if not resizable:
        return aliases, list(scratch.values())

    curve = live_bytes(g, _buffers(lts, aliases) + list(scratch.values()))
    for i, op, out, inp in resizable:
        if not legal(i, out, inp):
            continue
        bufs = {b.tensor: b for b in _buffers(lts, aliases)}
        a, b = bufs[_root(aliases, inp)], bufs[out]  # out is still a root: nothing aliased it yet
        big = max(a.nbytes, b.nbytes)
        sb = 0 if i in scratch else max(rules[op.kind].scratch(g, op) - _declared(op), 0)  # beyond the declared
        new = list(curve)
        for s in range(max(a.first, 0), min(b.last, len(curve) - 1) + 1):
            new[s] += big - (a.nbytes if s <= a.last else 0) - (b.nbytes if s >= b.first else 0) + (sb if s == i else 0)
        span = slice(max(a.first, 0), min(b.last, len(curve) - 1) + 1)
        if max(new[span], default=0) <= max(curve[span], default=0):
            aliases[out] = inp
            taken.add(inp)
            curve = new
            if sb > 0:
                scratch[i] = Lifetime(f"{op.name}.scratch", i, i, sb + _declared(op))
    return aliases, list(scratch.values())


def _declared_scratch(g: Graph, have: set[str]) -> list[Lifetime]:
    """Workspace an op declares itself (`attrs["scratch_bytes"]`: a patch stage's tile arena, a qint8 gradient
    kernel's float32 channel), live for that op; an in-place op's scratch (`have`) already covers it."""
    return [Lifetime(f"{op.name}.scratch", i, i, _declared(op)) for i, op in enumerate(g.ops)
            if _declared(op) and f"{op.name}.scratch" not in have]


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


def plan_memory(graph: Graph, roles: Iterable[str] = ARENA_ROLES, inplace: bool = True, align: int = 4,
                rules: Mapping[str, InplaceRule] | None = None) -> Plan:
    """Plan every tensor of `roles` into one arena, following the schedule `graph.ops`. `rules` replaces the
    in-place table (`INPLACE_OPS`), e.g. to measure what a subset of the rules buys."""
    lts = {lt.tensor: lt for lt in lifetimes(graph, roles)}
    aliases, scratch = _find_aliases(graph, lts, INPLACE_OPS if rules is None else rules) if inplace else ({}, [])
    scratch += _declared_scratch(graph, {lt.tensor for lt in scratch})

    buffers = _buffers(lts, aliases) + scratch
    offsets = _greedy(buffers, align)
    offsets.update({t: offsets[_root(aliases, t)] for t in aliases})
    curve = live_bytes(graph, buffers)
    return Plan(offsets=offsets,
                arena_bytes=max((offsets[b.tensor] + b.nbytes for b in buffers), default=0),
                peak_live_bytes=max(curve, default=0),
                lifetimes=buffers, aliases=aliases, live_curve=curve)


# ---- picture -------------------------------------------------------------------------------------------------------
ROLE_COLORS = {"input": "tab:gray", "act": "tab:blue", "grad": "tab:red", "mask": "tab:purple", "label": "tab:olive",
               "loss": "tab:brown", "state": "tab:green", "scratch": "tab:orange"}


def plot_plan(plan: Plan, graph: Graph, path: str | Path, title: str | None = None,
              resident: Mapping[str, int] | None = None, budget: int | None = None) -> None:
    """Top: each buffer as a rectangle (op steps x arena address). Bottom: live bytes per step, stacked by role on top
    of the `resident` bytes that are not in the arena (e.g. trainable state), with the forward/backward phases
    shaded, the `budget` line, the peak step marked and its largest buffers named."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    def role(name: str) -> str:
        return graph.tensors[name].role if name in graph.tensors else "scratch"

    def color(r: str) -> str:
        return ROLE_COLORS.get(r, "tab:cyan")

    n = max(len(plan.live_curve), 1)
    peak = plan.peak_step
    base = sum((resident or {}).values()) / 1024
    fig = Figure(figsize=(13, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax, bx = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    for lt in plan.lifetimes:
        x0, x1 = max(lt.first, 0), min(lt.last, n - 1) + 1
        if x1 > x0 and lt.nbytes:
            ax.add_patch(Rectangle((x0, plan.offsets[lt.tensor] / 1024), x1 - x0, lt.nbytes / 1024,
                                   facecolor=color(role(lt.tensor)), edgecolor="black", linewidth=0.3, alpha=0.8))
    ax.set_xlim(0, n)
    ax.set_ylim(0, max(plan.arena_bytes, 1) / 1024 * 1.05)
    ax.axhline(plan.arena_bytes / 1024, color="black", linestyle="--", linewidth=0.8)
    ax.set_ylabel("arena address (KB)")
    ax.set_title(title or f"{graph.name}: arena {plan.arena_bytes / 1024:.1f} KB, "
                          f"peak live {plan.peak_live_bytes / 1024:.1f} KB at op {peak}")
    roles = sorted({role(lt.tensor) for lt in plan.lifetimes})
    handles = [Patch(color=color(r), label=r) for r in roles]
    if resident:
        handles.insert(0, Patch(facecolor="tab:green", alpha=0.35, hatch="//", label="state (resident)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, title="role")

    # phases: shade the forward part, label each run of ops of one phase
    phases = [op.attrs.get("phase", "") for op in graph.ops]
    start = 0
    for i in range(1, len(phases) + 1):
        if i == len(phases) or phases[i] != phases[start]:
            if phases[start] == "forward":
                for a in (ax, bx):
                    a.axvspan(start, i, color="0.93", zorder=0)
            if phases[start] and i - start >= 3:
                bx.text((start + i) / 2, 0.99, phases[start], transform=bx.get_xaxis_transform(), ha="center",
                        va="top", fontsize=8, color="0.35")
            start = i

    steps = list(range(len(plan.live_curve)))
    stacks = {r: [0.0] * len(steps) for r in roles}
    for lt in plan.lifetimes:
        for s in range(max(lt.first, 0), min(lt.last, len(steps) - 1) + 1):
            stacks[role(lt.tensor)][s] += lt.nbytes / 1024
    if steps:
        xs = [s + 0.5 for s in steps]
        layers = ([[base] * len(steps)] if resident else []) + list(stacks.values())
        colors = (["tab:green"] if resident else []) + [color(r) for r in stacks]
        polys = bx.stackplot(xs, *layers, step="mid", colors=colors, alpha=0.8)
        if resident:
            polys[0].set_alpha(0.35)
            polys[0].set_hatch("//")
        top = ", ".join(f"{lt.tensor} {lt.nbytes / 1024:.1f}" for lt in plan.live_at(peak)[:4])
        op_name = graph.ops[peak].name if peak < len(graph.ops) else ""
        total = base + plan.peak_live_bytes / 1024
        head = (f"peak {total:.1f} KB = state {base:.1f} + arena live {plan.peak_live_bytes / 1024:.1f}"
                if resident else f"peak {plan.peak_live_bytes / 1024:.1f} KB")
        bx.annotate(f"{head} at op {peak} ({op_name})\nlargest (KB): {top}", (peak + 0.5, total),
                    xytext=(0.01, 0.90), textcoords="axes fraction", va="top", fontsize=8,
                    bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85},
                    arrowprops={"arrowstyle": "->", "linewidth": 0.6})
    for a in (ax, bx):
        a.axvline(peak + 0.5, color="red", linewidth=0.8)
    top_kb = base + max(plan.peak_live_bytes, 1) / 1024
    if budget:
        bx.axhline(budget / 1024, color="black", linestyle=":", linewidth=1)
        bx.text(n, budget / 1024, f" budget {budget / 1024:.0f} KB", va="center", fontsize=8)
        top_kb = max(top_kb, budget / 1024)
    bx.set_ylim(0, top_kb * 1.3)
    bx.set_xlabel("op step (schedule order)")
    bx.set_ylabel("live bytes (KB)")
    fig.savefig(str(path), dpi=110)
