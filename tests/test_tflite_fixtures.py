"""The committed .tflite fixtures (tests/fixtures/make_tflite.py): a MobileNetV1-style net, a ResNet-style net (residual
adds, no depthwise, an overlapping padded MAX_POOL_2D, a windowed AVERAGE_POOL_2D, MEAN) and a plain CNN (MAX_POOL_2D,
a flatten, two FULLY_CONNECTED layers with a RELU between).

Each is checked end to end: imported logits against TFLite Micro's interpreter (bit for bit) and LiteRT's reference
kernels (within one output step, top-1 equal) on real images; the torch engine trains it; the planner plans it; the C
program of its training step equals the torch engine on the host (first step's activations bit for bit, the state
after the stream within the engines' stated tolerance) and the Cortex-M4 (QEMU) equals the host byte for byte; and it
exports back to a .tflite that TFLite Micro runs like microtrain (the int8 head of --int8-head), and whose default
float32 head gives LiteRT and TFLite Micro the run's logits (within float summation order) and top-1.
"""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from microtrain.frontends.zoo import load_model
from microtrain.runtime.executor import Executor

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ("mbv1", "resnet", "plain_cnn", "cifar_cnn")
SCHEMES = {"mbv1": "last:3", "resnet": "last:4", "plain_cnn": "full", "cifar_cnn": "full"}


