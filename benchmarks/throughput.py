"""Host training throughput: sparse update on the int8 training graph vs PyTorch fp32 full fine-tuning.

Both train the same network (mcunet-5fps at 128x128 by default, 10 classes) on the same real CIFAR-10 batches, in
the same process, alternating rounds so that machine load affects all alike. `sparse_int8` recomputes its frozen
prefix every step (no prefix cache): the cost of one real training step. `sparse_int8_prefix_cached` is what
`microtrain train` runs after the first epoch with flip / no augmentation (the frozen prefix's output memoised per
image, exact), its cache filled by one untimed pass.

    python benchmarks/throughput.py [--model mcunet-5fps] [--scheme paper-99kb] [--batch 64] [--rounds 4]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from microtrain.data.datasets import batches, open_dataset
from microtrain.frontends.zoo import load_model
from microtrain.runtime.float_model import FloatNet
from microtrain.runtime.prefix_cache import PrefixCache
from microtrain.runtime.trainstep import build_train_step
from microtrain.sparse.scheme import resolve_scheme

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mcunet-5fps")
    ap.add_argument("--scheme", default="paper-99kb")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5, help="training steps per round")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    g = load_model(args.model)
    ds = open_dataset("cifar10", "train", subset=args.batch * args.iters, progress=False)
    data = list(batches(ds, args.batch, shuffle=True, augment="flip", resolution=128))
    sparse = build_train_step(g, resolve_scheme(args.scheme, g), 10)
    cached = PrefixCache(build_train_step(g, resolve_scheme(args.scheme, g), 10))
    for x, y in data:  # fill the cache (epoch 1 of a run)
        cached.step(x, y, 0.01)
    net = FloatNet(g, 10)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)

    def float_step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    timings: dict[str, float] = {"sparse_int8": 0.0, "sparse_int8_prefix_cached": 0.0, "pytorch_fp32_full": 0.0}
    for _ in range(args.rounds):
        for name, fn in (("sparse_int8", lambda x, y: sparse.step(x, y, 0.01)),
                         ("sparse_int8_prefix_cached", lambda x, y: cached.step(x, y, 0.01)),
                         ("pytorch_fp32_full", float_step)):
            t = time.perf_counter()
            for x, y in data:
                fn(x, y)
            timings[name] += time.perf_counter() - t
    images = args.rounds * len(data) * args.batch
    ips = {k: images / v for k, v in timings.items()}
    result = {"command": shlex.join(["python", "benchmarks/throughput.py", *sys.argv[1:]]),
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "model": args.model, "scheme": args.scheme, "batch_size": args.batch, "images_per_setting": images,
              "torch_threads": torch.get_num_threads(), "images_per_second": ips,
              "ratio_sparse_over_pytorch_full": ips["sparse_int8"] / ips["pytorch_fp32_full"],
              "ratio_sparse_cached_over_pytorch_full": ips["sparse_int8_prefix_cached"] / ips["pytorch_fp32_full"]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
