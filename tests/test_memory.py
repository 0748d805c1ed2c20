"""compile_memory / `microtrain plan`: the issue-4 acceptance against the paper, the plan's invariants, the patch stage
reproduced from the graph's meta, and the schedule leaving the training step unchanged."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from microtrain.autodiff.build import TrainConfig, build_training_graph
from microtrain.cli import main
from microtrain.compiler.memory import MemoryReport, compile_memory, frozen_forward_ops, planning_view
from microtrain.compiler.patch import make_stage, tile_graph
from microtrain.compiler.planner import plan_memory
from microtrain.compiler.schedule import hoist_updates
from microtrain.frontends.zoo import load_model
from microtrain.runtime.executor import Executor, run_stage_tiled
from microtrain.runtime.trainstep import GraphTrainStep
from microtrain.sparse.scheme import Scheme

from tiny import tiny_model


@functools.lru_cache(maxsize=8)
def _model(name: str):
    return load_model(name)


def memory_of(model: str, scheme, **kw) -> MemoryReport:
    """compile_memory of a zoo model (loaded once)."""
    return compile_memory(_model(model), scheme, **kw)


# The paper's scheme nearest 100 KB per model and its measured sparse+reorder peak SRAM (PAPER.md §4, KB).
PAPER_SCHEME = {"mbv2-w0.35": "paper-99kb", "proxyless-w0.3": "paper-98kb", "mcunet-5fps": "paper-99kb"}
PAPER_PEAK_KB = {"mbv2-w0.35": 141, "proxyless-w0.3": 135, "mcunet-5fps": 173}
# Known misses, measured and explained in benchmarks/results/memory.md; strict, so a fix shows up as a failure here.
PROXYLESS = ("with the image whole (no --stream-input), b3's 16->48 expansion at 32x32 holds 80 KB of activations "
             "after the patch stage: the forward peak")
REORDER_DEFAULT = ("without --stream-input the peak is in the forward pass, which reordering cannot lower, while the "
                   "channel-serial block backward lowers the reorder-off backward")
RATIO = ("the same planner puts the full update 16-31% below the paper's measured figure (2034 / 2290 / 3049 KB vs "
         "2939 / 2745 / 3650 KB), and without --stream-input the sparse peak is the forward pass")
FULL_SAME_LEVERS = ("with every lever on both sides (the channel-serial block backward lowers the full update too, "
                    "2034 / 2290 KB), the sparse step's resident state (75-80 KB) plus masks keep it above 1/20")


@functools.cache
def report(model: str, scheme: str, reorder: bool = True, **kw) -> MemoryReport:
    return memory_of(model, scheme, cfg=TrainConfig(reorder=reorder), **kw)


def miss(reason: str):
    return pytest.mark.xfail(strict=True, reason=reason)


# ---- acceptance (issue 4) -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["mbv2-w0.35", pytest.param("proxyless-w0.3", marks=miss(PROXYLESS)), "mcunet-5fps"])
def test_peak_at_or_below_paper(model):
    assert report(model, PAPER_SCHEME[model]).peak_sram_bytes <= PAPER_PEAK_KB[model] * 1024


@pytest.mark.parametrize("model,options", [("mbv2-w0.35", {}), ("mcunet-5fps", {}),
                                           ("proxyless-w0.3", {"stream_input": True, "max_recompute": 3.0})])
def test_peak_at_or_below_paper_with_int8_gradients(model, options):
    """`--int8-grads` (and for proxyless the explicit --stream-input / --max-recompute 3 options) meet the paper."""
    r = memory_of(model, PAPER_SCHEME[model], cfg=TrainConfig(int8_grads=True), **options)
    assert r.peak_sram_bytes <= PAPER_PEAK_KB[model] * 1024
    assert any(t.dtype == "qint8" for t in r.graph.tensors.values())


@pytest.mark.parametrize("model", ["mbv2-w0.35", pytest.param("proxyless-w0.3", marks=miss(REORDER_DEFAULT)),
                                   pytest.param("mcunet-5fps", marks=miss(REORDER_DEFAULT))])
def test_reorder_ratio(model):
    on, off = report(model, PAPER_SCHEME[model]), report(model, PAPER_SCHEME[model], reorder=False)
    assert off.peak_sram_bytes >= 2.4 * on.peak_sram_bytes


@pytest.mark.parametrize("model", [pytest.param(m, marks=miss(RATIO)) for m in PAPER_SCHEME])
def test_full_update_ratio(model):
    full = report(model, "full", reorder=False)
    assert full.peak_sram_bytes >= 20 * report(model, PAPER_SCHEME[model]).peak_sram_bytes


LOWEST = {"stream_input": True, "max_recompute": 3.0}  # the lowest-memory levers (options the default leaves off)
RATIO_LOWEST = ("the full update shrinks with int8 gradients too (activation gradients at 64x64); this planner puts it "
                "at 2017 / 2261 KB where the paper measured 2939 / 2745 KB, so the ratio stays at 18.0x / 19.2x")


def test_full_update_ratio_proxyless_with_recompute_cap_5():
    """proxyless-w0.3 reaches 20x with int8 gradients on both sides when its patch stage may recompute up to 5x."""
    full = memory_of("proxyless-w0.3", "full", cfg=TrainConfig(int8_grads=True, reorder=False))
    sparse = memory_of("proxyless-w0.3", "paper-98kb", cfg=TrainConfig(int8_grads=True), stream_input=True,
                            max_recompute=5.0)
    assert full.peak_sram_bytes >= 20 * sparse.peak_sram_bytes


@pytest.mark.parametrize("model", list(PAPER_SCHEME))
def test_float32_gradients_lowest_memory_meet_the_paper(model):
    """Float32 gradients, as the paper's engine: --stream-input --max-recompute 3 with the channel-serial block
    backward is at or below the paper's measured peak on every model, and reorder off / on >= 2.4x."""
    on = memory_of(model, PAPER_SCHEME[model], **LOWEST)
    off = memory_of(model, PAPER_SCHEME[model], cfg=TrainConfig(reorder=False), **LOWEST)
    assert on.graph.meta["block_grads"] and not any(t.dtype == "qint8" for t in on.graph.tensors.values())
    assert on.peak_sram_bytes <= PAPER_PEAK_KB[model] * 1024
    assert off.peak_sram_bytes >= 2.4 * on.peak_sram_bytes