def maker():
    """tests/fixtures/make_tflite.py as a module."""
    spec = importlib.util.spec_from_file_location("make_tflite", FIXTURES / "make_tflite.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def images(g, n: int, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    from microtrain.data.samples import real_images

    x, y, _ = real_images(n, g.tensors[g.inputs[0]].shape, seed=seed, num_classes=10)
    return x, np.asarray(y)


def test_committed_fixtures_are_what_the_script_writes(tmp_path):
    torch.set_num_threads(1)
    mod = maker()
    for name in NAMES:
        assert mod.FIXTURES[name]() == (FIXTURES / f"{name}.tflite").read_bytes(), name


def test_fixtures_have_the_ops_they_claim():
    kinds = {n: [o.kind for o in load_model(FIXTURES / f"{n}.tflite").ops] for n in NAMES}
    assert "maxpool2d" in kinds["resnet"] and "avgpool2d" in kinds["resnet"] and kinds["resnet"].count("add") == 2
    g = load_model(FIXTURES / "resnet.tflite")
    assert all(o.attrs.get("groups", 1) == 1 for o in g.ops)  # no depthwise
    mp = next(o for o in g.ops if o.kind == "maxpool2d")
    assert (mp.attrs["pool_h"], mp.attrs["stride"], mp.attrs.get("pad_bottom")) == (3, 2, 1)  # SAME: pads 0 / 1
    assert kinds["plain_cnn"].count("maxpool2d") == 2 and kinds["plain_cnn"][-1] == "linear"
    pc = load_model(FIXTURES / "plain_cnn.tflite")
    fc = [o for o in pc.ops if o.attrs.get("fc")]  # FULLY_CONNECTED inside the network: a conv on the 7x7 map
    assert len(fc) == 1 and pc.tensors[fc[0].inputs[1]].shape == (32, 16, 7, 7)
    assert pc.tensors[fc[0].outputs[0]].zero == -128  # its RELU: the int8 range starts at real 0
    mb = load_model(FIXTURES / "mbv1.tflite")
    assert sum(o.attrs.get("groups", 1) > 1 for o in mb.ops) == 4
    cc = load_model(FIXTURES / "cifar_cnn.tflite")  # an even 4x4 map: flatten (NHWC order), then a 1x1 conv
    assert [o.kind for o in cc.ops][-4:] == ["flatten", "conv2d", "reshape", "linear"]
    assert cc.tensors[cc.ops[-3].inputs[1]].shape == (32, 256, 1, 1)


def reference_logits(buf: bytes, path: Path, x: np.ndarray, logits_index: int) -> tuple[np.ndarray, np.ndarray]:
    """(LiteRT reference kernels' logits, TFLM's logits) for images x (NCHW int8)."""
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    tflm = pytest.importorskip("tflite_micro.python.tflite_micro.runtime")
    it = litert.Interpreter(model_path=str(path), experimental_preserve_all_tensors=True,
                            experimental_op_resolver_type=litert.OpResolverType.BUILTIN_REF)
    it.allocate_tensors()
    tm = tflm.Interpreter.from_bytes(buf, arena_size=1 << 20)
    lr, tr = [], []
    for img in x:
        nhwc = img.transpose(1, 2, 0)[None]
        it.set_tensor(it.get_input_details()[0]["index"], nhwc)
        it.invoke()
        lr.append(it.get_tensor(logits_index).reshape(-1))
        tm.set_input(nhwc, 0)
        tm.invoke()
        tr.append(tm.get_output(0).reshape(-1))
    return np.stack(lr), np.stack(tr)


def tflm_logits(tflm, buf: bytes, x: np.ndarray) -> np.ndarray:
    """TFLite Micro's output for each image of x (NCHW int8), stacked."""
    tm = tflm.Interpreter.from_bytes(buf, arena_size=1 << 20)
    rows = []
    for img in x:
        tm.set_input(img.transpose(1, 2, 0)[None], 0)
        tm.invoke()
        rows.append(tm.get_output(0).reshape(-1))
    return np.stack(rows)


@pytest.mark.parametrize("name", NAMES)
def test_fixture_agrees_with_litert_and_tflite_micro(name):
    """On 40 real images: logits equal TFLM's bit for bit (the file without its SOFTMAX: the same integers), within
    one step of LiteRT's reference kernels, top-1 equal to both; the logits spread over classes (no constant net)."""
    path = FIXTURES / f"{name}.tflite"
    g = load_model(path)
    x, _ = images(g, 40)
    ours = Executor(g).run(torch.from_numpy(x))[g.outputs[0]].numpy().astype(np.int64)
    lite, micro = reference_logits(maker().FIXTURES[name](softmax=False), path, x, int(g.outputs[0][1:]))
    np.testing.assert_array_equal(ours, micro)
    assert np.abs(ours - lite).max() <= 1
    assert (ours.argmax(1) == lite.argmax(1)).all() and (ours.argmax(1) == micro.argmax(1)).all()
    assert len(np.unique(ours.argmax(1))) >= 4 and len(np.unique(ours)) > 50


@pytest.mark.parametrize("name", NAMES)
def test_fixture_trains_and_plans(name):
    """A few torch-engine steps change the trainable tensors (FC-as-conv and convs behind pools included) with finite
    losses; the planner plans the step inside 256 KB / 1 MB."""
    from microtrain.autodiff.build import build_training_graph
    from microtrain.compiler.memory import compile_memory
    from microtrain.runtime.trainstep import GraphTrainStep
    from microtrain.sparse.scheme import resolve_scheme

    g = load_model(FIXTURES / f"{name}.tflite")
    scheme = resolve_scheme(SCHEMES[name], g)
    step = GraphTrainStep(build_training_graph(g, scheme, 10))
    before = step.state_dict()
    x, y = images(g, 16, seed=9)
    losses = [step.step(torch.from_numpy(x[i:i + 4]), torch.from_numpy(y[i:i + 4]), 0.05) for i in range(0, 16, 4)]
    assert all(np.isfinite(losses))
    after = step.state_dict()
    changed = [n for n in before if n != "__step__" and not np.array_equal(before[n], after[n])]
    assert any(n.endswith("w_train") for n in changed) and len(changed) >= 4
    rep = compile_memory(g, scheme)
    assert rep.peak_sram_bytes <= 256 * 1024 and rep.flash_bytes <= 1024 * 1024


def c_and_engine(name, tmp_path, scheme, int8_grads=False, n=8, rule=None):
    from microtrain.autodiff.build import TrainConfig, build_training_graph
    from microtrain.compiler.memory import plan_training_graph
    from microtrain.sparse.scheme import resolve_scheme
    from test_codegen import check, run_parity

    g = load_model(FIXTURES / f"{name}.tflite")
    if rule is not None:  # the same graph under another requantization rule (it has no fused clamps to lose)
        assert not any("act_min" in o.attrs or "act_max" in o.attrs for o in g.ops)
        g.meta["requant"] = rule
    x, y = images(g, n + 4, seed=2)
    tg = build_training_graph(g, resolve_scheme(scheme, g), 10, TrainConfig(int8_grads=int8_grads))
    sched, best = plan_training_graph(tg)
    out = tmp_path / "c"
    res, host, prog, c_state = run_parity(sched, best.plan, out, x[:n], y[:n], 0.05, x[n:])
    check(res, host, prog, c_state, out, sched)
    return sched, x[:n], y[:n], c_state


@pytest.mark.parametrize("name,scheme,q8,rule", [("cifar_cnn", "full", True, None),
                                                  ("plain_cnn", "last:2", False, "float32-multiplier")])
def test_host_c_equals_torch_engine_through_the_new_kernels(name, scheme, q8, rule, tmp_path):
    """maxpool2d / avgpool2d / reshape and their gradients (float32, and qint8 with --int8-grads; TFLite's rule and
    the float32-multiplier rule of float imports) in C against the torch engine: the first step's activations bit
    for bit and its loss, the predictions of the C state, and the state after the stream (int8 weights at most one
    apart, float32 and int32 state within the engines' tolerance)."""
    from microtrain.codegen.project import toolchain
    from microtrain.commands.parity import simulate

    if toolchain("host") is not None:
        pytest.skip("host C toolchain not installed")
    sched, x, y, c_state = c_and_engine(name, tmp_path, scheme, q8, rule=rule)
    kinds = {o.kind for o in sched.ops}
    assert {"maxpool2d", "maxpool2d_grad"} <= kinds
    assert name != "cifar_cnn" or {"avgpool2d_grad", "flatten_grad"} <= kinds
    assert_state_close(c_state, simulate(sched, x, y, np.full(len(y), 0.05, np.float32)).state)


def assert_state_close(c_state: dict, eng: dict) -> None:
    """The C program's state after a stream against the torch engine's (docs/codegen.md's tolerance: int8 weights at
    most one apart on a few elements, int32 biases one unit, float32 within 1e-5 of the largest value)."""
    for n, v in eng.items():
        if n == "__step__":
            continue
        c = np.asarray(c_state[n])
        if v.dtype == np.int8:
            assert np.abs(c.astype(int) - v.astype(int)).max() <= 1 and (c != v).mean() < 0.05, n
        elif v.dtype == np.int32:
            assert np.abs(c.astype(np.int64) - v.astype(np.int64)).max() <= 1, n
        else:
            np.testing.assert_allclose(c, v, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(v).max())), err_msg=n)


