"""The torch engine vs the device twin (the generated C): run both on one ordered stream at batch 1 and measure how far
apart they end up. Not a command of its own: the wiring of the two backends that the tests, the benchmarks and
`train --engine device` use (backends never import each other).

The torch side is `runtime.trainstep.GraphTrainStep` (the trainer's engine) on the training graph, stepping one image
at a time; the C side is whatever the twin, `run_host` or `run_qemu` produced. Integer tensors are compared element by
element (share equal, largest difference), float tensors by their largest difference relative to the tensor's
largest magnitude.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from microtrain.ir.graph import Graph
from microtrain.runtime.trainstep import GraphTrainStep


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Batch-1 steps are tiny: one thread is fastest, and immune to a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class HostRun:
    losses: list[float]
    state: dict[str, np.ndarray]
    first: dict[str, np.ndarray]  # every tensor of step `trace_step` (int8 activations, float32 logits, loss, grads)
    logits: np.ndarray | None = None  # of the held-out images after the stream


def simulate(tg: Graph, images: np.ndarray, labels: np.ndarray, lrs: np.ndarray, held_out: np.ndarray | None = None,
             state: dict[str, np.ndarray] | None = None, trace_step: int = 1) -> HostRun:
    """The host trainer at batch 1 over the stream (optionally from `state`, e.g. a checkpoint), keeping every tensor
    of step `trace_step` (1-based)."""
    with torch_threads(1), torch.no_grad():
        step = GraphTrainStep(tg)
        if state is not None:
            step.load_state_dict(state)
        losses, first = [], {}
        for i in range(len(labels)):
            x, y = torch.from_numpy(images[i:i + 1]), torch.tensor([int(labels[i])])
            if i + 1 != trace_step:
                losses.append(step.step(x, y, float(lrs[i])))
                continue
            env = step._env(x)  # the step as GraphTrainStep.step runs it, keeping its environment
            env["label"], env["lr"] = y, torch.tensor(float(lrs[i]), dtype=torch.float32)
            step.run(step.g.ops, env, train=True)
            step.step_count += 1
            losses.append(float(env["loss"]))
            first = {n: v.numpy().copy() for n, v in env.items() if isinstance(v, torch.Tensor)}
        logits = step.logits(torch.from_numpy(held_out)).numpy() if held_out is not None else None
        return HostRun(losses, step.state_dict(), first, logits)


@dataclass
class Agreement:
    int_elements: int = 0
    int_equal: int = 0
    int_max_diff: int = 0
    float_max_rel: float = 0.0
    float_elements: int = 0
    float_equal: int = 0
    per_tensor: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def int_share(self) -> float:
        return self.int_equal / max(self.int_elements, 1)

    def ok(self, share: float = 0.999, rel: float = 1e-4) -> bool:
        """The issue's tolerance: integers equal in >= 99.9% of elements and never more than 1 apart, floats within
        1e-4 relative."""
        return self.int_share >= share and self.int_max_diff <= 1 and self.float_max_rel <= rel

    def summary(self) -> dict[str, Any]:
        return {"int_elements": self.int_elements, "int_equal": self.int_equal, "int_share": self.int_share,
                "int_max_diff": self.int_max_diff, "float_elements": self.float_elements,
                "float_bit_equal": self.float_equal, "float_max_rel": self.float_max_rel}


def compare_states(c: dict[str, np.ndarray], host: dict[str, np.ndarray], names: list[str]) -> Agreement:
    a = Agreement()
    for n in names:
        x, y = np.asarray(c[n]), np.asarray(host[n])
        if x.shape != y.shape:
            raise ValueError(f"{n}: shape {x.shape} vs {y.shape}")
        if x.dtype.kind == "f":
            rel = float(np.abs(x.astype(np.float64) - y).max() / max(float(np.abs(y).max()), 1e-30)) if x.size else 0.0
            eq = int((x == y).sum())
            a.float_max_rel = max(a.float_max_rel, rel)
            a.float_elements += x.size
            a.float_equal += eq
            a.per_tensor[n] = {"max_rel": rel, "bit_equal": eq, "elements": x.size}
        else:
            d = np.abs(x.astype(np.int64) - y.astype(np.int64))
            eq = int((d == 0).sum())
            a.int_elements += x.size
            a.int_equal += eq
            a.int_max_diff = max(a.int_max_diff, int(d.max()) if d.size else 0)
            a.per_tensor[n] = {"equal": eq, "elements": x.size, "max_diff": int(d.max()) if d.size else 0}
    return a


# ---- the torch engine vs the device twin, one step at a time ---------------------------------------------------------
@dataclass(frozen=True)
class StepTolerance:
    """How far the torch engine's step may land from the device twin's, both starting from the twin's state on the
    same image (docs/semantics.md states and explains these numbers; tests/test_twin.py checks them). The int8
    forward is integer-exact either way; the float backward differs only in summation order (torch picks its own),
    which moves float32 values by a few ulps and, rarely, a stochastic-rounding or int8-gradient decision."""

    loss_rel: float = 1e-5  # |loss_c - loss_t| <= loss_rel * |loss_t|
    float_rel: float = 1e-5  # float32 state: max |c - t| <= float_rel * max |t|
    int8_share: float = 0.999  # int8 weights: this share equal, the rest 1 apart
    int32_update_rel: float = 0.02  # int32 biases: |c - t| <= 1 + int32_update_rel * max |t - before|

    @classmethod
    def for_config(cls, int8_grads: bool) -> StepTolerance:
        """With --int8-grads, a float difference that crosses an int8 gradient's rounding boundary moves that
        gradient element by one quantum, 1/127 of its channel's largest gradient, so more weights land one apart,
        and a bias (the sum of its channel's pixel gradients) moves by up to 1/127 of a one-pixel update per flip:
        where the pixel gradients cancel, a few flips are a few percent of the step's update. The int32 bound allows
        six flipped quanta (6/127 = 4.7%); measured worst: 2.8% (mcunet-5fps paper-99kb, 48 teacher-forced steps
        under each of ../shared/tools/other-cpu's settings; docs/semantics.md)."""
        return cls(int8_share=0.98, int32_update_rel=6 / 127) if int8_grads else cls()


@dataclass
class StepAgreement:
    steps: int = 0
    loss_max_rel: float = 0.0
    float_max_rel: float = 0.0
    int8_min_share: float = 1.0
    int8_max_diff: int = 0
    int32_max_excess: float = 0.0  # max over tensors and steps of (|c - t| - 1) / max |t - before|

    def within(self, tol: StepTolerance) -> bool:
        return (self.loss_max_rel <= tol.loss_rel and self.float_max_rel <= tol.float_rel
                and self.int8_min_share >= tol.int8_share and self.int8_max_diff <= 1
                and self.int32_max_excess <= tol.int32_update_rel)

    def summary(self) -> dict[str, Any]:
        return dict(self.__dict__)


def teacher_forced(twin: Any, engine: GraphTrainStep, images: np.ndarray, labels: np.ndarray,
                   lrs: np.ndarray) -> StepAgreement:
    """Step the twin through the stream; before each step, load the twin's state into the torch engine and step it
    on the same image: the per-step distance, free of the drift that any two float orders accumulate over a stream
    (one flipped stochastic rounding and the trajectories part)."""
    a = StepAgreement()
    with torch_threads(1), torch.no_grad():
        for i in range(len(labels)):
            before = twin.state_dict()
            engine.load_state_dict(before)
            lt = engine.step(torch.from_numpy(images[i:i + 1]), torch.tensor([int(labels[i])]), float(lrs[i]))
            lc = twin.step(images[i:i + 1], labels[i:i + 1], float(lrs[i]))
            c, t = twin.state_dict(), engine.state_dict()
            a.steps += 1
            a.loss_max_rel = max(a.loss_max_rel, abs(lc - lt) / max(abs(lt), 1e-30))
            per = compare_states(c, t, [s["name"] for s in twin.program["state"]]).per_tensor
            for n, d in per.items():
                if "max_rel" in d:
                    a.float_max_rel = max(a.float_max_rel, d["max_rel"])
                elif c[n].dtype == np.int8:
                    a.int8_min_share = min(a.int8_min_share, d["equal"] / d["elements"] if d["elements"] else 1.0)
                    a.int8_max_diff = max(a.int8_max_diff, d["max_diff"])
                else:
                    update = max(int(np.abs(t[n].astype(np.int64) - before[n]).max()), 1)
                    a.int32_max_excess = max(a.int32_max_excess, (d["max_diff"] - 1) / update)
    return a
