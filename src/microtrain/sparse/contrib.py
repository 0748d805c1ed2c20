"""Contribution analysis (PAPER.md §3): what accuracy each part of a sparse update buys, measured by short fine-tunes.

Every trial fine-tunes the same model on the same data subset, in the same order, from the same linear-probe head
(head-only training for `probe_epochs` first, so a short fine-tune measures what the extra parameters add rather than
how fast a fresh head converges), and is evaluated on the same fixed test subset:

- `head`:        the classifier only                                  (baseline of the bias trials)
- `bias-k`:      + the biases of the last k convs, k in `k_grid`       -> dacc_b[k] = acc(bias-k) - acc(head)
- `weight-i-r`:  the biases of the last `base_k` convs + the first int(C_in * r) input channels of conv i's weight
                 -> dacc_W[i, r] = acc(weight-i-r) - acc(bias-base_k)

Trials are independent: they run in parallel processes (or on Ray) and each result is one small JSON file under
`<cache>/<model>-<data>-<protocol hash>/trials/`, so an interrupted analysis resumes where it stopped.

Speed without changing a single number: the frozen prefix of a trial is a pure function of the image, and with flip
(or no) augmentation each image has at most two variants. Before the trials, the forward pass is run once per image
variant and the activations at a few *cuts* (the boundaries of the probe, of `bias-base_k` and of the bias trials
whose boundary is small) are stored as tables. A trial starts from the latest cut inside its own frozen prefix and
runs only its remaining frozen ops (exact: the same kernels on the same values; a test checks bit-equality).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from microtrain.autodiff.build import TrainConfig, build_training_graph
from microtrain.data.datasets import ImageDataset, model_resolution, open_dataset, resize_batch
from microtrain.errors import MicrotrainError
from microtrain.frontends.zoo import ZOO_MODELS, load_model
from microtrain.ir.graph import Graph
from microtrain.runtime.prefix_cache import PrefixCache, PrefixStep
from microtrain.runtime.tasks import run_tasks
from microtrain.runtime.trainer import DivergedError, fit
from microtrain.runtime.trainstep import GraphTrainStep
from microtrain.sparse.cost import analytic_extra_bytes
from microtrain.sparse.scheme import RATIOS, Scheme

FORMAT = "microtrain-contrib/1"
HEAD_KEYS = ("head.w", "head.b")


# ---- protocol and trials ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Protocol:
    """Everything that decides a trial's number; its hash keys the on-disk trial cache."""

    data: str
    train_images: int = 3000
    test_images: int = 2000
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    warmup_epochs: float = 0.3
    probe_epochs: int = 10
    probe_lr: float = 0.1
    augment: str = "flip"
    precision: str = "int8"
    seed: int = 0
    k_grid: tuple[int, ...] = ()
    weight_convs: tuple[int, ...] = ()
    base_k: int = 0
    ratios: tuple[float, ...] = RATIOS
    max_table_bytes: int = 8192  # per image: larger cuts are recomputed by the trials that need them

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Protocol:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def default_protocol(graph: Graph, data: str, **overrides: Any) -> Protocol:
    """Weight trials on the later half of the convs (every conv the paper's schemes ever weight-update lies there:
    mcunet 21.., mbv2 27.., proxyless 33..), measured on top of the biases of exactly that half; bias trials every
    block (3 convs) up to the base, then every two blocks, and all convs."""
    n = len(graph.convs())
    base = overrides.pop("base_k", None)
    base = n - math.ceil(n / 2) if base is None else base
    k_grid = overrides.pop("k_grid", None) or tuple(sorted({*range(3, base + 1, 3), base,
                                                            *range(base + 6, n, 6), n} - {0}))
    weight_convs = overrides.pop("weight_convs", None) or tuple(range(n - base, n))
    p = Protocol(data=data, k_grid=tuple(k_grid), weight_convs=tuple(weight_convs), base_k=base, **overrides)
    return validate_protocol(p, graph)