@pytest.mark.parametrize("model", [pytest.param("mbv2-w0.35", marks=miss(FULL_SAME_LEVERS)),
                                   pytest.param("proxyless-w0.3", marks=miss(FULL_SAME_LEVERS)), "mcunet-5fps"])
def test_full_update_ratio_float32_lowest_memory(model):
    full = report(model, "full", reorder=False)
    assert full.peak_sram_bytes >= 20 * memory_of(model, PAPER_SCHEME[model], **LOWEST).peak_sram_bytes


@pytest.mark.parametrize("model", list(PAPER_SCHEME))
def test_reorder_ratio_lowest_memory_configuration(model):
    """--int8-grads --stream-input --max-recompute 3 on both sides: reorder on vs off >= 2.4x on every model."""
    cfg = dict(LOWEST)
    on = memory_of(model, PAPER_SCHEME[model], cfg=TrainConfig(int8_grads=True), **cfg)
    off = memory_of(model, PAPER_SCHEME[model], cfg=TrainConfig(int8_grads=True, reorder=False), **cfg)
    assert off.peak_sram_bytes >= 2.4 * on.peak_sram_bytes
    assert on.peak_sram_bytes <= PAPER_PEAK_KB[model] * 1024


@pytest.mark.parametrize("model", [pytest.param("mbv2-w0.35", marks=miss(RATIO_LOWEST)),
                                   pytest.param("proxyless-w0.3", marks=miss(RATIO_LOWEST)), "mcunet-5fps"])
