"""What a new user gets with the defaults (issue 15's acceptance): no --lr (so `--lr auto`), no --augment, no
--warmup-epochs, no --batch-size; mcunet-5fps on 5,000 class-balanced CIFAR-10 training images, 3 epochs, the full
10,000-image test set. One `microtrain train` command per setting, recorded verbatim with its metrics (chosen rate,
every candidate's validation score, the selection's seconds against the run's).

Acceptance: int8 + QAS >= no-QAS + 3 points, within 2 points of fp32, and `paper-99kb` >= `last:6` (int8 + QAS).

    python benchmarks/defaults.py [--only NAME ...] [--threads 1]   # -> benchmarks/results/defaults.json
    python benchmarks/defaults.py --seed 1 --only last6-int8-qas last6-int8-noqas   # -> defaults-seed1.json

A single run's test accuracy moves by about half a point with the seed (one binomial standard error on 10,000 test
images is ~0.5 points), so the QAS margin is also measured over more seeds (`--seed N`: the same commands with
`--seed N`, written to their own file).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT_JSON = RESULTS / "defaults.json"
SETTINGS = {  # name -> the arguments that differ between settings; nothing else is passed but the protocol
    "last6-int8-qas": ["--scheme", "last:6"],
    "last6-int8-noqas": ["--scheme", "last:6", "--no-qas"],
    "last6-fp32": ["--scheme", "last:6", "--precision", "fp32"],
    "paper-99kb": ["--scheme", "paper-99kb"],
}
PROTOCOL = ["--model", "mcunet-5fps", "--data", "cifar10", "--subset", "5000", "--epochs", "3"]


def git_commit() -> str | None:
    """The commit the numbers were measured at (with '+dirty' when the tree differs from it)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "src"], cwd=HERE.parent,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def acceptance(settings: dict[str, Any]) -> dict[str, Any] | None:
    """The issue's three relations on the measured final test accuracies (None until all four settings ran)."""
    acc = {k: (v.get("metrics") or {}).get("test_accuracy") for k, v in settings.items()}
    if any(acc.get(k) is None for k in SETTINGS):
        return None
    qas, noqas, fp32, p99 = (acc[k] for k in SETTINGS)
    checks = {"qas_minus_noqas_points": round(100 * (qas - noqas), 2),
              "qas_minus_fp32_points": round(100 * (qas - fp32), 2),
              "paper99kb_minus_last6_points": round(100 * (p99 - qas), 2)}
    checks["qas_beats_noqas_by_3"] = checks["qas_minus_noqas_points"] >= 3
    checks["qas_within_2_of_fp32"] = checks["qas_minus_fp32_points"] >= -2
    checks["paper99kb_at_least_last6"] = checks["paper99kb_minus_last6_points"] >= 0
    checks["passed"] = all(checks[k] for k in ("qas_beats_noqas_by_3", "qas_within_2_of_fp32",
                                                "paper99kb_at_least_last6"))
    return checks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=list(SETTINGS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    ap.add_argument("--runs", default=str(HERE.parent / "runs" / "defaults"))
    ap.add_argument("--seed", type=int, default=None, help="pass --seed N to every run (own results file)")
    args = ap.parse_args()
    out_json = OUT_JSON if args.seed is None else RESULTS / f"defaults-seed{args.seed}.json"
    seed = [] if args.seed is None else ["--seed", str(args.seed)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    for name in args.only or SETTINGS:
        run_dir = Path(args.runs) / (name if args.seed is None else f"{name}-seed{args.seed}")
        cmd = ["microtrain", "train", *PROTOCOL, *SETTINGS[name], *seed, "--out", str(run_dir), "--force", "--json"]
        print("$", shlex.join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        m = json.loads(proc.stdout)
        keep = ("test_accuracy", "test_accuracy_per_epoch", "train_loss", "lr", "batch_size", "augment",
                "warmup_epochs", "epochs", "train_images", "test_images", "train_seconds", "eval_seconds",
                "images_per_second", "analytic_extra_bytes", "lr_selection")
        latest = json.loads(out_json.read_text()) if out_json.exists() else {"settings": {}}
        latest["protocol"] = {"command_prefix": shlex.join(["microtrain", "train", *PROTOCOL]),
                              "note": "defaults only: --lr auto, the dataset's augmentation / warm-up, the default "
                                      "batch size",
                              "threads": args.threads}
        latest["settings"][name] = {"command": shlex.join(cmd), "commit": git_commit(),
                                    "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                                    "metrics": {k: m.get(k) for k in keep},
                                    "console": [ln for ln in proc.stderr.splitlines() if ln.startswith("lr auto")]}
        latest["acceptance"] = acceptance(latest["settings"])
        RESULTS.mkdir(exist_ok=True)
        out_json.write_text(json.dumps(latest, indent=1) + "\n")
        sel = m.get("lr_selection") or {}
        print(f"{name}: test {m['test_accuracy']:.2%} at lr {m['lr']:g}; selection {sel.get('seconds', 0):.0f}s "
              f"of {sel.get('seconds', 0) + sel.get('run_seconds', 0):.0f}s", flush=True)
    print(json.dumps(json.loads(out_json.read_text()).get("acceptance"), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
