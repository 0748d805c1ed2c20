"""`microtrain models`: the zoo, with the numbers that decide what fits on a chip."""

from __future__ import annotations

import argparse
import json
from typing import Any

from microtrain.compiler.liveness import inference_peak_bytes
from microtrain.frontends.zoo import ZOO_MODELS, load_model
from microtrain.ir.graph import Graph


def model_summary(name: str, g: Graph) -> dict[str, Any]:
    return {
        "name": name,
        "input_shape": [1, *g.tensors[g.inputs[0]].shape],
        "params": g.num_params(),
        "macs": g.macs(),
        "convs": len(g.convs()),
        "flash_bytes": g.const_bytes(),
        "inference_peak_activation_bytes": inference_peak_bytes(g),
    }


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model zoo (shape, params, MACs, flash, activation peak)",
                       description="List the shipped int8 models. flash_bytes counts int8 weights, int32 biases and "
                                   "float32 per-channel scales (the 1000-class ImageNet head included); the "
                                   "activation peak is a plain layer-by-layer batch-1 forward pass.")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    rows = [model_summary(n, load_model(n)) for n in ZOO_MODELS]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title="microtrain model zoo (int8, ImageNet-pretrained)")
    for col in ("model", "input", "params", "MACs", "convs", "flash (KB)", "act. peak (KB)"):
        t.add_column(col, justify="left" if col == "model" else "right", no_wrap=True)
    for r in rows:
        kb = (r["flash_bytes"] / 1024, r["inference_peak_activation_bytes"] / 1024)
        t.add_row(r["name"], "x".join(map(str, r["input_shape"])), f"{r['params']:,}", f"{r['macs'] / 1e6:.1f}M",
                  str(r["convs"]), f"{kb[0]:.1f}", f"{kb[1]:.1f}")
    Console().print(t)
    return 0
