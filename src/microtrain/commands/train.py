"""`microtrain train`: fine-tune a model on a dataset with a sparse update scheme, on the real int8 training graph."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from microtrain.autodiff.build import OPTIMIZERS, TrainConfig, build_training_graph
from microtrain.data.datasets import AUGMENTS, DATASETS, dataset_info, model_resolution, open_dataset
from microtrain.errors import MicrotrainError
from microtrain.frontends.zoo import ZOO_MODELS, load_model
from microtrain.runtime.lr_select import AUTO, base_grid, parse_lr, scale_rate, select_lr
from microtrain.runtime.prefix_cache import PrefixCache
from microtrain.runtime.rundir import open_run_dir
from microtrain.runtime.trainer import METRICS, DivergedError, _write_json, fit, sweep
from microtrain.runtime.trainstep import GraphTrainStep
from microtrain.sparse.cost import analytic_extra_bytes
from microtrain.sparse.scheme import resolve_scheme

GRAPH = "train_graph"  # RUN_DIR/train_graph.json + .npz: the exact training graph (initial state included)
LR_SELECTION = "lr_selection.json"  # RUN_DIR/lr_selection.json: what --lr auto chose (--resume reuses it)
# Images per step of the torch engine. Small, because a short fine-tune gains from more (noisier) steps, and most where
# the backbone learns: CIFAR-10, mcunet-5fps `last:6`, 5,000 images, 3 epochs, `--lr auto`, seed 0: int8 + QAS
# 64.0 / 66.4 / 68.4 / 68.7% at batch 64 / 32 / 16 / 8, int8 without QAS (which moves mostly its head) 62.7 / 64.2 /
# 64.1 / 63.9%, at about the same train time (benchmarks/batch_size.py). 16 is also nearer the device's one image
# per step.
DEFAULT_BATCH = 16


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="fine-tune a model with a sparse update scheme (host simulation of the device)",
        description="Fine-tune an int8 model on an image dataset by executing its compiled training graph on the "
                    "CPU, batched: integer-exact forward, fp32 backward, QAS-scaled updates stored exactly as the "
                    "device stores them. Writes RUN_DIR/metrics.json, checkpoints (resumable) and the training "
                    "graph. With --lr-sweep, runs one sub-run per learning rate and reports every one of them.")
    p.add_argument("--model", required=True, help=f"zoo name ({', '.join(ZOO_MODELS)}) or model file")
    p.add_argument("--data", required=True, help=f"dataset name ({', '.join(DATASETS)}) or ImageFolder directory")
    p.add_argument("--scheme", default="bias-only", help="preset (paper-<label>, full, bias-only, bias:K, last:K, "
                                                         "head-only) or a scheme .yaml/.json file")
    p.add_argument("--epochs", type=int, help="default: the paper's protocol for the dataset (50; VWW 10)")
    p.add_argument("--lr", default=AUTO,
                   help="peak learning rate, or 'auto' (default): chosen by short trial runs scored on a validation "
                        "slice of the training images (never the test split) over a grid that depends on precision, "
                        "QAS, optimizer and batch size; the choice and every candidate's scores go to metrics.json")
    p.add_argument("--lr-sweep", help="comma-separated learning rates to try instead of --lr, e.g. 0.01,0.03,0.1")
    p.add_argument("--workers", type=int, default=1,
                   help="with --lr-sweep: learning rates trained at the same time, in spawned processes with one "
                        "torch thread each (default 1: one after the other in this process)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="with --lr-sweep: train the learning rates as Ray tasks ('local': a private instance with "
                        "--workers CPUs; 'auto' or host:port: a running cluster that sees --out); same results as "
                        "--workers; pip install 'microtrain[ray]'")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="sgd (no momentum, default), sgd-m, adam")
    p.add_argument("--no-qas", action="store_true", help="disable Quantization-Aware Scaling (paper baseline)")
    p.add_argument("--precision", choices=("int8", "fp32"), default="int8",
                   help="int8: the device's arithmetic; fp32: the float relaxation of the same graph (baseline)")
    p.add_argument("--update-storage", choices=("int8", "fp32"), default="int8",
                   help="trainable weight slices as int8 with stochastic rounding (default) or an fp32 shadow")
    p.add_argument("--int8-grads", action="store_true",
                   help="propagate activation gradients as per-channel quantized int8 (less SRAM; see `plan`)")
    p.add_argument("--engine", choices=("torch", "device"), default="torch",
                   help="torch: the fast batched engine (default); device: the device twin, i.e. the generated C "
                        "training step built for this machine and run one image at a time: bit-identical to what "
                        "the chip computes (the final run before flashing; int8 precision and storage, batch 1)")
    p.add_argument("--batch-size", type=int,
                   help=f"images per step (default {DEFAULT_BATCH}; the device engine trains 1)")
    p.add_argument("--subset", type=int, help="class-balanced subset of N training images")
    p.add_argument("--test-subset", type=int, help="class-balanced subset of N test images")
    p.add_argument("--augment", choices=AUGMENTS, help="default: the paper's for the dataset (flip for a gray or "
                                                       "non-square model)")
    p.add_argument("--warmup-epochs", type=float,
                   help="default: the paper's share of the run (its warm-up over its epochs: 5 of 50, VWW 1 of 10), "
                        "so a shorter run warms up for the same fraction and still decays")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="recompute the frozen prefix every step (it is cached per image when augmentation is "
                        "flip/none; results are identical)")
    p.add_argument("--no-blowup-stop", action="store_true",
                   help="keep training when the loss blows up without becoming non-finite (by default a run whose "
                        "mean loss over 50 iterations exceeds 10x chance level stops as diverged)")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (same model, data, "
                                                         "scheme, optimizer, precision, QAS, storage: checked)")
    p.add_argument("--force", action="store_true", help="replace the run that --out holds (completed or unfinished)")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print metrics.json (or sweep.json) to stdout at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def parse_lrs(text: str) -> list[float]:
    try:
        lrs = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MicrotrainError(f"--lr-sweep: not a comma-separated list of numbers: {text!r}") from None
    if not lrs or any(lr <= 0 for lr in lrs):
        raise MicrotrainError(f"--lr-sweep: need positive learning rates, got {text!r}")
    return lrs


def check_numbers(args: argparse.Namespace) -> None:
    """Numeric options that argparse accepts but no run can use: one line each, before anything is loaded."""
    def bad(flag: str, v: Any, rule: str) -> MicrotrainError:
        return MicrotrainError(f"{flag} must be {rule}, got {v}")

    for flag, v in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--subset", args.subset),
                    ("--test-subset", args.test_subset), ("--eval-every", args.eval_every)):
        if v is not None and v < 1:
            raise bad(flag, v, "an integer >= 1")
    if args.epochs is not None and args.epochs > 100_000:
        raise bad("--epochs", args.epochs, "at most 100000")
    if isinstance(args.lr, str):
        args.lr = parse_lr(args.lr)
    if args.warmup_epochs is not None and not (math.isfinite(args.warmup_epochs) and args.warmup_epochs >= 0):
        raise bad("--warmup-epochs", args.warmup_epochs, "a finite number >= 0")


def run_identity(args: argparse.Namespace, model: Any, scheme: Any, graph: Any, train_ds: Any) -> dict[str, Any]:
    """What a run is (runtime/rundir.py): --resume must name the same, or it is refused before any file changes."""
    from microtrain.runtime.rundir import graph_hash

    data = str(Path(args.data).resolve()) if Path(args.data).is_dir() else args.data
    return {"model": model.name, "data": data, "scheme": scheme.to_dict(), "optimizer": args.optimizer,
            "precision": args.precision, "qas": not args.no_qas, "update_storage": args.update_storage,
            "int8_grads": args.int8_grads, "engine": args.engine, "classes": list(train_ds.classes),
            "lr_sweep": args.lr_sweep and parse_lrs(args.lr_sweep), "graph_sha256": graph_hash(graph)}


def default_warmup(info: Any, epochs: int) -> float:
    """The paper's warm-up as a share of its run (5 of 50 epochs; VWW 1 of 10), applied to this run's length. A fixed
    5-epoch warm-up would make a 3-epoch run end at 60% of its rate, still rising, never decayed: on CIFAR-10
    (mcunet-5fps last:6, 5,000 images, 3 epochs) int8 + QAS fell from 47.4% after epoch 2 to 44.3% at the end."""
    paper_warmup, paper_epochs = (info.warmup_epochs, info.epochs) if info else (5, 50)
    return round(paper_warmup * min(1.0, epochs / paper_epochs), 4)


def auto_lr(args: argparse.Namespace, graph: Any, out: Path, train_ds: Any, batch_size: int, epochs: int,
            warmup: float, augment: str, resolution: int, entries: dict, progress: bool) -> dict[str, Any]:
    """--lr auto: the rate recorded in RUN_DIR (a resumed run keeps the rate it started with), else a selection on the
    training split (runtime/lr_select.py), written to RUN_DIR before the run starts. The device engine's selection
    runs the torch engine (same arithmetic within the stated tolerance) at batch 64, where a candidate costs a few
    percent of the run instead of a large share of it at batch 1, and scales the chosen rate to batch 1 by the
    grid's own sqrt(batch / 64) rule (`lr_select.scale_rate`)."""
    path = out / LR_SELECTION
    if args.resume and path.is_file():
        rec = json.loads(path.read_text())
        if progress:
            print(f"lr auto: resuming with the recorded lr {rec['lr']:g} (selected in {rec['seconds']:.1f}s)",
                  file=sys.stderr)
        return rec
    precision = args.precision if args.engine == "torch" else "int8"
    sel_batch = batch_size if args.engine == "torch" else 64
    grid, ratio = base_grid(precision, not args.no_qas, args.optimizer, sel_batch)

    def make_step() -> Any:
        return PrefixCache(GraphTrainStep(graph, precision), entries=entries)

    rec = select_lr(make_step, train_ds, grid=grid, ratio=ratio, epochs=epochs, batch_size=sel_batch,
                    warmup_epochs=warmup, augment=augment, resolution=resolution,
                    eval_crop=0.875 if augment == "paper" else 1.0, seed=args.seed, progress=progress)
    if sel_batch != batch_size:
        rec["lr_at_selection_batch"] = rec["lr"]
        rec["lr"] = scale_rate(rec["lr"], sel_batch, batch_size)
        if progress:
            print(f"lr auto: {rec['lr_at_selection_batch']:g} at batch {sel_batch} -> {rec['lr']:g} at batch "
                  f"{batch_size}", file=sys.stderr)
    _write_json(path, rec)
    return rec


