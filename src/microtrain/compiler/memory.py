"""The memory of one on-device training step: schedule, patch stage, arena plan, SRAM and flash.

`compile_memory(model, scheme)` is what `microtrain plan` prints and what the C generator allocates:

1. the training graph (autodiff/build.py), then schedule choices that keep its semantics (`schedule.hoist_updates`);
2. the frozen early stage run patch by patch (compiler/patch.py), chosen automatically: every candidate stage of the
   frozen forward prefix x grids 2..8 whose recomputation stays under `max_recompute`, minimising the planned arena
   (ties: fewer MACs). The choice goes into `graph.meta["patch_stage"]` with its tile plan, so the C generator runs
   exactly the stage that was planned;
3. a *planning view* of the graph where the stage is one `patch_stage` op whose scratch buffer is the tile arena
   (`plan_memory(tile_graph(...))`: the tile intermediates live inside it), planned into one arena with the in-place
   rules of `planner.INPLACE_OPS`.

Peak SRAM = arena + state. State (role `state`: trainable int8 weight slices, int32 biases, the fp32 head, optimizer
slots) is resident for the whole step and is not planned into the arena. Flash = frozen weights and biases, one
float32 scale per output channel of every conv, and the initial values of the state (copied to SRAM at boot;
optimizer slots start at zero and need none).

Levers can be switched off one by one (`backward_inplace`, `schedule`, `patch`) to measure what each buys.
`stream_input` is an explicit option, reported separately: the camera delivers each tile's input region, so the whole
image never sits in SRAM (the tile's input region is planned in the tile arena instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from microtrain.autodiff.build import TrainConfig, build_training_graph, frozen_prefix
from microtrain.compiler.blockgrad import collapse_blocks, serialize_blocks, with_batch
from microtrain.compiler.patch import PatchStage, candidate_stages, make_stage, tile_graph
from microtrain.compiler.planner import INPLACE_OPS, InplaceRule, Plan, plan_memory, plot_plan
from microtrain.compiler.schedule import hoist_updates
from microtrain.errors import MicrotrainError
from microtrain.ir.graph import Graph, Op, Tensor
from microtrain.ir.trainmeta import params as param_roles
from microtrain.sparse.cost import analytic_extra_bytes
from microtrain.sparse.scheme import Scheme, resolve_scheme

FORWARD_INPLACE = ("add", "conv2d")  # the rules that existed before the backward ones (for lever accounting)
PATCH_GRIDS = tuple(range(2, 9))
SRAM_BUDGET = 256 * 1024  # the paper's target device class (STM32F746: 320 KB SRAM, 256 KB for the workload)
FLASH_BUDGET = 1024 * 1024


@dataclass
class MemoryReport:
    model: str
    scheme: Scheme
    config: TrainConfig
    graph: Graph  # the scheduled training graph: the host executor and the C generator run this op order
    view: Graph  # planning view: the patch stage collapsed into one op
    plan: Plan  # the arena plan of `view`
    stage: PatchStage | None
    tile_plan: Plan | None  # the arena of one tile, inside the stage op's scratch buffer
    stream_input: bool
    levers: dict[str, Any]
    analytic_extra_bytes: int
    state: dict[str, int] = field(default_factory=dict)  # resident state by kind
    flash: dict[str, int] = field(default_factory=dict)

    @property
    def arena_bytes(self) -> int:
        return self.plan.arena_bytes

    @property
    def state_bytes(self) -> int:
        return sum(self.state.values())

    @property
    def peak_sram_bytes(self) -> int:
        return self.arena_bytes + self.state_bytes

    @property
    def flash_bytes(self) -> int:
        return sum(self.flash.values())

    @property
    def executed_macs(self) -> int:
        return executed_macs(self.graph, self.stage)

    def patch(self) -> dict[str, Any] | None:
        s = self.stage
        if s is None:
            return None
        step_macs = self.graph.macs()
        return {"ops": s.ops, "output": s.output, "grid": s.grid, "tiles": len(s.tiles), "macs": s.macs,
                "whole_macs": s.whole_macs, "recompute": s.macs / max(s.whole_macs, 1),
                "extra_macs": s.macs - s.whole_macs, "step_macs": step_macs,
                "step_overhead": (s.macs - s.whole_macs) / max(step_macs, 1),
                "scratch_bytes": self.tile_plan.arena_bytes if self.tile_plan else 0,
                "stream_input": self.stream_input}

    def block_backward(self) -> dict[str, Any]:
        """The channel-serial block backward of this plan: its groups, and the MACs recomputing masks costs."""
        from microtrain.ir.ops import OPS

        g = self.graph
        groups = g.meta.get("block_grads", [])
        rc = [grp["recompute"] for grp in groups if grp.get("recompute")]
        macs = sum(OPS["conv2d"].macs(g, g.op(n)) for r in rc for n in (r["pw1"], r["dw"]))
        return {"blocks": [grp["block"] for grp in groups], "recompute_blocks": len(rc), "recompute_macs": macs,
                "step_macs": g.macs(), "step_overhead": macs / max(g.macs(), 1)}

    def breakdown(self) -> dict[str, Any]:
        """What makes up the peak: the arena buffers live at the peak step (by role and by tensor), the resident
        state, and flash."""
        p, v = self.plan, self.view
        step = p.peak_step
        members: dict[str, list[str]] = {}
        for t in p.aliases:
            members.setdefault(p.root(t), []).append(t)
        live, by_role = [], {}
        for lt in p.live_at(step):
            role = v.tensors[lt.tensor].role if lt.tensor in v.tensors else "scratch"
            by_role[role] = by_role.get(role, 0) + lt.nbytes
            live.append({"tensor": lt.tensor, "role": role, "bytes": lt.nbytes, "offset": p.offsets[lt.tensor],
                         "first": lt.first, "last": lt.last, "aliases": sorted(members.get(lt.tensor, []))})
        op = v.ops[step] if step < len(v.ops) else None
        phases: dict[str, int] = {}
        for i, o in enumerate(v.ops):
            ph = o.attrs.get("phase", "")
            phases[ph] = max(phases.get(ph, 0), p.live_curve[i])
        out: dict[str, Any] = {
            "peak_step": step, "peak_op": op.name if op else None, "peak_op_kind": op.kind if op else None,
            "peak_phase": op.attrs.get("phase") if op else None,
            "arena_live_bytes": p.peak_live_bytes, "arena_fragmentation_bytes": p.arena_bytes - p.peak_live_bytes,
            "arena_live_peak_by_phase": phases,
            "arena_by_role": dict(sorted(by_role.items(), key=lambda kv: -kv[1])), "live_at_peak": live,
            "state": dict(self.state), "flash": dict(self.flash)}
        if op is not None and op.kind == "patch_stage" and self.tile_plan is not None:
            tp = self.tile_plan
            out["tile_at_peak"] = [{"tensor": lt.tensor, "bytes": lt.nbytes} for lt in tp.live_at(tp.peak_step)]
        return out

    def to_json(self) -> dict[str, Any]:
        cfg = self.config
        return {"model": self.model, "scheme": self.scheme.name, "num_classes": self.graph.meta["train"]["num_classes"],
                "optimizer": cfg.optimizer, "reorder": cfg.reorder, "update_storage": cfg.update_storage,
                "levers": self.levers, "peak_sram_bytes": self.peak_sram_bytes, "arena_bytes": self.arena_bytes,
                "state_bytes": self.state_bytes, "flash_bytes": self.flash_bytes,
                "analytic_extra_bytes": self.analytic_extra_bytes,
                "budget": {"sram_bytes": SRAM_BUDGET, "flash_bytes": FLASH_BUDGET},
                "patch": self.patch(), "block_backward": self.block_backward(), "breakdown": self.breakdown()}

    def plot(self, path: str | Path) -> None:
        title = (f"{self.model} {self.scheme.name} ({self.config.optimizer}, reorder "
                 f"{'on' if self.config.reorder else 'off'}): peak SRAM {self.peak_sram_bytes / 1024:.1f} KB = arena "
                 f"{self.arena_bytes / 1024:.1f} KB + resident state {self.state_bytes / 1024:.1f} KB")
        plot_plan(self.plan, self.view, path, title=title, resident=self.state, budget=SRAM_BUDGET)


# ---- pieces ---------------------------------------------------------------------------------------------------------
def inplace_rules(backward: bool) -> dict[str, InplaceRule]:
    return dict(INPLACE_OPS) if backward else {k: r for k, r in INPLACE_OPS.items() if k in FORWARD_INPLACE}


def state_bytes(g: Graph) -> dict[str, int]:
    """Resident SRAM state by kind. Every `state` tensor is counted once, whatever its kind; with
    `update_storage="fp32"` the trainable int8 slices are float32 shadows (4 bytes per element)."""
    names = g.meta["train"]["state"]
    fp32 = g.meta["train"]["config"].get("update_storage") == "fp32"
    report = {"slot": "optimizer_slots", "head_weight": "head", "head_bias": "head",
              "weight_slice": "trainable_weights", "bias": "trainable_biases"}
    roles = param_roles(g)
    out = {"trainable_weights": 0, "trainable_biases": 0, "head": 0, "optimizer_slots": 0}
    for n in names:
        t = g.tensors[n]
        kind = report[roles[n].kind]
        out[kind] += 4 * t.numel if fp32 and t.dtype == "int8" else t.nbytes
    return out


def flash_bytes(g: Graph) -> dict[str, int]:
    """Flash: frozen weights and biases, one float32 scale per output channel of each conv (its weight parts share
    it), and the boot values of the state (optimizer slots start at zero)."""
    names = g.meta["train"]["state"]
    roles = param_roles(g)
    scales = sum(4 * np.asarray(g.tensors[op.inputs[1]].scale).size for op in g.ops
                 if op.kind == "conv2d" and g.tensors[op.inputs[1]].scale is not None)
    return {"frozen_weights": sum(t.nbytes for t in g.tensors.values() if t.role == "weight"),
            "frozen_biases": sum(t.nbytes for t in g.tensors.values() if t.role == "bias"),
            "scales": int(scales),
            "state_init": sum(g.tensors[n].nbytes for n in names if not roles[n].is_slot)}


def stage_tile_graph(g: Graph, stage: PatchStage, stream_input: bool) -> Graph:
    """`tile_graph`, and with `stream_input` the image tile planned inside the tile arena (the sensor writes it)."""
    t = tile_graph(g, stage)
    if stream_input:
        img = t.tensors[g.inputs[0]]
        t.tensors[img.name] = Tensor(img.name, img.shape, img.dtype, "input", img.scale, img.zero)
    return t


def planning_view(g: Graph, stage: PatchStage | None, scratch_bytes: int, stream_input: bool = False,
                  blocks: list[dict[str, Any]] | None = None) -> Graph:
    """`g` with the stage's ops (a prefix of the schedule) replaced by one `patch_stage` op whose scratch is the tile
    arena, and each channel-serial block backward (`blocks`, default `g.meta["block_grads"]`) by one `block_grad` op.
    With `stream_input` the image is no graph input of the view: it never exists whole."""
    g = collapse_blocks(g, g.meta.get("block_grads", []) if blocks is None else blocks)
    if stage is None:
        return g
    n = len(stage.ops)
    if [o.name for o in g.ops[:n]] != stage.ops:
        raise MicrotrainError(f"patch stage {stage.ops[0]}..{stage.ops[-1]} is not a prefix of the schedule")
    inner = {t for o in g.ops[:n] for t in o.outputs} - {stage.output}
    image = g.inputs[0]
    consts = [t for o in g.ops[:n] for t in o.inputs[1:] if t not in inner]
    op = Op("patch_stage", "patch_stage", ([] if stream_input else [image]) + consts, [stage.output],
            {"ops": list(stage.ops), "grid": stage.grid, "scratch_bytes": scratch_bytes, "macs": stage.macs,
             "stream_input": stream_input, "phase": "forward"})
    inputs = [i for i in g.inputs if not (stream_input and i == image)]
    return Graph(f"{g.name}:view", {k: t for k, t in g.tensors.items() if k not in inner}, [op, *g.ops[n:]],
                 inputs, list(g.outputs), g.meta)


def executed_macs(g: Graph, stage: PatchStage | None) -> int:
    """MACs one step of the scheduled graph `g` executes: its ops', plus the patch stage's halo recomputation and
    the channel-serial blocks' recomputed pw1 / dw outputs."""
    from microtrain.ir.ops import OPS

    rc = [grp["recompute"] for grp in g.meta.get("block_grads", []) if grp.get("recompute")]
    return (g.macs() + (stage.macs - stage.whole_macs if stage else 0)
            + sum(OPS["conv2d"].macs(g, g.op(n)) for r in rc for n in (r["pw1"], r["dw"])))


