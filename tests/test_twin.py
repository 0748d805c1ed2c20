"""The device twin (the generated C as a host library) and the torch engine.

- The twin is the harness's program: same stream, same state.bin bytes, same losses bit for bit.
- The torch engine lands within the stated per-step tolerance of the twin (commands/parity.py StepTolerance,
  docs/semantics.md), float32 and --int8-grads, on the tiny model and on mcunet-5fps; under the native torch
  setting and under ATEN_CPU_CAPABILITY=default, with 1 and 2 threads.
- The generated sources do not depend on the machine, its torch ISA setting or thread count.
"""

from __future__ import annotations

import ast
import filecmp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from microtrain.autodiff.build import TrainConfig, build_training_graph
from microtrain.codegen.project import build, harness_args, load_program, read_state, run_host, toolchain, write_records
from microtrain.codegen.twin import DeviceTwin
from microtrain.commands.parity import StepTolerance, teacher_forced
from microtrain.compiler.memory import plan_training_graph
from microtrain.frontends.zoo import load_model
from microtrain.ir.ops import OPS
from microtrain.runtime.trainstep import GraphTrainStep
from microtrain.sparse.scheme import Scheme, resolve_scheme

from tiny import CLASSES, tiny_model

pytestmark = pytest.mark.skipif(toolchain("host") is not None, reason="host C toolchain (gcc, make) not installed")
MIXED = Scheme("mixed", n_bias_update=8, weight_ratios={4: 0.5, 5: 0.25, 7: 1.0, 9: 0.5}, head=True)
SRC = Path(__file__).resolve().parents[1] / "src" / "microtrain"


def tiny_graph(int8_grads: bool, optimizer: str = "sgd"):
    tg = build_training_graph(tiny_model(seed=1, res=32), MIXED, CLASSES,
                              TrainConfig(int8_grads=int8_grads, optimizer=optimizer))
    sched, best = plan_training_graph(tg, patch=None)
    return tg, sched, best.plan


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_twin_is_the_harness_program(optimizer, images32, tmp_path):
    """A stream through the twin ends with the bytes the harness program saves, and the same losses bit for bit."""
    x, y, _ = images32
    tg, sched, plan = tiny_graph(True, optimizer)
    twin = DeviceTwin(sched, plan, tmp_path)
    lrs = np.linspace(0.02, 0.005, len(y)).astype(np.float32)
    losses = [twin.step(x[i:i + 1], y[i:i + 1], float(lrs[i])) for i in range(len(y))]
    build(tmp_path)
    write_records(tmp_path / "s.bin", x, y, lrs)
    res = run_host(tmp_path, harness_args("s.bin", state_out="state.bin"))
    state = read_state(tmp_path / "state.bin", load_program(tmp_path))
    mine = twin.state_dict()
    assert state.keys() == mine.keys() and all(np.array_equal(state[n], mine[n]) for n in state)
    assert np.float32(losses).tobytes() == np.float32(res["losses"]).tobytes()
    assert twin.step_count == len(y)
    # and it resumes from a state dict exactly (what `fit` checkpoints)
    again = DeviceTwin(sched, plan, tmp_path / "again")
    again.load_state_dict(state)
    assert again.state_bytes() == twin.state_bytes()
    np.testing.assert_array_equal(again.logits(x[:4]).numpy(), twin.logits(x[:4]).numpy())


@pytest.mark.parametrize("int8_grads", [False, True], ids=["fp32-grads", "int8-grads"])
def test_torch_engine_within_tolerance_tiny(int8_grads, images32, tmp_path):
    x, y, held = images32
    tg, sched, plan = tiny_graph(int8_grads)
    twin = DeviceTwin(sched, plan, tmp_path)
    engine = GraphTrainStep(tg)
    agree = teacher_forced(twin, engine, x, y, np.full(len(y), 0.02, np.float32))
    assert agree.within(StepTolerance.for_config(int8_grads)), agree.summary()
    engine.load_state_dict(twin.state_dict())
    c, t = twin.logits(held).numpy(), engine.logits(__import__("torch").from_numpy(held)).numpy()
    assert np.abs(c - t).max() <= 1e-5 * np.abs(t).max()
    np.testing.assert_array_equal(c.argmax(1), t.argmax(1))