@pytest.mark.parametrize("name", NAMES[:3])  # cifar_cnn's kernels are the C-vs-torch test's (with --int8-grads)
def test_fixture_on_cortex_m4_equals_host(name, tmp_path):
    """The training step compiled for the Cortex-M4 runs in QEMU with the host's losses and state, byte for byte,
    and links into 256 KB SRAM / 1 MB flash; the host program's losses and state are the torch engine's (within the
    stated tolerance)."""
    from microtrain.autodiff.build import build_training_graph
    from microtrain.codegen.project import (
        SRAM_BUDGET,
        load_program,
        measure_memory,
        read_state,
        run_host_and_device,
        toolchain,
    )
    from microtrain.commands.parity import simulate
    from microtrain.compiler.memory import plan_training_graph
    from microtrain.sparse.scheme import resolve_scheme

    if toolchain("cortex-m4") is not None:
        pytest.skip("arm-none-eabi-gcc / qemu-system-arm not installed")
    g = load_model(FIXTURES / f"{name}.tflite")
    x, y = images(g, 4, seed=4)
    sched, best = plan_training_graph(build_training_graph(g, resolve_scheme(SCHEMES[name], g), 10))
    res_host, res_m4 = run_host_and_device(sched, best.plan, tmp_path, x, y, np.full(len(y), 0.05, np.float32))
    assert (res_host["dir"] / "state.bin").read_bytes() == (res_m4["dir"] / "state.bin").read_bytes()
    assert np.float32(res_host["losses"]).tobytes() == np.float32(res_m4["losses"]).tobytes()
    mem = measure_memory(res_m4["dir"], res_m4, best.plan)
    assert mem["fits"] and mem["sram_total_bytes"] <= SRAM_BUDGET
    eng = simulate(sched, x, y, np.full(len(y), 0.05, np.float32))
    np.testing.assert_allclose(res_host["losses"], eng.losses, rtol=1e-5)
    assert_state_close(read_state(res_host["dir"] / "state.bin", load_program(res_host["dir"])), eng.state)


