"""`microtrain predict`: top-5 ImageNet classes of images, computed with integer-exact int8 inference."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import torch

from microtrain.data.datasets import resize_batch
from microtrain.data.images import ImageDecodeError, load_image, to_int8
from microtrain.errors import MicrotrainError
from microtrain.frontends.zoo import class_names, load_model
from microtrain.runtime.executor import Executor


def predict(model: str, images: list[str], k: int = 5) -> tuple[list[dict[str, Any]], list[str]]:
    """Returns ([{"image", "top5": [[index, name, probability], ...]}], [undecodable image errors])."""
    g = load_model(model)
    c, h, w = g.tensors[g.inputs[0]].shape
    size = max(h, w)
    names = class_names()
    ok, batch, errors = [], [], []
    for path in images:
        try:
            pixels = load_image(path, size)
            if (c, h, w) != (3, size, size):  # an imported gray or non-square model: its own input shape
                batch.append(resize_batch(torch.from_numpy(pixels[None]), [c, h, w], crop=1.0)[0].numpy())
            else:
                batch.append(to_int8(pixels))
            ok.append(path)
        except ImageDecodeError as e:
            errors.append(str(e))
    results = []
    if batch:
        probs = torch.softmax(Executor(g).logits(np.stack(batch)), dim=1)
        for path, p in zip(ok, probs, strict=True):
            top = torch.argsort(p, descending=True)[:k].tolist()
            label = (lambda i: names[i]) if p.numel() == len(names) else str
            results.append({"image": path, "top5": [[i, label(i), round(float(p[i]), 6)] for i in top]})
    return results, errors


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="top-5 ImageNet classes of images (int8-exact inference)",
                       description="Classify images with a zoo model or a model file. Each image is centre-cropped "
                                   "to a square and resized to the model's input; scores are softmax probabilities "
                                   "of the model's logits (int8 logits dequantized; a float head's as they are).")
    p.add_argument("--model", required=True, help="zoo name (see `microtrain models`), a tiny-training .pkl, or a "
                                                   "microtrain .json/.npz model")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--json", action="store_true", help='print [{"image", "top5": [[index, name, score], ...]}]')
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    results, errors = predict(args.model, args.images)
    if not results:  # one line: the reason itself for one image, the count and the first reason for several
        raise MicrotrainError(errors[0] if len(errors) == 1 else
                              f"none of the {len(args.images)} images could be decoded (first: {errors[0]})")
    for e in errors:
        print(f"microtrain: skipped: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(r["image"])
            for i, name, score in r["top5"]:
                print(f"  {score:7.2%}  {i:4d}  {name}")
    return 1 if errors else 0
