"""Channel-serial block backward (compiler/blockgrad.py): what the planner gains, and that the generated C, running
each inverted-residual block's backward one expanded channel at a time, ends bit for bit where the same program run op
by op (whole tensors) ends: the same chains of ir/ops.py in another loop nest."""

from __future__ import annotations

import pytest

from microtrain.autodiff.build import TrainConfig, build_training_graph
from microtrain.codegen.project import build, emit_project, harness_args, measure_memory, run_host, toolchain
from microtrain.compiler.blockgrad import collapse_blocks, serialize_blocks
from microtrain.compiler.memory import compile_memory, inplace_rules, plan_training_graph, planning_view
from microtrain.compiler.planner import plan_memory
from microtrain.compiler.schedule import hoist_updates
from microtrain.data.samples import real_images
from microtrain.frontends.zoo import load_model
from microtrain.sparse.scheme import resolve_scheme
from test_codegen import MIXED, check, run_parity

from tiny import CLASSES, tiny_model

ZOO = [("mbv2-w0.35", "paper-99kb"), ("proxyless-w0.3", "paper-98kb"), ("mcunet-5fps", "paper-99kb")]
ROLES = {"pw2_gi", "dw_acc", "dw_upd", "dw_gi", "pw1_acc", "pw1_gi", "pw1_upd"}


def forced(tg, recompute: bool = False):
    """Every eligible block channel-serial (the planner keeps op by op where that is smaller; a tiny model's planes
    are no smaller than its tensors), with `recompute` recomputing pw1's and dw's masks per channel, planned."""
    sched = serialize_blocks(hoist_updates(tg), recompute=recompute)
    return sched, plan_memory(planning_view(sched, None, 0), rules=inplace_rules(True))


@pytest.mark.parametrize("model,scheme", ZOO)
def test_planner_uses_channel_serial_blocks_and_gains(model, scheme):
    on = compile_memory(load_model(model), scheme, stream_input=True, max_recompute=3)
    off = compile_memory(load_model(model), scheme, stream_input=True, max_recompute=3, block_backward=False)
    groups = on.graph.meta["block_grads"]
    assert groups and not off.graph.meta["block_grads"] and on.levers["block_backward_groups"] == len(groups)
    assert on.peak_sram_bytes < off.peak_sram_bytes
    assert sum(o.kind == "block_grad" for o in on.view.ops) == len(groups)
    for grp in groups:
        assert set(grp["roles"]) <= ROLES and {"pw2_gi", "dw_acc"} <= set(grp["roles"])
        # no expanded gradient leaves a group: only the gradient it hands on, or materialised weight gradients
        for t in grp["outputs"]:
            assert t == grp["output"] or (t.startswith("grad:") and t.endswith((".w_train", ".b"))), t
    # the op-by-op graph and the serialized one compute the same ops: only order and grouping differ
    assert sorted(o.name for o in on.graph.ops) == sorted(o.name for o in off.graph.ops)


def test_collapsed_view_accounts_every_byte():
    """The block_grad op holds its inputs, outputs and planes; the arena plan of the view stays a valid plan."""
    g = tiny_model(seed=1, res=32)
    tg = build_training_graph(g, resolve_scheme("full", g), CLASSES, TrainConfig())
    sched, plan = forced(tg)
    view = collapse_blocks(sched, sched.meta["block_grads"])
    ops = {o.name: o for o in view.ops}
    for grp in sched.meta["block_grads"]:
        op = ops[f"{grp['block']}.block_grad"]
        assert op.attrs["scratch_bytes"] == grp["scratch_bytes"] > 0
        assert f"{op.name}.scratch" in plan.offsets
        inside = {t for m in grp["members"] for t in sched.op(m).outputs}
        assert not inside & set(op.inputs) and set(op.outputs) <= inside
    # no two buffers live at one step overlap
    live = plan.lifetimes
    for i, a in enumerate(live):
        for b in live[i + 1:]:
            if a.nbytes and b.nbytes and a.first <= b.last and b.first <= a.last:
                oa, ob = plan.offsets[a.tensor], plan.offsets[b.tensor]
                assert oa + a.nbytes <= ob or ob + b.nbytes <= oa, (a, b)


def test_block_backward_off_is_op_by_op():
    g = tiny_model(seed=1, res=32)
    tg = build_training_graph(g, MIXED, CLASSES, TrainConfig())
    sched, best = plan_training_graph(tg, patch=None, block_backward=False)
    assert sched.meta["block_grads"] == [] and not any(o.kind == "block_grad" for o in best.view.ops)


pytestmark_c = pytest.mark.skipif(toolchain("host") is not None, reason="host C toolchain (gcc, make) not installed")


def same_as_op_by_op(tg, serial_dir, out, stage=None):
    """The op-by-op program (no block groups, same schedule otherwise) on serial_dir's stream ends with the same
    state file, byte for byte, and the same losses, bit for bit."""
    sched, best = plan_training_graph(tg, patch=None, block_backward=False, **(stage or {}))
    emit_project(sched, best.plan, out, "host")
    build(out)
    (out / "stream.bin").write_bytes((serial_dir / "stream.bin").read_bytes())
    ref = run_host(out, harness_args("stream.bin", state_out="state.bin"))
    serial = run_host(serial_dir, harness_args("stream.bin", state_out="serial.bin"))
    assert (out / "state.bin").read_bytes() == (serial_dir / "serial.bin").read_bytes()
    assert ref["losses"] == serial["losses"]