@pytest.mark.parametrize("name", NAMES)
def test_fixture_export_round_trip(name, tmp_path):
    """Imported, trained (torch engine), exported with --int8-head (forward_graph + quantize_head, graph_to_tflite) and
    imported back: the same ops, the trained backbone bit for bit, and TFLM computes the exported file's int8 logits as
    microtrain does."""
    tflm = pytest.importorskip("tflite_micro.python.tflite_micro.runtime")
    from microtrain.commands.export import forward_graph, quantize_head
    from microtrain.frontends.tflite_write import graph_to_tflite

    g, tg, step, state, x = trained(name)
    assert [o.kind for o in load_model_bytes(graph_to_tflite(g), tmp_path / "same.tflite").ops] == \
        [o.kind for o in g.ops]
    fg = forward_graph(tg, state)
    pooled = tg.meta["train"]["pooled"]
    feats = Executor(fg).run(torch.from_numpy(x))[pooled]
    p = fg.tensors[pooled]
    quantize_head(fg, state["head.w"], state["head.b"], ((feats.float() - p.zero) * float(p.scale)).numpy())
    buf = graph_to_tflite(fg)
    back = load_model_bytes(buf, tmp_path / "trained.tflite")
    env = Executor(back).run(torch.from_numpy(x), keep_all=True)
    run_env = step.run(step.forward_ops, step._env(torch.from_numpy(x)), train=False)
    assert torch.equal(env[back.ops[-1].inputs[0]], run_env[pooled])  # the trained backbone, bit for bit
    np.testing.assert_array_equal(env[back.outputs[0]].numpy(), tflm_logits(tflm, buf, x))


@functools.cache
def trained(name: str):
    """(fixture graph, training graph, the torch engine after 4 steps of 4 images, its state, the 16 images), once
    per process (read only: the export tests share it)."""
    from microtrain.autodiff.build import build_training_graph
    from microtrain.runtime.trainstep import GraphTrainStep
    from microtrain.sparse.scheme import resolve_scheme

    g = load_model(FIXTURES / f"{name}.tflite")
    tg = build_training_graph(g, resolve_scheme(SCHEMES[name], g), 10)
    step = GraphTrainStep(tg)
    x, y = images(g, 16, seed=8)
    for i in range(0, 16, 4):
        step.step(torch.from_numpy(x[i:i + 4]), torch.from_numpy(y[i:i + 4]), 0.05)
    return g, tg, step, step.state_dict(), x