def validate_protocol(p: Protocol, graph: Graph) -> Protocol:
    n = len(graph.convs())
    if p.augment not in ("flip", "none"):
        raise MicrotrainError(f"contribution analysis needs augment flip or none (cacheable prefix), got {p.augment}")
    if min(p.train_images, p.test_images, p.epochs, p.batch_size) < 1 or p.probe_epochs < 0:
        raise MicrotrainError("subset sizes, epochs and batch size must be >= 1 (probe epochs >= 0)")
    if not 0 < p.base_k <= n or any(not 0 < k <= n for k in p.k_grid):
        raise MicrotrainError(f"bias counts (base {p.base_k}, grid {list(p.k_grid)}) must lie in 1..{n}")
    if p.base_k not in p.k_grid:
        raise MicrotrainError(f"the base bias count {p.base_k} must be one of the k grid {list(p.k_grid)}")
    if any(not 0 <= i < n for i in p.weight_convs):
        raise MicrotrainError(f"weight conv indices must lie in 0..{n - 1}, got {list(p.weight_convs)}")
    if any(r not in RATIOS for r in p.ratios):
        raise MicrotrainError(f"ratios must be among {RATIOS}, got {list(p.ratios)}")
    return p


@dataclass(frozen=True)
class Trial:
    kind: str  # head | bias | weight
    k: int = 0
    conv: int | None = None
    ratio: float | None = None

    @property
    def key(self) -> str:
        return {"head": "head", "bias": f"bias-{self.k}"}.get(self.kind) or f"weight-{self.conv}-{self.ratio:g}"

    def scheme(self) -> Scheme:
        wr = {self.conv: float(self.ratio)} if self.kind == "weight" else {}
        return Scheme(f"contrib-{self.key}", self.k, wr)


def plan_trials(p: Protocol, graph: Graph) -> list[Trial]:
    """head, bias-k for the grid, weight-i-r (skipping ratios that select no channel, e.g. 1/8 of a 3-channel stem)."""
    trials = [Trial("head"), *(Trial("bias", k) for k in p.k_grid)]
    for i in p.weight_convs:
        for r in p.ratios:
            t = Trial("weight", p.base_k, i, r)
            if Scheme("probe", 0, {i: r}).updated_channels(graph, i) > 0:
                trials.append(t)
    return trials


def model_fingerprint(g: Graph) -> str:
    h = hashlib.sha1(g.name.encode())
    for n in sorted(g.tensors):
        t = g.tensors[n]
        h.update(f"{n}{t.shape}{t.dtype}{t.zero}".encode())
        for a in (t.data, t.scale):
            if a is not None:
                h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:12]


# the packages whose code decides a trial's number (graph, autodiff, executor, trainer, data pipeline)
SEMANTIC_PACKAGES = ("ir", "autodiff", "runtime", "data")


