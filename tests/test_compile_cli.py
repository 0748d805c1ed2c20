"""`microtrain compile`: emit, build, run; --from a `microtrain train` run starts the device from its checkpoint."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from microtrain.cli import main
from microtrain.codegen.project import (
    harness_args,
    load_program,
    read_state,
    run_host,
    toolchain,
    write_records,
)
from microtrain.codegen.twin import DeviceTwin
from microtrain.commands.parity import StepTolerance, compare_states, teacher_forced
from microtrain.compiler.memory import plan_training_graph
from microtrain.data.datasets import open_dataset
from microtrain.data.samples import real_images
from microtrain.ir.graph import Graph
from microtrain.runtime.trainer import load_checkpoint
from microtrain.runtime.trainstep import GraphTrainStep

from conftest import SHARED

CIFAR = SHARED / "datasets" / "cifar10"
needs_gcc = pytest.mark.skipif(toolchain("host") is not None, reason="host C toolchain not installed")


def test_emit_only_writes_the_project(tmp_path, capsys):
    assert main(["compile", "--model", "proxyless-w0.3", "--scheme", "paper-98kb", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "patch stage" in out and "arena" in out
    for f in ("model.c", "model.h", "mt_runtime.h", "mt_conv2d.c", "mt_config.h", "Makefile", "program.json"):
        assert (tmp_path / f).is_file(), f
    prog = load_program(tmp_path)
    assert prog["target"] == "host" and prog["num_classes"] == 10


@pytest.mark.parametrize("argv,msg", [
    (["--model", "mcunet-5fps"], "give --model and --scheme"),
    (["--model", "mcunet-5fps", "--scheme", "paper-1kb"], "unknown scheme"),
    (["--from", "/nonexistent/run"], "not a `microtrain train` run directory"),
    (["--model", "mcunet-5fps", "--scheme", "full", "--steps", "0", "--run"], "--steps must be >= 1"),
])
def test_errors_are_one_line(argv, msg, tmp_path, capsys):
    assert main(["compile", *argv, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


@needs_gcc
def test_run_writes_memory_json(tmp_path, capsys):
    assert main(["compile", "--model", "mcunet-5fps", "--scheme", "paper-49kb", "-o", str(tmp_path), "--run",
                 "--steps", "4", "--data", "skimage"]) == 0
    out = capsys.readouterr().out
    assert "trained 4 skimage images" in out and "SRAM" in out
    mem = json.loads((tmp_path / "memory.json").read_text())
    assert mem["arena_bytes"] == load_program(tmp_path)["arena_bytes"] and mem["stack_bytes"] > 0
    assert mem["ram_bytes"] >= mem["arena_bytes"] + mem["state_bytes"]
    assert mem["command"].startswith("microtrain compile --model mcunet-5fps")


@needs_gcc
def test_run_int8_grads(tmp_path, capsys):
    assert main(["compile", "--model", "mcunet-5fps", "--scheme", "paper-49kb", "--int8-grads", "-o", str(tmp_path),
                 "--run", "--steps", "3", "--data", "skimage"]) == 0
    assert "int8 activation gradients" in capsys.readouterr().out
    assert re.search(r"mt_\w+_q8\(", (tmp_path / "model.c").read_text())
    assert json.loads((tmp_path / "memory.json").read_text())["command"].endswith("--int8-grads --run")


@needs_gcc
@pytest.mark.parametrize("int8_grads", [False, True], ids=["fp32-grads", "int8-grads"])
def test_from_run_dir_starts_from_the_checkpoint(int8_grads, tmp_path, capsys):
    """The device starts from the run's checkpoint and trains its graph (with --int8-grads if the run had it)."""
    if not CIFAR.is_dir():
        pytest.skip("../shared/datasets/cifar10 not present")
    data = tmp_path / "data"
    for split, n in (("train", 12), ("test", 4)):
        for c in ("airplane", "cat", "ship"):
            (data / split / c).mkdir(parents=True)
            for f in sorted((CIFAR / split / c).glob("*.jpg"))[:n]:
                shutil.copy(f, data / split / c / f.name)
    run = tmp_path / "run"
    assert main(["train", "--model", "mcunet-5fps", "--data", str(data), "--scheme", "paper-49kb", "--epochs", "1",
                 "--warmup-epochs", "0", "--batch-size", "12", "--augment", "none", "--quiet", "--lr", "0.05",
                 "--out", str(run)]
                + ["--int8-grads"] * int8_grads) == 0
    out = tmp_path / "c"
    assert main(["compile", "--from", str(run), "-o", str(out), "--build"]) == 0
    printed = capsys.readouterr().out
    assert "from " in printed and ("int8 activation gradients" in printed) == int8_grads
    if not int8_grads:
        assert main(["compile", "--from", str(run), "--int8-grads", "-o", str(tmp_path / "x")]) == 2
        assert "--int8-grads does not match the run" in capsys.readouterr().err
    ckpt = load_checkpoint(run / "checkpoint.npz")
    assert int(ckpt["__step__"]) == 3
    if not int8_grads:  # --run continues on the run's own data (its classes, its labels), not on CIFAR-10's ten
        assert main(["compile", "--from", str(run), "-o", str(tmp_path / "r"), "--run", "--steps", "6"]) == 0
        assert f"trained 6 {open_dataset(str(data), 'train', progress=False).name} images" in capsys.readouterr().out
        other = tmp_path / "other"
        for c in ("dog", "frog", "ship"):
            (other / "train" / c).mkdir(parents=True)
            shutil.copy(next((CIFAR / "train" / c).glob("*.jpg")), other / "train" / c / "0.jpg")
        assert main(["compile", "--from", str(run), "-o", str(tmp_path / "o"), "--run", "--data", str(other)]) == 2
        assert "are not the run's airplane, cat, ship" in capsys.readouterr().err
    prog = load_program(out)
    names = [t["name"] for t in prog["state"]]
    x, y, _ = real_images(6, 128, seed=5, num_classes=3)
    write_records(out / "s.bin", x, y, 0.005)
    run_host(out, harness_args("s.bin", state_out="start.bin", max_steps=0))
    start = read_state(out / "start.bin", prog)
    assert int(start["__step__"]) == 3 and compare_states(start, ckpt, names).int_share == 1.0
    assert all(np.array_equal(start[n], ckpt[n]) for n in names)
    # the device keeps training where the host stopped: the torch engine, loaded with the checkpoint and stepped on
    # the same images one at a time, stays within the per-step tolerance of the device twin
    tg = Graph.load(run / "train_graph")
    sched, best = plan_training_graph(tg)
    twin = DeviceTwin(sched, best.plan, tmp_path / "twin", ckpt)
    assert twin.step_count == 3
    agree = teacher_forced(twin, GraphTrainStep(tg), x, y, np.full(6, 0.005, np.float32))
    assert agree.within(StepTolerance.for_config(int8_grads)), agree.summary()
    run_host(out, harness_args("s.bin", state_out="end.bin"))  # the harness program is the twin, bit for bit
    end, ref = read_state(out / "end.bin", prog), twin.state_dict()
    assert all(np.array_equal(end[n], ref[n]) for n in ref)
