"""Federated vs centralized fine-tuning on the same images with the same number of training steps.

Federated: `microtrain federate` (Flower simulation) with N devices on a Dirichlet partition, R rounds of K local
steps at batch 1. Centralized: one device (the same batch-1 torch engine, the same graph, learning-rate schedule and
flip augmentation) trains N_per_round x R x K steps on the union of the shards (the same decoded images the federation
used). Also reports the bytes each device sends and receives per round vs the whole int8 model.

    python benchmarks/federated.py                      # the acceptance configuration (CIFAR-10, mcunet-5fps)
    python benchmarks/federated.py --subset 1000 --rounds 2 --local-steps 20 --out /tmp/f.json   # a quick check
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from microtrain.cli import main as cli
from microtrain.data.datasets import ImageDataset
from microtrain.fleet.core import DATA, JOB, Device, Job, initial_state, plot_rounds, training_graph
from microtrain.runtime.prefix_cache import PrefixCache
from microtrain.runtime.trainer import evaluate
from microtrain.runtime.trainstep import GraphTrainStep

REPO = Path(__file__).resolve().parents[1]


def centralized(run: Path, threads: int) -> dict:
    """One device on every image of the federation, for as many steps as the whole fleet took."""
    torch.set_num_threads(threads)
    fed = Job.load(run / JOB)
    graph = training_graph(fed)
    train = ImageDataset.load(run / DATA / "train.npz")
    test = ImageDataset.load(run / DATA / "test.npz")
    steps = fed.per_round * fed.rounds * fed.local_steps
    job = Job(run_dir=str(run), model=fed.model, scheme=fed.scheme, data=fed.data, clients=1, rounds=1,
              local_steps=steps, lr=fed.lr, warmup_rounds=fed.warmup_rounds, augment=fed.augment, seed=fed.seed,
              resolution=fed.resolution)
    dev = Device(graph, train, 0, job)
    t0 = time.perf_counter()
    state, m = dev.train_round(initial_state(graph), 0, 0)
    seconds = time.perf_counter() - t0
    step = GraphTrainStep(graph, "int8")
    ev = PrefixCache(step) if step.boundary != graph.inputs[:1] else step
    ev.load_state_dict(state)
    acc = evaluate(ev, test, batch_size=100, resolution=fed.resolution, eval_crop=1.0)
    return {"test_accuracy": acc, "steps": steps, "batch_size": 1, "train_images": len(train),
            "lr": fed.lr, "schedule": "cosine over the steps, as each device's", "augment": fed.augment,
            "mean_train_loss": m["loss"], "train_seconds": round(seconds, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mcunet-5fps")
    ap.add_argument("--scheme", default="paper-99kb")
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-steps", type=int, default=100)
    ap.add_argument("--partition", default="dirichlet:0.5")
    ap.add_argument("--subset", type=int, default=10000)
    ap.add_argument("--test-subset", type=int, help="default: the full test split")
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir", default=str(REPO / "runs" / "bench-federated"))
    ap.add_argument("--resume", action="store_true", help="resume the federation in --run-dir")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "federated.json"))
    ap.add_argument("--centralized-only", action="store_true",
                    help="only train the centralized baseline of the federation prepared in --run-dir (it reads the "
                         "federation's job and images) and write it to --centralized-json")
    ap.add_argument("--centralized-json", help="the centralized baseline's result: read from here if present "
                                               "(written by --centralized-only), else computed")
    args = ap.parse_args()
    if args.centralized_only:
        cen = {**centralized(Path(args.run_dir), threads=1),
               "command": shlex.join(["python", "benchmarks/federated.py", *sys.argv[1:]])}
        Path(args.centralized_json).write_text(json.dumps(cen, indent=1) + "\n")
        print(f"centralized {cen['test_accuracy']:.2%} in {cen['train_seconds']:.0f} s -> {args.centralized_json}")
        return 0
    argv = ["federate", "--model", args.model, "--scheme", args.scheme, "--data", args.data, "--clients",
            str(args.clients), "--rounds", str(args.rounds), "--local-steps", str(args.local_steps), "--partition",
            args.partition, "--subset", str(args.subset), "--lr", f"{args.lr:g}", "--workers", str(args.workers),
            "--seed", str(args.seed), "--out", args.run_dir, "--quiet"]
    if args.test_subset:
        argv += ["--test-subset", str(args.test_subset)]
    if args.resume:
        argv.append("--resume")
    t0 = time.perf_counter()
    if cli(argv) != 0:
        return 1
    fed_seconds = time.perf_counter() - t0
    run = Path(args.run_dir)
    fed = json.loads((run / "metrics.json").read_text())
    if args.centralized_json and Path(args.centralized_json).is_file():
        cen = json.loads(Path(args.centralized_json).read_text())
    else:
        cen = centralized(run, threads=1)
    b = fed["bytes"]
    out = {
        "command": shlex.join(["python", "benchmarks/federated.py", *sys.argv[1:]]),
        "federate_command": fed["command"],
        "engine": fed["engine"], "transport": fed["transport"],
        "setting": {k: fed[k] for k in ("model", "data", "clients", "rounds", "local_steps", "partition", "sample",
                                        "lr", "augment", "seed", "resolution", "train_images", "test_images",
                                        "shard_sizes")} | {"scheme": fed["scheme"]["name"]},
        "federated": {"test_accuracy": fed["test_accuracy"], "best_test_accuracy": fed["best_test_accuracy"],
                      "best_round": fed["best_round"], "test_accuracy_per_round": fed["test_accuracy_per_round"],
                      "train_loss_per_round": fed["train_loss_per_round"], "round_seconds": fed["round_seconds"],
                      "wall_seconds": round(fed_seconds, 1),
                      "device_steps_total": fed["devices_per_round"] * fed["rounds"] * fed["local_steps"]},
        "centralized": cen,
        "accuracy_gap_points": round(100 * (cen["test_accuracy"] - fed["test_accuracy"]), 2),
        "bytes_per_round_per_client": {"down": b["per_round_per_client"]["down"], "up": b["per_round_per_client"]["up"],
                                       "wire_down": b["wire_per_round_per_client"]["down"],
                                       "wire_up": b["wire_per_round_per_client"]["up"]},
        "full_int8_model_bytes": b["full_model"],
        "payload_vs_full_model": round(b["payload_vs_full_model"], 4),
        "bytes_note": b["note"],
        "shard_class_counts": fed["shard_class_counts"],
        "torch_threads": torch.get_num_threads(),
    }
    dst = Path(args.out)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(out, indent=1) + "\n")
    plot_rounds(fed["history"], dst.with_suffix(".png"),
                f"{fed['model']} {fed['scheme']['name']}, {fed['clients']} devices, {fed['partition']}, "
                f"{fed['local_steps']} local steps/round", reference=("centralized, same steps", cen["test_accuracy"]))
    print(f"federated {fed['test_accuracy']:.2%} (best {fed['best_test_accuracy']:.2%}) vs centralized "
          f"{cen['test_accuracy']:.2%}; {b['per_round_per_client']['up']} B up + {b['per_round_per_client']['down']} B "
          f"down per device per round vs {b['full_model']} B full int8 model ({b['payload_vs_full_model']:.1%}); "
          f"{fed_seconds:.0f} s federated, {cen['train_seconds']:.0f} s centralized -> {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
