"""The host training loop, independent of how one step is computed: learning-rate schedule, epochs over augmented
batches, evaluation, checkpoints that an interrupted run resumes from, a hard stop on a non-finite loss, metrics.json,
and a learning-rate sweep (the paper grid-searches the learning rate per setting, PAPER.md §5).

It drives any object implementing `TrainStep` (the int8 training graph's step is built by
`microtrain.runtime.trainstep.build_train_step`). Files written in `out_dir`:
  checkpoint.npz   the step's state_dict (np.savez, no pickle), loadable with `load_checkpoint`
  checkpoint.json  epoch / iteration / RNG state / history / config of that checkpoint, sha256 of the .npz
  metrics.json     see `fit`; rewritten after every epoch ("status": running | completed | diverged)
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from tqdm import tqdm

from microtrain.data.datasets import AUGMENTS, ImageDataset, batches, num_batches
from microtrain.errors import MicrotrainError

SCHEDULES = ("cosine", "constant")
CHECKPOINT, STATE, METRICS, SWEEP = "checkpoint.npz", "checkpoint.json", "metrics.json", "sweep.json"
# A run whose mean loss over the last BLOWUP_WINDOW iterations exceeds BLOWUP_FACTOR x chance level (ln classes)
# has blown up: int8 weights saturate at +-127, so such runs stay finite yet sit at chance for the rest of the run.
BLOWUP_WINDOW, BLOWUP_FACTOR = 50, 10.0


def blowup_threshold(num_classes: int) -> float:
    """Loss above which a (windowed mean) training loss counts as blown up: 10x the loss of a uniform guess."""
    return BLOWUP_FACTOR * math.log(max(num_classes, 2))


@runtime_checkable
class TrainStep(Protocol):
    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
        """x int8 [N, 3, R, R], y int64 [N]: one optimizer update; returns the mean loss of the batch."""
        ...

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """float [N, classes], no update."""
        ...

    def state_dict(self) -> dict[str, np.ndarray]: ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None: ...


class DivergedError(MicrotrainError):
    """The loss (or the weights) became non-finite, or the loss blew up (see `BLOWUP_WINDOW`). `checkpoint` is the
    last good checkpoint, already loaded back into the step."""

    def __init__(self, message: str, epoch: int, iteration: int, checkpoint: Path):
        super().__init__(message)
        self.epoch, self.iteration, self.checkpoint = epoch, iteration, checkpoint


def lr_at(iteration: int, total: int, warmup: int, base_lr: float, schedule: str = "cosine") -> float:
    """Learning rate of (0-based) `iteration`: linear warm-up to base_lr over the first `warmup` iterations, then
    cosine decay to 0 at `total` (or constant)."""
    if iteration < warmup:
        return base_lr * (iteration + 1) / warmup
    if schedule == "constant":
        return base_lr
    if schedule != "cosine":
        raise MicrotrainError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    t = (iteration - warmup) / max(1, total - warmup)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(1.0, t)))


@torch.no_grad()
def evaluate(step: TrainStep, ds: ImageDataset, *, batch_size: int = 100, resolution: int = 128,
             eval_crop: float = 0.875, progress: bool = False) -> float:
    """Top-1 accuracy on `ds` with the evaluation transform (resize + centre crop, no augmentation)."""
    if len(ds) == 0:
        raise MicrotrainError(f"{ds.name}/{ds.split}: no images to evaluate")
    correct = 0
    bar = tqdm(batches(ds, batch_size, resolution=resolution, eval_crop=eval_crop), desc="eval", unit="batch",
               total=num_batches(len(ds), batch_size), disable=not progress, leave=False)
    for x, y in bar:
        correct += int((step.logits(x).argmax(dim=1) == y).sum())
    return correct / len(ds)


# ------------------------------------------------------------------------------------------------ checkpoints

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _nonfinite(state: dict[str, np.ndarray]) -> list[str]:
    return [k for k, v in state.items() if np.asarray(v).dtype.kind in "fc" and not np.isfinite(v).all()]


def load_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """A checkpoint.npz as a state dict (no pickle)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _rng_state() -> dict[str, Any]:
    """Global RNG states a step may draw from (torch, numpy's legacy global, Python's random)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
            "numpy": [base64.b64encode(np.asarray(keys, np.uint32).tobytes()).decode(), int(pos), int(has_gauss),
                      float(gauss)],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(s["torch"])), dtype=torch.uint8))
    keys = np.frombuffer(base64.b64decode(s["numpy"][0]), np.uint32)
    np.random.set_state(("MT19937", keys, *s["numpy"][1:]))
    v, st, g = s["python"]
    random.setstate((v, tuple(st), g))


class _Run:
    """Checkpoint and metrics files of one fit() run directory."""

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ckpt, self.state, self.metrics = self.dir / CHECKPOINT, self.dir / STATE, self.dir / METRICS

    def save(self, step: TrainStep, info: dict[str, Any]) -> None:
        """Atomically replaces checkpoint.npz, then checkpoint.json (which names the .npz by its sha256, so a
        crash between the two is detected on resume instead of pairing new weights with old counters)."""
        state = step.state_dict()
        tmp = self.ckpt.with_name(CHECKPOINT + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in state.items()})
        info = {**info, "checkpoint_sha256": _sha256(tmp), "rng": _rng_state()}
        os.replace(tmp, self.ckpt)
        _write_json(self.state, info)

    def load(self) -> dict[str, Any] | None:
        if not self.state.is_file():
            return None
        try:
            info = json.loads(self.state.read_text())
        except (OSError, ValueError) as e:
            raise MicrotrainError(f"{self.state}: unreadable checkpoint state ({e})") from None
        if not self.ckpt.is_file() or _sha256(self.ckpt) != info.get("checkpoint_sha256"):
            raise MicrotrainError(f"{self.ckpt} does not match {self.state} (interrupted while saving?); "
                                  "start again without resume")
        return info


# ---------------------------------------------------------------------------------------------------------- fit

def fit(step: TrainStep, train_ds: ImageDataset, test_ds: ImageDataset, *, epochs: int, lr: float,
        batch_size: int = 64, warmup_epochs: float = 0, schedule: str = "cosine", augment: str = "paper",
        resolution: int = 128, seed: int = 0, out_dir: str | Path, eval_every: int = 1,
        eval_crop: float | None = None, eval_batch_size: int | None = None, drop_last: bool = False,
        resume: bool = False, progress: bool = True, stop_on_blowup: bool = True,
        extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Trains `step` for `epochs` over `train_ds` and returns the metrics dict also written to out_dir/metrics.json.

    - lr: peak learning rate; per iteration, linear warm-up over `warmup_epochs` then `schedule` (cosine | constant).
    - augment: "paper" | "flip" | "none" (see `data.datasets.augment_batch`); data order and augmentation draws are
      seeded by (seed, epoch). eval_crop: centre-crop fraction of the eval transform (default 0.875 for "paper", as
      timm/tiny-training; 1.0 = plain resize as the paper's VWW).
    - Test accuracy is measured every `eval_every` epochs and after the last one.
    - A checkpoint is written before the first epoch and after every epoch; `resume=True` continues from it (same
      configuration required) and reproduces the uninterrupted run, including the global RNG states.
    - A non-finite loss, or non-finite weights at the end of an epoch, raises `DivergedError` ("loss became nan at
      epoch E, iteration I; last good checkpoint: PATH") after loading that checkpoint back into `step`; so does a
      blown-up loss (mean of the last BLOWUP_WINDOW iterations above `blowup_threshold`) unless stop_on_blowup=False.
    - metrics.json: status, test_accuracy (final, null if diverged), best_test_accuracy, best_epoch, train_loss
      (per-epoch mean), test_accuracy_per_epoch (null where not evaluated), images_per_second (training only,
      augmentation included, evaluation and checkpointing excluded), train_seconds, eval_seconds, epochs,
      epochs_completed, iterations, lr, batch_size, warmup_epochs, schedule, augment, resolution, eval_crop, seed,
      dataset, train_images, test_images, num_classes, skipped_images, skipped_files, checkpoint, plus `extra`."""
    if epochs < 1 or batch_size < 1 or eval_every < 1:
        raise MicrotrainError(f"epochs, batch size and eval_every must be >= 1 (got {epochs}, {batch_size}, "
                              f"{eval_every})")
    if not (lr > 0 and math.isfinite(lr)):
        raise MicrotrainError(f"learning rate must be a positive number, got {lr}")
    if augment not in AUGMENTS or schedule not in SCHEDULES:
        raise MicrotrainError(f"augment must be one of {AUGMENTS} and schedule one of {SCHEDULES}")
    if train_ds.num_classes != test_ds.num_classes:
        raise MicrotrainError(f"train has {train_ds.num_classes} classes but test has {test_ds.num_classes}")
    if len(train_ds) == 0:
        raise MicrotrainError(f"{train_ds.name}/{train_ds.split}: no training images")
    extra = dict(extra or {})
    eval_crop = (0.875 if augment == "paper" else 1.0) if eval_crop is None else eval_crop
    eval_batch_size = eval_batch_size or batch_size
    ipe = num_batches(len(train_ds), batch_size, drop_last)
    if ipe == 0:
        raise MicrotrainError(f"{len(train_ds)} training images make no full batch of {batch_size}")
    total, warm = epochs * ipe, round(warmup_epochs * ipe)
    config = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "warmup_epochs": warmup_epochs,
              "schedule": schedule, "augment": augment, "resolution": resolution, "eval_crop": eval_crop,
              "seed": seed, "drop_last": drop_last, "dataset": train_ds.name, "train_images": len(train_ds),
              "test_images": len(test_ds), "num_classes": train_ds.num_classes}
    run = _Run(out_dir)
    skipped = train_ds.skipped + test_ds.skipped
    st: dict[str, Any] = {"epoch": 0, "iteration": 0, "train_loss": [], "test_accuracy_per_epoch": [],
                          "train_images_seen": 0, "train_seconds": 0.0, "eval_seconds": 0.0}

    def metrics(status: str) -> dict[str, Any]:
        accs = [(a, e + 1) for e, a in enumerate(st["test_accuracy_per_epoch"]) if a is not None]
        best = max(accs, default=(None, None))
        m = {"status": status,
             "test_accuracy": accs[-1][0] if status == "completed" else None,
             "best_test_accuracy": best[0], "best_epoch": best[1],
             "train_loss": st["train_loss"], "test_accuracy_per_epoch": st["test_accuracy_per_epoch"],
             "images_per_second": st["train_images_seen"] / st["train_seconds"] if st["train_seconds"] else None,
             "train_seconds": round(st["train_seconds"], 3), "eval_seconds": round(st["eval_seconds"], 3),
             **config, "epochs_completed": st["epoch"], "iterations": st["iteration"],
             "skipped_images": len(skipped),
             "skipped_files": [{"path": p, "reason": r} for p, r in skipped[:100]],
             "checkpoint": str(run.ckpt)}
        if "diverged" in st:
            m["diverged"] = st["diverged"]
        clash = set(m) & set(extra)
        if clash:
            raise MicrotrainError(f"extra metrics would overwrite {sorted(clash)}")
        m.update(extra)
        _write_json(run.metrics, m)
        return m

    def stop(epoch: int, what: str) -> DivergedError:
        """Diverged: record it, put the last good checkpoint back into the step, build the error."""
        st["diverged"] = {"epoch": epoch + 1, "iteration": st["iteration"] + 1, "what": what}
        metrics("diverged")
        good = run.load() or {}
        _write_json(run.state, {**good, "diverged": st["diverged"]})
        step.load_state_dict(load_checkpoint(run.ckpt))
        return DivergedError(f"{what} at epoch {epoch + 1}, iteration {st['iteration'] + 1}; last good checkpoint: "
                             f"{run.ckpt}", epoch + 1, st["iteration"] + 1, run.ckpt)

    info = run.load() if resume else None
    if info is not None:
        diff = {k: (info["config"].get(k), v) for k, v in config.items() if info["config"].get(k) != v}
        if diff:
            raise MicrotrainError(f"cannot resume {run.dir}: configuration changed "
                                  + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items()))
        step.load_state_dict(load_checkpoint(run.ckpt))
        _set_rng_state(info["rng"])
        st.update({k: info[k] for k in st})
        if "diverged" in info:
            st["diverged"] = info["diverged"]
            metrics("diverged")
            d = info["diverged"]
            raise DivergedError(f"{d['what']} at epoch {d['epoch']}, iteration {d['iteration']} (in an earlier "
                                f"attempt); last good checkpoint: {run.ckpt}; rerun without resume to retry",
                                d["epoch"], d["iteration"], run.ckpt)
    else:
        run.save(step, {**st, "config": config})

    log = (lambda s: tqdm.write(s, file=sys.stderr)) if progress else (lambda s: None)
    if st["epoch"]:
        log(f"resuming {run.dir} after epoch {st['epoch']}/{epochs}")
    limit = blowup_threshold(train_ds.num_classes) if stop_on_blowup else math.inf
    # the blow-up window spans epochs (and is checkpointed), and a run shorter than the window is judged on all of
    # its iterations: a few iterations per epoch must not hide a blown-up loss
    window: deque[float] = deque((info or {}).get("blowup_window", []), maxlen=BLOWUP_WINDOW)
    need = min(BLOWUP_WINDOW, total)
    for epoch in range(st["epoch"], epochs):
        loss_sum, seen, t0 = 0.0, 0, time.perf_counter()
        bar = tqdm(batches(train_ds, batch_size, shuffle=True, seed=seed, epoch=epoch, augment=augment,
                           resolution=resolution, drop_last=drop_last),
                   total=ipe, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", disable=not progress, leave=False)
        for x, y in bar:
            cur = lr_at(st["iteration"], total, warm, lr, schedule)
            loss = float(step.step(x, y, cur))
            if not math.isfinite(loss):
                bar.close()
                raise stop(epoch, f"loss became {'nan' if math.isnan(loss) else 'inf'}") from None
            window.append(loss)
            if len(window) >= need and sum(window) / len(window) > limit:
                bar.close()
                raise stop(epoch, f"loss blew up (mean {sum(window) / len(window):.3g} over the last "
                                  f"{len(window)} iterations, above {limit:.3g} = {BLOWUP_FACTOR:g}x chance)")
            loss_sum += loss * len(y)
            seen += len(y)
            st["iteration"] += 1
            if progress:  # tqdm redraws at most every 0.1 s, so this is cheap even for fast steps
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", lr=f"{cur:.3g}",
                                img_s=f"{seen / (time.perf_counter() - t0):.0f}", refresh=False)
        bar.close()
        st["train_seconds"] += time.perf_counter() - t0
        st["train_images_seen"] += seen
        state = step.state_dict()
        bad = _nonfinite(state)
        if bad:
            st["iteration"] -= 1  # report the last update of the epoch
            raise stop(epoch, f"weights became non-finite ({', '.join(bad[:3])})")
        acc = None
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
            t1 = time.perf_counter()
            acc = evaluate(step, test_ds, batch_size=eval_batch_size, resolution=resolution, eval_crop=eval_crop,
                           progress=progress)
            st["eval_seconds"] += time.perf_counter() - t1
        st["epoch"] = epoch + 1
        st["train_loss"].append(loss_sum / seen)
        st["test_accuracy_per_epoch"].append(acc)
        run.save(step, {**{k: st[k] for k in st if k != "diverged"}, "config": config,
                        "blowup_window": list(window)})
        m = metrics("completed" if epoch + 1 == epochs else "running")
        log(f"epoch {epoch + 1}/{epochs}  loss {loss_sum / seen:.4f}"
            + (f"  test acc {acc:.2%}" if acc is not None else "")
            + f"  {m['images_per_second']:.0f} img/s")
    return metrics("completed")


