"""PyTorch's memory for one training step of the same network (the paper's "PyTorch 303 MB" point, PAPER.md §1).

For each zoo model, in a fresh process: the dequantized float network (`runtime.float_model.FloatNet`, every
parameter trained, SGD, batch 1, 128x128, 10 classes, 1 thread) takes a few autograd steps on real CIFAR-10-sized
images while a sampler thread reads the process's resident set (/proc/self/statm) every millisecond. Reported:
- `step_peak_bytes`: peak RSS during the steps minus RSS just before the first step (what one step allocates:
  activations kept for backward, gradients, allocator slack);
- `process_peak_bytes`: the whole process's peak RSS (ru_maxrss: torch, Python, the model) - the paper's kind of
  number;
- `params_bytes`: fp32 parameters, for scale.
microtrain's planned peak SRAM for the same step (full update, and the sparse scheme with reordering) sits beside it
in docs/results.md (benchmarks/results/memory.json).

    python benchmarks/pytorch_memory.py   # -> benchmarks/results/pytorch_memory.json (about a minute)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODELS = ("mbv2-w0.35", "proxyless-w0.3", "mcunet-5fps")
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def measure(model: str, steps: int) -> dict:
    """One model's numbers (run in a fresh process: ru_maxrss is per process)."""
    import numpy as np
    import torch

    from microtrain.data.samples import real_images
    from microtrain.frontends.zoo import load_model
    from microtrain.runtime.float_model import FloatNet

    torch.set_num_threads(1)
    g = load_model(model)
    net = FloatNet(g, 10)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    x, y, _ = real_images(steps, 128, seed=0, num_classes=10)
    xs, ys = torch.from_numpy(x), torch.from_numpy(np.asarray(y, dtype=np.int64))
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    before = rss()
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(xs[i: i + 1]), ys[i: i + 1])
        loss.backward()
        opt.step()
    stop.set()
    t.join()
    return {"model": model, "steps": steps, "rss_before_bytes": before, "step_peak_bytes": peak[0] - before,
            "process_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "params_bytes": sum(p.numel() * 4 for p in net.parameters()), "torch": torch.__version__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--one", choices=MODELS, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps)))
        return 0
    rows = []
    for m in MODELS:
        r = subprocess.run([sys.executable, __file__, "--one", m, "--steps", str(args.steps)], capture_output=True,
                           text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"{m}: step +{rows[-1]['step_peak_bytes'] / 2**20:.1f} MB, process peak "
              f"{rows[-1]['process_peak_bytes'] / 2**20:.1f} MB", flush=True)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout
    out = {"command": f"python benchmarks/pytorch_memory.py --steps {args.steps}", "commit": sha.strip(),
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "setting": "FloatNet fp32, full update (every parameter), SGD, batch 1, 128x128, 10 classes, 1 thread",
           "paper": {"model": "mbv2-w0.35", "pytorch_mb": 303, "tensorflow_mb": 652}, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pytorch_memory.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