def code_fingerprint() -> str:
    """Hash of the source that computes a trial, so a cache written by other code is not reused."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha1()
    for pkg in SEMANTIC_PACKAGES:
        for f in sorted((root / pkg).glob("*.py")):
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


def _data_id(data: str) -> str:
    p = Path(data)
    return str(p.resolve()) if p.is_dir() and os.sep in data else data


def workdir_for(cache_root: str | Path, graph: Graph, p: Protocol) -> Path:
    """`<cache>/<model>-<data>-<hash>/protocol-<hash>`: the outer directory (decoded subsets, prefix tables) is keyed
    by what the images and activations depend on (including the code that computes them), the inner one (probe head,
    trials) by the whole protocol, so trials of a changed protocol or code never mix and a new learning rate reuses
    the tables."""
    def h(obj: Any) -> str:
        return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]
    data = {"model": model_fingerprint(graph), "data": _data_id(p.data), "train": p.train_images,
            "test": p.test_images, "seed": p.seed, "augment": p.augment, "precision": p.precision,
            "code": code_fingerprint()}
    outer = Path(cache_root) / f"{graph.name}-{Path(p.data).name}-{h(data)}"
    return outer / f"protocol-{h({**data, 'protocol': p.to_dict()})}"


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "microtrain" / "contrib"


# ---- prefix tables --------------------------------------------------------------------------------------------
def image_key(img: torch.Tensor) -> bytes:
    """Same key as runtime.prefix_cache: the exact int8 image bytes."""
    return hashlib.blake2b(img.numpy().tobytes(), digest_size=16).digest()


@dataclass
class Table:
    """Activations at one cut for every image variant of the protocol: `rows[key]` indexes `arrays[tensor]`."""

    name: str
    tensors: list[str]
    frozen_ops: list[str]  # the ops that produce the cut (a trial may start here iff they are all frozen there)
    rows: dict[bytes, int]
    arrays: dict[str, np.ndarray]

    def save(self, d: Path) -> None:
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        keys = np.zeros((len(self.rows), 16), np.uint8)
        for k, i in self.rows.items():
            keys[i] = np.frombuffer(k, np.uint8)
        np.save(tmp / "keys.npy", keys)
        for j, n in enumerate(self.tensors):
            np.save(tmp / f"t{j}.npy", self.arrays[n])
        (tmp / "meta.json").write_text(json.dumps({"name": self.name, "tensors": self.tensors,
                                                   "frozen_ops": self.frozen_ops}))
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)

    @classmethod
    def load(cls, d: Path) -> Table:
        meta = json.loads((d / "meta.json").read_text())
        keys = np.load(d / "keys.npy")
        arrays = {n: np.load(d / f"t{j}.npy", mmap_mode="r") for j, n in enumerate(meta["tensors"])}
        return cls(meta["name"], meta["tensors"], meta["frozen_ops"], {k.tobytes(): i for i, k in enumerate(keys)},
                   arrays)


class TablePrefix(PrefixStep):
    """A TrainStep wrapper: the boundary of `step` from a table cut (exact), via the frozen ops after the cut.
    Images missing from the table (none when the protocol built it) fall back to the step's own prefix."""

    def __init__(self, step: GraphTrainStep, table: Table):
        self.inner, self.table = step, table
        done = set(table.frozen_ops)
        self.ops = [o for o in step.frozen_ops if o.name not in done]
        self.misses = 0

    def _prefix(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = [self.table.rows.get(image_key(img)) for img in x]
        if any(r is None for r in rows):
            self.misses += sum(r is None for r in rows)
            return self.inner.prefix(x)
        env = {n: torch.from_numpy(np.ascontiguousarray(a[rows])) for n, a in self.table.arrays.items()}
        env = self.inner.run(self.ops, env, train=True)
        return {n: env[n] for n in self.inner.boundary}


def usable_table(step: GraphTrainStep, tables: Iterable[Table]) -> Table | None:
    """The table whose cut lies latest inside `step`'s frozen prefix (None if no cut does)."""
    frozen = {o.name for o in step.frozen_ops}
    ok = [t for t in tables if set(t.frozen_ops) <= frozen]
    return max(ok, key=lambda t: len(t.frozen_ops), default=None)


def image_variants(train_ds: ImageDataset, test_ds: ImageDataset, p: Protocol, resolution: int, batch: int = 64
                   ) -> Iterator[tuple[torch.Tensor, list[bytes]]]:
    """Every distinct int8 image a trial can feed, in batches: train images resized (and mirrored with flip), test
    images as the evaluation transform sees them (plain resize for flip/none). Exactly what `data.batches` yields."""
    seen: set[bytes] = set()
    for ds, train in ((train_ds, True), (test_ds, False)):
        for s in range(0, len(ds), batch):
            y = resize_batch(torch.from_numpy(ds.images[s: s + batch]), resolution, crop=1.0)
            for v in ([y, y.flip(-1)] if train and p.augment == "flip" else [y]):
                keep, keys = [], []
                for i, img in enumerate(v):
                    k = image_key(img)
                    if k not in seen:
                        seen.add(k)
                        keep.append(i)
                        keys.append(k)
                if keep:
                    yield v[keep], keys


def cut_schemes(graph: Graph, p: Protocol, trials: list[Trial]) -> dict[str, Scheme]:
    """Cuts worth a table: the probe's (pool), the base's, and each bias trial's boundary when it is small."""
    cuts = {"head": Trial("head").scheme(), f"bias-{p.base_k}": Trial("bias", p.base_k).scheme()}
    for t in trials:
        if t.kind == "bias" and t.key not in cuts:
            cuts[t.key] = t.scheme()
    return cuts


def build_tables(graph: Graph, p: Protocol, trials: list[Trial], train_ds: ImageDataset, test_ds: ImageDataset,
                 out: Path, *, progress: bool = True, batch: int = 64) -> list[str]:
    """One forward pass over every image variant; writes the tables of `cut_schemes` that are missing in `out`."""
    res = model_resolution(graph)
    cuts: dict[str, tuple[list[str], list[str]]] = {}
    for name, s in cut_schemes(graph, p, trials).items():
        st = GraphTrainStep(build_training_graph(graph, s, train_ds.num_classes, TrainConfig(seed=p.seed)),
                            p.precision)
        if st.boundary == graph.inputs[:1]:
            continue
        per_image = sum(st.g.tensors[n].numel * (1 if st.g.tensors[n].dtype == "int8" else 4) for n in st.boundary)
        if name in ("head", f"bias-{p.base_k}") or per_image <= p.max_table_bytes:
            cuts[name] = (list(st.boundary), [o.name for o in st.frozen_ops])
    todo = {n: c for n, c in cuts.items() if not (out / n / "meta.json").is_file()}
    if todo:
        full = GraphTrainStep(build_training_graph(graph, Scheme("forward", 0), train_ds.num_classes,
                                                   TrainConfig(seed=p.seed)), p.precision)
        arrays: dict[str, list[torch.Tensor]] = {t: [] for c in todo.values() for t in c[0]}
        rows: dict[bytes, int] = {}
        total = (len(train_ds) * (2 if p.augment == "flip" else 1) + len(test_ds))
        bar = tqdm(total=total, desc="prefix tables", unit="img", disable=not progress, leave=False)
        for x, keys in image_variants(train_ds, test_ds, p, res, batch):
            env = full.run(full.frozen_ops, full._env(x), train=True)
            for t in arrays:
                arrays[t].append(env[t].clone())
            for k in keys:
                rows[k] = len(rows)
            bar.update(len(x))
        bar.close()
        for name, (tensors, ops) in todo.items():
            Table(name, tensors, ops, rows, {t: torch.cat(arrays[t]).numpy() for t in tensors}).save(out / name)
    return sorted(cuts)


# ---- one trial (runs in a worker process) -----------------------------------------------------------------------
_MEMO: dict[Any, Any] = {}


def _memo(key: Any, make: Callable[[], Any]) -> Any:
    if key not in _MEMO:
        _MEMO[key] = make()
    return _MEMO[key]


def _datasets(workdir: Path, p: Protocol, progress: bool = False) -> tuple[ImageDataset, ImageDataset]:
    """The protocol's fixed train/test subsets, decoded once and stored in the work dir (workers load the npz)."""
    def get(split: str, n: int) -> ImageDataset:
        f = workdir.parent / "data" / f"{split}.npz"
        if f.is_file():
            return ImageDataset.load(f)
        ds = open_dataset(p.data, split, subset=n, seed=p.seed, progress=progress)
        ds.save(f)
        return ds
    return get("train", p.train_images), get("test", p.test_images)


def _tables(workdir: Path) -> list[Table]:
    d = workdir.parent / "tables"
    return [Table.load(t) for t in sorted(d.iterdir()) if (t / "meta.json").is_file()] if d.is_dir() else []


def _fit_trial(graph: Graph, scheme: Scheme, p: Protocol, train_ds: ImageDataset, test_ds: ImageDataset,
               tables: list[Table], run_dir: Path, epochs: int, lr: float,
               head: dict[str, np.ndarray] | None) -> dict[str, Any]:
    step = GraphTrainStep(build_training_graph(graph, scheme, train_ds.num_classes, TrainConfig(seed=p.seed)),
                          p.precision)
    if head is not None:
        step.load_state_dict(head)
    table = usable_table(step, tables)
    wrapped: Any = TablePrefix(step, table) if table is not None else PrefixCache(step)
    res = model_resolution(graph)
    t0 = time.perf_counter()
    try:
        m = fit(wrapped, train_ds, test_ds, epochs=epochs, lr=lr, batch_size=p.batch_size,
                warmup_epochs=p.warmup_epochs, augment=p.augment, resolution=res, seed=p.seed, out_dir=run_dir,
                eval_every=epochs, eval_crop=1.0, progress=False)
        out = {"status": "completed", "accuracy": m["test_accuracy"], "train_loss": m["train_loss"][-1]}
    except DivergedError as e:
        out = {"status": "diverged", "accuracy": None, "train_loss": None, "message": str(e)}
    out.update(seconds=round(time.perf_counter() - t0, 2), table=table.name if table else None,
               table_misses=wrapped.misses if table is not None else 0)
    out["state"] = step.state_dict()
    return out


def run_trial(model: str, workdir: str, protocol: dict[str, Any], trial: dict[str, Any],
              threads: int = 1) -> dict[str, Any]:
    """Runs one trial (module-level: picklable for process pools and Ray) and writes `trials/<key>.json`."""
    torch.set_num_threads(threads)
    wd = Path(workdir)
    p = Protocol.from_dict(protocol)
    t = Trial(**trial)
    graph = _memo(("model", model), lambda: load_model(model))
    train_ds, test_ds = _memo(("data", workdir), lambda: _datasets(wd, p))
    tables = _memo(("tables", workdir), lambda: _tables(wd))
    head_file = wd / "probe_head.npz"
    head = None
    if head_file.is_file():
        with np.load(head_file) as z:
            head = {k: z[k] for k in HEAD_KEYS}
    scheme = t.scheme()
    run_dir = wd / "runs" / t.key
    r = _fit_trial(graph, scheme, p, train_ds, test_ds, tables, run_dir, p.epochs, p.lr, head)
    r.pop("state")
    shutil.rmtree(run_dir, ignore_errors=True)
    result = {"trial": t.key, **asdict(t), "scheme": scheme.to_dict(),
              "analytic_extra_bytes": analytic_extra_bytes(graph, scheme), **r}
    _write_json(wd / "trials" / f"{t.key}.json", result)
    return result


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


# ---- the analysis ------------------------------------------------------------------------------------------------
@dataclass
class Analysis:
    model: str
    protocol: Protocol
    workdir: Path
    trials: list[Trial] = field(default_factory=list)


def prepare(model: str, p: Protocol, cache_root: str | Path, *, threads: int = 1, progress: bool = True
            ) -> Analysis:
    """Decodes the subsets, builds the prefix tables and trains the probe head (each only if not cached)."""
    graph = load_model(model)
    p = validate_protocol(p, graph)
    wd = workdir_for(cache_root, graph, p)
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "protocol.json").write_text(json.dumps({"model": graph.name, "model_fingerprint": model_fingerprint(graph),
                                                  "protocol": p.to_dict()}, indent=1) + "\n")
    trials = plan_trials(p, graph)
    torch.set_num_threads(threads)
    train_ds, test_ds = _datasets(wd, p, progress)
    build_tables(graph, p, trials, train_ds, test_ds, wd.parent / "tables", progress=progress)
    head_file = wd / "probe_head.npz"
    if p.probe_epochs and not head_file.is_file():
        r = _fit_trial(graph, Trial("head").scheme(), p, train_ds, test_ds, _tables(wd), wd / "runs" / "probe",
                       p.probe_epochs, p.probe_lr, None)
        if r["status"] != "completed":
            raise MicrotrainError(f"the probe head diverged at lr {p.probe_lr}: {r.get('message')}")
        tmp = head_file.with_name("probe_head.tmp.npz")
        np.savez(tmp, **{k: r["state"][k] for k in HEAD_KEYS}, accuracy=np.array(r["accuracy"]))
        os.replace(tmp, head_file)
        shutil.rmtree(wd / "runs" / "probe", ignore_errors=True)
    return Analysis(model, p, wd, trials)


