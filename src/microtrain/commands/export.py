"""`microtrain export`: a trained run as a `.tflite` model (the fine-tuned int8 backbone and the new head).

The run's forward graph gets its trained state (trainable slices joined to their frozen rest, trained biases). By
default the head is written as the device holds it: a DEQUANTIZE of the int8 pooled features, then a float32
FULLY_CONNECTED with the run's float32 weights [K, C] and bias [K] (the `linear` op of ir/ops.py), so the file's
output is float32 logits and its top-1 is the run's (`microtrain eval`'s) up to float summation order. With
--int8-head the float32 head becomes an int8 FULLY_CONNECTED instead (for int8-only deployments): per-class weight
scales max|w| / 127, int32 biases in units of pooled.scale * w.scale, and an output scale calibrated on --calib test
images (the largest |logit| / 127); its rounding can change a few predictions. Under the TFLite rule (a model
imported from .tflite) the backbone computes exactly what the run computes; a zoo model's backbone changes rounding
rule (ir/ops.py). The command re-imports the written file, runs it with microtrain's executor on --calib test images
and reports how often its top-1 equals the run's (the float32 head) and the largest logit difference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from microtrain.codegen.project import read_state
from microtrain.commands.train import GRAPH, device_twin
from microtrain.data.datasets import batches, open_dataset
from microtrain.errors import MicrotrainError
from microtrain.frontends.tflite_write import graph_to_tflite
from microtrain.ir.graph import Graph, Op, Tensor
from microtrain.ir.trainmeta import head as head_params
from microtrain.ir.trainmeta import params as param_roles
from microtrain.runtime.executor import Executor
from microtrain.runtime.rundir import load_run_checkpoint, read_metrics
from microtrain.runtime.trainstep import GraphTrainStep


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a trained run as a .tflite model (int8 backbone, float32 head)",
                       description="The run's fine-tuned int8 weights and new head as a TensorFlow Lite model. The "
                                   "head is written as the device holds it: DEQUANTIZE of the int8 features, then a "
                                   "float32 FULLY_CONNECTED (float32 logits out), so LiteRT / TFLite Micro predict "
                                   "what `microtrain eval` does. --int8-head writes an int8 head instead.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("-o", "--out", required=True, help="the .tflite file to write")
    p.add_argument("--int8-head", action="store_true",
                   help="quantize the float32 head to an int8 FULLY_CONNECTED (per-class weight scales, int8 "
                        "logits calibrated on --calib test images) for int8-only deployments; its rounding can "
                        "change a few predictions against the run's")
    p.add_argument("--calib", type=int, default=200,
                   help="test images for the agreement check (and, with --int8-head, the logits' scale)")
    p.add_argument("--state", metavar="STATE_BIN",
                   help="export a device's saved state (the state.bin of `compile --run` or of a board running the "
                        "generated C) instead of the run's last checkpoint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def forward_graph(tg: Graph, state: dict[str, np.ndarray]) -> Graph:
    """The forward int8 graph of training graph `tg` with `state` applied, ending in an int8 classifier."""
    roles = param_roles(tg)

    def value(name: str) -> np.ndarray:
        a = state.get(name, tg.tensors[name].data)
        if tg.tensors[name].dtype == "float32" and name in roles and roles[name].kind == "weight_slice":
            # --update-storage fp32: the float shadow of a trainable slice
            a = np.clip(np.round(a), -128, 127)
        return np.asarray(a)

    g = Graph(name=tg.name.split(":")[0], inputs=tg.inputs[:1], meta={k: v for k, v in tg.meta.items()
                                                                      if k == "requant"})
    g.add_tensor(Tensor(**{**tg.tensors[tg.inputs[0]].__dict__}))
    pooled = tg.meta["train"]["pooled"]
    for op in tg.ops:
        if op.attrs.get("phase") != "forward" or op.kind in ("slice_channels", "linear"):
            continue
        if op.kind not in ("conv2d", "add", "avgpool", "maxpool2d", "avgpool2d", "reshape", "flatten"):
            raise MicrotrainError(f"{op.name}: op {op.kind} has no export")
        y = tg.tensors[op.outputs[0]]
        g.add_tensor(Tensor(y.name, y.shape, y.dtype, "act", y.scale, y.zero))
        attrs = {k: v for k, v in op.attrs.items() if k not in ("phase", "train_channels", "split_axis")}
        inputs = list(op.inputs)
        if op.kind == "conv2d":
            parts = op.inputs[1:-1]
            w = np.concatenate([value(n).astype(np.int8) for n in parts], axis=op.attrs.get("split_axis", 0))
            wt, bt = tg.tensors[parts[0]], tg.tensors[op.inputs[-1]]
            g.add_tensor(Tensor(f"{op.name}.weight", w.shape, "int8", "weight", np.asarray(wt.scale, np.float32), 0,
                                w))
            g.add_tensor(Tensor(f"{op.name}.bias", bt.shape, "int32", "bias", None, 0,
                                value(bt.name).astype(np.int32)))
            inputs = [op.inputs[0], f"{op.name}.weight", f"{op.name}.bias"]
        g.add_op(Op(op.name, op.kind, inputs, [op.outputs[0]], attrs))
    if g.ops[-1].outputs[0] != pooled:
        raise MicrotrainError(f"{tg.name}: the forward pass does not end in the pooled features {pooled!r}")
    g.outputs = [pooled]
    return g


def float_head(g: Graph, w: np.ndarray, b: np.ndarray) -> None:
    """Append the float32 head (logits = w @ f + b on f = (pooled - z) * s) as it is: a `linear` with float32
    weights [K, C] and bias [K] and float32 logits (graph_to_tflite: DEQUANTIZE + a float FULLY_CONNECTED)."""
    p = g.tensors[g.outputs[0] if g.outputs else g.ops[-1].outputs[0]]
    w32, b32 = np.asarray(w, np.float32), np.asarray(b, np.float32).reshape(-1)
    if w32.ndim != 2 or w32.shape[1] != p.shape[0] or b32.shape != (w32.shape[0],):
        raise MicrotrainError(f"head weight {list(w32.shape)} / bias {list(b32.shape)} do not fit {p.shape[0]} "
                              "features")
    if not (np.isfinite(w32).all() and np.isfinite(b32).all()):
        raise MicrotrainError("the head holds NaN or infinite values")
    k = w32.shape[0]
    g.add_tensor(Tensor("head.weight", w32.shape, "float32", "weight", None, 0, np.ascontiguousarray(w32)))
    g.add_tensor(Tensor("head.bias", (k,), "float32", "bias", None, 0, np.ascontiguousarray(b32)))
    g.add_tensor(Tensor("logits", (k,), "float32", "act"))
    g.add_op(Op("head", "linear", [p.name, "head.weight", "head.bias"], ["logits"], {}))
    g.outputs = ["logits"]


def quantize_head(g: Graph, w: np.ndarray, b: np.ndarray, feats: np.ndarray) -> None:
    """Append the float32 head (logits = w @ f + b on f = (pooled - z) * s) as an int8 FULLY_CONNECTED, its output
    scale the largest |logit| over `feats` (calibration features) / 127."""
    p = g.tensors[g.outputs[0] if g.outputs else g.ops[-1].outputs[0]]
    sw = np.abs(w).max(axis=1) / 127.0
    sw = np.where(sw > 0, sw, 1e-8).astype(np.float32)
    qw = np.clip(np.round(w / sw[:, None]), -127, 127).astype(np.int8)
    qb = np.round(b / (np.float64(p.scale) * sw)).astype(np.int64)
    qb = np.clip(qb, -(1 << 31), (1 << 31) - 1).astype(np.int32)
    logits = feats @ w.T + b
    ys = float(max(np.abs(logits).max(), 1e-6)) / 127.0
    k = w.shape[0]
    g.add_tensor(Tensor("head.weight", qw.shape, "int8", "weight", sw, 0, qw))
    g.add_tensor(Tensor("head.bias", (k,), "int32", "bias", None, 0, qb))
    g.add_tensor(Tensor("logits", (k,), "int8", "act", ys, 0))
    g.add_op(Op("head", "linear", [p.name, "head.weight", "head.bias"], ["logits"], {}))
    g.outputs = ["logits"]


def run(args: argparse.Namespace) -> int:
    run_dir, out = Path(args.run_dir), Path(args.out)
    if out.suffix != ".tflite":
        raise MicrotrainError(f"{out}: the output must end in .tflite")
    if not out.parent.is_dir():
        raise MicrotrainError(f"{out.parent}: no such directory")
    if not (run_dir / f"{GRAPH}.json").exists():
        raise MicrotrainError(f"{run_dir}: not a training run (no {GRAPH}.json)")
    if args.calib < 1:
        raise MicrotrainError(f"--calib must be at least 1, got {args.calib}")
    metrics = read_metrics(run_dir)
    tg = Graph.load(run_dir / GRAPH)
    if metrics.get("precision", "int8") != "int8":
        raise MicrotrainError(f"{run_dir}: an fp32-precision run has no int8 model to export")
    if args.state:  # read with the layout of the program that wrote it: the device twin's (same graph)
        twin = device_twin(tg, run_dir / "device" / "eval")
        state = read_state(args.state, twin.program)
    else:
        state = load_run_checkpoint(run_dir)
    g = forward_graph(tg, state)
    ds = open_dataset(metrics.get("data", metrics["dataset"]), "test", subset=args.calib, progress=False)
    xs = torch.cat([x for x, _ in batches(ds, 100, resolution=metrics["resolution"],
                                          eval_crop=metrics["eval_crop"])])
    hw, hb = head_params(tg)
    w = np.asarray(state.get(hw, tg.tensors[hw].data), np.float64)
    b = np.asarray(state.get(hb, tg.tensors[hb].data), np.float64)
    if args.int8_head:
        pooled = g.ops[-1].outputs[0]
        pt = g.tensors[pooled]
        feats = ((Executor(g).run(xs)[pooled].to(torch.float64) - pt.zero) * float(pt.scale)).numpy()
        quantize_head(g, w, b, feats)
    else:
        float_head(g, w, b)  # the run's float32 values (float64 here: exact)
    buf = graph_to_tflite(g)
    step = GraphTrainStep(tg)
    step.load_state_dict(state)
    with torch.no_grad():
        run_logits = step.logits(xs).to(torch.float32)
    from microtrain.frontends.tflite import tflite_to_graph

    ex_logits = Executor(tflite_to_graph(buf, out)).logits(xs).to(torch.float32)  # the file as read back
    out.write_bytes(buf)
    agree = float((run_logits.argmax(1) == ex_logits.argmax(1)).double().mean())
    diff = float((run_logits - ex_logits).abs().max())
    result = {"run": str(run_dir), "out": str(out), "bytes": len(buf), "head": "int8" if args.int8_head else "float32",
              "calibration_images": len(xs), "top1_agreement_with_run": agree, "max_logit_difference": diff,
              "requant": g.requant.value}
    print(json.dumps(result) if args.json else
          f"wrote {out} ({len(buf) / 1024:.1f} KB, {result['head']} head): top-1 equals the run's on {agree:.1%} of "
          f"{len(xs)} test images, logits within {diff:.3g}")
    return 0
