"""Host training throughput: the int8 engine vs a same-scheme PyTorch fp32 baseline, side by side in one process.

Both train the same network (mcunet-5fps at 128x128, 10 classes) under the same sparse scheme, on the same real
CIFAR-10 batches, with plain SGD, the same batch size and the same number of torch threads:

- `int8`: the torch engine (`runtime/trainstep.py`), the device's training graph (integer-exact int8 forward, float32
  backward, int8 weights updated with stochastic rounding).
- `fp32`: an ordinary `torch.nn.Module` of the same function (`SchemeFloatStep` below): the int8 graph's weights
  dequantized, BatchNorm already folded into the convs (the int8 graph has no BN to keep; un-folding it would add
  work the int8 side does not do, so folded is the fair choice), each activation clamped to its int8 tensor's real
  range (ReLU6 where the graph folded one). Exactly the scheme's tensors train: the trained convs' biases, the
  trained weights' channel slices (a slice as its own parameter, the rest a frozen tensor), the head; every other
  tensor has requires_grad=False and the frozen prefix runs under torch.no_grad(); autograd + torch.optim.SGD.

Two settings, each side against its own kind:
- `cached`: what `microtrain train` runs after the first epoch with `--augment flip|none`: the frozen prefix's
  boundary tensors memoised per image (`runtime/prefix_cache.py` for both sides, fp32 keeping float32 tensors),
  filled by one untimed pass; each step runs only the trainable part.
- `uncached`: a full forward every step (the default augmentation, where every epoch sees new crops). The int8
  engine runs its frozen prefix `prefix_chunk` images at a time (same values; smaller activations that the allocator
  and the caches reuse); `fp32_prefix_chunked/uncached` gives the fp32 model the same micro-batching, to show how
  much of the uncached difference is that scheduling rather than the kernels.

Timing: per round, each (setting, side) trains on the same batches; the order of the two sides alternates from round
to round, and the reported number is the median over rounds of images per second. The load average is recorded:
the machine is shared, so rounds vary.

    python benchmarks/throughput.py [--model mcunet-5fps] [--scheme paper-99kb last:6] [--batch 64 1]
        [--threads 1 2] [--rounds 5] [--images 192] [--max-steps 24] [--settings uncached cached] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from microtrain.data.datasets import batches, open_dataset
from microtrain.frontends.zoo import load_model
from microtrain.ir.graph import Graph
from microtrain.ir.ops import conv_pads
from microtrain.runtime.float_model import FloatNet, _real_range
from microtrain.runtime.prefix_cache import PrefixCache
from microtrain.runtime.trainstep import GraphTrainStep, build_train_step
from microtrain.sparse.scheme import resolve_scheme

RESULTS = Path(__file__).resolve().parent / "results"


class SchemeFloatStep(nn.Module):
    """PyTorch fp32 training of the same network and the same trainable tensors as the int8 step `ref` (its training
    graph says which); implements the TrainStep calls PrefixCache needs (`g`, `boundary`, `prefix`, `step`)."""

    def __init__(self, model: Graph, ref: GraphTrainStep, num_classes: int, prefix_chunk: int | None = None):
        """`prefix_chunk`: run the no-grad prefix that many images at a time (None: the whole batch at once)."""
        super().__init__()
        self.prefix_chunk = prefix_chunk
        self.g = model
        self.boundary = list(ref.boundary)
        frozen = {o.name for o in ref.frozen_ops}
        self.prefix_ops = [o for o in model.ops[:-1] if o.name in frozen]
        self.rest_ops = [o for o in model.ops[:-1] if o.name not in frozen]
        state = set(ref.g.meta["train"]["state"])
        tops = {o.name: o for o in ref.g.ops if o.kind == "conv2d"}
        full = FloatNet(model, num_classes)
        self.weights = nn.ParameterDict()  # trainable tensors only; the frozen ones are plain tensors
        self.frozen: dict[str, torch.Tensor] = {}
        self.split: dict[str, tuple[int, int]] = {}  # conv -> (train_channels, axis) for a partially trained weight
        self.convs: dict[str, tuple[int, int | tuple[int, int, int, int], int]] = {}
        for op in model.ops:
            if op.kind != "conv2d":
                continue
            key = op.name.replace(".", "_")
            conv = full.convs[key]
            t, b, left, r = conv_pads(op.attrs)
            pad = t if (t, left) == (b, r) and t == left else (t, b, left, r)
            self.convs[op.name] = (op.attrs["stride"], pad, op.attrs["groups"])
            w, bias = conv.weight.detach(), conv.bias.detach()
            top = tops[op.name]
            if top.inputs[-1] in state:
                self.weights[key + "_b"] = nn.Parameter(bias.clone())
            else:
                self.frozen[key + "_b"] = bias.clone()
            wname = op.name + ".w_train"
            if wname not in state:
                self.frozen[key + "_w"] = w.clone()
                continue
            ch, axis = top.attrs["train_channels"], top.attrs["split_axis"]
            if ch == w.shape[axis]:
                self.weights[key + "_w"] = nn.Parameter(w.clone())
            else:
                self.split[op.name] = (ch, axis)
                self.weights[key + "_wt"] = nn.Parameter(w.narrow(axis, 0, ch).clone())
                self.frozen[key + "_wf"] = w.narrow(axis, ch, w.shape[axis] - ch).clone()
        self.head = full.head
        self.opt = torch.optim.SGD(self.parameters(), lr=0.01)

    def _w(self, name: str) -> torch.Tensor:
        return self.weights[name] if name in self.weights else self.frozen[name]

    def _conv(self, op, x: torch.Tensor) -> torch.Tensor:
        key = op.name.replace(".", "_")
        stride, pad, groups = self.convs[op.name]
        if op.name in self.split:
            w = torch.cat([self.weights[key + "_wt"], self.frozen[key + "_wf"]], dim=self.split[op.name][1])
        else:
            w = self._w(key + "_w")
        if not isinstance(pad, int):
            t, b, left, r = pad
            x, pad = F.pad(x, (left, r, t, b)), 0
        return F.conv2d(x, w, self._w(key + "_b"), stride, pad, 1, groups)

    def _run(self, ops: list, env: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        g = self.g
        for op in ops:
            if op.kind == "conv2d":
                v = self._conv(op, env[op.inputs[0]])
            elif op.kind == "add":
                v = env[op.inputs[0]] + env[op.inputs[1]]
            elif op.kind == "avgpool":
                env[op.outputs[0]] = env[op.inputs[0]].mean(dim=(2, 3))
                continue
            else:
                raise NotImplementedError(op.kind)
            env[op.outputs[0]] = torch.clamp(v, *_real_range(g.tensors[op.outputs[0]], op.attrs))
        return env

    @torch.no_grad()
    def prefix(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frozen prefix's boundary tensors (float32), without autograd."""
        k = self.prefix_chunk
        if k is not None and x.shape[0] > k:
            parts = [self.prefix(x[i:i + k]) for i in range(0, x.shape[0], k)]
            return {n: torch.cat([p[n] for p in parts]) for n in self.boundary}
        inp = self.g.tensors[self.g.inputs[0]]
        env = self._run(self.prefix_ops, {self.g.inputs[0]: (x.to(torch.float32) - inp.zero) * float(inp.scale)})
        return {n: env[n] for n in self.boundary}

    def step(self, x: torch.Tensor | dict[str, torch.Tensor], y: torch.Tensor, lr: float) -> float:
        """One SGD step on a batch of int8 images, or on the boundary tensors `prefix` returned."""
        env = dict(x) if isinstance(x, dict) else self.prefix(x)
        env = self._run(self.rest_ops, env)
        loss = F.cross_entropy(self.head(env[self.g.ops[-1].inputs[0]]), y)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()


