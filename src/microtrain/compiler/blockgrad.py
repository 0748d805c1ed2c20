"""Channel-serial backward of inverted-residual blocks: the expanded gradients never exist whole.

In the backward of a block `x -> pw1 (expand to E) -> dw -> pw2 (project)`, every tensor with E channels is computed
channel by channel with no mixing between channels, except the very last step, pw1's input gradient, which sums over
them. So instead of op by op (`pw2.grad_input` writes all E channels of g_dw, `dw.grad_acc` reads them, ...), the
device runs the block's backward one expanded channel e at a time: g_dw[e] (pw2's input gradient, channel e), its
mask and multiplier, dw's update for channel e, g_pw1[e] through dw's transpose, its mask and multiplier, pw1's update
of row e, and finally g_x += W1[e]^T g_pw1[e]. Only two channel planes and g_x are alive instead of two E-channel
tensors: at 128x128 mbv2-w0.35's largest float32 gradient (48 KB, 192 channels at 8x8) becomes a 256-byte plane.

The arithmetic is the host's, element for element: the per-channel steps are the same kernels on one channel, qint8
gradients are quantized per channel anyway, and pw1's input gradient continues the same chain of fused multiply-adds
over e that the op-by-op kernel runs (ir/ops.py: one chain over e = 0..E-1). So the torch engine
runs the graph op by op as before; the planner sees each group as one `block_grad` op (planning view) whose scratch
holds the planes, and the C generator emits the channel loop (codegen/emit.py).

With `recompute`, a group also stops storing what only its channels need: the 1-bit masks of pw1 and dw (and dw's
saved input, pw1's output, when dw's weights train) are not kept from the forward pass; the channel loop recomputes
pw1's output channel e from the block input x and dw's from that (the forward kernels on one channel, so the same
integers and the same mask bits), right before channel e's backward, with the weights of channel e not yet updated.
It costs the forward MACs of pw1 and dw once more and saves their masks (2 bits per expanded element).

Legality: every member is per-channel in e, and a channel's members run in schedule order, so each reads what the
op-by-op schedule had it read (pw1's weight row e before its update, ...). Only pw2's own update may sit between
pw2's input gradient and dw's ops in the schedule; it is moved after the group when no hazard forbids it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from microtrain.compiler.schedule import can_swap
from microtrain.ir.graph import Graph, Op

UPDATE_KINDS = ("conv2d_update", "conv2d_weight_grad")
# Expanded channels whose pw1 gradient planes join the input-gradient sums in one pass over the accumulator (speed,
# never order): 4 passes instead of one per channel (measured: -6% of mcunet's Cortex-M4 instructions per step) for
# 3 more planes; the planner falls back to 1 where those planes would raise the peak.
BATCH = 4


@dataclass
class BlockGroup:
    """One block's channel-serial backward: its member ops (schedule order) by role, and what it hands out."""

    block: str
    members: list[str]  # op names, schedule order
    roles: dict[str, str]  # role -> op name: pw2_gi, dw_acc, dw_upd, dw_gi, pw1_acc, pw1_upd, pw1_gi
    channels: int  # E
    output: str | None  # the gradient the group hands on (pw1's or dw's input gradient), if any
    scratch_bytes: int = 0
    outputs: list[str] = field(default_factory=list)  # every tensor read after the group (output, weight grads)
    recompute: dict[str, Any] | None = None  # masks recomputed per channel instead of stored (`_recompute`)
    batch: int = 1  # channels per pass of pw1's input-gradient sums (its gradient planes in the scratch)
    plane_bytes: int = 0  # one such plane (0: the group has no pw1 input gradient)

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.block, "members": self.members, "roles": self.roles, "channels": self.channels,
                "output": self.output, "outputs": self.outputs, "scratch_bytes": self.scratch_bytes,
                "recompute": self.recompute, "batch": self.batch, "plane_bytes": self.plane_bytes}