MAX_FALLBACKS = 2  # restarts at a lower candidate after the chosen rate diverged in the full run


def fallback_rate(selection: dict[str, Any] | None, failed: float, batch_size: int) -> float | None:
    """The rate to restart a run at whose `--lr auto` rate diverged: the largest completed candidate below it (in the
    run's batch size), at most `MAX_FALLBACKS` times; None when there is none (or the rate was given explicitly).

    Why: a trial is short and decays its rate over a few dozen steps, the run holds the peak for much longer. Where
    validation accuracy saturates the candidates tie and the lowest validation loss, i.e. the largest stable rate,
    wins; that can sit at the edge of stability (scikit-image faces, 150 images, batch 16: 0.05 won on loss, all at
    100%, and the 50-epoch run blew up in epoch 5)."""
    if selection is None or len(selection.get("fallbacks", [])) >= MAX_FALLBACKS:
        return None
    sel_batch = selection.get("batch_size", batch_size)
    rates = [c["lr"] if sel_batch == batch_size else scale_rate(c["lr"], sel_batch, batch_size)
             for c in selection.get("candidates", []) if c.get("status") == "completed"]
    below = [r for r in rates if r < failed]
    return max(below) if below else None


def record_cost(out: Path, metrics: dict[str, Any], selection: dict[str, Any], fit_seconds: float,
                fit_cpu_seconds: float) -> None:
    """The selection's cost next to the run's: wall and CPU seconds of each and the selection's share of the whole
    (CPU time does not depend on what else the machine runs), in metrics.json (and in the returned metrics)."""
    selection["run_seconds"] = round(fit_seconds, 3)
    selection["fraction_of_total"] = round(selection["seconds"] / (selection["seconds"] + fit_seconds), 4)
    if "cpu_seconds" in selection:  # absent from a selection recorded before CPU time was measured
        selection["run_cpu_seconds"] = round(fit_cpu_seconds, 3)
        selection["cpu_fraction_of_total"] = round(
            selection["cpu_seconds"] / (selection["cpu_seconds"] + fit_cpu_seconds), 4)
    metrics["lr_selection"] = selection
    _write_json(out / METRICS, metrics)
    _write_json(out / LR_SELECTION, selection)


