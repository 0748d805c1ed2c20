"""Why `train`'s default batch size is 16: the defaults protocol (mcunet-5fps `last:6` on 5,000 class-balanced
CIFAR-10 training images, 3 epochs, the full test set, `--lr auto`) at batch 64 / 32 / 16 / 8, int8 + QAS and int8
without QAS. A 3-epoch fine-tune is short of steps; more, noisier steps help where the backbone learns (QAS), while
no-QAS, whose int8 backbone barely moves, is mostly its head and gains less. Every command is recorded with its
metrics; `python benchmarks/report.py` draws accuracy against batch size.

    python benchmarks/batch_size.py [--batch 64 32 16 8] [--jobs 2]   # -> benchmarks/results/batch_size.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from defaults import PROTOCOL, git_commit  # noqa: E402

RESULTS = HERE / "results"
OUT_JSON = RESULTS / "batch_size.json"
MODES = {"int8-qas": ["--scheme", "last:6"], "int8-noqas": ["--scheme", "last:6", "--no-qas"]}


def run_one(mode: str, batch: int, runs: Path, env: dict[str, str]) -> dict:
    cmd = ["microtrain", "train", *PROTOCOL, *MODES[mode], "--batch-size", str(batch),
           "--out", str(runs / f"{mode}-b{batch}"), "--force", "--json"]
    print("$", shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    m = json.loads(proc.stdout)
    sel = m.get("lr_selection") or {}
    print(f"{mode} batch {batch}: test {m['test_accuracy']:.2%} at lr {m['lr']:g}", flush=True)
    return {"mode": mode, "batch_size": batch, "command": shlex.join(cmd), "commit": git_commit(),
            "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "test_accuracy": m["test_accuracy"], "test_accuracy_per_epoch": m.get("test_accuracy_per_epoch"),
            "lr": m["lr"], "train_seconds": m.get("train_seconds"), "selection_seconds": sel.get("seconds")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 32, 16, 8])
    ap.add_argument("--jobs", type=int, default=2, help="runs at once, one torch thread each")
    ap.add_argument("--runs", default=str(HERE.parent / "runs" / "batch_size"))
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    jobs = [(mode, b) for b in args.batch for mode in MODES]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda j: run_one(j[0], j[1], Path(args.runs), env), jobs))
    margins = {}
    for b in args.batch:
        acc = {r["mode"]: r["test_accuracy"] for r in rows if r["batch_size"] == b}
        margins[str(b)] = round(100 * (acc["int8-qas"] - acc["int8-noqas"]), 2)
    RESULTS.mkdir(exist_ok=True)
    OUT_JSON.write_text(json.dumps({"protocol": shlex.join(["microtrain", "train", *PROTOCOL]), "threads": 1,
                                    "command": shlex.join(["python", "benchmarks/batch_size.py", *sys.argv[1:]]),
                                    "commit": git_commit(),
                                    "rows": rows, "qas_minus_noqas_points": margins}, indent=1) + "\n")
    print(json.dumps(margins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
