"""`microtrain contrib`: contribution analysis of a model on a dataset (the input of `microtrain search`)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from microtrain.data.datasets import DATASETS
from microtrain.errors import MicrotrainError
from microtrain.frontends.zoo import ZOO_MODELS, load_model
from microtrain.outputs import check_output_file
from microtrain.runtime.lr_select import AUTO, parse_lr
from microtrain.sparse.contrib import Protocol, analyse, default_cache_root, default_protocol


def _ints(text: str | None, what: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        out: list[int] = []
        for part in text.split(","):
            a, _, b = part.partition("-")
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
        return tuple(sorted(set(out)))
    except ValueError:
        raise MicrotrainError(f"{what}: expected comma-separated integers or ranges (e.g. 3,6,9 or 21-41), "
                              f"got {text!r}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = Protocol(data="")
    p = sub.add_parser(
        "contrib", help="contribution analysis: accuracy gained by each bias depth and each conv's weights",
        description="Measure, with short fine-tunes on a subset, the accuracy gained by training the biases of the "
                    "last k convs (vs the head only) and by additionally training the weights of one conv at ratio r "
                    "(vs those biases alone). Trials run in parallel processes (or on Ray), each cached on disk: "
                    "rerunning the same command resumes an interrupted analysis.")
    p.add_argument("--model", required=True, help=f"zoo name ({', '.join(ZOO_MODELS)}) or model file")
    p.add_argument("--data", required=True, help=f"dataset name ({', '.join(DATASETS)}) or ImageFolder directory")
    p.add_argument("--out", help="contribution file to write (default contrib-<model>-<data>.json)")
    p.add_argument("--subset", type=int, default=d.train_images, help=f"training images (default {d.train_images})")
    p.add_argument("--test-subset", type=int, default=d.test_images,
                   help=f"fixed test images every trial is evaluated on (default {d.test_images})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"fine-tune epochs per trial (default {d.epochs})")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate of every trial (default {d.lr:g})")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs,
                   help=f"linear warm-up of each trial, in epochs (default {d.warmup_epochs:g}), then cosine decay")
    p.add_argument("--probe-epochs", type=int, default=d.probe_epochs,
                   help=f"head-only epochs of the shared starting head (default {d.probe_epochs}; 0: fresh head)")
    p.add_argument("--probe-lr", default=AUTO,
                   help="learning rate of the linear-probe head, or 'auto' (default): chosen as `train --lr auto` "
                        "does, on a validation slice of the training subset; the chosen number goes into the "
                        "protocol (and the recorded command), so the trial cache stays keyed by a rate")
    p.add_argument("--augment", choices=("flip", "none"), default=d.augment)
    p.add_argument("--k-grid", help="bias counts to measure, e.g. 3,6,9 or 3-12 (default: every 3 up to the base, "
                                    "then every 6, and all convs)")
    p.add_argument("--base-k", type=int, help="bias count under the weight trials (default: half the convs)")
    p.add_argument("--weight-convs", help="convs whose weights are measured, e.g. 21-41 (default: the last base-k)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=2, help="parallel trial processes (default 2)")
    p.add_argument("--ray", metavar="ADDRESS", help="run the trials as Ray tasks: 'local' (a private Ray instance with "
                                                    "--workers CPUs), 'auto' or host:port (a running cluster; needs a "
                                                    "shared --cache-dir); pip install 'microtrain[ray]'")
    p.add_argument("--cache-dir", help=f"trial cache root (default {default_cache_root()})")
    p.add_argument("--json", action="store_true", help="print the contribution file to stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise MicrotrainError(f"--workers must be >= 1, got {args.workers}")
    graph = load_model(args.model)
    # checked before the probe's rate selection and the trials, not after them
    out = check_output_file(args.out or f"contrib-{graph.name}-{Path(args.data).name}.json", "--out")
    probe_lr, selection = parse_lr(str(args.probe_lr)), None
    if probe_lr == AUTO:
        if args.probe_epochs > 0:
            selection = select_probe_lr(args, graph)
        probe_lr = selection["lr"] if selection else Protocol(data="").probe_lr  # no probe: the rate is unused
    proto = default_protocol(graph, args.data, train_images=args.subset, test_images=args.test_subset,
                             epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             warmup_epochs=args.warmup_epochs, probe_epochs=args.probe_epochs,
                             probe_lr=probe_lr, augment=args.augment,
                             seed=args.seed, k_grid=_ints(args.k_grid, "--k-grid"), base_k=args.base_k,
                             weight_convs=_ints(args.weight_convs, "--weight-convs"))
    command = shlex.join(["microtrain", "contrib", *_argv(args, proto, out)])
    result = analyse(args.model, proto, cache_root=args.cache_dir, workers=args.workers, ray_address=args.ray,
                     progress=not args.quiet, command=command)
    if selection is not None:
        result["probe_lr_selection"] = selection
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        best_w = max((w for w in result["weight"] if w["delta"] is not None), key=lambda w: w["delta"], default=None)
        base = result["baselines"]
        print(f"{result['model']} on {proto.data}: head only {base['head']:.2%}, "
              + ", ".join(f"bias:{b['k']} {b['delta'] * 100:+.2f}" for b in result["bias"])
              + (f"; best weight trial conv {best_w['conv']} r={best_w['ratio']:g} {best_w['delta'] * 100:+.2f} "
                 f"points" if best_w else "")
              + f"; {len(result['bias']) + len(result['weight']) + 1} trials -> {out}")
    return 0


def select_probe_lr(args: argparse.Namespace, graph: Any) -> dict[str, Any]:
    """--probe-lr auto: the probe head's rate, chosen on the training subset the analysis uses (runtime/lr_select.py,
    never its test images). The head is a float layer with plain SGD; the int8 + QAS prior (whose QAS-scaled
    gradients are in real units too) is its prior, and the grid extends when an end of it wins."""
    from microtrain.autodiff.build import TrainConfig, build_training_graph
    from microtrain.data.datasets import model_resolution, open_dataset
    from microtrain.runtime.lr_select import base_grid, select_lr
    from microtrain.runtime.prefix_cache import PrefixCache
    from microtrain.runtime.trainstep import GraphTrainStep
    from microtrain.sparse.scheme import Scheme

    d = Protocol(data="")
    train = open_dataset(args.data, "train", subset=args.subset, seed=args.seed, progress=not args.quiet)
    g = build_training_graph(graph, Scheme("probe", 0, {}), train.num_classes, TrainConfig(seed=args.seed))
    entries: dict = {}
    grid, ratio = base_grid("int8", True, "sgd", args.batch_size)
    sel = select_lr(lambda: PrefixCache(GraphTrainStep(g, d.precision), entries=entries), train, grid=grid,
                    ratio=ratio, epochs=args.probe_epochs, batch_size=args.batch_size,
                    warmup_epochs=args.warmup_epochs, augment=args.augment, resolution=model_resolution(graph),
                    eval_crop=1.0, seed=args.seed, progress=not args.quiet)
    print(f"probe lr auto: {sel['lr']:g} (" + ", ".join(
        f"{c['lr']:g} {c['val_accuracy']:.1%}" if c["status"] == "completed" else f"{c['lr']:g} diverged"
        for c in sel["candidates"]) + f"; {sel['seconds']:.1f}s)", file=sys.stderr)
    return sel


def _spans(v: tuple[int, ...]) -> str:
    """(3, 6, 21, 22, 23) -> '3,6,21-23'."""
    parts: list[str] = []
    for i in v:
        if parts and "-" not in parts[-1] and int(parts[-1]) == i - 1 and i - 2 not in v:
            parts[-1] = f"{parts[-1]}-{i}"
        elif parts and "-" in parts[-1] and int(parts[-1].split("-")[1]) == i - 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{i}"
        else:
            parts.append(str(i))
    return ",".join(parts)


def _argv(args: argparse.Namespace, p: Protocol, out: Path) -> list[str]:
    """The command line with every protocol option spelled out (defaults resolved): the exact command."""
    argv = ["--model", args.model, "--data", args.data, "--out", str(out), "--subset", str(p.train_images),
            "--test-subset", str(p.test_images), "--epochs", str(p.epochs), "--batch-size", str(p.batch_size),
            "--lr", f"{p.lr:g}", "--warmup-epochs", f"{p.warmup_epochs:g}", "--probe-epochs", str(p.probe_epochs),
            "--probe-lr", f"{p.probe_lr:g}",
            "--augment", p.augment, "--k-grid", _spans(p.k_grid), "--base-k", str(p.base_k),
            "--weight-convs", _spans(p.weight_convs), "--seed", str(p.seed), "--workers", str(args.workers)]
    for flag in ("ray", "cache_dir"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return argv
