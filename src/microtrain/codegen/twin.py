"""The device twin: the generated C training step, built for this machine and driven from Python.

It is the very C that runs on the Cortex-M (same `model.c`, same kernels, same `mt_math.c` exp/log, IEEE float32
with no contraction), compiled as a shared library (`make twin` in a host project) and called through ctypes, one
image at a time: its state after any stream of (image, label, lr) is bit-identical to the device's, on any machine
(tests/test_twin.py checks it against QEMU). It implements the trainer's `TrainStep` protocol, so `fit` (epochs,
learning-rate schedule, checkpoints, resume, divergence stop) drives it unchanged: `microtrain train --engine device`.

A batch of N images is N consecutive device steps at the same learning rate (the device trains batch 1); the
returned loss is their mean.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from microtrain.codegen.project import build, emit_project, load_program, state_from_bytes, state_to_bytes, toolchain
from microtrain.codegen.statefile import CStore, MemoryStore, payload_bytes
from microtrain.compiler.planner import Plan
from microtrain.errors import MicrotrainError
from microtrain.ir.graph import Graph

_IO = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32)


class DeviceTwin:
    """The C training step of `tg` planned as `plan`, emitted into `out_dir` (a host project) and loaded.
    `state`: a state_dict to start from (e.g. a checkpoint); default the graph's initial state."""

    def __init__(self, tg: Graph, plan: Plan, out_dir: str | Path, state: dict[str, np.ndarray] | None = None):
        missing = toolchain("host")
        if missing:
            raise MicrotrainError(f"{missing} is not installed (see the README's set-up command)")
        self.dir = Path(out_dir)
        emit_project(tg, plan, self.dir, "host", state=state)
        lib = build(self.dir, "twin")
        self.program: dict[str, Any] = load_program(self.dir)
        if self.program["stream_input"]:
            raise MicrotrainError("the device twin takes whole images: plan without --stream-input")
        # every instance gets its own copy of the library, hence its own static arena and state
        fd, private = tempfile.mkstemp(prefix=".twin-", suffix=".so", dir=self.dir)
        os.close(fd)
        shutil.copyfile(lib, private)
        try:
            self.lib = ctypes.CDLL(private)
        finally:
            os.unlink(private)  # the mapping stays valid
        self.lib.train_step.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_float]
        self.lib.train_step.restype = ctypes.c_float
        self.lib.predict.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.lib.predict.restype = ctypes.c_int
        self.lib.trained_steps.restype = ctypes.c_uint32
        for fn in (self.lib.save_state, self.lib.load_state):  # through an in-memory two-slot store (mt_state.h)
            fn.argtypes = [ctypes.POINTER(CStore)]
            fn.restype = ctypes.c_int
        self.image_shape = tuple(self.program["image_shape"])
        self.num_classes = int(self.program["num_classes"])

    def _images(self, x: Any) -> np.ndarray:
        images = np.ascontiguousarray(np.asarray(x, dtype=np.int8))
        if images.shape[1:] != self.image_shape:
            raise MicrotrainError(f"the device twin takes images of shape {self.image_shape}, got {images.shape[1:]}")
        return images

    def step(self, x: Any, y: Any, lr: float) -> float:
        """N device steps, one per image, at learning rate `lr` (rounded to float32 as the device reads it)."""
        images, labels = self._images(x), np.asarray(y, np.int64).reshape(-1)
        losses = [float(self.lib.train_step(images[i].ctypes.data, int(labels[i]), lr)) for i in range(len(labels))]
        return float(np.mean(losses))

    def logits(self, x: Any) -> torch.Tensor:
        images = self._images(x)
        out = np.zeros((len(images), self.num_classes), np.float32)
        for i in range(len(images)):
            self.lib.predict(images[i].ctypes.data, out[i].ctypes.data)
        return torch.from_numpy(out)

    def state_bytes(self) -> bytes:
        """What `save_state` writes into a new file (the harness's `-o state.bin`)."""
        store = MemoryStore(payload_bytes(self.program))
        if self.lib.save_state(ctypes.byref(store.c)):
            raise MicrotrainError("the device twin could not save its state")
        return store.image()

    def load_state_bytes(self, raw: bytes) -> None:
        """A state file's bytes: the newest valid slot, or an error and the state as it was."""
        store = MemoryStore(payload_bytes(self.program), raw)
        if self.lib.load_state(ctypes.byref(store.c)):
            raise MicrotrainError("the device twin rejected the state (no valid slot of this program's layout)")

    def state_dict(self) -> dict[str, np.ndarray]:
        return state_from_bytes(self.state_bytes(), self.program, "device twin")

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.load_state_bytes(state_to_bytes(state, self.program))

    @property
    def step_count(self) -> int:
        return int(self.lib.trained_steps())