def describe(selection: dict[str, Any]) -> str:
    """One line: the chosen rate, every candidate's score, and what the selection cost."""
    cands = ", ".join(f"{c['lr']:g} " + (f"{c['val_accuracy']:.1%}" if c["status"] == "completed" else "diverged")
                      for c in selection["candidates"])
    cost = f"; selection {selection['seconds']:.0f}s"
    if "fraction_of_total" in selection:
        cost += f" = {selection['fraction_of_total']:.0%} of the run"
    if "cpu_fraction_of_total" in selection:
        cost += f" ({selection['cpu_fraction_of_total']:.0%} of its CPU time)"
    fell = "".join(f"; diverged in the run at {f['lr']:g}" for f in selection.get("fallbacks", []))
    return f"lr auto {selection['lr']:g} (validation accuracy {cands}{cost}{fell})"


def report_skipped(*datasets: Any) -> None:
    """Undecodable images are skipped, and the console says so (with the first reason), not only metrics.json."""
    for ds in datasets:
        if ds.skipped:
            path, why = ds.skipped[0]
            print(f"microtrain: skipped {len(ds.skipped)} undecodable image(s) in {ds.name}/{ds.split} (first: "
                  f"{path}: {why}); all are listed in metrics.json", file=sys.stderr)


def device_twin(graph: Any, out_dir: Path, state: dict | None = None) -> Any:
    """The device engine: `graph`'s C training step (planned with the default levers: the numerics do not depend on
    the plan) built into out_dir as a host library."""
    from microtrain.codegen.twin import DeviceTwin
    from microtrain.compiler.memory import plan_training_graph

    sched, best = plan_training_graph(graph)
    return DeviceTwin(sched, best.plan, out_dir, state)