def test_full_update_ratio_lowest_memory_configuration(model):
    """The same levers on both sides (a full update has no frozen stage to stream: int8 gradients only)."""
    full = memory_of(model, "full", cfg=TrainConfig(int8_grads=True, reorder=False))
    sparse = memory_of(model, PAPER_SCHEME[model], cfg=TrainConfig(int8_grads=True), **LOWEST)
    assert full.peak_sram_bytes >= 20 * sparse.peak_sram_bytes


@pytest.mark.parametrize("model", list(PAPER_SCHEME))
def test_levers_help_and_fit_the_device(model):
    """Every lever keeps or lowers the peak; the sparse step fits 256 KB of SRAM and 1 MB of flash."""
    s = PAPER_SCHEME[model]
    naive = report(model, s, patch=None, backward_inplace=False, schedule=False)
    best = report(model, s)
    assert best.peak_sram_bytes < 0.8 * naive.peak_sram_bytes
    assert report(model, s, stream_input=True).peak_sram_bytes <= best.peak_sram_bytes
    assert report(model, s, reorder=False).peak_sram_bytes > best.peak_sram_bytes
    assert best.peak_sram_bytes <= 256 * 1024 and best.flash_bytes <= 1024 * 1024
    assert best.stage is not None and best.patch()["recompute"] <= 1.5


# ---- invariants -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", list(PAPER_SCHEME))
def test_plan_accounts_for_every_live_byte(model):
    r = report(model, PAPER_SCHEME[model])
    v, p = r.view, r.plan
    # independent liveness over the planning view: each arena tensor from its producer (or entry) to its last reader
    first = {t: -1 for t in v.inputs}
    last: dict[str, int] = {}
    for i, op in enumerate(v.ops):
        for t in op.outputs:
            first.setdefault(t, i)
        for t in op.inputs:
            last[t] = i
    arena = {t: (f, len(v.ops) if t in v.outputs else last.get(t, f)) for t, f in first.items()
             if v.tensors[t].role in ("input", "act", "grad", "mask", "label", "loss")}
    assert set(arena) <= set(p.offsets)
    for i in range(len(v.ops)):
        live = {p.root(t) for t, (f, l) in arena.items() if f <= i <= l}
        need = sum(v.tensors[t].nbytes for t in live)  # each buffer at least once
        need += int(v.ops[i].attrs.get("scratch_bytes", 0))
        assert p.live_curve[i] >= need
    assert p.arena_bytes >= p.peak_live_bytes == max(p.live_curve)
    assert r.state_bytes == sum(t.nbytes for t in r.graph.tensors.values() if t.role == "state")
    assert r.peak_sram_bytes == r.arena_bytes + r.state_bytes
    # flash: the zoo model's constants without the ImageNet classifier, plus the new fp32 head
    fwd = load_model(model)
    cls = fwd.ops[-1]
    imagenet = sum(fwd.tensors[n].nbytes + 4 * np.asarray(fwd.tensors[n].scale).size * (
        fwd.tensors[n].scale is not None) for n in cls.inputs[1:])
    head = sum(r.graph.tensors[n].nbytes for n in ("head.w", "head.b"))
    assert r.flash_bytes == fwd.const_bytes() - imagenet + head


@pytest.mark.parametrize("model", list(PAPER_SCHEME))
def test_patch_stage_reproduced_from_meta(model):
    """What the C generator reads (graph.meta["patch_stage"]) rebuilds the planned stage, tile arena and arena."""
    r = report(model, PAPER_SCHEME[model])
    g, m = r.graph, r.graph.meta["patch_stage"]
    stage = make_stage(g, [g.op(n) for n in m["ops"]], m["output"], m["grid"])
    assert stage.to_dict() == r.stage.to_dict()
    tplan = plan_memory(tile_graph(g, stage))
    assert tplan.arena_bytes == m["scratch_bytes"] == m["tile_plan"]["arena_bytes"] == r.patch()["scratch_bytes"]
    assert tplan.offsets == m["tile_plan"]["offsets"]
    assert plan_memory(planning_view(g, stage, tplan.arena_bytes)).arena_bytes == r.arena_bytes
    assert json.loads(json.dumps(m)) == m  # plain JSON, travels with the graph
    # the planned stage (its ops are frozen forward ops, named as in the model) computes what the whole forward does
    fwd = load_model(model)
    x = torch.from_numpy(np.random.default_rng(0).integers(-128, 128, (1, *fwd.tensors[fwd.inputs[0]].shape))
                         .astype(np.int8))
    fstage = make_stage(fwd, [fwd.op(n) for n in m["ops"]], m["output"], m["grid"])
    assert torch.equal(run_stage_tiled(fwd, fstage, x), Executor(fwd).run(x, keep_all=True)[m["output"]])


