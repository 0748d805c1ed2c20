"""Issue 14's acceptance, per fixture: it trains, plans, compiles for the Cortex-M4, fits 256 KB / 1 MB, runs in QEMU
with host C == QEMU C; and the TFLite fixtures' export round trip gives LiteRT `microtrain eval`'s accuracy.

Why: the tests cover these pieces on some fixtures only (tests/test_tflite_fixtures.py runs mbv1 / resnet / plain_cnn
on QEMU but cifar_cnn only on the host; tests/test_import.py runs float_cnn.pt2 on QEMU, gray_cnn.pt2 only with
MICROTRAIN_SLOW=1, and neither .onnx import on a device). This script runs every fixture through every stage once:

- the committed TFLite fixtures tests/fixtures/{mbv1,resnet,plain_cnn,cifar_cnn}.tflite (load_model), and
- the float fixtures tests/fixtures/{float_cnn,gray_cnn}.{onnx,pt2} imported as `microtrain import` does (the CLI in
  process: calibrated on --calib-count training images of CIFAR-10 / Fashion-MNIST, agreement on --held-out test
  images), under the schemes and learning rates the tests use per fixture.

Per fixture:
1. train: the torch engine (GraphTrainStep) on --train-images real training images of the fixture's dataset
   (CIFAR-10 for RGB models, Fashion-MNIST for the gray ones), --epochs passes at batch 16; the cross-entropy of the
   new head on those images before and after (the TFLite fixtures have seeded random weights: their features hardly
   separate classes, so their drop is small), and the per-step losses.
2. plan: compile_memory (the planner's peak SRAM and flash of a batch-1 step) and plan_training_graph's arena.
3. device: run_host_and_device (the same C program built for the host and for the Cortex-M4, arm-none-eabi-gcc -O3,
   trained on the same --device-steps images in `qemu-system-arm -M mps2-an386 -icount shift=0`): state.bin equal
   byte for byte, losses equal bit for bit, measure_memory's SRAM (RAM + painted stack) and flash against the
   generic-m4 board's 256 KB / 1 MB, QEMU instructions per step (train_ns under -icount shift=0), and the host C
   losses against the torch engine (commands.parity.simulate).
4. export (TFLite fixtures): `microtrain train` (--export-train training images, --export-test test images,
   --export-epochs epochs, --augment none, --lr 0.05, the scheme above), `microtrain export RUN -o model.tflite`,
   `microtrain eval RUN` on the same test subset, and the exported file in LiteRT (ai_edge_litert: default kernels,
   and the reference kernels) on those test images prepared as eval prepares them: both accuracies, and how often
   LiteRT's top-1 equals the run's (torch engine, float32 head) per image and microtrain's executor on the exported
   file per image; LiteRT's float32 logits against the run's (largest difference); and the exported file's logits
   in LiteRT (default and reference kernels) and TFLite Micro against microtrain's executor on it (logits equal,
   largest difference, top-1). The exported head is export's default: the run's float32 head as the device holds it
   (DEQUANTIZE of the int8 features, then a float32 FULLY_CONNECTED: float32 logits), so LiteRT's top-1 is the
   run's up to float summation order and the int8 kernels' rounding (`microtrain export --int8-head`, the int8
   head of an int8-only deployment, is not measured here).

Writes benchmarks/results/fixtures_device.json (the command, the date, one row per fixture).
Run: `python benchmarks/fixtures_device.py [--only mbv1,float_cnn.pt2] [--no-export]` (about 10-15 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from microtrain.autodiff.build import build_training_graph
from microtrain.cli import main as cli
from microtrain.codegen.project import measure_memory, run_host_and_device, toolchain
from microtrain.commands.parity import simulate
from microtrain.compiler.memory import compile_memory, plan_training_graph
from microtrain.data.datasets import batches, open_dataset
from microtrain.frontends.zoo import load_model
from microtrain.runtime.executor import Executor
from microtrain.runtime.trainstep import GraphTrainStep
from microtrain.sparse.scheme import resolve_scheme

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
RESULTS = ROOT / "benchmarks" / "results"
SRAM, FLASH = 256 * 1024, 1024 * 1024
# fixture -> (scheme, learning rate, dataset): the tests' schemes and rates (test_tflite_fixtures.SCHEMES,
# test_import's QEMU test); each model's own data (RGB 32x32: CIFAR-10; gray 28x28: Fashion-MNIST)
CASES = {
    "mbv1": ("last:3", 0.05, "cifar10"),
    "resnet": ("last:4", 0.05, "cifar10"),
    "plain_cnn": ("full", 0.05, "fashion-mnist"),
    "cifar_cnn": ("full", 0.05, "cifar10"),
    "float_cnn.onnx": ("last:2", 0.05, "cifar10"),
    "float_cnn.pt2": ("last:2", 0.05, "cifar10"),
    "gray_cnn.onnx": ("full", 0.02, "fashion-mnist"),
    "gray_cnn.pt2": ("full", 0.02, "fashion-mnist"),
}


def dataset_images(data: str, split: str, n: int, resolution, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n class-balanced images of a split as the model's int8 input (the evaluation transform, no crop)."""
    ds = open_dataset(data, split, subset=n, seed=seed, progress=False)
    xs, ys = zip(*batches(ds, 256, resolution=resolution, eval_crop=1.0), strict=True)
    return torch.cat(xs), torch.cat(ys)