def measure(model: str, scheme: str, batch: int, threads: int, rounds: int, steps: int,
            settings: tuple[str, ...] = ("uncached", "cached")) -> dict:
    """Median img/s over `rounds` of each (side, setting) for one configuration, sides alternating order."""
    torch.set_num_threads(threads)
    load = os.getloadavg()[0]
    g = load_model(model)
    ds = open_dataset("cifar10", "train", subset=batch * steps, progress=False)
    data = [(torch.as_tensor(x), torch.as_tensor(y))
            for x, y in batches(ds, batch, shuffle=True, augment="flip", resolution=128)]
    int8 = build_train_step(g, resolve_scheme(scheme, g), 10)
    fp32 = SchemeFloatStep(g, int8, 10)
    chunked = SchemeFloatStep(g, int8, 10, prefix_chunk=int8.prefix_chunk)
    trained = {"int8": sum(int8.params[n].numel() for n in int8.g.meta["train"]["state"]),
               "fp32": sum(p.numel() for p in fp32.parameters() if p.requires_grad)}
    if trained["int8"] != trained["fp32"]:  # SGD keeps no slot: the state is exactly the trained tensors
        raise SystemExit(f"the fp32 baseline trains other tensors than the scheme: {trained}")
    steps_of: dict[str, Callable] = {}
    if "uncached" in settings:
        steps_of.update({"int8/uncached": int8.step, "fp32/uncached": fp32.step,
                         "fp32_prefix_chunked/uncached": chunked.step})
    if "cached" in settings:
        steps_of.update({"int8/cached": PrefixCache(build_train_step(g, resolve_scheme(scheme, g), 10)).step,
                         "fp32/cached": PrefixCache(SchemeFloatStep(g, int8, 10)).step})
    for fn in steps_of.values():  # warm-up; fills the caches (a run's first epoch)
        for x, y in data:
            fn(x, y, 0.01)
    ips: dict[str, list[float]] = {k: [] for k in steps_of}
    for r in range(rounds):
        for setting in settings:
            sides = [k.split("/")[0] for k in steps_of if k.endswith("/" + setting)]
            for side in (sides if r % 2 == 0 else sides[::-1]):
                fn = steps_of[f"{side}/{setting}"]
                t = time.perf_counter()
                for x, y in data:
                    fn(x, y, 0.01)
                ips[f"{side}/{setting}"].append(len(data) * batch / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in ips.items()}
    return {"model": model, "scheme": scheme, "batch_size": batch, "torch_threads": threads,
            "load_average_1min_before_after": [round(load, 2), round(os.getloadavg()[0], 2)],
            "images_per_round": len(data) * batch, "rounds": rounds,
            "images_per_second_median": med,
            "images_per_second_rounds": {k: [round(v, 1) for v in vs] for k, vs in ips.items()},
            "int8_prefix_chunk": int8.prefix_chunk, "trained_elements": trained,
            "ratio_int8_over_fp32": {s: med[f"int8/{s}"] / med[f"fp32/{s}"] for s in settings},
            **({"ratio_int8_over_fp32_prefix_chunked": med["int8/uncached"] / med["fp32_prefix_chunked/uncached"]}
               if "uncached" in settings else {})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mcunet-5fps")
    ap.add_argument("--scheme", nargs="+", default=["paper-99kb", "last:6"])
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 1])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=192, help="images per round and setting (steps = images / batch)")
    ap.add_argument("--max-steps", type=int, default=24, help="at most this many steps per round (small batches)")
    ap.add_argument("--settings", nargs="+", choices=["uncached", "cached"], default=["uncached", "cached"],
                    help="a subset, for a quick look (with --out elsewhere)")
    ap.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    args = ap.parse_args()
    load_before = os.getloadavg()
    runs = []
    for scheme in args.scheme:
        for batch in args.batch:
            for threads in args.threads:
                steps = max(1, min(args.max_steps, args.images // batch))
                runs.append(measure(args.model, scheme, batch, threads, args.rounds, steps, tuple(args.settings)))
                print(json.dumps({k: runs[-1][k] for k in ("scheme", "batch_size", "torch_threads",
                                                            "images_per_second_median", "ratio_int8_over_fp32")}),
                      flush=True)
    result = {"command": shlex.join(["python", "benchmarks/throughput.py", *sys.argv[1:]]),
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "torch": torch.__version__, "cpu_count": os.cpu_count(),
              "load_average_1_5_15_before": [round(v, 2) for v in load_before],
              "load_average_1_5_15_after": [round(v, 2) for v in os.getloadavg()],
              "int8_at_least_fp32_everywhere": all(v >= 1.0 for r in runs for v in r["ratio_int8_over_fp32"].values()),
              "int8_below_fp32": [f"{r['scheme']} batch {r['batch_size']} threads {r['torch_threads']} {s}: "
                                  f"{r['images_per_second_median']['int8/' + s]:.1f} vs "
                                  f"{r['images_per_second_median']['fp32/' + s]:.1f} img/s"
                                  for r in runs for s, v in r["ratio_int8_over_fp32"].items() if v < 1.0],
              "runs": runs}
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
