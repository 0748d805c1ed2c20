"""A learning-rate sweep whose runs train at the same time: in spawned processes or as Ray tasks
(`microtrain train --lr-sweep ... --workers N` / `--ray ADDRESS`).

Each run is `runtime.trainer.fit` on a training step rebuilt from its specification (model, scheme, classes,
TrainConfig, precision: the graph build is deterministic) and on the decoded images the parent saved in
OUT/.sweep-data, with one torch thread, so the pool and Ray give the same numbers. sweep.json has the format of
`runtime.trainer.sweep` (the sequential sweep).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from microtrain.autodiff.build import TrainConfig, build_training_graph
from microtrain.data.datasets import ImageDataset
from microtrain.errors import MicrotrainError
from microtrain.frontends.zoo import load_model
from microtrain.runtime.prefix_cache import PrefixCache
from microtrain.runtime.tasks import run_tasks
from microtrain.runtime.trainer import SWEEP, DivergedError, fit
from microtrain.runtime.trainstep import GraphTrainStep
from microtrain.sparse.scheme import resolve_scheme

DATA = ".sweep-data"


def step_spec(model: str, scheme: str, num_classes: int, cfg: TrainConfig, precision: str, cache: bool
              ) -> dict[str, Any]:
    """What a worker needs to rebuild the run's training step (paths made absolute)."""
    def absolute(p: str) -> str:
        return str(Path(p).resolve()) if Path(p).is_file() else p

    return {"model": absolute(model), "scheme": absolute(scheme), "num_classes": num_classes, "config": asdict(cfg),
            "precision": precision, "cache": cache}


def lr_run(spec: dict[str, Any], lr: float, out_dir: str, fit_kwargs: dict[str, Any]) -> dict[str, Any]:
    """One learning rate of the sweep (module-level: picklable for pools and Ray); the record `trainer.sweep` keeps."""
    torch.set_num_threads(1)
    out = Path(out_dir)
    model = load_model(spec["model"])
    cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()})
    graph = build_training_graph(model, resolve_scheme(spec["scheme"], model), spec["num_classes"], cfg)
    step: Any = GraphTrainStep(graph, spec["precision"])
    if spec["cache"]:
        step = PrefixCache(step)
    train = ImageDataset.load(out / DATA / "train.npz")
    test = ImageDataset.load(out / DATA / "test.npz")
    sub = out / f"lr-{lr:g}"
    try:
        m = fit(step, train, test, lr=lr, out_dir=sub, progress=False, **fit_kwargs)
        return {"lr": lr, "status": "completed", "test_accuracy": m["test_accuracy"],
                "final_train_loss": m["train_loss"][-1], "images_per_second": m["images_per_second"],
                "dir": str(sub)}
    except DivergedError as e:
        return {"lr": lr, "status": "diverged", "test_accuracy": None, "diverged_at_epoch": e.epoch,
                "diverged_at_iteration": e.iteration, "message": str(e), "dir": str(sub)}


def parallel_sweep(spec: dict[str, Any], lrs: Sequence[float], train_ds: ImageDataset, test_ds: ImageDataset, *,
                   out_dir: str | Path, workers: int, ray_address: str | None, progress: bool = True,
                   **fit_kwargs: Any) -> dict[str, Any]:
    """`trainer.sweep` with the learning rates trained at the same time (see the module docstring)."""
    if not lrs:
        raise MicrotrainError("sweep needs at least one learning rate")
    if workers < 1:
        raise MicrotrainError(f"--workers must be >= 1, got {workers}")
    out = Path(out_dir)
    train_ds.save(out / DATA / "train.npz")
    test_ds.save(out / DATA / "test.npz")
    bar = tqdm(total=len(lrs), desc="lr sweep", unit="run", disable=not progress, dynamic_ncols=True)

    def done(r: dict[str, Any]) -> None:
        acc = "diverged" if r["test_accuracy"] is None else f"{r['test_accuracy']:.2%}"
        bar.write(f"sweep: lr {r['lr']:g}: {acc} -> {r['dir']}", file=sys.stderr)
        bar.update()

    try:
        got = run_tasks(lr_run, [(spec, lr, str(out), fit_kwargs) for lr in lrs], workers=workers,
                        ray_address=ray_address, on_result=done)
    finally:
        bar.close()
    by_lr = {r["lr"]: r for r in got}
    runs = [by_lr[lr] for lr in lrs]
    result: dict[str, Any] = {"runs": runs, "selection": "highest final test accuracy among completed runs"}
    done_runs = [r for r in runs if r["status"] == "completed"]
    best = max(done_runs, key=lambda r: r["test_accuracy"], default=None)
    result.update({"best_lr": best and best["lr"], "best_test_accuracy": best and best["test_accuracy"],
                   "best_dir": best and best["dir"], "diverged_lrs": [r["lr"] for r in runs if r not in done_runs],
                   "parallel": {"workers": workers, "ray": ray_address}})
    tmp = out / f"{SWEEP}.tmp"
    tmp.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, out / SWEEP)
    if best is None:
        raise MicrotrainError(f"all {len(runs)} learning rates diverged ({', '.join(f'{lr:g}' for lr in lrs)}); "
                              f"see {out / SWEEP}")
    return result