def frozen_forward_ops(g: Graph) -> list[Op]:
    return frozen_prefix(g)[0]


@dataclass
class _Candidate:
    arena: int
    extra_macs: int
    stage: PatchStage | None
    tile_plan: Plan | None
    view: Graph
    plan: Plan


def choose_stage(g: Graph, rules: dict[str, InplaceRule], stream_input: bool = False, max_recompute: float = 1.5,
                 grids: tuple[int, ...] = PATCH_GRIDS) -> _Candidate:
    """Every candidate stage x grid within `max_recompute` (stage MACs tiled / whole), and no stage at all: the one
    with the smallest planned arena, ties broken by fewer extra MACs."""
    whole = planning_view(g, None, 0)
    best = _Candidate(0, 0, None, None, whole, plan_memory(whole, rules=rules))
    best.arena = best.plan.arena_bytes
    if stream_input:
        best.arena = 1 << 62  # without a stage there is no tile to stream: the option needs one
    prefix = [o.name for o in g.ops]
    for ops, out in candidate_stages(g, frozen_forward_ops(g)):
        if [o.name for o in ops] != prefix[:len(ops)]:
            continue
        for grid in grids:
            if grid > min(g.tensors[out].shape[1:]):
                continue
            stage = make_stage(g, ops, out, grid)
            if stage.macs > max_recompute * stage.whole_macs:
                continue
            tplan = plan_memory(stage_tile_graph(g, stage, stream_input), rules=rules)
            view = planning_view(g, stage, tplan.arena_bytes, stream_input)
            plan = plan_memory(view, rules=rules)
            cand = _Candidate(plan.arena_bytes, stage.macs - stage.whole_macs, stage, tplan, view, plan)
            if (cand.arena, cand.extra_macs) < (best.arena, best.extra_macs):
                best = cand
    if best.stage is None and stream_input:
        raise MicrotrainError("--stream-input needs a patch stage, and this graph has no frozen early stage")
    return best