def resolution_of(g):
    shape = tuple(g.tensors[g.inputs[0]].shape)
    return shape[1] if shape[0] == 3 and shape[1] == shape[2] else list(shape)


def import_float(name: str, data: str, out: Path, calib: int, held_out: int) -> tuple[Path, dict]:
    """`microtrain import FIXTURE --calib DATA -o OUT --calib-count N --held-out M --json`, in process."""
    dst = out / f"{name.replace('.', '_')}.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli(["import", str(FIXTURES / name), "--calib", data, "-o", str(dst), "--calib-count", str(calib),
                  "--held-out", str(held_out), "--json"])
    if rc != 0:
        raise RuntimeError(f"microtrain import {name} exited {rc}")
    return dst, json.loads(buf.getvalue())


def train_stage(g, scheme: str, lr: float, data: str, n: int, epochs: int) -> dict:
    x, y = dataset_images(data, "train", n, resolution_of(g), seed=5)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # the subset comes class by class
    x, y = x[order], y[order]
    step = GraphTrainStep(build_training_graph(g, resolve_scheme(scheme, g), 10))
    with torch.no_grad():
        before = float(F.cross_entropy(step.logits(x), y))
    losses = []
    for _ in range(epochs):
        for i in range(0, len(y), 16):
            losses.append(float(step.step(x[i:i + 16], y[i:i + 16], lr)))
    with torch.no_grad():
        after = float(F.cross_entropy(step.logits(x), y))
    return {"images": len(y), "epochs": epochs, "batch": 16, "lr": lr, "loss_before": round(before, 4),
            "loss_after": round(after, 4), "step_losses": [round(v, 4) for v in losses],
            "finite": bool(np.isfinite(losses).all()), "loss_drop": round(before - after, 4),
            "loss_went_down": after < before}


def plan_and_device(g, scheme: str, data: str, steps: int, tmp: Path, qemu: bool) -> tuple[dict, dict | None]:
    rep = compile_memory(g, scheme)
    tg = build_training_graph(g, resolve_scheme(scheme, g), 10)
    sched, best = plan_training_graph(tg)
    plan = {"peak_sram_bytes": rep.peak_sram_bytes, "flash_bytes": rep.flash_bytes,
            "arena_bytes": best.plan.arena_bytes,
            "fits_256k_1m": rep.peak_sram_bytes <= SRAM and rep.flash_bytes <= FLASH}
    if not qemu:
        return plan, None
    x, y = dataset_images(data, "train", steps, resolution_of(g), seed=4)
    x, y = x.numpy(), y.numpy()
    lrs = np.full(len(y), 0.05, np.float32)
    t0 = time.perf_counter()
    host, m4 = run_host_and_device(sched, best.plan, tmp, x, y, lrs, icount=True)
    seconds = time.perf_counter() - t0
    mem = measure_memory(m4["dir"], m4, best.plan)
    eng = simulate(sched, x, y, lrs)
    hl, ml = np.float32(host["losses"]), np.float32(m4["losses"])
    dev = {"steps": len(y), "host_state_equals_qemu": (host["dir"] / "state.bin").read_bytes()
           == (m4["dir"] / "state.bin").read_bytes(),
           "host_losses_equal_qemu": len(hl) == len(ml) == len(y) and hl.tobytes() == ml.tobytes(),
           "losses": [float(v) for v in ml],
           "host_c_vs_torch_engine_max_rel_loss_diff": float(np.max(np.abs(hl - np.float32(eng.losses))
                                                                    / np.maximum(np.abs(eng.losses), 1e-12))),
           "sram_total_bytes": mem["sram_total_bytes"], "ram_bytes": mem["ram_bytes"],
           "stack_bytes": mem["stack_bytes"], "flash_bytes": mem["flash_bytes"],
           "planned_peak_sram_bytes": mem["planned_peak_sram_bytes"], "fits": mem["fits"],
           "qemu_instructions_per_step": round(m4["train_ns"] / m4["steps"]) if m4.get("steps") else None,
           "build_and_run_seconds": round(seconds, 1)}
    return plan, dev


