"""The generated C program (batch 1, an ordered stream of real images) on the tiny model (several optimizers, reorder
off, forced patch stages), on zoo models on the host, and on an emulated Cortex-M4 (QEMU), where it must also link into
256 KB SRAM / 1 MB flash and the loss must go down. The C runtime is the reference of ir/ops.py: the host build and the
Cortex-M4 build end every stream with byte-identical state (three models x float32 / --int8-grads x whole image /
--stream-input). Against the torch engine: the first step's int8 activations bit for bit and its loss within 1e-5
(same initial state; the integer forward is exact), and the torch engine loaded with the C program's final state
predicts what the C program predicts. The per-step tolerance of the torch engine is tests/test_twin.py's."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from microtrain.autodiff.build import TrainConfig, build_training_graph
from microtrain.codegen.project import (
    SRAM_BUDGET,
    build,
    emit_project,
    harness_args,
    load_program,
    measure_memory,
    read_predictions,
    read_state,
    read_trace,
    run_host,
    run_host_and_device,
    run_qemu,
    toolchain,
    write_records,
    write_state,
)
from microtrain.commands.parity import simulate
from microtrain.compiler.blockgrad import serialize_blocks
from microtrain.compiler.memory import (
    frozen_forward_ops,
    inplace_rules,
    plan_training_graph,
    planning_view,
    stage_meta,
    stage_tile_graph,
)
from microtrain.compiler.patch import candidate_stages, make_stage
from microtrain.compiler.planner import plan_memory
from microtrain.compiler.schedule import hoist_updates
from microtrain.errors import MicrotrainError
from microtrain.frontends.zoo import load_model
from microtrain.runtime.trainstep import GraphTrainStep
from microtrain.sparse.scheme import Scheme, resolve_scheme

from tiny import CLASSES, tiny_model

pytestmark = pytest.mark.skipif(toolchain("host") is not None, reason="host C toolchain (gcc, make) not installed")
M4 = pytest.mark.skipif(toolchain("cortex-m4") is not None, reason="arm-none-eabi-gcc / qemu-system-arm not installed")
# MICROTRAIN_SLOW=1 runs every combination below; by default a covering subset (benchmarks/device_speed.py checks
# host == M4 on all three zoo models too), to keep the suite near 20 minutes on 2 cores
SLOW_ONLY = pytest.mark.skipif(not os.environ.get("MICROTRAIN_SLOW"), reason="MICROTRAIN_SLOW=1 only")

MIXED = Scheme("mixed", n_bias_update=8, weight_ratios={4: 0.5, 5: 0.25, 7: 1.0, 9: 0.5}, head=True)


def forced_stage(tg, index: int, grid: int, stream: bool = False):
    """Schedule `tg` and run its `index`-th candidate early stage tile by tile on a grid x grid split (the planner
    would not choose one for a model this small): the scheduled graph with its stage meta, and the view's plan.
    stream: the stage reads each tile's input region from the image source (no image in the arena)."""
    tg = hoist_updates(tg)
    rules = inplace_rules(True)
    ops, out = candidate_stages(tg, frozen_forward_ops(tg))[index]
    stage = make_stage(tg, ops, out, grid)
    tile = stage_tile_graph(tg, stage, stream)
    tplan = plan_memory(tile, rules=rules)
    tg.meta["patch_stage"] = stage_meta(stage, tile, tplan, stream)
    return tg, plan_memory(planning_view(tg, stage, tplan.arena_bytes, stream), rules=rules)