def with_batch(groups: list[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    """The same groups summing `batch` channel planes per pass (their scratch resized)."""
    return [{**grp, "batch": batch, "scratch_bytes": grp["scratch_bytes"] + (batch - grp["batch"]) * grp["plane_bytes"]}
            for grp in groups]


def _pointwise(g: Graph, op: Op) -> bool:
    w = g.tensors[op.inputs[1]]
    return (op.kind == "conv2d" and op.attrs["groups"] == 1 and w.shape[2] == w.shape[3] == 1
            and op.attrs["stride"] == 1 and op.attrs["padding"] == 0)


def _depthwise(g: Graph, op: Op) -> bool:
    return op.kind == "conv2d" and op.attrs["groups"] > 1 and op.attrs["groups"] == g.tensors[op.outputs[0]].shape[0]


def _plane(g: Graph, name: str) -> int:
    c, h, w = g.tensors[name].shape
    return h * w


def plane_bytes(hw1: int, hw2: int, batch: int, gx_numel: int, gx_qint8: bool) -> int:
    """Float32 channel planes: one for dw's output gradient (hw2), one for dw's input gradient (hw1), or `batch` of
    those when pw1's input gradient sums them (each pass over its accumulator takes that many channels: the same
    chain of fused multiply-adds, less accumulator traffic). Plus pw1's input-gradient accumulators (gx_numel
    elements, 0 without one) where the output cannot be one: a qint8 output is quantized per channel once complete.
    A float32 output is the accumulator itself (each sum is one chain over e, ir/ops.py)."""
    return 4 * (hw2 + hw1 * batch) + (4 * gx_numel if gx_numel and gx_qint8 else 0)


def _scratch(g: Graph, grp: BlockGroup) -> int:
    """The group's planes and accumulators (`plane_bytes`)."""
    r = grp.roles
    gdw = g.op(r["pw2_gi"]).outputs[0]
    dw = g.op(g.op(r["dw_acc"]).attrs["conv"])
    gx = g.tensors[g.op(r["pw1_gi"]).outputs[0]] if "pw1_gi" in r else None
    return plane_bytes(_plane(g, dw.inputs[0]), _plane(g, gdw), grp.batch if gx else 1, gx.numel if gx else 0,
                       gx is not None and gx.dtype == "qint8")


def _group_at(g: Graph, ops: list[Op], i: int, producers: dict[str, Op]) -> tuple[BlockGroup, list[Op]] | None:
    """The group starting at ops[i] (a pointwise conv's input gradient whose input came from a depthwise conv), with
    the ops to run after it (pw2's own update, moved past the group), or None. `producers`: the forward op that
    writes each tensor."""
    x = ops[i]
    if x.kind != "conv2d_grad_input" or not _pointwise(g, pw2 := g.op(x.attrs["conv"])):
        return None
    dw = producers.get(pw2.inputs[0])
    if dw is None or not _depthwise(g, dw):
        return None
    pw1 = producers.get(dw.inputs[0])
    pw1 = pw1 if pw1 is not None and _pointwise(g, pw1) else None
    roles = {"pw2_gi": x.name}
    members, moved = [x], []
    role_of = {("conv2d_grad_acc", dw.name): "dw_acc", ("conv2d_grad_input", dw.name): "dw_gi"}
    if pw1 is not None:
        role_of.update({("conv2d_grad_acc", pw1.name): "pw1_acc", ("conv2d_grad_input", pw1.name): "pw1_gi"})
    for j in range(i + 1, len(ops)):
        op = ops[j]
        conv = op.attrs.get("conv")
        if op.kind in UPDATE_KINDS and conv in (dw.name, pw1.name if pw1 else None):
            role = "dw_upd" if conv == dw.name else "pw1_upd"
        else:
            role = role_of.get((op.kind, conv))
        if role is not None and role not in roles:
            if role.startswith("pw1") and "dw_gi" not in roles:
                break
            roles[role] = op.name
            members.append(op)
            continue
        if op.kind in UPDATE_KINDS and conv == pw2.name:  # pw2's own update: runs after the group (checked below)
            moved.append(op)
            continue
        break
    if "dw_acc" not in roles:
        return None
    # every member reads the previous member's gradient of the same channel: the chain must be the data path
    chain = [roles[r] for r in ("pw2_gi", "dw_acc", "dw_gi", "pw1_acc") if r in roles]
    for a, b in zip(chain, chain[1:], strict=False):
        if g.op(a).outputs[0] not in g.op(b).inputs:
            return None
    e = g.tensors[x.outputs[0]].shape[0]
    inside = {t for m in members for t in m.outputs}
    later = {t for o in ops for t in o.inputs if o not in members} | set(g.outputs)
    escaping = [t for t in inside if t in later]
    act_grads = {m.outputs[0] for m in members if m.kind in ("conv2d_grad_input", "conv2d_grad_acc")}
    last = roles.get("pw1_gi") or (roles.get("dw_gi") if "pw1_acc" not in roles else None)
    output = g.op(last).outputs[0] if last else None
    if any(t in act_grads and t != output for t in escaping):
        return None  # an expanded gradient is needed whole after the group: nothing to gain, keep op by op
    pos = {o.name: k for k, o in enumerate(ops)}
    if any(not can_swap(g, mv, m) for mv in moved for m in members if pos[m.name] > pos[mv.name]):
        return None
    if moved and pos[moved[-1].name] > pos[members[-1].name]:
        moved = [mv for mv in moved if pos[mv.name] < pos[members[-1].name]]  # after the group already: stays
    grp = BlockGroup(dw.name.rsplit(".", 1)[0], [m.name for m in members], roles, e, output,
                     outputs=sorted(escaping))
    return grp, moved


def _recompute(g: Graph, grp: BlockGroup) -> dict[str, Any] | None:
    """What the group recomputes instead of storing (None where it cannot): needs pw1 in the group, and pw1's and
    dw's masks (and dw's saved input) read by the group alone."""
    r = grp.roles
    if "pw1_acc" not in r:
        return None
    dw = g.op(g.op(r["dw_acc"]).attrs["conv"])
    pw1 = g.op(g.op(r["pw1_acc"]).attrs["conv"])
    masks = [next((t for t in op.outputs[1:] if g.tensors[t].role == "mask"), None) for op in (pw1, dw)]
    if None in masks:
        return None
    members = set(grp.members)
    drop, saved = [], None
    if "dw_upd" in r and g.op(r["dw_upd"]).attrs["channels"]:
        saved = g.op(r["dw_upd"]).inputs[1]
        if saved != pw1.outputs[0]:
            slicer = next((o for o in g.ops if saved in o.outputs), None)
            if slicer is None or slicer.kind != "slice_channels":
                return None
            drop.append(slicer.name)
    sliced = saved if saved and saved != pw1.outputs[0] else None  # pw1's output itself is read by dw's forward
    for t in [*masks, *([sliced] if sliced else [])]:
        if not {o.name for o in g.ops if t in o.inputs} <= members:
            return None
    hw1, hw2 = _plane(g, pw1.outputs[0]), _plane(g, dw.outputs[0])
    nbytes = hw1 + hw2 + -(-hw1 // 8) + -(-hw2 // 8)  # int8 planes of pw1.y and dw.y, their mask bits
    return {"x": pw1.inputs[0], "pw1": pw1.name, "dw": dw.name, "masks": masks, "drop_ops": drop,
            "saved": sliced, "bytes": -(-nbytes // 4) * 4}


def serialize_blocks(g: Graph, recompute: bool = False, batch: int = BATCH) -> Graph:
    """A copy of the scheduled graph `g` whose eligible blocks' backward ops are contiguous groups, described in
    `meta["block_grads"]` (the C generator runs each channel by channel; the planning view collapses each). With
    `recompute`, groups that can recompute pw1's and dw's masks per channel do (`group["recompute"]`)."""
    ops = list(g.ops)
    out: list[Op] = []
    groups: list[dict[str, Any]] = []
    producers = {t: o for o in g.ops for t in o.outputs if o.attrs.get("phase") == "forward"}
    i = 0
    while i < len(ops):
        found = _group_at(g, ops, i, producers)
        if found is None:
            out.append(ops[i])
            i += 1
            continue
        grp, moved = found
        if "pw1_gi" in grp.roles:
            grp.batch = batch
            grp.plane_bytes = 4 * _plane(g, g.op(grp.roles["pw1_acc"]).outputs[0])
        grp.scratch_bytes = _scratch(g, grp)
        rc = _recompute(g, grp) if recompute else None
        if rc:
            grp.recompute = rc
            grp.scratch_bytes += rc["bytes"]
        span = len(grp.members) + len(moved)
        assert {o.name for o in ops[i:i + span]} == set(grp.members) | {m.name for m in moved}, "not contiguous"
        out += [g.op(n) for n in grp.members] + moved
        i += span
        groups.append(grp.to_dict())
    meta = copy.deepcopy(g.meta)
    meta["block_grads"] = groups
    return Graph(g.name, dict(g.tensors), out, list(g.inputs), list(g.outputs), meta)


def collapse_blocks(g: Graph, groups: list[dict[str, Any]]) -> Graph:
    """Planning view: each group becomes one `block_grad` op (inputs: what its members read from outside; outputs:
    what is read after it; scratch: the planes and accumulators)."""
    if not groups:
        return g
    first = {grp["members"][0]: grp for grp in groups}
    member_of = {m for grp in groups for m in grp["members"]}
    recomputed = [grp["recompute"] for grp in groups if grp.get("recompute")]
    unstored = {m for rc in recomputed for m in rc["masks"]} | {rc["saved"] for rc in recomputed if rc["saved"]}
    dropped = {n for rc in recomputed for n in rc["drop_ops"]}
    ops: list[Op] = []
    for op in g.ops:
        if op.name in dropped:
            continue
        if op.attrs.get("phase") == "forward" and unstored & set(op.outputs):  # the masks the groups recompute
            ops.append(Op(op.name, op.kind, list(op.inputs), [t for t in op.outputs if t not in unstored], op.attrs))
            continue
        if op.name in first:
            grp = first[op.name]
            members = [g.op(n) for n in grp["members"]]
            inside = {t for m in members for t in m.outputs}
            ins: list[str] = []
            for m in members:
                ins += [t for t in m.inputs if t not in inside and t not in ins]
            if rc := grp.get("recompute"):  # reads the block input; no longer the masks and dw's saved input
                pw1_y = g.op(rc["pw1"]).outputs[0]
                ins = [t for t in ins if t not in unstored and t != pw1_y] + [rc["x"]]
            ops.append(Op(f"{grp['block']}.block_grad", "block_grad", ins, list(grp["outputs"]),
                          {"ops": list(grp["members"]), "channels": grp["channels"],
                           "scratch_bytes": grp["scratch_bytes"], "phase": "backward"}))
        elif op.name not in member_of:
            ops.append(op)
    return Graph(f"{g.name}:blocks", g.tensors, ops, list(g.inputs), list(g.outputs), g.meta)
