"""The QAS table on more datasets (the paper's Table 1 shape: fp32 / int8 / int8 + QAS, mcunet-5fps, last two blocks
= `last:6`), with the defaults a user gets (`--lr auto`, the dataset's augmentation and warm-up), small but real:
- Fashion-MNIST (Debian's dataset-fashion-mnist): 2,000 class-balanced training images, 1,000 test images, 3 epochs;
- scikit-image's face / non-face crops (`--data lfw`): all 150 training and 50 test images, the default 50 epochs.
CIFAR-10's row comes from benchmarks/results/defaults.json (same settings, 5,000 images, 3 epochs).

    python benchmarks/qas_datasets.py [--only DATASET ...]   # -> benchmarks/results/qas_datasets.json
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from defaults import git_commit  # noqa: E402

RESULTS = HERE / "results"
OUT_JSON = RESULTS / "qas_datasets.json"
DATASETS = {
    "fashion-mnist": ["--data", "fashion-mnist", "--subset", "2000", "--test-subset", "1000", "--epochs", "3"],
    "lfw": ["--data", "lfw"],
}
MODES = {"fp32": ["--precision", "fp32"], "int8": ["--no-qas"], "int8-qas": []}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=list(DATASETS))
    ap.add_argument("--runs", default=str(HERE.parent / "runs" / "qas_datasets"))
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for data in args.only or DATASETS:
        for mode, flags in MODES.items():
            cmd = ["microtrain", "train", "--model", "mcunet-5fps", "--scheme", "last:6", *DATASETS[data], *flags,
                   "--out", str(Path(args.runs) / f"{data}-{mode}"), "--force", "--quiet", "--json"]
            print("$", shlex.join(cmd), flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            m = json.loads(proc.stdout)
            sel = m.get("lr_selection") or {}
            row = {"command": shlex.join(cmd), "commit": git_commit(),
                   "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                   "test_accuracy": m["test_accuracy"], "lr": m["lr"], "train_images": m["train_images"],
                   "test_images": m["test_images"], "epochs": m["epochs"], "augment": m["augment"],
                   "batch_size": m.get("batch_size"), "fallbacks": sel.get("fallbacks"),
                   "selection_seconds": sel.get("seconds"), "run_seconds": sel.get("run_seconds"),
                   "candidates": [{k: c.get(k) for k in ("lr", "status", "val_accuracy", "val_loss")}
                                  for c in sel.get("candidates", [])]}
            latest = json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {"rows": {}}
            latest["model"], latest["scheme"] = "mcunet-5fps", "last:6"
            latest["rows"].setdefault(data, {})[mode] = row
            RESULTS.mkdir(exist_ok=True)
            OUT_JSON.write_text(json.dumps(latest, indent=1) + "\n")
            print(f"{data} {mode}: {m['test_accuracy']:.2%} at lr {m['lr']:g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