@pytestmark_c
@pytest.mark.parametrize("scheme,cfg,recompute", [
    ("mixed", TrainConfig(), False),
    ("mixed", TrainConfig(int8_grads=True), False),
    ("full", TrainConfig(), False),
    ("full", TrainConfig(int8_grads=True, optimizer="sgd-m"), False),
    ("full", TrainConfig(optimizer="adam", reorder=False), False),
    ("bias:10", TrainConfig(int8_grads=True), False),
    ("mixed", TrainConfig(), True),
    ("full", TrainConfig(int8_grads=True), True),
    ("full", TrainConfig(reorder=False), True),
], ids=["mixed", "mixed-int8-grads", "full", "full-int8-grads-sgdm", "full-adam-deferred", "bias-int8-grads",
        "recompute-mixed", "recompute-full-int8-grads", "recompute-full-deferred"])
def test_tiny_channel_serial_parity(scheme, cfg, recompute, images32, tmp_path):
    """Every block channel-serial (weights of pw1, dw and pw2 trained, bias only, reorder off with the gradients
    materialised row by row, qint8 gradients; recomputing pw1's and dw's masks, and dw's input, per channel): the C
    program ends with the op-by-op program's state, bit for bit, and AddressSanitizer sees no access outside the
    planned planes."""
    x, y, held = images32
    g = tiny_model(seed=1, res=32)
    tg = build_training_graph(g, MIXED if scheme == "mixed" else resolve_scheme(scheme, g), CLASSES, cfg)
    sched, plan = forced(tg, recompute)
    assert len(sched.meta["block_grads"]) >= 2
    if recompute:
        recomputed = [grp for grp in sched.meta["block_grads"] if grp["recompute"]]
        assert recomputed and not any(m in plan.offsets for grp in recomputed for m in grp["recompute"]["masks"])
    out = tmp_path / "serial"
    check(*run_parity(sched, plan, out, x, y, 0.01, held, sanitizers=len(y)), out, sched)
    same_as_op_by_op(tg, out, tmp_path / "op-by-op")


@pytestmark_c
def test_zoo_recompute_host_parity(tmp_path):
    """mbv2-w0.35 paper-99kb, the lowest-memory float32 plan with --recompute-blocks: 30 real images at 128x128 end
    with the op-by-op program's state, bit for bit, and the plan keeps none of the recomputed masks."""
    x, y, _ = real_images(34, 128, seed=3)
    g = load_model("mbv2-w0.35")
    tg = build_training_graph(g, resolve_scheme("paper-99kb", g), 10, TrainConfig())
    sched, best = plan_training_graph(tg, stream_input=True, max_recompute=3.0, block_recompute=True)
    recomputed = [grp for grp in sched.meta["block_grads"] if grp["recompute"]]
    assert len(recomputed) >= 4
    assert not any(m in best.plan.offsets for grp in recomputed for m in grp["recompute"]["masks"])
    out = tmp_path / "serial"
    check(*run_parity(sched, best.plan, out, x[:30], y[:30], 0.005, x[30:], sanitizers=2), out, sched)
    same_as_op_by_op(tg, out, tmp_path / "op-by-op")


@pytest.mark.skipif(toolchain("cortex-m4") is not None, reason="arm-none-eabi-gcc / qemu-system-arm not installed")
def test_cortex_m4_recompute_blocks(tmp_path):
    """mbv2-w0.35 paper-99kb with --int8-grads --stream-input --max-recompute 3 --recompute-blocks (its lowest plan):
    links into 256 KB, trains 12 real images in QEMU, uses no more SRAM than planned (+ harness and stack); its first
    step is the torch engine's."""
    x, y, _ = real_images(14, 128, seed=3)
    g = load_model("mbv2-w0.35")
    tg = build_training_graph(g, resolve_scheme("paper-99kb", g), 10, TrainConfig(int8_grads=True))
    sched, best = plan_training_graph(tg, stream_input=True, max_recompute=3.0, block_recompute=True)
    assert any(grp["recompute"] for grp in sched.meta["block_grads"])
    res, host, prog, c_state = run_parity(sched, best.plan, tmp_path, x[:12], y[:12], 0.005, x[12:], target="cortex-m4")
    mem = measure_memory(tmp_path, res, best.plan)
    assert mem["fits"] and mem["ram_bytes"] < mem["arena_bytes"] + mem["state_bytes"] + 4096
    check(res, host, prog, c_state, tmp_path, sched)


@pytestmark_c
@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "recompute"])
def test_tflite_fixture_channel_serial_parity(recompute, tmp_path):
    """The MobileNetV1-style TFLite fixture (TFLite's fixed-point requantization, fused ReLU6 clamps): its pw -> dw ->
    pw chains run channel-serial, with pw1's and dw's channels stored or recomputed through the fixed-point kernels
    (each channel's multiplier and shift); the C program ends with the op-by-op program's state, bit for bit, and
    the torch engine's within the usual tolerance."""
    from pathlib import Path

    from test_tflite_fixtures import images

    g = load_model(Path(__file__).parent / "fixtures" / "mbv1.tflite")
    x, y = images(g, 10, seed=2)
    tg = build_training_graph(g, resolve_scheme("full", g), 10, TrainConfig())
    sched, plan = forced(tg, recompute)
    groups = sched.meta["block_grads"]
    assert groups and all(bool(grp["recompute"]) == recompute for grp in groups)
    out = tmp_path / "serial"
    check(*run_parity(sched, plan, out, x[:8], y[:8], 0.05, x[8:], sanitizers=2), out, sched)
    same_as_op_by_op(tg, out, tmp_path / "op-by-op")