def check_engine(args: argparse.Namespace) -> int:
    """The batch size, and what the device engine supports (int8 precision and storage, one image per step)."""
    if args.engine == "torch":
        return DEFAULT_BATCH if args.batch_size is None else args.batch_size
    device = {"--precision": (args.precision, "int8"), "--update-storage": (args.update_storage, "int8"),
              "--batch-size": (args.batch_size, 1)}
    for flag, (value, want) in device.items():
        if value is not None and value != want:
            raise MicrotrainError(f"--engine device trains as the device does: {flag} {want} (got {value})")
    return 1


def run(args: argparse.Namespace) -> int:
    check_numbers(args)
    batch_size = check_engine(args)
    model = load_model(args.model)
    scheme = resolve_scheme(args.scheme, model)
    info = dataset_info(args.data)
    progress = not args.quiet
    train_ds = open_dataset(args.data, "train", subset=args.subset, seed=args.seed, progress=progress)
    test_ds = open_dataset(args.data, "test", subset=args.test_subset, seed=args.seed, progress=progress)
    report_skipped(train_ds, test_ds)
    augment = args.augment or (info.augment if info else "paper")
    if augment == "paper" and not args.augment and not isinstance(model_resolution(model), int):
        augment = "flip"  # the paper's crop + colour jitter needs square RGB inputs (a gray / non-square import)
    epochs = args.epochs or (info.epochs if info else 50)
    warmup = args.warmup_epochs if args.warmup_epochs is not None else default_warmup(info, epochs)
    cfg = TrainConfig(optimizer=args.optimizer, qas=not args.no_qas, update_storage=args.update_storage,
                      int8_grads=args.int8_grads, seed=args.seed)
    graph = build_training_graph(model, scheme, train_ds.num_classes, cfg)
    out = Path(args.out)
    open_run_dir(out, run_identity(args, model, scheme, graph, train_ds), resume=args.resume, force=args.force)
    graph.save(out / GRAPH)
    cache = augment in ("flip", "none") and not args.no_prefix_cache and args.engine == "torch"
    shared: dict = {}
    twins = iter(range(1 << 30))

    def make_step() -> Any:
        if args.engine == "device":
            return device_twin(graph, out / "device" / f"twin-{next(twins)}")
        step = GraphTrainStep(graph, args.precision)
        return PrefixCache(step, entries=shared) if cache else step

    data = str(Path(args.data).resolve()) if Path(args.data).is_dir() else args.data
    extra = {"model": model.name, "data": data, "scheme": scheme.to_dict(), "precision": args.precision,
             "qas": cfg.qas, "optimizer": cfg.optimizer, "update_storage": cfg.update_storage,
             "int8_grads": cfg.int8_grads, "prefix_cache": cache, "engine": args.engine,
             "analytic_extra_bytes": analytic_extra_bytes(model, scheme), "classes": train_ds.classes}
    common = dict(epochs=epochs, batch_size=batch_size, warmup_epochs=warmup, augment=augment,
                  resolution=model_resolution(model), seed=args.seed, resume=args.resume,
                  eval_every=args.eval_every, progress=progress, stop_on_blowup=not args.no_blowup_stop,
                  extra=extra)
    if args.lr_sweep:
        if args.workers > 1 or args.ray:
            from microtrain.commands.sweeps import parallel_sweep, step_spec

            if args.engine != "torch":
                raise MicrotrainError("--workers / --ray sweeps run the torch engine (drop --engine device)")
            spec = step_spec(args.model, args.scheme, train_ds.num_classes, cfg, args.precision, cache)
            result = parallel_sweep(spec, parse_lrs(args.lr_sweep), train_ds, test_ds, out_dir=out,
                                    workers=args.workers, ray_address=args.ray, **common)
        else:
            result = sweep(make_step, parse_lrs(args.lr_sweep), train_ds, test_ds, out_dir=out, **common)
        summary = f"best lr {result['best_lr']:g}: test accuracy {result['best_test_accuracy']:.2%}"
        if result["diverged_lrs"]:
            summary += f" (diverged at lr {', '.join(f'{v:g}' for v in result['diverged_lrs'])})"
    else:
        lr, selection = args.lr, None
        if lr == AUTO:
            selection = auto_lr(args, graph, out, train_ds, batch_size, epochs, warmup, augment,
                                model_resolution(model), shared if cache else {}, progress)
            lr = selection["lr"]
            extra["lr_selection"] = selection
        t0, c0 = time.perf_counter(), time.process_time()
        while True:
            try:
                result = fit(make_step(), train_ds, test_ds, lr=lr, out_dir=out, **common)
                break
            except DivergedError as e:
                lower = fallback_rate(selection, lr, batch_size)
                if lower is None:
                    raise
                print(f"lr auto: the run diverged at lr {lr:g} ({e}); restarting from the initial state at "
                      f"{lower:g}, the next lower candidate that completed", file=sys.stderr)
                selection.setdefault("fallbacks", []).append({"lr": lr, "why": str(e)})
                selection["lr"] = lr = lower
                _write_json(out / LR_SELECTION, selection)  # a --resume continues at the rate now running
                common["resume"] = False  # the restart begins at the initial state, not the diverged checkpoint
        summary = (f"test accuracy {result['test_accuracy']:.2%} after {epochs} epochs "
                   f"({result['images_per_second']:.0f} images/s)")
        if selection is not None:
            record_cost(out, result, selection, time.perf_counter() - t0, time.process_time() - c0)
            summary += "; " + describe(selection)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{model.name} {scheme.name} on {train_ds.name}: {summary}; run in {out}")
    return 0