def test_patch_choice_is_the_minimum():
    """No candidate stage x grid within the cap plans a smaller arena than the chosen one (ties: fewer MACs)."""
    from microtrain.compiler.patch import candidate_stages

    r = report("mcunet-5fps", "paper-99kb")
    g = r.graph
    for ops, out in candidate_stages(g, frozen_forward_ops(g)):
        for grid in (2, 5, 8):
            stage = make_stage(g, ops, out, grid)
            if stage.macs > 1.5 * stage.whole_macs or grid > g.tensors[out].shape[1]:
                continue
            arena = plan_memory(planning_view(g, stage, plan_memory(tile_graph(g, stage)).arena_bytes)).arena_bytes
            assert (arena, stage.macs - stage.whole_macs) >= (r.arena_bytes, r.patch()["extra_macs"])


def test_stream_input_drops_the_image_from_the_arena():
    r = report("mbv2-w0.35", "paper-99kb", stream_input=True)
    image = r.graph.inputs[0]
    assert image not in r.plan.offsets and image in r.tile_plan.offsets
    assert r.graph.meta["patch_stage"]["stream_input"] and r.patch()["stream_input"]
    assert image in report("mbv2-w0.35", "paper-99kb").plan.offsets


# ---- the schedule does not change the step --------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_hoisted_schedule_trains_identically(optimizer):
    g = tiny_model(seed=3)
    n = len(g.convs())
    scheme = Scheme("t", n, {n - 3: 1.0, n - 5: 0.5, n - 2: 0.5})  # bias-only depthwise convs + trained ones
    tg = build_training_graph(g, scheme, 5, TrainConfig(optimizer=optimizer))
    hg = hoist_updates(tg)
    assert [o.name for o in hg.ops] != [o.name for o in tg.ops]
    assert sorted(o.name for o in hg.ops) == sorted(o.name for o in tg.ops)
    a, b = GraphTrainStep(tg), GraphTrainStep(hg)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = torch.from_numpy(rng.integers(-128, 128, (4, 3, 16, 16)).astype(np.int8))
        y = torch.from_numpy(rng.integers(0, 5, 4))
        assert a.step(x, y, 0.05) == b.step(x, y, 0.05)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


def test_hoisting_enables_inplace_depthwise_backward():
    """Op by op (the channel-serial block backward would take these ops into its groups)."""
    r = report("mbv2-w0.35", "paper-99kb", block_backward=False)
    plain = report("mbv2-w0.35", "paper-99kb", schedule=False, block_backward=False)
    kinds = {r.view.producer(t).kind for t in r.plan.aliases}
    assert "conv2d_grad_input" in kinds and "conv2d_grad_acc" in kinds
    assert r.breakdown()["arena_live_peak_by_phase"]["backward"] < \
        plain.breakdown()["arena_live_peak_by_phase"]["backward"]