@pytest.mark.parametrize("name", NAMES)
def test_fixture_export_float_head_in_litert(name, tmp_path):
    """`microtrain export`'s default head: the run's float32 head written as DEQUANTIZE + a float32 FULLY_CONNECTED.
    Read back it is a `linear` with the run's float32 weights and bias (bit for bit) after the trained backbone; LiteRT
    (reference kernels, and its default kernels) and TFLite Micro give float32 logits within a float tolerance of the
    run's (the torch engine's float32 head) and the run's top-1 on every image."""
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    tflm = pytest.importorskip("tflite_micro.python.tflite_micro.runtime")
    from microtrain.commands.export import float_head, forward_graph
    from microtrain.frontends.tflite_write import graph_to_tflite

    g, tg, step, state, x = trained(name)
    fg = forward_graph(tg, state)
    float_head(fg, state["head.w"], state["head.b"])
    buf = graph_to_tflite(fg)
    path = tmp_path / "float_head.tflite"
    back = load_model_bytes(buf, path)
    head = back.ops[-1]
    hw, hb = (back.tensors[n] for n in head.inputs[1:])
    assert head.kind == "linear" and hw.dtype == hb.dtype == back.tensors[back.outputs[0]].dtype == "float32"
    assert [o.kind for o in back.ops] == [o.kind for o in g.ops]  # the fixture's ops, the head now float
    np.testing.assert_array_equal(hw.data, np.asarray(state["head.w"], np.float32))
    np.testing.assert_array_equal(hb.data, np.asarray(state["head.b"], np.float32))
    xt = torch.from_numpy(x)
    with torch.no_grad():
        run = step.logits(xt).numpy()
    assert np.abs(run).max() > 0  # the head trained away from zero
    np.testing.assert_allclose(Executor(back).logits(xt).numpy(), run, rtol=0, atol=1e-5)
    outs = {}
    for label, kw in (("reference", {"experimental_op_resolver_type": litert.OpResolverType.BUILTIN_REF}),
                      ("default", {})):
        it = litert.Interpreter(model_path=str(path), **kw)
        it.allocate_tensors()
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        assert out["dtype"] == np.float32 and list(out["shape"]) == [1, 10]
        rows = []
        for img in x:
            it.set_tensor(inp["index"], img.transpose(1, 2, 0)[None])
            it.invoke()
            rows.append(it.get_tensor(out["index"]).reshape(-1))
        outs[label] = np.stack(rows)
    outs["tflm"] = tflm_logits(tflm, buf, x)
    for label in ("reference", "tflm"):  # the backbone bit for bit, the float head up to summation order
        np.testing.assert_allclose(outs[label], run, rtol=0, atol=1e-5, err_msg=label)
        assert (outs[label].argmax(1) == run.argmax(1)).all(), label
    # LiteRT's default (optimized int8) kernels may round a pooled feature one step apart: close, same top-1
    scale = float(back.tensors[head.inputs[0]].scale)
    assert np.abs(outs["default"] - run).max() <= 2 * scale * np.abs(hw.data).sum(1).max() + 1e-5
    assert (outs["default"].argmax(1) == run.argmax(1)).mean() >= 0.9


def load_model_bytes(buf: bytes, path: Path):
    path.write_bytes(buf)
    return load_model(path)


