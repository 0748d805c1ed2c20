"""`microtrain eval`: accuracy of a trained run (its training graph and last checkpoint) on a dataset split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from microtrain.codegen.project import read_state
from microtrain.commands.train import GRAPH, device_twin
from microtrain.data.datasets import open_dataset
from microtrain.errors import MicrotrainError
from microtrain.ir.graph import Graph
from microtrain.runtime.rundir import check_run_classes, load_run_checkpoint, read_metrics
from microtrain.runtime.trainer import evaluate
from microtrain.runtime.trainstep import GraphTrainStep


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run on a dataset split",
                       description="Load RUN_DIR's training graph and last checkpoint, and measure top-1 accuracy "
                                   "on --data (default: the dataset it was trained on).")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data", help="dataset name or ImageFolder directory (default: the run's dataset)")
    p.add_argument("--split", default="test")
    p.add_argument("--subset", type=int)
    p.add_argument("--engine", choices=("torch", "device"), default="torch",
                   help="torch (default) or the device twin (the generated C built for this machine: the chip's "
                        "predictions bit for bit)")
    p.add_argument("--state", metavar="STATE_BIN",
                   help="evaluate a device's saved state (the state.bin of `compile --run` or of a board running the "
                        "generated C) instead of the run's last checkpoint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / f"{GRAPH}.json").exists():
        raise MicrotrainError(f"{run_dir}: not a training run (no {GRAPH}.json)")
    metrics = read_metrics(run_dir)
    graph = Graph.load(run_dir / GRAPH)
    # a device state file is read with the layout of the program that wrote it: the twin's (same graph, same layout)
    twin = device_twin(graph, run_dir / "device" / "eval") if args.engine == "device" or args.state else None
    state = read_state(args.state, twin.program) if args.state else load_run_checkpoint(run_dir)
    step = twin if args.engine == "device" else GraphTrainStep(graph, metrics.get("precision", "int8"))
    step.load_state_dict(state)
    data = args.data or metrics.get("data", metrics["dataset"])
    ds = open_dataset(data, args.split, subset=args.subset, progress=not args.json)
    check_run_classes(metrics, ds.classes, data)
    acc = evaluate(step, ds, resolution=metrics["resolution"], eval_crop=metrics["eval_crop"])
    result = {"run": str(run_dir), "dataset": ds.name, "split": args.split, "images": len(ds), "accuracy": acc,
              "engine": args.engine, "state": args.state or str(run_dir / "checkpoint.npz"),
              "step": int(state.get("__step__", 0))}
    print(json.dumps(result) if args.json else f"{ds.name}/{args.split}: {acc:.2%} top-1 on {len(ds)} images")
    return 0
