"""Schedule choices that lower the planned peak without changing what the training step computes.

`hoist_updates` moves each weight-gradient consumer (fused `conv2d_update` / `linear_update`, or the unfused
`*_weight_grad`) up to right after the op that produced its last input, past ops it has no hazard with. In the
builder's order a conv's backward is `grad_acc, grad_input, update`, so the update is the last reader of `g_acc`; for
a conv whose update does not write what `grad_input` reads (a bias-only depthwise conv: the update writes the bias,
`grad_input` reads the weights), moving the update first makes `grad_input` the last reader, and the depthwise
in-place rule of the planner applies. Deferred `apply_update` ops (reorder off) are never moved: that would be
operator reordering itself.

Legality is the classic one for swapping two adjacent ops: neither reads what the other writes (RAW, WAR) and they
write nothing in common (WAW). "Writes" is an op's outputs plus, for update ops, the state tensors it mutates
(weights, biases, optimizer slots: every input of role `state` that the op lists as a parameter or slot).
"""

from __future__ import annotations

import copy

from microtrain.ir.graph import Graph, Op

HOISTED = ("conv2d_update", "linear_update", "conv2d_weight_grad", "linear_weight_grad")
UPDATES = ("conv2d_update", "linear_update", "apply_update")


def writes(g: Graph, op: Op) -> set[str]:
    """Tensors an op writes: its outputs, and the state an update mutates (all its `state` inputs but none else)."""
    out = set(op.outputs)
    if op.kind in UPDATES:
        out |= {n for n in op.inputs if g.tensors[n].role == "state"}
    return out


def can_swap(g: Graph, first: Op, second: Op) -> bool:
    """True when running `second` before `first` gives the same result (no RAW, WAR or WAW hazard)."""
    w1, w2 = writes(g, first), writes(g, second)
    return not (w1 & set(second.inputs) or w2 & set(first.inputs) or w1 & w2)


def hoist_updates(g: Graph) -> Graph:
    """A copy of `g` whose weight-gradient consumers run as early as their hazards allow, within the backward."""
    ops: list[Op] = []
    for op in g.ops:
        ops.append(op)
        if op.kind not in HOISTED:
            continue
        j = len(ops) - 1
        while j > 0 and ops[j - 1].attrs.get("phase") == "backward" and can_swap(g, ops[j - 1], op):
            ops[j - 1], ops[j] = ops[j], ops[j - 1]
            j -= 1
    return Graph(g.name, dict(g.tensors), ops, list(g.inputs), list(g.outputs), copy.deepcopy(g.meta))