def cached_results(a: Analysis) -> dict[str, dict[str, Any]]:
    out = {}
    for t in a.trials:
        f = a.workdir / "trials" / f"{t.key}.json"
        if f.is_file():
            try:
                out[t.key] = json.loads(f.read_text())
            except ValueError:
                f.unlink()  # a torn write from a killed run: redo the trial
    return out


def _cost_order(a: Analysis, trials: list[Trial]) -> list[Trial]:
    """Longest first (deep bias trials without a table), so the pool does not wait on one slow straggler."""
    return sorted(trials, key=lambda t: (-t.k if t.kind == "bias" else 0, t.key))


def run_trials(a: Analysis, *, workers: int = 1, ray_address: str | None = None, progress: bool = True,
               on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
    """Runs every trial without a cached result: in-process (workers=1), in a process pool, or on Ray ('local': a
    private instance with `workers` CPUs; see runtime.tasks.run_tasks)."""
    results = cached_results(a)
    todo = _cost_order(a, [t for t in a.trials if t.key not in results])
    bar = tqdm(total=len(a.trials), initial=len(results), desc=f"contrib {a.model}", unit="trial",
               disable=not progress, dynamic_ncols=True)
    args = [(a.model, str(a.workdir), a.protocol.to_dict(), asdict(t)) for t in todo]

    def done(r: dict[str, Any]) -> None:
        results[r["trial"]] = r
        acc = "diverged" if r["accuracy"] is None else f"{r['accuracy']:.2%}"
        bar.set_postfix_str(f"{r['trial']}: {acc} in {r['seconds']:.0f}s", refresh=False)
        bar.update()
        if on_result:
            on_result(r)

    try:
        run_tasks(run_trial, args, workers=workers, ray_address=ray_address, on_result=done)
    finally:
        bar.close()
    return results


def summarize(a: Analysis, results: dict[str, dict[str, Any]], *, command: str | None = None,
              wall_seconds: float | None = None) -> dict[str, Any]:
    """The contribution file: protocol, command, baselines, dacc per bias count and per (conv, ratio)."""
    graph = load_model(a.model)
    p = a.protocol
    missing = [t.key for t in a.trials if t.key not in results]
    if missing:
        raise MicrotrainError(f"{len(missing)} trials have no result yet ({', '.join(missing[:5])}...)")

    def acc(key: str) -> float:
        v = results[key]["accuracy"]
        if v is None:
            raise MicrotrainError(f"baseline trial {key} diverged at lr {p.lr}: lower --lr")
        return v

    head, base = acc("head"), acc(f"bias-{p.base_k}")
    names = {op.attrs["conv_index"]: op.name for op in graph.convs()}

    def delta(v: float | None, ref: float) -> float | None:
        return None if v is None else round(v - ref, 6)

    bias = [{"k": t.k, "accuracy": results[t.key]["accuracy"], "delta": delta(results[t.key]["accuracy"], head),
             "analytic_extra_bytes": results[t.key]["analytic_extra_bytes"]}
            for t in a.trials if t.kind == "bias"]
    weight = [{"conv": t.conv, "name": names[t.conv], "ratio": t.ratio, "accuracy": results[t.key]["accuracy"],
               "delta": delta(results[t.key]["accuracy"], base),
               "analytic_extra_bytes": results[t.key]["analytic_extra_bytes"]}
              for t in a.trials if t.kind == "weight"]
    probe = a.workdir / "probe_head.npz"
    probe_acc = float(np.load(probe)["accuracy"]) if probe.is_file() else None
    trial_seconds = sum(r["seconds"] for r in results.values())
    return {
        "format": FORMAT, "model": graph.name, "model_fingerprint": model_fingerprint(graph),
        "num_convs": len(graph.convs()), "data": p.data, "protocol": p.to_dict(),
        "protocol_text": protocol_text(p),
        "command": command, "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "wall_seconds": wall_seconds, "trial_seconds": round(trial_seconds, 1),
        "baselines": {"probe_head_accuracy": probe_acc, "head": head, f"bias-{p.base_k}": base},
        "bias": bias, "weight": weight,
        "diverged": sorted(k for k, r in results.items() if r["status"] != "completed"),
        "table_misses": sum(r["table_misses"] for r in results.values() if r["table"]),  # must be 0: exact reuse
    }


def protocol_text(p: Protocol) -> str:
    probe = (f"from a linear-probe head (head-only, {p.probe_epochs} epochs at lr {p.probe_lr:g}), "
             if p.probe_epochs else "from a fresh head, ")
    return (f"{p.data}: {p.train_images} class-balanced training images, {p.test_images} test images (fixed, seed "
            f"{p.seed}); every trial fine-tunes {probe}{p.epochs} epoch(s), batch {p.batch_size}, SGD lr {p.lr:g} "
            f"(warm-up {p.warmup_epochs:g} epochs, cosine), augment {p.augment}, {p.precision} training graph with "
            f"QAS; bias trials k in {list(p.k_grid)} vs head only; weight trials on convs "
            f"{p.weight_convs[0]}..{p.weight_convs[-1]} at ratios {list(p.ratios)} on top of the biases of the last "
            f"{p.base_k} convs, vs those biases alone. Single run per trial: deltas below ~1/test_images are noise.")


def analyse(model: str, p: Protocol, *, cache_root: str | Path | None = None, workers: int = 1,
            ray_address: str | None = None, progress: bool = True, command: str | None = None) -> dict[str, Any]:
    """The whole analysis: prepare (cached), run the missing trials, summarise."""
    t0 = time.perf_counter()
    a = prepare(model, p, cache_root or default_cache_root(), threads=max(1, workers), progress=progress)
    cached = len(cached_results(a))
    results = run_trials(a, workers=workers, ray_address=ray_address, progress=progress)
    out = summarize(a, results, command=command, wall_seconds=round(time.perf_counter() - t0, 1))
    out["trials_from_cache"] = cached  # wall_seconds covers this invocation only; trial_seconds every trial
    return out


# ---- reading contribution files ------------------------------------------------------------------------------
@dataclass
class Contributions:
    """A contribution file as the search uses it: dacc_b over k (linear between measured k, 0 at k = 0) and
    dacc_W per (conv, ratio) (missing or diverged -> not offered)."""

    model: str
    num_convs: int
    bias_k: np.ndarray  # measured k, ascending, starting with 0
    bias_delta: np.ndarray
    weight: dict[int, dict[float, float]]
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def k_max(self) -> int:
        return int(self.bias_k[-1])

    def bias_table(self) -> np.ndarray:
        """dacc_b for every k in 0..k_max (interpolated between measured points)."""
        return np.interp(np.arange(self.k_max + 1), self.bias_k, self.bias_delta)

    def noise(self) -> float:
        """The measurement noise of one delta, estimated from the table itself: the robust spread (1.4826 MAD) of
        the differences between adjacent ratios of the same conv, / sqrt(2). True effects change little from one
        ratio to the next, so these differences are mostly noise."""
        diffs: list[float] = []
        for w in self.weight.values():
            v = [w[r] for r in sorted(w)]
            diffs += [b - a for a, b in zip(v, v[1:], strict=False)]
        if len(diffs) < 4:
            return 0.0
        d = np.asarray(diffs)
        return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2))

    def shrunk(self, tau: float) -> Contributions:
        """Soft-thresholded deltas: sign(d) * max(|d| - tau, 0). A search maximising a sum of noisy deltas picks
        up every lucky one; shrinking by the noise level keeps only what stands out from it."""
        if tau <= 0:
            return self
        st = lambda v: float(np.sign(v) * max(abs(v) - tau, 0.0))  # noqa: E731
        w = {i: {r: st(v) for r, v in rs.items()} for i, rs in self.weight.items()}
        return replace(self, bias_delta=np.array([st(v) for v in self.bias_delta]), weight=w,
                       meta={**self.meta, "shrink": tau})

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "") -> Contributions:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise MicrotrainError(f"{source or 'contribution file'}: not a {FORMAT} file")
        try:
            pts = {0: 0.0} | {int(b["k"]): float(b["delta"]) for b in d["bias"] if b["delta"] is not None}
            k = np.array(sorted(pts))
            w: dict[int, dict[float, float]] = {}
            for e in d["weight"]:
                if e["delta"] is not None:
                    w.setdefault(int(e["conv"]), {})[float(e["ratio"])] = float(e["delta"])
            return cls(str(d["model"]), int(d["num_convs"]), k, np.array([pts[i] for i in k]), w, source,
                       {k_: d.get(k_) for k_ in ("data", "protocol", "command", "protocol_text")})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise MicrotrainError(f"{source or 'contribution file'}: malformed {FORMAT} file "
                                  f"({type(e).__name__}: {e})") from None

    @classmethod
    def load(cls, path: str | Path) -> Contributions:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise MicrotrainError(f"{path}: cannot read contribution file ({e})") from None
        return cls.from_dict(d, str(path))


def shipped_path(model: str) -> Path:
    return Path(str(resources.files("microtrain") / "sparse" / "contrib" / f"{model}.json"))


def shipped_contributions(model: str) -> Contributions:
    """The contribution file shipped for a zoo model (computed with `microtrain contrib`, command inside)."""
    f = shipped_path(model)
    if not f.is_file():
        have = [m for m in ZOO_MODELS if shipped_path(m).is_file()]
        raise MicrotrainError(f"no shipped contribution file for {model} (shipped: {', '.join(have) or 'none'}); "
                              f"run `microtrain contrib --model {model} --data DIR --out FILE` and pass --contrib FILE")
    return Contributions.load(f)


def with_overrides(p: Protocol, **kw: Any) -> Protocol:
    return replace(p, **{k: v for k, v in kw.items() if v is not None})


def echo(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
