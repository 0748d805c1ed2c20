"""`--lr auto`: pick the learning rate of a run with short trial runs on a validation slice of the training data.

Why: the best rate differs by setting by an order of magnitude or more (CIFAR-10, mcunet-5fps `last:6`, batch 64,
`benchmarks/cifar10_transfer.py`: fp32 0.01-0.02, int8 + QAS 0.03, int8 without QAS 0.1 on a flat 0.01-10 plateau),
so one default rate makes QAS look worse than no QAS and fp32 blow up. The paper grid-searches the rate per setting.

How (cheap and never touching the test split):
- a class-balanced validation slice is carved from the *training* images (`VAL_FRACTION`, capped); the candidates
  train on a disjoint slice of the remaining training images, one pass, about `BUDGET_FRACTION` of the run's image
  steps each; the final run then trains on the whole training set with the chosen rate;
- every candidate starts from the same initial state, sees the same batches in the same order, warms up over the
  run's own warm-up steps (at most half the trial) and then decays as the run does, so the candidates differ only in
  the rate. The warm-up is not compressed with the rest: a run that diverges does so in its first steps, and a 2-step
  warm-up made the 24-step trials bimodal near the edge of stability (CIFAR-10 mcunet-5fps `last:6` int8 + QAS, seed
  1, batch 64: lr 0.03 scored 57.4% and 40.4% on two batch orders; kept at 24 steps, 57.8% and 57.0% over 47-step
  trials);
- the frozen prefix is cached per image (flip / no augmentation during selection), so a candidate costs only the
  trainable part of the network; the cache is shared with the run when the run caches too;
- a candidate whose loss becomes non-finite or blows up (the trainer's rule: windowed mean above 10x chance), or
  whose validation loss does, is diverged and excluded;
- score: validation accuracy; candidates within one binomial standard error of the best are ties, decided by the
  lower validation loss (continuous, so less sampling noise than accuracy on a few hundred images);
- the grid (`base_grid`) is a prior from measured sweeps, by precision, QAS, optimizer and batch size; when the
  winner sits at an end of the grid and its neighbour beyond was not diverged-out, the grid is extended one step in
  that direction (at most `MAX_EXTEND` times), so a setting outside the prior still finds its rate; then one
  refinement round tries the geometric midpoint between the winner and its better completed neighbour (`refine`);
- the two best candidates train once more on a second batch order and are scored by their mean (`confirm`), and a
  rate that diverges on either order is out: near the edge of stability one trial is noisy (seed 2, one order:
  0.03 48.2% against 0.0173 53.8%, yet over the whole run 0.03 reached 64.5% and 0.0173 63.7%).
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from microtrain.data.datasets import ImageDataset, balanced_indices, batches
from microtrain.errors import MicrotrainError
from microtrain.runtime.trainer import BLOWUP_WINDOW, TrainStep, blowup_threshold, lr_at

AUTO = "auto"
VAL_FRACTION, VAL_MAX = 0.1, 1000  # validation slice: 10% of the training images, at most 1000
# Training images one candidate sees, as a fraction of the run's image steps. 0.1 at batch 16 is 94 steps (CIFAR-10,
# 5,000 images, 3 epochs); against 0.2 it chose the same rate in 7 of 8 default runs (seeds 0-2, QAS / no-QAS; fp32,
# paper-99kb; no-QAS seed 2: 0.05 for 0.158, 63.5 against 64.0%) and halved the selection's share of the run to
# 9-17% of wall time.
BUDGET_FRACTION = 0.1
MIN_STEPS = 8  # a candidate takes at least this many steps (the slice allowing)
MAX_EXTEND = 2  # grid steps added beyond the prior when the winner sits at its end

# Priors at batch 64, SGD without momentum: (rates, ratio between neighbours).
# int8 + QAS: 0.03 best, 0.1 blows up, 0.01 ~3 points worse; fp32 (QAS-scaled gradients, no int8 saturation):
# 0.01-0.02 best, 0.03 blows up; without QAS the gradients of int8 weights are s_w^2 smaller, best 0.1 on a flat
# plateau 0.01..10 (benchmarks/results/cifar10_transfer.json).
_SGD_PRIORS: dict[tuple[str, bool], tuple[tuple[float, ...], float]] = {
    ("int8", True): ((0.01, 0.03, 0.1), 3.0),
    ("fp32", True): ((0.003, 0.01, 0.03), 3.0),
    ("int8", False): ((0.01, 0.1, 1.0), 10.0),
    ("fp32", False): ((0.01, 0.1, 1.0), 10.0),
}
# Adam's step is lr (in the parameter's stored units: int8 steps for int8 weights) whatever the gradient's scale, so
# neither QAS nor precision moves its rate; no measured sweep yet: a wide grid that the extension can leave.
_ADAM_PRIOR = ((0.001, 0.01, 0.1), 10.0)


def parse_lr(text: str) -> float | str:
    """argparse type of `--lr`: 'auto' or a finite positive number."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        v = float(text)
    except ValueError:
        raise MicrotrainError(f"--lr must be 'auto' or a number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise MicrotrainError(f"--lr must be a finite number > 0, got {v}")
    return v


def base_grid(precision: str, qas: bool, optimizer: str, batch_size: int) -> tuple[list[float], float]:
    """The prior grid and its neighbour ratio for a setting. Momentum 0.9 multiplies SGD's effective step by ~10, so
    sgd-m's grid is SGD's / 10; rates scale with sqrt(batch / 64) (the noise scale of the gradient estimate)."""
    if optimizer == "adam":
        rates, ratio = _ADAM_PRIOR
        return list(rates), ratio
    rates, ratio = _SGD_PRIORS[(precision, qas)]
    scale = 0.1 if optimizer == "sgd-m" else 1.0
    return [scale_rate(r * scale, 64, batch_size) for r in rates], ratio


def scale_rate(lr: float, from_batch: int, to_batch: int) -> float:
    """A rate moved between batch sizes by sqrt(to / from). Measured on CIFAR-10 mcunet-5fps paper-99kb: 0.03 best at
    batch 64, 0.002 good at batch 1 (benchmarks/results/twin_accuracy.json); the rule gives 0.0037 - same order."""
    return float(f"{lr * math.sqrt(to_batch / from_batch):.3g}")


@dataclass
class Slices:
    """The selection's data: `fit` (candidates train on it) and `val` (they are scored on it), disjoint, both from
    the training split."""

    fit: ImageDataset
    val: ImageDataset


def carve(train_ds: ImageDataset, steps_budget: int, seed: int) -> Slices:
    """A class-balanced validation slice (10% of the training images, at most 1000, at least one per class) and a
    disjoint class-balanced fit slice of up to `steps_budget` images from the rest."""
    n = len(train_ds)
    n_val = min(VAL_MAX, max(train_ds.num_classes, round(VAL_FRACTION * n)))
    if n - n_val < 1:
        raise MicrotrainError(f"--lr auto needs more training images than classes to carve a validation slice "
                              f"({n} images, {train_ds.num_classes} classes); pass --lr")
    val_idx = balanced_indices(train_ds.labels, n_val, train_ds.num_classes, seed + 7919)
    rest = np.setdiff1d(np.arange(n), val_idx)
    fit_idx = rest[balanced_indices(train_ds.labels[rest], min(len(rest), steps_budget), train_ds.num_classes,
                                    seed + 104729)]
    return Slices(train_ds.take(fit_idx), train_ds.take(val_idx))


def _evaluate(step: TrainStep, ds: ImageDataset, batch_size: int, resolution: int, eval_crop: float
              ) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `step` on `ds` with the evaluation transform."""
    correct, loss = 0, 0.0
    with torch.no_grad():
        for x, y in batches(ds, batch_size, resolution=resolution, eval_crop=eval_crop):
            z = step.logits(x).float()
            correct += int((z.argmax(dim=1) == y).sum())
            loss += float(F.cross_entropy(z, y, reduction="sum"))
    return correct / len(ds), loss / len(ds)


def _trial(make_step: Callable[[], TrainStep], lr: float, sl: Slices, *, batch_size: int, steps: int,
           run_warmup: int, schedule: str, augment: str, resolution: int, eval_crop: float, seed: int
           ) -> dict[str, Any]:
    """One candidate: `steps` updates on the fit slice, warming up over the run's warm-up steps (at most half the
    trial) and then decaying as the run does, then scored on the validation slice."""
    step = make_step()
    limit = blowup_threshold(sl.fit.num_classes)
    window: deque[float] = deque(maxlen=BLOWUP_WINDOW)
    need = min(BLOWUP_WINDOW, steps)
    losses: list[float] = []
    t0 = time.perf_counter()
    it, epoch = 0, 0
    while it < steps:
        for x, y in batches(sl.fit, batch_size, shuffle=True, seed=seed, epoch=epoch, augment=augment,
                            resolution=resolution):
            cur = lr_at(it, steps, min(run_warmup, steps // 2), lr, schedule)
            loss = float(step.step(x, y, cur))
            if not math.isfinite(loss):
                return {"lr": lr, "status": "diverged", "why": f"loss became {loss} at step {it + 1}",
                        "seconds": round(time.perf_counter() - t0, 3)}
            window.append(loss)
            losses.append(loss)
            if len(window) >= need and sum(window) / len(window) > limit:
                return {"lr": lr, "status": "diverged", "why": f"loss blew up (mean {sum(window) / len(window):.3g} "
                        f"over {len(window)} steps, above {limit:.3g}) at step {it + 1}",
                        "seconds": round(time.perf_counter() - t0, 3)}
            it += 1
            if it >= steps:
                break
        epoch += 1
    acc, vloss = _evaluate(step, sl.val, max(batch_size, 64), resolution, eval_crop)
    r = {"lr": lr, "status": "completed", "val_accuracy": acc, "val_loss": round(vloss, 5) if math.isfinite(vloss)
         else None, "final_train_loss": round(float(np.mean(losses[-max(1, steps // 4):])), 5),
         "seconds": round(time.perf_counter() - t0, 3)}
    if not math.isfinite(vloss) or vloss > limit:
        r.update(status="diverged", why=f"validation loss {vloss:.3g} above {limit:.3g}")
    return r


def _best(results: Sequence[dict[str, Any]], n_val: int) -> dict[str, Any] | None:
    """Highest validation accuracy; among the candidates within one binomial standard error of it, the lowest
    validation loss (then the smaller rate). Accuracy on a few hundred images cannot separate rates a factor of 2
    apart (one standard error is ~2 points on 500); the loss, a continuous score, usually can."""
    done = [r for r in results if r["status"] == "completed"]
    if not done:
        return None
    top = max(r["val_accuracy"] for r in done)
    se = math.sqrt(max(top * (1 - top), 0.25 / n_val) / n_val)
    tied = [r for r in done if r["val_accuracy"] >= top - se]
    return min(tied, key=lambda r: (r["val_loss"] if r["val_loss"] is not None else math.inf, r["lr"]))


def refine(results: dict[float, dict[str, Any]], run: Callable[[float], None], n_val: int) -> list[float]:
    """One refinement round: the geometric midpoint between the winner and its better completed neighbour, so every
    setting's rate is resolved to a factor of about sqrt(3) (the priors' grids are 3x or 10x apart, and a 10x grid
    can miss a rate by 3x), for one more trial. The better neighbour is the side the optimum leans to; a neighbour
    that diverged is never the side: the trial is ~10x shorter than the run, and a rate within 2x of one that blew
    up in it is the kind that blows up later in a long run. Returns the rates tried."""
    best = _best(list(results.values()), n_val)
    if best is None:
        return []
    ordered = sorted(results)
    i = ordered.index(best["lr"])
    sides = [ordered[j] for j in (i - 1, i + 1)
             if 0 <= j < len(ordered) and results[ordered[j]]["status"] == "completed"]
    if not sides:
        return []
    side = max(sides, key=lambda lr: (results[lr]["val_accuracy"], -results[lr]["val_loss"]))
    mid = float(f"{math.sqrt(best['lr'] * side):.3g}")
    run(mid)
    return [mid]


def confirm(results: dict[float, dict[str, Any]], again: Callable[[float], dict[str, Any]]) -> list[float]:
    """The two best completed candidates (by validation accuracy) train again on a second batch order (`again`);
    each keeps both scores (`orders`) and is scored by their mean; one that diverges on the second order is
    diverged. Halves the trial-to-trial variance where it decides the choice, for two more trials. Returns the
    rates confirmed."""
    done = sorted((r for r in results.values() if r["status"] == "completed"), key=lambda r: -r["val_accuracy"])
    if len(done) < 2:
        return []
    for r in done[:2]:
        second = again(r["lr"])
        r["orders"] = [{k: r[k] for k in ("val_accuracy", "val_loss", "final_train_loss", "seconds")},
                       {k: second.get(k) for k in ("status", "why", "val_accuracy", "val_loss", "final_train_loss",
                                                   "seconds") if k in second}]
        r["seconds"] = round(r["seconds"] + second["seconds"], 3)
        if second["status"] != "completed":
            r.update(status="diverged", why=f"second batch order: {second['why']}")
            continue
        for k in ("val_accuracy", "val_loss", "final_train_loss"):
            a, b = r["orders"][0][k], second[k]
            r[k] = None if a is None or b is None else round((a + b) / 2, 5)
    return [r["lr"] for r in done[:2]]


def select_lr(make_step: Callable[[], TrainStep], train_ds: ImageDataset, *, grid: Sequence[float], ratio: float,
              epochs: int, batch_size: int, warmup_epochs: float, schedule: str = "cosine", augment: str = "flip",
              resolution: int = 128, eval_crop: float = 1.0, seed: int = 0, progress: bool = True,
              budget_fraction: float = BUDGET_FRACTION) -> dict[str, Any]:
    """Chooses the learning rate of a run of `epochs` over `train_ds` (see the module docstring). `make_step` builds
    a fresh step from the run's initial state each call (share a prefix cache between them). Returns the record
    written to metrics.json: chosen lr, every candidate with its scores, slices, steps and seconds."""
    t0, c0 = time.perf_counter(), time.process_time()
    run_images = epochs * len(train_ds)
    # a short run's candidates see at least MIN_STEPS batches, but never more images than the run itself
    per_candidate = max(math.ceil(budget_fraction * run_images), min(MIN_STEPS * batch_size, run_images))
    sl = carve(train_ds, per_candidate, seed)
    steps = math.ceil(per_candidate / batch_size)  # more than one pass when the fit slice is small
    ipe = math.ceil(len(train_ds) / batch_size)
    run_warm = round(warmup_epochs * ipe)
    sel_augment = "none" if augment == "none" else "flip"  # cacheable: the frozen prefix is computed once per image
    kw = dict(batch_size=batch_size, steps=steps, run_warmup=run_warm, schedule=schedule,
              augment=sel_augment, resolution=resolution, eval_crop=eval_crop, seed=seed)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    log(f"lr auto: {len(grid)} candidates ({', '.join(f'{v:g}' for v in grid)}), {steps} steps of {batch_size} on "
        f"{len(sl.fit)} training images each, scored on {len(sl.val)} validation images carved from the training "
        f"split")
    results: dict[float, dict[str, Any]] = {}

    def run(lr: float) -> None:
        lr = float(f"{lr:.3g}")
        if lr in results:
            return
        r = _trial(make_step, lr, sl, **kw)
        results[lr] = r
        score = (f"val acc {r['val_accuracy']:.2%}, val loss {r['val_loss']:.4f}" if r["status"] == "completed"
                 else f"diverged: {r['why']}")
        log(f"lr auto: lr {lr:g}: {score} ({r['seconds']:.1f}s)")

    for lr in grid:
        run(lr)
    extended = 0
    while extended < MAX_EXTEND:
        ordered = sorted(results)
        best = _best(list(results.values()), len(sl.val))
        if best is None:  # everything diverged: step below the grid
            nxt = ordered[0] / ratio
        elif best["lr"] == ordered[-1]:
            nxt = ordered[-1] * ratio
        elif best["lr"] == ordered[0]:
            nxt = ordered[0] / ratio
        else:
            break
        extended += 1
        run(nxt)
    refined = refine(results, run, len(sl.val))

    def again(lr: float) -> dict[str, Any]:
        r = _trial(make_step, lr, sl, **{**kw, "seed": seed + 1})
        score = (f"val acc {r['val_accuracy']:.2%}" if r["status"] == "completed" else f"diverged: {r['why']}")
        log(f"lr auto: lr {lr:g}, second batch order: {score} ({r['seconds']:.1f}s)")
        return r

    confirmed = confirm(results, again)
    candidates = [results[k] for k in sorted(results)]
    best = _best(candidates, len(sl.val))
    seconds = time.perf_counter() - t0
    if best is None:
        raise MicrotrainError(f"--lr auto: every candidate diverged ({', '.join(f'{v:g}' for v in sorted(results))});"
                              f" pass --lr")
    log(f"lr auto: chose lr {best['lr']:g} (val acc {best['val_accuracy']:.2%}) in {seconds:.1f}s")
    return {"lr": best["lr"], "mode": AUTO, "grid": list(grid), "ratio": ratio, "extended": extended,
            "refined": refined, "confirmed": confirmed,
            "candidates": candidates, "validation_images": len(sl.val), "fit_images": len(sl.fit),
            "steps_per_candidate": steps, "batch_size": batch_size, "augment": sel_augment,
            "split": "train (validation slice carved from the training images; the test split is not read)",
            "rule": "highest validation accuracy (the two best: mean over two batch orders); within one standard "
                    "error of it, the lowest validation loss",
            "seconds": round(seconds, 3), "cpu_seconds": round(time.process_time() - c0, 3)}
