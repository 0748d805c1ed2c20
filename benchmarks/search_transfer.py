"""Does the searched scheme train as well as the paper's? (issue 6 acceptance)

Searches the `--extra-budget 100KB` scheme of mcunet-5fps on its shipped contributions, then fine-tunes it on the
CIFAR-10 protocol of the training benchmark (benchmarks/cifar10_transfer.py: 10,000 class-balanced training images,
the full test set, 128x128, 5 epochs, batch 64, 1 warm-up epoch, cosine, SGD, flip augmentation, learning-rate
sweep), and compares with `paper-99kb` under the same protocol: taken from benchmarks/results/cifar10_transfer.json
when that benchmark has run it at every learning rate of --lrs (same protocol and seed: the same run), otherwise
trained here too.

    python benchmarks/search_transfer.py [--lrs 0.01,0.03,0.1] [--epochs 5] [--subset 10000]

Writes benchmarks/results/search_transfer.json with every command. Resumable: finished runs are not repeated.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def sh(cmd: list[str]) -> subprocess.CompletedProcess:
    print("$", shlex.join(cmd), flush=True)
    return subprocess.run(cmd, capture_output=True, text=True)


def train(name: str, scheme: str, args: argparse.Namespace, runs: Path) -> dict:
    out = runs / name
    cmd = ["microtrain", "train", "--model", "mcunet-5fps", "--data", "cifar10", "--subset", str(args.subset),
           "--epochs", str(args.epochs), "--warmup-epochs", "1", "--augment", "flip", "--batch-size", "64",
           "--quiet", "--out", str(out), "--scheme", scheme, "--lr-sweep", args.lrs]
    sweep = out / "sweep.json"
    proc = None
    if not sweep.is_file() or len(json.loads(sweep.read_text())["runs"]) < len(args.lrs.split(",")):
        proc = sh(cmd + (["--resume"] if out.is_dir() else []))
    if not sweep.is_file():
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:] if proc else ''}")
    s = json.loads(sweep.read_text())
    return {"command": shlex.join(cmd), "best_lr": s["best_lr"], "best_test_accuracy": s["best_test_accuracy"],
            "runs": [{"lr": r["lr"], "status": r["status"], "test_accuracy": r["test_accuracy"]} for r in s["runs"]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lrs", default="0.01,0.03,0.1")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--subset", type=int, default=10000)
    ap.add_argument("--runs", default=str(HERE.parent / "runs" / "search_transfer"))
    args = ap.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    scheme = runs / "search-100kb.yaml"
    search_cmd = ["microtrain", "search", "--model", "mcunet-5fps", "--extra-budget", "100KB", "--budget", "256KB",
                  "-o", str(scheme), "--json"]
    proc = sh(search_cmd)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    found = json.loads(proc.stdout)
    result: dict = {"command": shlex.join(["python", "benchmarks/search_transfer.py", *sys.argv[1:]]),
                    "protocol": {"model": "mcunet-5fps", "data": "cifar10", "train_images": args.subset,
                                 "test_images": 10000, "epochs": args.epochs, "batch_size": 64, "warmup_epochs": 1,
                                 "augment": "flip", "optimizer": "sgd", "lr_sweep": args.lrs},
                    "search": {"command": shlex.join(search_cmd), "scheme": found["scheme"], "score": found["score"],
                               "analytic_extra_bytes": found["analytic_extra_bytes"],
                               "planned_peak_bytes": found["planned_peak_bytes"],
                               "paper_99kb_score": found["paper_schemes"]["99kb"]["score"]}}
    result["searched"] = train("search-100kb", str(scheme), args, runs)
    ref = RESULTS / "cifar10_transfer.json"
    done = json.loads(ref.read_text())["settings"].get("paper-99kb") if ref.is_file() else None
    lrs = [float(v) for v in args.lrs.split(",")]
    # the training benchmark runs the same protocol and seed: its paper-99kb run at a learning rate is the run this
    # script would make, so reuse it when it covers every learning rate of our grid
    theirs = [r for r in (done or {}).get("runs", []) if any(abs(r["lr"] - v) < 1e-12 for v in lrs)]
    if len(theirs) == len(lrs) and all(r["status"] in ("completed", "diverged") for r in theirs):
        ok = [r for r in theirs if r["status"] == "completed"]
        best = max(ok, key=lambda r: r["test_accuracy"])
        result["paper-99kb"] = {"from": "benchmarks/results/cifar10_transfer.json (runs at the same learning rates)",
                                "command": done["command"], "best_lr": best["lr"],
                                "best_test_accuracy": best["test_accuracy"],
                                "runs": [{k: r[k] for k in ("lr", "status", "test_accuracy")} for r in theirs]}
    else:
        result["paper-99kb"] = train("paper-99kb", "paper-99kb", args, runs)
    a, b = result["searched"]["best_test_accuracy"], result["paper-99kb"]["best_test_accuracy"]
    result["difference_points"] = round(100 * (a - b), 2)
    result["meets_acceptance"] = a >= b - 0.005
    result["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search_transfer.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"searched {a:.2%} vs paper-99kb {b:.2%} ({result['difference_points']:+.2f} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