def stage_meta(stage: PatchStage, tile: Graph, tplan: Plan, stream_input: bool) -> dict[str, Any]:
    """What the C generator needs to run the planned stage: its ops, grid, and the tile arena layout."""
    return {**stage.to_dict(), "stream_input": stream_input, "scratch_bytes": tplan.arena_bytes,
            "tile_plan": {"arena_bytes": tplan.arena_bytes, "offsets": dict(tplan.offsets),
                          "aliases": dict(tplan.aliases),
                          "shapes": {n: list(t.shape) for n, t in tile.tensors.items() if n in tplan.offsets}}}


# ---- entry points ---------------------------------------------------------------------------------------------------
def plan_training_graph(g: Graph, *, patch: str | None = "auto", stream_input: bool = False,
                        backward_inplace: bool = True, schedule: bool = True, max_recompute: float = 1.5,
                        grids: tuple[int, ...] = PATCH_GRIDS, block_backward: bool = True,
                        block_recompute: bool = False) -> tuple[Graph, _Candidate]:
    """Schedule and plan a training graph; returns the scheduled graph (with `meta["patch_stage"]` and
    `meta["block_grads"]`) and the plan. `block_backward`: run inverted-residual blocks' backward channel by channel
    (compiler/blockgrad.py) where that lowers the planned arena; `block_recompute`: and recompute pw1's and dw's
    masks per channel instead of storing them, where that lowers it further."""
    if patch not in ("auto", None):
        raise MicrotrainError(f"patch must be 'auto' or None, got {patch!r}")
    if stream_input and patch is None:
        raise MicrotrainError("--stream-input streams the patch stage's input tiles: it needs the patch stage")
    tg = hoist_updates(g) if schedule else g
    if block_backward:
        tg = serialize_blocks(tg, recompute=block_recompute)
    else:
        tg = Graph(tg.name, dict(tg.tensors), list(tg.ops), list(tg.inputs), list(tg.outputs), dict(tg.meta))
        tg.meta["block_grads"] = []
    rules = inplace_rules(backward_inplace)
    if patch == "auto":
        best = choose_stage(tg, rules, stream_input, max_recompute, grids)
    else:
        view = planning_view(tg, None, 0)
        plan = plan_memory(view, rules=rules)
        best = _Candidate(plan.arena_bytes, 0, None, None, view, plan)
    # on the same stage: cheaper alternatives where they plan no larger, op by op (the planes are not free, nor the
    # channel loop), then the groups without recomputation (it costs pw1's and dw's MACs again); and one channel per
    # accumulator pass where the batch's planes would raise the peak
    groups = tg.meta["block_grads"]
    plain = [{**grp, "recompute": None, "scratch_bytes": grp["scratch_bytes"] - grp["recompute"]["bytes"]}
             if grp.get("recompute") else grp for grp in groups]
    scratch = best.tile_plan.arena_bytes if best.tile_plan else 0

    def plan_with(blocks: list[dict[str, Any]]) -> tuple[Graph, Plan]:
        view = planning_view(tg, best.stage, scratch, stream_input, blocks=blocks)
        return view, plan_memory(view, rules=rules)

    for alt in ([[]] if groups else []) + ([plain] if plain != groups else []):
        view, plan = plan_with(alt)
        if plan.arena_bytes <= best.arena:
            tg.meta["block_grads"] = alt
            best = _Candidate(plan.arena_bytes, best.extra_macs, best.stage, best.tile_plan, view, plan)
            break
    single = with_batch(tg.meta["block_grads"], 1)
    if single != tg.meta["block_grads"]:
        view, plan = plan_with(single)
        if plan.arena_bytes < best.arena:
            tg.meta["block_grads"] = single
            best = _Candidate(plan.arena_bytes, best.extra_macs, best.stage, best.tile_plan, view, plan)
    tg.meta.pop("patch_stage", None)
    if best.stage is not None:
        tg.meta["patch_stage"] = stage_meta(best.stage, stage_tile_graph(tg, best.stage, stream_input),
                                            best.tile_plan, stream_input)
        best.view.meta = tg.meta
    return tg, best


