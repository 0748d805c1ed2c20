"""Speed of the generated C training step: instructions per step and wall time per step against PyTorch.

For each scheme (full update and the paper's sparse scheme) of a zoo model, the host C program is generated, built
(`gcc -O2`) and run on real images at batch 1:
  - instructions per training step: `valgrind --tool=callgrind --toggle-collect=train_step` (x86-64 instructions
    retired inside train_step, exact and load-independent), over a few steps;
  - wall time per step of the C program (the harness times train_step), the median of several runs;
and, in the same run, a PyTorch batch-1 training step of the same network (`runtime.float_model.FloatNet`: the
dequantized float network, autograd, SGD over every parameter) with 1 thread and with the default thread count, and
the host trainer's own int8 step (`GraphTrainStep`, batch 1, 1 thread) for the sparse scheme.

Where the program fits the 256 KB / 1 MB regions, its Cortex-M4 build also runs under `qemu-system-arm -icount
shift=0` for the Cortex-M4 instructions per step. Writes benchmarks/results/codegen_speed.json.
Run: `python benchmarks/codegen_speed.py` (about 3 minutes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from microtrain.autodiff.build import build_training_graph
from microtrain.codegen.project import build, emit_project, harness_args, run_host, run_qemu, toolchain, write_records
from microtrain.commands.parity import torch_threads
from microtrain.compiler.memory import plan_training_graph
from microtrain.data.samples import real_images
from microtrain.errors import MicrotrainError
from microtrain.frontends.zoo import load_model
from microtrain.runtime.float_model import FloatNet
from microtrain.runtime.trainstep import GraphTrainStep
from microtrain.sparse.scheme import resolve_scheme

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def callgrind_instructions(out: Path, steps: int) -> int | None:
    """x86 instructions retired inside train_step over `steps` steps, or None without valgrind."""
    if shutil.which("valgrind") is None:
        return None
    cg = out / "callgrind.out"
    subprocess.run(["valgrind", "--tool=callgrind", "--toggle-collect=train_step", f"--callgrind-out-file={cg}",
                    "./prog", *harness_args("stream.bin", max_steps=steps, quiet=True)], cwd=out, check=True,
                   capture_output=True)
    m = re.search(r"^summary: (\d+)$", cg.read_text(), re.M)
    return int(m.group(1)) if m else None


def c_program(model: str, scheme: str, x: np.ndarray, y: np.ndarray, lr: float, out: Path, runs: int,
              cg_steps: int) -> dict[str, Any]:
    g = load_model(model)
    tg = build_training_graph(g, resolve_scheme(scheme, g), 10)
    sched, best = plan_training_graph(tg)
    emit_project(sched, best.plan, out, "host")
    build(out)
    write_records(out / "stream.bin", x, y, lr)
    ms = []
    for _ in range(runs):
        r = run_host(out, harness_args("stream.bin", quiet=True))
        ms.append(r["train_ns"] / 1e6 / r["steps"])
    ins = callgrind_instructions(out, cg_steps)
    return {"scheme": scheme, "arena_bytes": best.plan.arena_bytes, "macs_per_step": sched.macs(),
            "c_ms_per_step": statistics.median(ms), "c_ms_per_step_runs": ms,
            "instructions_per_step": ins // cg_steps if ins else None, "callgrind_steps": cg_steps,
            "instructions_per_mac": ins / cg_steps / sched.macs() if ins else None,
            **m4_instructions(sched, best.plan, out.with_name(out.name + "-m4"), cg_steps + 1), "graph": tg}


def m4_instructions(sched, plan, out: Path, steps: int) -> dict[str, Any]:
    """Cortex-M4 instructions per step: the program under `qemu -icount shift=0` (if it fits the 256 KB / 1 MB
    regions at all)."""
    if toolchain("cortex-m4") is not None:
        return {"m4_instructions_per_step": None, "m4_note": "arm-none-eabi-gcc / qemu-system-arm not installed"}
    emit_project(sched, plan, out, "cortex-m4")
    try:
        build(out)
    except MicrotrainError as e:
        return {"m4_instructions_per_step": None, "m4_note": str(e)}
    shutil.copyfile(out.with_name(out.name.removesuffix("-m4")) / "stream.bin", out / "stream.bin")
    r = run_qemu(out, harness_args("stream.bin", max_steps=steps, quiet=True), icount=True)
    return {"m4_instructions_per_step": r["train_ns"] // r["steps"], "m4_note": "qemu-system-arm -M mps2-an386 "
            "-icount shift=0, train_step only (SysTick at 25 MHz: +-40 instructions)"}


def torch_float_step(model: str, x: np.ndarray, y: np.ndarray, lr: float, threads: int, warmup: int = 3
                     ) -> float:
    """ms per batch-1 autograd SGD step of the float network, every parameter trained."""
    g = load_model(model)
    with torch_threads(threads):
        net = FloatNet(g, 10)
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        xs, ys = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
        times = []
        for i in range(len(x) + warmup):
            j = i % len(x)
            t0 = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(net(xs[j:j + 1]), ys[j:j + 1]).backward()
            opt.step()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def host_int8_step(tg, x: np.ndarray, y: np.ndarray, lr: float, warmup: int = 3) -> float:
    """ms per batch-1 step of the host trainer's int8 executor (the reference the C program matches)."""
    with torch_threads(1):
        step = GraphTrainStep(tg)
        times = []
        for i in range(len(x) + warmup):
            j = i % len(x)
            t0 = time.perf_counter()
            step.step(torch.from_numpy(x[j:j + 1]), torch.tensor([int(y[j])]), lr)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mcunet-5fps")
    p.add_argument("--schemes", default="full,paper-99kb")
    p.add_argument("--steps", type=int, default=20, help="images per timed run")
    p.add_argument("--runs", type=int, default=3, help="timed runs of the C program (median)")
    p.add_argument("--callgrind-steps", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--work", default=str(ROOT / "build" / "codegen_speed"))
    p.add_argument("--out", default=str(RESULTS / "codegen_speed.json"))
    args = p.parse_args(argv)
    g = load_model(args.model)
    x, y, source = real_images(args.steps, g.tensors[g.inputs[0]].shape[1], seed=0)
    load_before = os.getloadavg()
    rows = []
    for scheme in args.schemes.split(","):
        r = c_program(args.model, scheme, x, y, args.lr, Path(args.work) / scheme, args.runs, args.callgrind_steps)
        tg = r.pop("graph")
        r["host_int8_trainer_ms_per_step_1thread"] = host_int8_step(tg, x, y, args.lr)
        rows.append(r)
        m4 = r["m4_instructions_per_step"]
        print(f"{args.model} {scheme}: C {r['c_ms_per_step']:.1f} ms/step, "
              f"{(r['instructions_per_step'] or 0) / 1e6:.0f}M x86 instructions/step, Cortex-M4 "
              + (f"{m4 / 1e6:.0f}M instructions/step" if m4 else f"- ({r['m4_note']})")
              + f", host int8 trainer {r['host_int8_trainer_ms_per_step_1thread']:.1f} ms/step", flush=True)
    pt = {f"{n}_threads": torch_float_step(args.model, x, y, args.lr, n) for n in sorted({1, torch.get_num_threads()})}
    for r in rows:
        r["c_over_pytorch_1thread"] = r["c_ms_per_step"] / pt["1_threads"]
    print("PyTorch FloatNet batch-1 SGD step (every parameter): "
          + ", ".join(f"{v:.1f} ms ({k.replace('_', ' ')})" for k, v in pt.items()))
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg(),
                    "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "gcc": subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True).stdout.strip()},
        "model": args.model, "images": source, "steps_per_run": args.steps, "lr": args.lr,
        "c_build": "gcc -std=c99 -O2 -ffp-contract=off (+ -mfma where the CPU has it), single thread",
        "instructions": "valgrind --tool=callgrind --toggle-collect=train_step: x86-64 instructions inside train_step",
        "pytorch_floatnet_ms_per_step": pt,
        "pytorch_floatnet": "runtime.float_model.FloatNet, batch 1, F.cross_entropy + backward + SGD step over every "
                            "parameter (the float equivalent of a full update)",
        "schemes": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
