"""Batched, integer-exact execution of a forward graph on torch CPU."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from microtrain.compiler.patch import PatchStage, Region, needed_region
from microtrain.ir.graph import Graph, Op
from microtrain.ir.ops import conv_pads
from microtrain.ir.quant import Requant, add_fixed_point, add_ratios, mean_fixed_point
from microtrain.runtime import kernels as K
from microtrain.runtime import pool_kernels as PK


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
        self.fx: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the TFLite rule's (q, shift) per conv / linear
        self.tflite = g.requant == Requant.TFLITE
        for op in g.ops:
            if op.kind in ("conv2d", "linear"):
                x, w, _ = (g.tensors[n] for n in op.inputs)
                y = g.tensors[op.outputs[0]]
                if w.dtype == "int8":
                    self.mult[op.name] = K.requant_multiplier(x.scale, w.scale, y.scale)
                    if self.tflite:
                        self.fx[op.name] = K.fixed_point(x.scale, w.scale, y.scale)

    def _requant(self, op: Op, acc: torch.Tensor, b: torch.Tensor, y_zero: int) -> torch.Tensor:
        if self.tflite:
            act = (op.attrs.get("act_min", -128), op.attrs.get("act_max", 127))
            return K.clamp_act(K.requantize_fx(acc, b, *self.fx[op.name], y_zero), act)
        return K.requantize(acc, b, self.mult[op.name], y_zero)

    def run_op(self, op: Op, env: dict[str, torch.Tensor]) -> torch.Tensor:
        g = self.graph
        ins = [env[n] if n in env else self.consts[n] for n in op.inputs]
        ts = [g.tensors[n] for n in op.inputs]
        y = g.tensors[op.outputs[0]]
        act = (op.attrs.get("act_min", -128), op.attrs.get("act_max", 127))
        if op.kind == "conv2d":
            a = op.attrs
            acc = K.conv_acc(ins[0], ts[0].zero, ins[1], a["stride"], conv_pads(a), a["groups"])
            return self._requant(op, acc, ins[2], y.zero)
        if op.kind == "add":
            if self.tflite:
                params = add_fixed_point(ts[0].scale, ts[1].scale, y.scale)
                return K.clamp_act(K.add_tflite_pre(ins[0], ts[0].zero, ins[1], ts[1].zero, params, y.zero), act)
            ra, rb = add_ratios(ts[0].scale, ts[1].scale, y.scale)
            return K.add_int8(ins[0], ts[0].zero, ra, ins[1], ts[1].zero, rb, y.zero)
        if op.kind == "avgpool":
            if self.tflite and op.attrs.get("mean"):
                params = mean_fixed_point(ts[0].scale, y.scale, ins[0].shape[2] * ins[0].shape[3])
                return K.mean_tflite(ins[0], ts[0].zero, y.zero, params, act)
            return K.avgpool_tflite(ins[0], act) if self.tflite else K.avgpool_int8(ins[0])
        if op.kind == "maxpool2d":
            return PK.maxpool2d(ins[0], op.attrs)
        if op.kind == "avgpool2d":
            return PK.avgpool2d(ins[0], op.attrs, self.tflite)
        if op.kind == "reshape":
            return ins[0].reshape(ins[0].shape[0], *y.shape)
        if op.kind == "flatten":  # TFLite's NHWC flatten order
            return ins[0].permute(0, 2, 3, 1).reshape(ins[0].shape[0], *y.shape).contiguous()
        if op.kind == "linear":
            if ts[1].dtype == "int8":
                acc = K.conv_acc(ins[0][:, :, None, None], ts[0].zero, ins[1][:, :, None, None], 1, 0, 1)[:, :, 0, 0]
                return self._requant(op, acc, ins[2], y.zero)
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


@torch.no_grad()
def run_stage_tiled(g: Graph, stage: PatchStage, x: torch.Tensor) -> torch.Tensor:
    """Execute the stage tile by tile with the integer kernels (the C runtime's algorithm, on the host).
    Used to prove bit-identity with whole-tensor execution."""
    ex = Executor(g)
    yt = g.tensors[stage.output]
    out = torch.zeros((x.shape[0], *yt.shape), dtype=torch.int8)
    for regions in stage.tiles:
        env: dict[str, torch.Tensor] = {g.inputs[0]: x}
        origin: dict[str, Region] = {g.inputs[0]: (0, x.shape[2], 0, x.shape[3])}
        for name in stage.ops:
            op = g.op(name)
            want = regions.get(op.outputs[0])
            if want is None:
                continue
            y = g.tensors[op.outputs[0]]
            if op.kind == "conv2d":
                xt = g.tensors[op.inputs[0]]
                need = needed_region(op, g, want)
                src, (o0, _, p0, _) = env[op.inputs[0]], origin[op.inputs[0]]
                # crop what exists, pad the rest with the zero point (real zero): border handling of the conv
                lo_r, lo_c = max(need[0], 0), max(need[2], 0)
                hi_r, hi_c = min(need[1], xt.shape[1]), min(need[3], xt.shape[2])
                crop = src[:, :, lo_r - o0:hi_r - o0, lo_c - p0:hi_c - p0]
                pad = (lo_c - need[2], need[3] - hi_c, lo_r - need[0], need[1] - hi_r)
                crop = F.pad(crop.to(torch.int16), pad, value=xt.zero).to(torch.int8)
                a = op.attrs
                acc = K.conv_acc(crop, xt.zero, ex.consts[op.inputs[1]], a["stride"], 0, a["groups"])
                env[op.outputs[0]] = ex._requant(op, acc, ex.consts[op.inputs[2]], y.zero)
            elif op.kind == "add":
                parts = []
                for n in op.inputs:
                    (o0, _, p0, _) = origin[n]
                    parts.append(env[n][:, :, want[0] - o0:want[1] - o0, want[2] - p0:want[3] - p0])
                env[op.outputs[0]] = ex.run_op(op, dict(zip(op.inputs, parts, strict=True)))
            else:
                raise NotImplementedError(f"{op.kind} inside a patch stage")
            origin[op.outputs[0]] = want
        r0, r1, c0, c1 = regions[stage.output]
        out[:, :, r0:r1, c0:c1] = env[stage.output]
    return out
