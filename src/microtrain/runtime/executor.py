"""Batched, integer-exact execution of a forward graph on torch CPU."""

from __future__ import annotations

import numpy as np
import torch

from microtrain.ir.graph import Graph, Op
from microtrain.runtime import kernels as K


def add_ratios(a_scale: float, b_scale: float, y_scale: float) -> tuple[float, float]:
    """float32 multipliers of the int8 add (a.scale / y.scale, b.scale / y.scale)."""
    return float(np.float32(a_scale / y_scale)), float(np.float32(b_scale / y_scale))


class Executor:
    """Runs `graph` on a batch of int8 inputs. Weights are read from the graph at construction; call
    `refresh()` after changing them."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.refresh()

    def refresh(self) -> None:
        g = self.graph
        self.consts = {n: torch.from_numpy(np.ascontiguousarray(t.data)) for n, t in g.tensors.items()
                       if t.data is not None}
        self.mult: dict[str, torch.Tensor] = {}
        for op in g.ops:
            if op.kind in ("conv2d", "linear"):
                x, w, _ = (g.tensors[n] for n in op.inputs)
                y = g.tensors[op.outputs[0]]
                if w.dtype == "int8":
                    self.mult[op.name] = K.requant_multiplier(x.scale, w.scale, y.scale)

    def run_op(self, op: Op, env: dict[str, torch.Tensor]) -> torch.Tensor:
        g = self.graph
        ins = [env[n] if n in env else self.consts[n] for n in op.inputs]
        ts = [g.tensors[n] for n in op.inputs]
        y = g.tensors[op.outputs[0]]
        if op.kind == "conv2d":
            a = op.attrs
            return K.conv2d_int8(ins[0], ts[0].zero, ins[1], ins[2], self.mult[op.name], y.zero,
                                 a["stride"], a["padding"], a["groups"])
        if op.kind == "add":
            ra, rb = add_ratios(ts[0].scale, ts[1].scale, y.scale)
            return K.add_int8(ins[0], ts[0].zero, ra, ins[1], ts[1].zero, rb, y.zero)
        if op.kind == "avgpool":
            return K.avgpool_int8(ins[0])
        if op.kind == "linear":
            if ts[1].dtype == "int8":
                return K.linear_int8(ins[0], ts[0].zero, ins[1], ins[2], self.mult[op.name], y.zero)
            feats = (ins[0].to(torch.float32) - ts[0].zero) * float(ts[0].scale)
            return feats @ ins[1].t() + ins[2]
        raise NotImplementedError(f"executor has no kernel for op {op.kind!r}")

    @torch.no_grad()
    def run(self, x: torch.Tensor | np.ndarray, keep_all: bool = False) -> dict[str, torch.Tensor]:
        """x: [N, C, H, W] int8. Returns the graph outputs (and every intermediate with keep_all)."""
        x = torch.as_tensor(x)
        if x.dtype != torch.int8:
            raise TypeError(f"input must be int8, got {x.dtype}")
        env = {self.graph.inputs[0]: x}
        for op in self.graph.ops:
            env[op.outputs[0]] = self.run_op(op, env)
        if keep_all:
            return env
        return {n: env[n] for n in self.graph.outputs}

    def logits(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Dequantized float logits of the first graph output."""
        out = self.graph.outputs[0]
        y = self.run(x)[out]
        t = self.graph.tensors[out]
        if t.dtype == "int8":
            return (y.to(torch.float32) - t.zero) * float(t.scale)
        return y
