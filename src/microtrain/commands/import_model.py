"""`microtrain import MODEL.onnx|MODEL.pt2 --calib DATA -o MODEL.json`: a float model as a microtrain int8 model.

The float model is read (frontends/onnx_import.py, frontends/torch_import.py), its input normalization folded in,
its activations calibrated on images of DATA through the same pipeline every other command feeds a model with, and
it is quantized (frontends/ptq.py). Before anything is written the command measures how often the int8 graph (the
integer-exact torch executor, what the device computes) predicts the float model's top-1, on the calibration
images and on held-out test images; then it writes MODEL.json / MODEL.npz, which `--model` accepts everywhere.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from microtrain.data.datasets import ImageDataset, batches, model_resolution, open_dataset
from microtrain.errors import MicrotrainError
from microtrain.frontends.float_graph import FloatGraph, run_float
from microtrain.frontends.ptq import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InputQuant,
    RangeObserver,
    dequantize_input,
    fold_input,
    input_quant,
    normalize,
    quantize,
)
from microtrain.ir.graph import Graph, Tensor
from microtrain.runtime.executor import Executor

BATCH = 64


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="quantize a float ONNX / torch.export model into a microtrain int8 model",
                       description="Read a float .onnx or .pt2 (torch.export) CNN, fold BatchNorm and the input "
                                   "normalization, calibrate int8 activations on images of DATA and write a microtrain "
                                   "model (MODEL.json + MODEL.npz) that --model accepts everywhere.")
    p.add_argument("model", metavar="MODEL", help="a float .onnx file or a torch.export .pt2 archive")
    p.add_argument("--calib", required=True, metavar="DATA",
                   help="calibration images: any --data value (cifar10, fashion-mnist, an ImageFolder directory...)")
    p.add_argument("-o", "--out", required=True, help="the microtrain model to write (MODEL.json; MODEL.npz beside)")
    p.add_argument("--calib-count", type=int, default=512, help="training-split images that calibrate activations")
    p.add_argument("--held-out", type=int, default=1000, help="test-split images on which agreement is measured")
    p.add_argument("--mean", help="input normalization mean, comma-separated, pixels in [0, 1] (default: the file's, "
                                  "else torchvision's ImageNet 0.485,0.456,0.406)")
    p.add_argument("--std", help="input normalization std (default: the file's, else 0.229,0.224,0.225)")
    p.add_argument("--calib-method", choices=("minmax", "percentile"), default="minmax",
                   help="activation ranges: the extremes seen (default) or a percentile of the values")
    p.add_argument("--percentile", type=float, default=99.99, help="with --calib-method percentile")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def load_float(path: Path) -> FloatGraph:
    if not path.is_file():
        raise MicrotrainError(f"{path}: no such file")
    if path.suffix == ".onnx":
        from microtrain.frontends.onnx_import import load_onnx

        return load_onnx(path)
    if path.suffix == ".pt2":
        from microtrain.frontends.torch_import import load_pt2

        return load_pt2(path)
    raise MicrotrainError(f"{path}: not a .onnx or .pt2 file (int8 .tflite models need no import: pass them to "
                          "--model directly)")


def g_input_only(fg: FloatGraph) -> Graph:
    """A graph of just the model's input: what `model_resolution` reads (the data pipeline's image geometry)."""
    g = Graph(fg.name)
    g.add_tensor(Tensor("input", fg.input_shape, "int8", "input", 1.0, 0))
    g.inputs.append("input")
    return g


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise MicrotrainError(f"--{what} {text!r} is not a comma-separated list of numbers") from None
    return vals


def agreement(fg: FloatGraph, g: Graph, iq: InputQuant, ds: ImageDataset, desc: str, progress: bool) -> dict:
    """Float model (its own input normalization, nothing folded) vs the int8 graph on the images of `ds`: top-1
    equal, mean |logit difference| in the float model's logit units, and each one's top-1 against the labels."""
    ex = Executor(g)
    out = g.tensors[g.outputs[0]]
    same = n = 0
    diff = 0.0
    right_f = right_q = 0
    res = model_resolution(g)
    for x, y in tqdm(batches(ds, BATCH, resolution=res, eval_crop=1.0), desc=desc, unit="batch", leave=False,
                     disable=not progress, total=-(-len(ds) // BATCH)):
        with torch.no_grad():
            lf = run_float(fg, normalize(x, iq)).to(torch.float64)
        lq = (ex.run(x)[g.outputs[0]].to(torch.float64) - out.zero) * float(out.scale)
        tf, tq = lf.argmax(1), lq.argmax(1)
        same += int((tf == tq).sum())
        diff += float((lf - lq).abs().mean(1).sum())
        right_f += int((tf == y).sum())
        right_q += int((tq == y).sum())
        n += len(y)
    r = {"images": n, "top1_equal": same / n, "mean_abs_logit_diff": diff / n}
    if ds.num_classes == out.shape[0]:  # the model's classes may be the dataset's (e.g. it was trained on it)
        r.update({"float_top1": right_f / n, "int8_top1": right_q / n})
    return r


def run(args: argparse.Namespace) -> int:
    src, out = Path(args.model), Path(args.out)
    if out.suffix not in (".json", ".npz"):
        raise MicrotrainError(f"{out}: the output must end in .json (MODEL.json + MODEL.npz are written)")
    if not out.parent.is_dir():
        raise MicrotrainError(f"{out.parent}: no such directory")
    if args.calib_count < 1 or args.held_out < 0:
        raise MicrotrainError("--calib-count must be at least 1 and --held-out at least 0")
    fg = load_float(src)
    mean = _floats(args.mean, "mean") or fg.mean or IMAGENET_MEAN
    std = _floats(args.std, "std") or fg.std or IMAGENET_STD
    c = fg.input_shape[0]
    if c == 1 and args.mean is None and fg.mean is None:  # a gray model: the ImageNet statistics as one value
        mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
    iq = input_quant(mean, std, c)
    folded = fold_input(fg, iq)
    progress = not args.json
    calib = open_dataset(args.calib, "train", subset=args.calib_count, progress=progress)
    obs = RangeObserver(args.calib_method, args.percentile)
    res = model_resolution(g_input_only(fg))
    for x, _ in tqdm(batches(calib, BATCH, resolution=res, eval_crop=1.0), desc="calibrating", unit="batch",
                     total=-(-len(calib) // BATCH), disable=not progress):
        with torch.no_grad():
            run_float(folded, dequantize_input(x, iq), obs)
    meta = {"calibration": {"data": str(args.calib), "images": len(calib), "method": args.calib_method,
                            **({"percentile": args.percentile} if args.calib_method == "percentile" else {})}}
    g = quantize(folded, iq, obs, meta)
    result = {"model": str(src), "out": str(out.with_suffix(".json")), "source": fg.source,
              "input": {"shape": list(fg.input_shape), "scale": iq.scale, "zero": iq.zero, "mean": list(iq.mean),
                        "std": list(iq.std), "folded_into_first_conv": not iq.exact},
              "convs": len(g.convs()), "params": g.num_params(), "macs": g.macs(), "flash_bytes": g.const_bytes(),
              "calibration": {**meta["calibration"], **agreement(fg, g, iq, calib, "agreement (calibration)",
                                                                 progress)}}
    if args.held_out:
        held = open_dataset(args.calib, "test", subset=args.held_out, seed=1, progress=progress)
        result["held_out"] = agreement(fg, g, iq, held, "agreement (held out)", progress)
    g.save(out.with_suffix(""))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"wrote {result['out']} (+ .npz): {result['convs']} convs, {result['params']:,} parameters, "
          f"{result['macs'] / 1e6:.2f}M MACs, {result['flash_bytes'] / 1024:.1f} KB of weights")
    fold = ", per-channel part folded into the first conv" if not iq.exact else ""
    print(f"input {'x'.join(map(str, fg.input_shape))}: int8 = pixel - 128, scale {iq.scale:.6g}, zero {iq.zero} "
          f"(mean {list(iq.mean)}, std {list(iq.std)}{fold})")
    for key, label in (("calibration", "calibration"), ("held_out", "held-out")):
        if key in result:
            r = result[key]
            acc = (f"; vs labels: float {r['float_top1']:.1%}, int8 {r['int8_top1']:.1%}" if "float_top1" in r
                   else "")
            print(f"{label} images ({r['images']}): int8 top-1 = float top-1 on {r['top1_equal']:.1%}, mean |logit "
                  f"diff| {r['mean_abs_logit_diff']:.4f}{acc}")
    return 0
