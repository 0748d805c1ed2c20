"""The device twin vs the torch engine on the CIFAR-10 protocol (issue 11's acceptance benchmark).

Protocol: mcunet-5fps `paper-99kb`, 10,000 class-balanced CIFAR-10 training images, the full 10,000-image test set,
128x128, 5 epochs, 1 warm-up epoch then cosine decay, SGD, flip augmentation, seed 0: the same data order, the same
augmentation draws and the same learning rate for every engine. Settings:

- `twin-b1`: `--engine device`, the generated C training step built for this machine (bit-identical to the chip),
  one image per step;
- `torch-b1`: the torch engine, one image per step (same stream, same rate);
- `torch-b64`: the torch engine batched (64 images per step) at the same rate, and at its own swept best rate
  (`torch-b64-best`, from benchmarks/results/cifar10_transfer.json's grid) for reference.

The batch-1 rate (0.002) is the best of 0.0005 / 0.002 / 0.005 in a pilot of the torch engine at batch 1 (2,000 images,
1 epoch, 1,000 test images: 64.6 / 71.5 / 67.6%). Each setting is one `microtrain train` command, recorded verbatim
with its wall time; finished settings are skipped when the script runs again (runs resume).

    python benchmarks/twin_accuracy.py [--only NAME ...] [--subset 10000] [--epochs 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LR_B1 = "0.002"
SETTINGS = {  # name -> extra CLI arguments
    "twin-b1": ["--engine", "device", "--lr", LR_B1],
    "torch-b1": ["--batch-size", "1", "--lr", LR_B1],
    "torch-b64": ["--batch-size", "64", "--lr", LR_B1],
    "torch-b64-best": ["--batch-size", "64", "--lr", "0.03"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=list(SETTINGS))
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--subset", type=int, default=10000)
    ap.add_argument("--runs", default=str(HERE.parent / "runs" / "twin_accuracy"))
    args = ap.parse_args()
    out_json = RESULTS / "twin_accuracy.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {"settings": {}}
    results["protocol"] = {"model": "mcunet-5fps", "scheme": "paper-99kb", "data": "cifar10",
                           "train_images": args.subset, "test_images": 10000, "epochs": args.epochs,
                           "warmup_epochs": 1, "augment": "flip", "optimizer": "sgd", "seed": 0, "resolution": 128}
    for name in args.only or SETTINGS:
        done = results["settings"].get(name)
        if done and done.get("status") == "completed" and not (args.only and name in args.only):
            print(f"{name}: done ({done['test_accuracy']})")
            continue
        run_dir = Path(args.runs) / name
        cmd = ["microtrain", "train", "--model", "mcunet-5fps", "--scheme", "paper-99kb", "--data", "cifar10",
               "--subset", str(args.subset), "--epochs", str(args.epochs), "--warmup-epochs", "1", "--augment",
               "flip", "--eval-every", str(args.epochs), "--seed", "0", "--quiet", "--json", "--out", str(run_dir),
               *SETTINGS[name]] + (["--resume"] if (run_dir / "checkpoint.json").exists() else [])
        print("$", shlex.join(cmd), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        m = json.loads(proc.stdout)
        results["settings"][name] = {
            "command": shlex.join(cmd), "engine": m.get("engine", "torch"), "batch_size": m["batch_size"],
            "lr": m["lr"], "status": m["status"], "test_accuracy": m["test_accuracy"], "train_loss": m["train_loss"],
            "images_per_second": m["images_per_second"], "train_seconds": m["train_seconds"],
            "wall_seconds_this_invocation": round(wall, 1), "iterations": m["iterations"],
            "date": datetime.date.today().isoformat()}
        RESULTS.mkdir(exist_ok=True)
        out_json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"{name}: {m['test_accuracy']:.2%}", flush=True)
    s = results["settings"]
    if "twin-b1" in s and "torch-b1" in s:
        gap = abs(s["twin-b1"]["test_accuracy"] - s["torch-b1"]["test_accuracy"])
        results["twin_vs_torch_b1_points"] = round(100 * gap, 2)
        results["within_1_point"] = gap <= 0.01
        out_json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"twin vs torch at batch 1: {100 * gap:.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