def run_parity(tg, plan, out, images, labels, lr, held_out, target="host", sanitizers=None):
    """Emit + build + run the C program on the stream, and the torch engine's first step. sanitizers=N: the
    AddressSanitizer + UBSan build trains the first N images too and must end with the same state."""
    emit_project(tg, plan, out, target)
    build(out)
    lrs = np.full(len(labels), lr, np.float32)
    write_records(out / "stream.bin", images, labels, lrs)
    write_records(out / "held_out.bin", held_out, np.zeros(len(held_out)))
    args = harness_args("stream.bin", state_out="state.bin", trace="trace.bin", eval_in="held_out.bin",
                        pred_out="pred.bin")
    res = (run_host if target == "host" else run_qemu)(out, args)
    host = simulate(tg, images[:1], labels[:1], lrs[:1])
    prog = load_program(out)
    c_state = read_state(out / "state.bin", prog)
    assert int(c_state["__step__"]) == len(labels) == len(res["losses"])
    if sanitizers:
        build(out, "asan")
        run_host(out, harness_args("stream.bin", state_out="state_asan.bin", max_steps=sanitizers, quiet=True),
                 program="prog_asan")
        run_host(out, harness_args("stream.bin", state_out="state_n.bin", max_steps=sanitizers, quiet=True))
        assert (out / "state_asan.bin").read_bytes() == (out / "state_n.bin").read_bytes()
    return res, host, prog, c_state


def check(res, host, prog, c_state, out, tg):
    trace = read_trace(out / "trace.bin", prog)
    assert set(trace) == {t["name"] for t in prog["traces"]}
    fwd = [t["name"] for t in prog["traces"] if t["dtype"] == "int8"]
    assert fwd
    for name in fwd:  # int8 activations of the first step, bit for bit
        np.testing.assert_array_equal(trace[name], host.first[name].reshape(-1), err_msg=name)
    assert abs(res["losses"][0] - host.losses[0]) <= 1e-5 * abs(host.losses[0])
    cls, logits = read_predictions(out / "pred.bin", prog["num_classes"])
    engine = GraphTrainStep(tg)
    engine.load_state_dict(c_state)
    with torch.no_grad():
        held = read_records_images(out / "held_out.bin").reshape(-1, *prog["image_shape"])
        t = engine.logits(torch.from_numpy(held)).numpy()
    np.testing.assert_array_equal(cls, t.argmax(1))
    assert np.abs(logits - t).max() <= 1e-5 * np.abs(t).max()


def read_records_images(path):
    """The images of a record file (header: magic, count, image bytes; per record label, lr, image)."""
    raw = path.read_bytes()
    _, n, nbytes = np.frombuffer(raw[:12], np.uint32)
    recs = np.frombuffer(raw[12:], np.uint8).reshape(int(n), 8 + int(nbytes))
    return recs[:, 8:].view(np.int8).copy()


@pytest.mark.parametrize("cfg", [TrainConfig(), TrainConfig(optimizer="adam", reorder=False),
                                 TrainConfig(optimizer="sgd-m", qas=False)], ids=["sgd", "adam-deferred", "sgdm-noqas"])
def test_tiny_parity(cfg, images32, tmp_path):
    x, y, held = images32
    tg = build_training_graph(tiny_model(seed=1, res=32), MIXED, CLASSES, cfg)
    sched, best = plan_training_graph(tg, patch=None)
    check(*run_parity(sched, best.plan, tmp_path, x, y, 0.01, held, sanitizers=len(y)), tmp_path, sched)


@pytest.mark.parametrize("index,grid,stream", [(1, 2, False), (4, 3, False), (4, 3, True)],
                         ids=["block1-2x2", "block2-3x3", "block2-3x3-stream"])