def test_unsupported_op_exits_2_with_one_line_and_writes_nothing(tmp_path):
    """A .tflite with an op microtrain does not import (LOGISTIC): `train` prints one line naming it, exits with
    status 2 and creates no run directory."""
    from microtrain.frontends.tflite_write import TFLiteWriter

    w = TFLiteWriter()
    x = w.tensor((1, 8, 8, 3), scale=1 / 255, zero=-128)
    y = w.tensor((1, 8, 8, 3), scale=1 / 256, zero=-128)
    w.op("LOGISTIC", [x], [y])
    p = tmp_path / "bad.tflite"
    p.write_bytes(w.finish([x], [y]))
    mt = [sys.executable, "-m", "microtrain"]
    for args, made in (([*mt, "train", "--model", str(p), "--data", "cifar10", "--out", str(tmp_path / "run")],
                        tmp_path / "run"),):
        r = subprocess.run(args, capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("microtrain: error: ") and r.stderr.count("\n") == 1 and "LOGISTIC" in r.stderr
        assert not made.exists()


def test_patch_stage_of_a_single_op(tmp_path):
    """A patch stage holding one op (the stem conv: it reads the image and writes the stage output, so its tile arena
    is empty) compiles and its C program equals the torch engine (it failed with
    "patch_stage.scratch has no arena offset")."""
    from microtrain.autodiff.build import build_training_graph
    from microtrain.codegen.project import toolchain
    from microtrain.sparse.scheme import resolve_scheme
    from test_codegen import check, forced_stage, run_parity

    if toolchain("host") is not None:
        pytest.skip("host C toolchain not installed")
    g = load_model(FIXTURES / "mbv1.tflite")
    tg = build_training_graph(g, resolve_scheme("last:2", g), 10)
    sched, plan = forced_stage(tg, 0, 2)
    st = sched.meta["patch_stage"]
    assert len(st["ops"]) == 1 and st["tile_plan"]["arena_bytes"] == 0
    x, y = images(g, 8)
    out = tmp_path / "c"
    check(*run_parity(sched, plan, out, x[:4], y[:4], 0.05, x[4:]), out, sched)


def test_patch_stage_candidates_stop_at_a_pool():
    """Only conv2d / add run tile by tile: the early stage the planner may choose ends before resnet's MAX_POOL_2D
    (with it, `last:3` planned a stage holding the pool, which neither the tiled executor nor the C stage runs)."""
    from microtrain.autodiff.build import build_training_graph
    from microtrain.compiler.memory import compile_memory, frozen_forward_ops
    from microtrain.compiler.patch import candidate_stages
    from microtrain.sparse.scheme import resolve_scheme

    g = load_model(FIXTURES / "resnet.tflite")
    tg = build_training_graph(g, resolve_scheme("last:3", g), 10)
    cands = candidate_stages(tg, frozen_forward_ops(tg))
    assert cands and all(o.kind in ("conv2d", "add") for ops, _ in cands for o in ops)
    st = compile_memory(g, "last:3").graph.meta.get("patch_stage")
    assert st is None or all(not n.startswith("pool") for n in st["ops"])


def test_head_on_a_flattened_map(tmp_path):
    """conv -> flatten -> FULLY_CONNECTED head (no pooling): the head reads the flattened map (flatten + reshape),
    TFLM computes the same logits, and training replaces that head (its features: the flattened map)."""
    tflm = pytest.importorskip("tflite_micro.python.tflite_micro.runtime")
    from microtrain.autodiff.build import build_training_graph
    from microtrain.runtime.trainstep import GraphTrainStep
    from microtrain.sparse.scheme import resolve_scheme

    mk = maker()
    n = mk.Net(14, (1, 10, 6))
    n.conv(4, 3, 2)  # 5x3: neither square nor a vector
    n.flatten()
    n.fc(5, center=True)
    buf = n.finish(softmax=False)
    g = load_model_bytes(buf, tmp_path / "flat.tflite")
    assert [o.kind for o in g.ops] == ["conv2d", "flatten", "reshape", "linear"]
    x, y = images(g, 12)
    ours = Executor(g).run(torch.from_numpy(x))[g.outputs[0]].numpy()
    tm = tflm.Interpreter.from_bytes(buf, arena_size=1 << 16)
    ref = []
    for img in x:
        tm.set_input(img.transpose(1, 2, 0)[None], 0)
        tm.invoke()
        ref.append(tm.get_output(0).reshape(-1))
    np.testing.assert_array_equal(ours, np.stack(ref))
    tg = build_training_graph(g, resolve_scheme("full", g), 3)
    assert tg.tensors[tg.meta["train"]["pooled"]].shape == (60,) and "flatten_grad" in {o.kind for o in tg.ops}
    assert np.isfinite(GraphTrainStep(tg).step(torch.from_numpy(x), torch.from_numpy(y % 3), 0.05))