@pytest.mark.parametrize("int8_grads", [False, True], ids=["fp32-grads", "int8-grads"])
def test_torch_engine_within_tolerance_mcunet(int8_grads, stream128, tmp_path):
    """mcunet-5fps paper-99kb, default levers (patch stage, channel-serial block backward), 12 real images."""
    x, y, _ = stream128
    g = load_model("mcunet-5fps")
    tg = build_training_graph(g, resolve_scheme("paper-99kb", g), 10, TrainConfig(int8_grads=int8_grads))
    sched, best = plan_training_graph(tg)
    twin = DeviceTwin(sched, best.plan, tmp_path)
    agree = teacher_forced(twin, GraphTrainStep(tg), x[:12], y[:12], np.full(12, 0.005, np.float32))
    assert agree.within(StepTolerance.for_config(int8_grads)), agree.summary()


SETTINGS = [{}, {"OMP_NUM_THREADS": "2"}, {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"},
            {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "2"}]
CHILD = """
import sys, numpy as np, torch
sys.path.insert(0, {tests!r})
from conftest import load_images32
from test_twin import tiny_graph
from microtrain.codegen.twin import DeviceTwin
from microtrain.commands.parity import StepTolerance, teacher_forced
from microtrain.runtime.trainstep import GraphTrainStep
torch.set_num_threads(int({threads!r}))
x, y, _ = load_images32()
for q8 in (False, True):
    tg, sched, plan = tiny_graph(q8)
    a = teacher_forced(DeviceTwin(sched, plan, {out!r} + str(q8)), GraphTrainStep(tg), x[:24], y[:24],
                       np.full(24, 0.02, np.float32))
    assert a.within(StepTolerance.for_config(q8)), a.summary()
print("ok")
"""


@pytest.mark.parametrize("env", SETTINGS, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()) or "native")
def test_tolerance_holds_under_other_torch_paths(env, tmp_path):
    """torch reads its ISA setting at import: each setting in a fresh process."""
    code = CHILD.format(tests=str(Path(__file__).parent), threads=env.get("OMP_NUM_THREADS", "1"),
                        out=str(tmp_path / "twin"))
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_sources_do_not_depend_on_the_machine(tmp_path):
    """`microtrain compile` under another torch ISA, MKL setting and thread count writes byte-identical sources."""
    dirs = []
    for i, env in enumerate([{}, {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                                  "OMP_NUM_THREADS": "1", "DNNL_MAX_CPU_ISA": "SSE41"}]):
        out = tmp_path / f"c{i}"
        r = subprocess.run([sys.executable, "-m", "microtrain", "compile", "--model", "mcunet-5fps", "--scheme",
                            "paper-99kb", "--int8-grads", "-o", str(out)], env={**os.environ, **env},
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        dirs.append(out)
    files = sorted(p.name for p in dirs[0].iterdir())
    assert files == sorted(p.name for p in dirs[1].iterdir()) and "model.c" in files
    match, mismatch, errors = filecmp.cmpfiles(dirs[0], dirs[1], files, shallow=False)
    assert not mismatch and not errors, mismatch


def imports(package: str) -> set[str]:
    """Every microtrain module that the modules of `package` import (statically, anywhere in the file)."""
    found = set()
    for f in (SRC / package).rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("microtrain"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("microtrain"))
    return found


@pytest.mark.parametrize("package,forbidden", [
    ("codegen", ("microtrain.runtime", "microtrain.frontends", "microtrain.commands")),
    ("runtime", ("microtrain.codegen", "microtrain.frontends", "microtrain.commands")),
    ("compiler", ("microtrain.runtime", "microtrain.codegen", "microtrain.frontends", "microtrain.commands")),
    ("ir", ("microtrain.runtime", "microtrain.codegen", "microtrain.compiler", "microtrain.frontends")),
])
def test_layers(package, forbidden):
    """frontends -> IR -> autodiff -> compiler -> backends; backends never import each other; only commands wire."""
    bad = sorted(m for m in imports(package) if m.startswith(forbidden))
    assert not bad, bad


def test_macs_count_every_weight_part():
    """A conv whose weight is split into a trainable slice and a frozen rest runs the MACs of both: the training
    graph's forward counts exactly the model's (mcunet-5fps paper-99kb splits b13.pw1 and b14.pw1)."""
    g = load_model("mcunet-5fps")
    tg = build_training_graph(g, resolve_scheme("paper-99kb", g), 10)
    split = [o for o in tg.ops if o.kind == "conv2d" and len(o.inputs) == 4]
    assert split, "the scheme splits some conv's weight"
    fwd = sum(OPS[o.kind].macs(tg, o) for o in tg.ops if o.attrs.get("phase") == "forward" and o.kind == "conv2d")
    assert fwd == sum(OPS[o.kind].macs(g, o) for o in g.ops if o.kind == "conv2d")