# ---- CLI ------------------------------------------------------------------------------------------------------------
def test_plan_json(capsys, tmp_path):
    png = tmp_path / "plan.png"
    assert main(["plan", "--model", "mcunet-5fps", "--scheme", "paper-99kb", "--json", "--plot", str(png)]) == 0
    d = json.loads(capsys.readouterr().out)
    for k in ("peak_sram_bytes", "flash_bytes", "analytic_extra_bytes", "arena_bytes", "state_bytes", "breakdown",
              "patch"):
        assert k in d
    r = report("mcunet-5fps", "paper-99kb")
    assert d["peak_sram_bytes"] == r.peak_sram_bytes == d["arena_bytes"] + d["state_bytes"]
    assert d["analytic_extra_bytes"] == 102240  # 99.8 KB, the paper's analytic figure for this scheme
    b = d["breakdown"]
    assert sum(e["bytes"] for e in b["live_at_peak"]) == b["arena_live_bytes"] == sum(b["arena_by_role"].values())
    assert d["patch"]["grid"] in range(2, 9) and d["patch"]["output"] == r.graph.meta["patch_stage"]["output"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_state_counts_optimizer_slots_and_fp32_shadows():
    base = report("mcunet-5fps", "paper-99kb")
    w, b, h = (base.state[k] for k in ("trainable_weights", "trainable_biases", "head"))
    adam = memory_of("mcunet-5fps", "paper-99kb", cfg=TrainConfig(optimizer="adam"))
    assert adam.state["optimizer_slots"] == 2 * 4 * (w + b // 4 + h // 4)  # m and v, float32, per element
    assert adam.flash_bytes == base.flash_bytes  # slots boot at zero
    fp32 = memory_of("mcunet-5fps", "paper-99kb", cfg=TrainConfig(update_storage="fp32"))
    assert fp32.state["trainable_weights"] == 4 * w and fp32.state_bytes == base.state_bytes + 3 * w


def test_plan_text_and_options(capsys):
    assert main(["plan", "--model", "proxyless-w0.3", "--scheme", "paper-98kb", "--no-reorder", "--no-patch",
                 "--optimizer", "sgd-m", "--classes", "4"]) == 0
    out = capsys.readouterr().out
    assert "reorder off" in out and "patch stage: none" in out and "of 256.0 KB" in out and "optimizer slots" in out


@pytest.mark.parametrize("argv, msg", [
    (["--model", "nope", "--scheme", "full"], "not a zoo model"),
    (["--model", "mcunet-5fps", "--scheme", "paper-1kb"], "unknown scheme"),
    (["--model", "mcunet-5fps", "--scheme", "full", "--no-patch", "--stream-input"], "needs the patch stage"),
    (["--model", "mcunet-5fps", "--scheme", "full", "--classes", "0"], "--classes"),
    (["--model", "mcunet-5fps", "--scheme", "full", "--plot", "x.svg"], "PNG"),
])
def test_plan_errors(argv, msg, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and err.startswith("microtrain: error:") and "\n" not in err


@pytest.mark.parametrize("model", ["mbv2-w0.35", "mcunet-5fps"])
def test_recompute_blocks_lowers_the_lowest_peak(model):
    """--recompute-blocks: the blocks' pw1 / dw masks leave the plan, the peak drops, and the report counts the MACs."""
    base = memory_of(model, PAPER_SCHEME[model], **LOWEST)
    rc = memory_of(model, PAPER_SCHEME[model], block_recompute=True, **LOWEST)
    groups = [grp for grp in rc.graph.meta["block_grads"] if grp["recompute"]]
    assert groups and rc.levers["block_recompute_groups"] == len(groups)
    assert not any(m in rc.plan.offsets for grp in groups for m in grp["recompute"]["masks"])
    assert rc.peak_sram_bytes < base.peak_sram_bytes
    bb = rc.to_json()["block_backward"]
    assert bb["recompute_blocks"] == len(groups) and 0 < bb["recompute_macs"] < bb["step_macs"]


@pytest.mark.parametrize("model", list(PAPER_SCHEME))
def test_full_update_plan_respects_its_floor(model):
    """Reorder off, every weight gradient exists at once after the backward: no plan may report less than the
    resident state plus all of them (a planner bug would)."""
    r = report(model, "full", reorder=False)
    state = set(r.graph.meta["train"]["state"])
    grads = sum(t.nbytes for n, t in r.graph.tensors.items() if t.role == "grad" and n.removeprefix("grad:") in state)
    assert grads > 0 and r.peak_sram_bytes >= r.state_bytes + grads