# ------------------------------------------------------------------------------------------------------ sweep

def sweep(make_step: Callable[[], TrainStep], lrs: Sequence[float], train_ds: ImageDataset, test_ds: ImageDataset,
          *, out_dir: str | Path, progress: bool = True, **fit_kwargs: Any) -> dict[str, Any]:
    """Runs `fit` once per learning rate, each with a fresh `make_step()` in out_dir/lr-<lr>, and writes
    out_dir/sweep.json: every lr tried with its status (completed or diverged, with where it diverged), final test
    accuracy and final train loss, then the best lr by final test accuracy (what the paper's grid search reports;
    pass a held-out split as test_ds for an unbiased choice). Raises MicrotrainError (after writing sweep.json) if
    every learning rate diverged. fit_kwargs go to `fit` (epochs, batch_size, resume, ...)."""
    if not lrs:
        raise MicrotrainError("sweep needs at least one learning rate")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    result: dict[str, Any] = {"runs": runs, "selection": "highest final test accuracy among completed runs"}
    for lr in lrs:
        sub = out / f"lr-{lr:g}"
        if progress:
            tqdm.write(f"sweep: lr {lr:g} -> {sub}", file=sys.stderr)
        try:
            m = fit(make_step(), train_ds, test_ds, lr=lr, out_dir=sub, progress=progress, **fit_kwargs)
            runs.append({"lr": lr, "status": "completed", "test_accuracy": m["test_accuracy"],
                         "final_train_loss": m["train_loss"][-1], "images_per_second": m["images_per_second"],
                         "dir": str(sub)})
        except DivergedError as e:
            runs.append({"lr": lr, "status": "diverged", "test_accuracy": None, "diverged_at_epoch": e.epoch,
                         "diverged_at_iteration": e.iteration, "message": str(e), "dir": str(sub)})
        _write_json(out / SWEEP, result)
    done = [r for r in runs if r["status"] == "completed"]
    best = max(done, key=lambda r: r["test_accuracy"], default=None)
    result.update({"best_lr": best and best["lr"], "best_test_accuracy": best and best["test_accuracy"],
                   "best_dir": best and best["dir"], "diverged_lrs": [r["lr"] for r in runs if r not in done]})
    _write_json(out / SWEEP, result)
    if best is None:
        raise MicrotrainError(f"all {len(runs)} learning rates diverged ({', '.join(f'{lr:g}' for lr in lrs)}); "
                              f"see {out / SWEEP}")
    return result