def compile_memory(model: Graph, scheme: Scheme | str, *, num_classes: int = 10,
                   cfg: TrainConfig | None = None, patch: str | None = "auto", stream_input: bool = False,
                   backward_inplace: bool = True, schedule: bool = True, max_recompute: float = 1.5,
                   grids: tuple[int, ...] = PATCH_GRIDS, block_backward: bool = True,
                   block_recompute: bool = False) -> MemoryReport:
    """The memory of one batch-1 training step of `model` under `scheme` on the device."""
    fwd = model
    sch = resolve_scheme(scheme, fwd) if isinstance(scheme, str) else scheme.validate(fwd)
    cfg = cfg or TrainConfig()
    if num_classes < 1:
        raise MicrotrainError(f"--classes must be >= 1, got {num_classes}")
    tg, best = plan_training_graph(build_training_graph(fwd, sch, num_classes, cfg), patch=patch,
                                   stream_input=stream_input, backward_inplace=backward_inplace, schedule=schedule,
                                   max_recompute=max_recompute, grids=grids, block_backward=block_backward,
                                   block_recompute=block_recompute)
    levers = {"inplace_forward": True, "inplace_backward": backward_inplace, "schedule_hoist_updates": schedule,
              "patch": patch, "stream_input": stream_input, "max_recompute": max_recompute,
              "block_backward": block_backward, "block_backward_groups": len(tg.meta["block_grads"]),
              "block_recompute": block_recompute,
              "block_recompute_groups": sum(bool(grp.get("recompute")) for grp in tg.meta["block_grads"])}
    return MemoryReport(fwd.name, sch, cfg, tg, best.view, best.plan, best.stage, best.tile_plan, stream_input,
                        levers, analytic_extra_bytes(fwd, sch), state_bytes(tg), flash_bytes(tg))