def test_tiny_patch_stage_parity(index, grid, stream, images32, tmp_path):
    """The stage's ops run tile by tile in the tile arena (halos, stride 2, in-place depthwise and add) and the
    result is still bit-identical to the host's whole-tensor forward. With stream, each tile's input region is read
    from the record file (seek + read per row) into the tile arena: the image is nowhere in the program's memory."""
    x, y, held = images32
    g = tiny_model(seed=2, res=32)
    tg, plan = forced_stage(build_training_graph(g, resolve_scheme("last:2", g), CLASSES), index, grid, stream)
    res, host, prog, c_state = run_parity(tg, plan, tmp_path, x, y, 0.01, held, sanitizers=len(y) if stream else None)
    assert prog["patch"]["grid"] == grid and prog["arena_bytes"] == plan.arena_bytes
    assert prog["stream_input"] == stream and (tg.inputs[0] in plan.offsets) != stream
    if stream:  # a record file cut inside an image: refused before any step, one line
        cut = tmp_path / "cut.bin"
        cut.write_bytes((tmp_path / "stream.bin").read_bytes()[:12 + 8 + int(x[0].size) // 2])
        with pytest.raises(MicrotrainError, match="record file size does not match its header .*cut.bin"):
            run_host(tmp_path, harness_args("cut.bin", quiet=True))
    assert tg.meta["patch_stage"]["output"] in read_trace(tmp_path / "trace.bin", prog)
    check(res, host, prog, c_state, tmp_path, tg)


def test_state_file_resumes_exactly(images32, tmp_path):
    """save_state / load_state: 30 steps, save, 30 more from the file == 60 in one go; a host state dict written
    with write_state starts the program where the host left off."""
    x, y, _ = images32
    tg = build_training_graph(tiny_model(seed=1, res=32), MIXED, CLASSES)
    sched, best = plan_training_graph(tg, patch=None)
    emit_project(sched, best.plan, tmp_path)
    build(tmp_path)
    write_records(tmp_path / "a.bin", x[:30], y[:30], 0.01)
    write_records(tmp_path / "b.bin", x[30:], y[30:], 0.01)
    write_records(tmp_path / "ab.bin", x, y, 0.01)
    run_host(tmp_path, harness_args("ab.bin", state_out="whole.bin", quiet=True))
    run_host(tmp_path, harness_args("a.bin", state_out="half.bin", quiet=True))
    run_host(tmp_path, harness_args("b.bin", state_in="half.bin", state_out="resumed.bin", quiet=True))
    assert (tmp_path / "whole.bin").read_bytes() == (tmp_path / "resumed.bin").read_bytes()
    prog = load_program(tmp_path)
    # a torch engine state dict written with write_state starts the program where the engine left off
    host_half = simulate(tg, x[:30], y[:30], np.full(30, 0.01, np.float32)).state
    write_state(tmp_path / "host_half.bin", host_half, prog)
    run_host(tmp_path, harness_args("b.bin", state_in="host_half.bin", state_out="from_host.bin", quiet=True))
    from_host = read_state(tmp_path / "from_host.bin", prog)
    assert int(from_host["__step__"]) == 60
    for name, v in read_state(tmp_path / "host_half.bin", prog).items():
        np.testing.assert_array_equal(v, host_half[name])
    (tmp_path / "bad.bin").write_bytes(b"MTS1" + bytes(40))
    with pytest.raises(MicrotrainError, match="does not match"):
        run_host(tmp_path, harness_args("b.bin", state_in="bad.bin"))


def qint8_inplace(tg, plan) -> set[str]:
    """The kinds of the ops that write a qint8 gradient in place (`/resize`: over an input of another size)."""
    made = {o: op for op in tg.ops for o in op.outputs}
    return {made[t].kind + ("/resize" if tg.tensors[t].nbytes != tg.tensors[src].nbytes else "")
            for t, src in plan.aliases.items() if tg.tensors[t].dtype == "qint8"}


Q8 = TrainConfig(int8_grads=True)


@pytest.mark.parametrize("scheme,cfg,stage,inplace", [
    ("mixed", Q8, None, {"conv2d_grad_acc", "add_grad", "grad_add", "conv2d_grad_input"}),
    ("mixed", TrainConfig(int8_grads=True, reorder=False), None, {"conv2d_grad_input"}),
    ("bias:10", Q8, None, {"conv2d_grad_input/resize"}),
    ("last:4", Q8, (1, 2), {"add_grad", "grad_add"}),
], ids=["sgd", "sgd-deferred", "bias-resize", "patch-stage"])
def test_tiny_int8_grads_parity(scheme, cfg, stage, inplace, images32, tmp_path):
    """--int8-grads: every activation gradient is a qint8 tensor at its planned offset (float32 scales, then int8
    values), written in place where the planner aliased it (per-element kinds; depthwise grad_input through its
    float32 channel workspace, also over a smaller g_acc); the sanitizer build agrees over the whole stream."""
    x, y, held = images32
    g = tiny_model(seed=1, res=32)
    tg = build_training_graph(g, MIXED if scheme == "mixed" else resolve_scheme(scheme, g), CLASSES, cfg)
    if stage:
        sched, plan = forced_stage(tg, *stage)
    else:
        sched, best = plan_training_graph(tg, patch=None)
        plan = best.plan
    assert inplace <= qint8_inplace(sched, plan)
    res, host, prog, c_state = run_parity(sched, plan, tmp_path, x, y, 0.01, held, sanitizers=len(y))
    assert prog["arena_bytes"] == plan.arena_bytes and (prog["patch"] is not None) == bool(stage)
    check(res, host, prog, c_state, tmp_path, sched)


def test_unsupported_configuration_is_a_clear_error(tmp_path):
    tg = build_training_graph(tiny_model(seed=1, res=32), MIXED, CLASSES, TrainConfig(update_storage="fp32"))
    sched, best = plan_training_graph(tg, patch=None)
    with pytest.raises(MicrotrainError, match="int8 update storage"):
        emit_project(sched, best.plan, tmp_path)


# ---- zoo models: host C, and the Cortex-M4 under QEMU -------------------------------------------------------------
ZOO = [("mcunet-5fps", "paper-99kb"), ("proxyless-w0.3", "paper-98kb"), ("mbv2-w0.35", "paper-99kb")]
LR, EPOCHS = 0.005, 2


def zoo_graph(model, scheme, cfg=None, **levers):
    g = load_model(model)
    tg = build_training_graph(g, resolve_scheme(scheme, g), 10, cfg)
    return tg, *plan_training_graph(tg, **levers)


def test_zoo_host_parity(stream128, tmp_path):
    x, y, held = stream128
    _, sched, best = zoo_graph("mcunet-5fps", "paper-99kb")
    assert sched.meta.get("patch_stage"), "the planner's patch stage is part of what is tested"
    check(*run_parity(sched, best.plan, tmp_path, x, y, LR, held, sanitizers=3), tmp_path, sched)


def test_zoo_int8_grads_host_parity(stream128, tmp_path):
    """mcunet-5fps paper-99kb with --int8-grads (patch stage, qint8 gradients in place, the blocks' backward channel
    by channel, one of them over 576 channels): 100 steps on real images, the sanitizer build agrees."""
    x, y, held = stream128
    _, sched, best = zoo_graph("mcunet-5fps", "paper-99kb", Q8)
    # the planner keeps op by op here (no smaller): make the blocks channel-serial anyway, on the same patch stage
    sched.meta["block_grads"] = serialize_blocks(sched).meta["block_grads"]
    plan = plan_memory(planning_view(sched, best.stage, best.tile_plan.arena_bytes), rules=inplace_rules(True))
    assert sched.meta.get("patch_stage") and "add_grad" in qint8_inplace(sched, plan)
    assert max(grp["channels"] for grp in sched.meta["block_grads"]) > 384
    check(*run_parity(sched, plan, tmp_path, x, y, LR, held, sanitizers=3), tmp_path, sched)


def _pairwise(model: str, int8_grads: bool, stream: bool):
    """Every (model, gradients), (model, input) and (gradients, input) pair is in the default subset (six of the
    twelve combinations); the other six run with MICROTRAIN_SLOW=1."""
    covered = {("mbv2-w0.35", False, False), ("mbv2-w0.35", True, True), ("proxyless-w0.3", False, True),
               ("proxyless-w0.3", True, False), ("mcunet-5fps", False, True), ("mcunet-5fps", True, False)}
    return () if (model, int8_grads, stream) in covered else (SLOW_ONLY,)


@M4
@pytest.mark.parametrize("model,scheme,int8_grads,stream", [
    pytest.param(m, s, q, st, marks=_pairwise(m, q, st),
                 id=f"{m}-{'int8' if q else 'fp32'}-grads-{'stream-input' if st else 'whole-image'}")
    for m, s in ZOO for q in (False, True) for st in (False, True)])
def test_host_equals_cortex_m4(model, scheme, int8_grads, stream, stream128, tmp_path):
    """The C runtime is the same on both: 8 steps on the host and in QEMU end with byte-identical state.bin and
    bit-identical losses, for the three models x float32 / int8 gradients x whole image / streamed input (a pairwise
    covering subset by default, all twelve with MICROTRAIN_SLOW=1)."""
    x, y = stream128[0][:8], stream128[1][:8]
    _, sched, best = zoo_graph(model, scheme, TrainConfig(int8_grads=int8_grads),
                               **({"stream_input": True, "max_recompute": 3} if stream else {}))
    res_host, res_m4 = run_host_and_device(sched, best.plan, tmp_path, x, y, LR)
    assert (res_host["dir"] / "state.bin").read_bytes() == (res_m4["dir"] / "state.bin").read_bytes()
    assert np.float32(res_host["losses"]).tobytes() == np.float32(res_m4["losses"]).tobytes()
    assert len(res_m4["losses"]) == 8


@M4
@pytest.mark.parametrize("int8_grads", [False, True], ids=["fp32-grads", "int8-grads"])
def test_cortex_m4_stream_input(int8_grads, stream128, tmp_path):
    """proxyless-w0.3 paper-98kb with --stream-input --max-recompute 3 (with --int8-grads: its lowest planned peak):
    the image is read patch by patch from the record file, the program links and runs in QEMU (streaming changes
    where pixels come from, not what is computed: the first step is the torch engine's)."""
    x, y, held = stream128[0][:20], stream128[1][:20], stream128[2][:2]
    g = load_model("proxyless-w0.3")
    tg = build_training_graph(g, resolve_scheme("paper-98kb", g), 10, TrainConfig(int8_grads=int8_grads))
    sched, best = plan_training_graph(tg, stream_input=True, max_recompute=3)
    assert g.inputs[0] not in best.plan.offsets
    res, host, prog, c_state = run_parity(sched, best.plan, tmp_path, x, y, LR, held, target="cortex-m4")
    mem = measure_memory(tmp_path, res, best.plan)
    assert prog["stream_input"] and mem["fits"] and mem["arena_bytes"] == best.plan.arena_bytes
    assert mem["ram_bytes"] < mem["arena_bytes"] + mem["state_bytes"] + 4096  # no image buffer anywhere
    check(res, host, prog, c_state, tmp_path, sched)


@M4
@pytest.mark.parametrize("model,scheme,cfg", [
    pytest.param(m, s, None, id=f"{m}-{s}", marks=() if m == "mcunet-5fps" else (SLOW_ONLY,)) for m, s in ZOO] + [
    pytest.param("mcunet-5fps", "paper-99kb", Q8, id="mcunet-5fps-paper-99kb-int8-grads")])
def test_cortex_m4_qemu(model, scheme, cfg, stream128, tmp_path):
    """Links into the 256 KB / 1 MB regions, trains 100 steps in QEMU and the loss goes down (mcunet-5fps by default;
    proxyless-w0.3 and mbv2-w0.35 with MICROTRAIN_SLOW=1: their host == QEMU runs are in test_host_equals_cortex_m4
    and benchmarks/device_speed.py)."""
    x, y, held = stream128
    _, sched, best = zoo_graph(model, scheme, cfg)
    res, host, prog, c_state = run_parity(sched, best.plan, tmp_path, x, y, LR, held, target="cortex-m4")
    mem = measure_memory(tmp_path, res, best.plan)
    assert mem["fits"] and mem["sram_total_bytes"] <= SRAM_BUDGET, mem
    assert mem["ram_bytes"] >= mem["arena_bytes"] + mem["state_bytes"]
    assert json.loads((tmp_path / "memory.json").read_text())["stack_bytes"] == res["stack_bytes"] > 0
    check(res, host, prog, c_state, tmp_path, sched)
    losses = np.asarray(res["losses"]).reshape(EPOCHS, -1)
    assert losses[1].mean() < losses[0].mean() - 0.2, losses.mean(axis=1)


@M4
def test_cortex_m4_does_not_fit_fails_at_link_time(tmp_path):
    _, sched, best = zoo_graph("mcunet-5fps", "full")
    emit_project(sched, best.plan, tmp_path, "cortex-m4")
    with pytest.raises(MicrotrainError, match=r"does not fit: region RAM overflowed by \d+ bytes"):
        build(tmp_path)