def export_stage(name: str, scheme: str, data: str, n_train: int, n_test: int, epochs: int, tmp: Path) -> dict:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from tflite_micro.python.tflite_micro import runtime

    from microtrain.commands.train import GRAPH
    from microtrain.ir.graph import Graph
    from microtrain.runtime.rundir import load_run_checkpoint, read_metrics

    mt = [sys.executable, "-m", "microtrain"]
    run, out = tmp / "run", tmp / f"{name}-ft.tflite"
    train = [*mt, "train", "--model", str(FIXTURES / f"{name}.tflite"), "--data", data, "--subset", str(n_train),
             "--test-subset", str(n_test), "--epochs", str(epochs), "--warmup-epochs", "0", "--batch-size", "16",
             "--scheme", scheme, "--augment", "none", "--lr", "0.05", "--quiet", "--out", str(run)]
    export = [*mt, "export", str(run), "-o", str(out), "--calib", str(n_test), "--json"]
    ev = [*mt, "eval", str(run), "--subset", str(n_test), "--json"]
    for cmd in (train, export, ev):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd[2:4])} exited {r.returncode}: {r.stderr.strip()[-500:]}")
        if cmd is export:
            exp = json.loads(r.stdout.strip().splitlines()[-1])
        if cmd is ev:
            evr = json.loads(r.stdout.strip().splitlines()[-1])
    metrics = read_metrics(run)
    ds = open_dataset(data, "test", subset=n_test, progress=False)  # eval's images: same subset (seed 0)
    xs, ys = (torch.cat(t) for t in zip(*batches(ds, 100, resolution=metrics["resolution"],
                                                    eval_crop=metrics["eval_crop"]), strict=True))
    tops = {}
    for label, kw in (("default", {}), ("reference", {"experimental_op_resolver_type": OpResolverType.BUILTIN_REF})):
        it = Interpreter(model_path=str(out), **kw)
        it.allocate_tensors()
        inp, outp = it.get_input_details()[0], it.get_output_details()[0]
        lite = []
        for img in xs.numpy():
            it.set_tensor(inp["index"], img.transpose(1, 2, 0)[None].astype(inp["dtype"]))
            it.invoke()
            lite.append(it.get_tensor(outp["index"]).reshape(-1))
        tops[label] = np.stack(lite).astype(np.float32)  # float32 logits (the float head)
    tm = runtime.Interpreter.from_bytes(out.read_bytes(), arena_size=1 << 20)
    micro = []
    for img in xs.numpy():
        tm.set_input(img.transpose(1, 2, 0)[None], 0)
        tm.invoke()
        micro.append(tm.get_output(0).reshape(-1))
    tops["tflm"] = np.stack(micro).astype(np.float32)
    lite_top1 = tops["default"].argmax(1)
    step = GraphTrainStep(Graph.load(run / GRAPH), metrics.get("precision", "int8"))
    step.load_state_dict(load_run_checkpoint(run))
    with torch.no_grad():
        run_logits = step.logits(xs).to(torch.float32).numpy()
    run_top1 = run_logits.argmax(1)
    exported = load_model(out)  # microtrain's own executor on the exported file
    ours = Executor(exported).logits(xs).to(torch.float32).numpy()
    ours_top1 = ours.argmax(1)
    vs_ours = {label: {"accuracy": float((v.argmax(1) == ys.numpy()).mean()),
                       "top1_equal": float((v.argmax(1) == ours_top1).mean()),
                       "logits_equal": float((v == ours).mean()),
                       "max_logit_difference": float(np.abs(v - ours).max())} for label, v in tops.items()}
    vs_run = {label: {"top1_equal": float((v.argmax(1) == run_top1).mean()),
                      "max_logit_difference": float(np.abs(v - run_logits).max())} for label, v in tops.items()}
    labels = ys.numpy()
    lite_acc = float((lite_top1 == labels).mean())
    return {"head": exp["head"], "train_images": n_train, "train_epochs": epochs, "test_images": int(len(labels)),
            "eval_images": evr["images"],
            "eval_accuracy": evr["accuracy"], "litert_accuracy": lite_acc,
            "accuracies_equal": math.isclose(lite_acc, evr["accuracy"], abs_tol=1e-9),
            "litert_reference_kernels_accuracy": vs_ours["reference"]["accuracy"],
            "litert_top1_equals_run_top1": float((lite_top1 == run_top1).mean()),
            "litert_max_logit_difference_vs_run": vs_run["default"]["max_logit_difference"],
            "exported_file_vs_run": vs_run,
            "litert_distinct_predicted_classes": len(np.unique(lite_top1)),
            "litert_top1_equals_microtrain_on_exported_file": float((lite_top1 == ours_top1).mean()),
            "exported_file_vs_microtrain_executor": vs_ours,
            "run_accuracy_recomputed": float((run_top1 == labels).mean()),
            "export_top1_agreement_with_run": exp["top1_agreement_with_run"],
            "export_max_logit_difference": exp["max_logit_difference"], "tflite_bytes": exp["bytes"],
            "requant": exp["requant"], "train_test_accuracy": metrics.get("test_accuracy")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", help="comma-separated fixture names (default: all of " + ", ".join(CASES) + ")")
    p.add_argument("--train-images", type=int, default=96)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--device-steps", type=int, default=4, help="images trained on the host C and in QEMU")
    p.add_argument("--calib-count", type=int, default=256)
    p.add_argument("--held-out", type=int, default=200)
    p.add_argument("--export-train", type=int, default=200)
    p.add_argument("--export-test", type=int, default=200)
    p.add_argument("--export-epochs", type=int, default=3)
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--no-qemu", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "fixtures_device.json"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    names = args.only.split(",") if args.only else list(CASES)
    qemu = not args.no_qemu and toolchain("cortex-m4") is None
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in names:
            scheme, lr, data = CASES[name]
            row: dict = {"fixture": name, "scheme": scheme, "data": data}
            t0 = time.perf_counter()
            try:
                if name.endswith(".tflite") or "." not in name:
                    g = load_model(FIXTURES / f"{name}.tflite")
                else:
                    path, rep = import_float(name, data, tmp, args.calib_count, args.held_out)
                    g = load_model(path)
                    row["import"] = {"calibration": rep.get("calibration"), "held_out": rep.get("held_out")}
                row["input"] = list(g.tensors[g.inputs[0]].shape)
                row["ops"] = [o.kind for o in g.ops]
                row["train"] = train_stage(g, scheme, lr, data, args.train_images, args.epochs)
                row["plan"], row["device"] = plan_and_device(g, scheme, data, args.device_steps, tmp / name, qemu)
                if "." not in name and not args.no_export:
                    row["export"] = export_stage(name, scheme, data, args.export_train, args.export_test,
                                                 args.export_epochs, tmp / name)
            except Exception as e:  # record and go on: one fixture's failure is a result, not the end of the run
                row["error"] = f"{type(e).__name__}: {e}"[:2000]
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            summary = {k: row.get(k) for k in ("plan", "error")}
            summary["train"] = {k: row["train"][k] for k in ("loss_before", "loss_after")} if "train" in row else None
            if row.get("device"):
                summary["device"] = {k: row["device"][k] for k in ("host_state_equals_qemu", "host_losses_equal_qemu",
                                                                   "sram_total_bytes", "flash_bytes", "fits",
                                                                   "qemu_instructions_per_step")}
            if row.get("export"):
                summary["export"] = {k: row["export"][k] for k in ("eval_accuracy", "litert_accuracy",
                                                                   "litert_top1_equals_microtrain_on_exported_file",
                                                                   "litert_top1_equals_run_top1",
                                                                   "litert_max_logit_difference_vs_run",
                                                                   "litert_distinct_predicted_classes")}
            print(name, f"{row['seconds']} s", json.dumps(summary), flush=True)
    out = {"command": "python benchmarks/fixtures_device.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "qemu": "qemu-system-arm -M mps2-an386 -icount shift=0 (one instruction = 1 ns: train_ns / steps = "
                   "instructions per step)" if qemu else "not run (no arm-none-eabi-gcc / qemu-system-arm, or "
                                                          "--no-qemu)",
           "budget": {"sram_bytes": SRAM, "flash_bytes": FLASH},
           "args": vars(args), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
