"""The numbers of a federated fine-tune, independent of the transport that carries them.

A fleet of `clients` simulated devices starts from the same pretrained model and training graph (one scheme, SGD).
Each round the server samples a fraction of them; each sampled device loads the global trainable state, runs
`local_steps` training steps at batch 1 on its own shard, and sends back its trainable state; the server averages
those states (weighted by shard size, FedAvg) and evaluates the result on the test split.

What a device runs: the host's torch engine (`runtime.trainstep.GraphTrainStep`, int8 precision) at batch 1, i.e.
the integer-exact forward, float32 backward, QAS-scaled SGD updates with counter-hash stochastic rounding into the
int8 slices and round-to-nearest into the int32 biases that the generated C program computes. (A host twin of the
generated C is being built separately; it is not used here.) Each device has its own rounding seed
(`device_seed`), as real devices would.

What travels: only the trainable state of the scheme (int8 weight slices, int32 biases, the float32 head), never the
frozen weights; `payload_bytes` vs `model_bytes` is the saving.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from microtrain.data.datasets import ImageDataset, resize_batch
from microtrain.errors import MicrotrainError
from microtrain.ir.graph import Graph
from microtrain.ir.trainmeta import trainable
from microtrain.runtime.prefix_cache import PrefixCache
from microtrain.runtime.trainer import evaluate, lr_at
from microtrain.runtime.trainstep import GraphTrainStep, sr_uniform

FORMAT = "microtrain-federate/1"
JOB, GRAPH, CHECKPOINT, STATE, METRICS = "federation.json", "train_graph", "checkpoint.npz", "checkpoint.json", \
    "metrics.json"
DATA = "fleet-data"  # RUN/fleet-data/{train,test}.npz (decoded images) and partition.npz (each client's indices)
PROGRESS, STATE_BIN, PLOT = "progress.json", "state.bin", "accuracy.png"
AUGMENTS = ("flip", "none")


# ---- the job --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """Everything that decides the federation's numbers (resuming requires the same job), plus where it lives."""

    run_dir: str
    model: str
    scheme: str
    data: str
    clients: int
    rounds: int
    local_steps: int
    partition: str = "iid"
    sample: float = 1.0
    lr: float = 0.005
    warmup_rounds: float = 0.0
    augment: str = "flip"
    seed: int = 0
    resolution: int = 128
    train_images: int = 0
    test_images: int = 0
    eval_batch: int = 100
    keep_client_states: bool = False
    program: str | None = None  # a `microtrain compile` project: RUN/state.bin is written in its state format
    model_spec: str = ""  # what --model named (zoo name or absolute path): devices rebuild the graph from it
    num_classes: int = 0

    def save(self, path: Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> Job:
        d = json.loads(Path(path).read_text())
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def numbers(self) -> dict[str, Any]:
        """The fields a resumed run must share with the interrupted one."""
        return {k: v for k, v in asdict(self).items() if k not in ("run_dir", "keep_client_states", "program",
                                                                    "eval_batch")}

    @property
    def per_round(self) -> int:
        """Devices sampled per round."""
        return max(1, round(self.sample * self.clients))

    @property
    def total_steps(self) -> int:
        """Training steps one device's learning-rate schedule spans (every round it could take part in)."""
        return self.rounds * self.local_steps


def validate(job: Job) -> None:
    if job.clients < 1 or job.rounds < 1 or job.local_steps < 1:
        raise MicrotrainError(f"--clients, --rounds and --local-steps must be >= 1 (got {job.clients}, {job.rounds}, "
                              f"{job.local_steps})")
    if not 0 < job.sample <= 1:
        raise MicrotrainError(f"--sample must be a fraction in (0, 1], got {job.sample:g}")
    if not (job.lr > 0 and math.isfinite(job.lr)) or job.warmup_rounds < 0:
        raise MicrotrainError(f"--lr must be positive and --warmup-rounds >= 0 (got {job.lr:g}, {job.warmup_rounds:g})")
    if job.augment not in AUGMENTS:
        raise MicrotrainError(f"--augment must be one of {', '.join(AUGMENTS)}, got {job.augment!r}")
    parse_partition(job.partition)


_graphs: dict[str, Graph] = {}


def training_graph(job: Job) -> Graph:
    """The job's training graph, rebuilt from the model and scheme (deterministic: the one RUN/train_graph holds)."""
    key = json.dumps([job.model_spec, job.scheme, job.num_classes, job.seed])
    if key not in _graphs:
        from microtrain.autodiff.build import TrainConfig, build_training_graph
        from microtrain.frontends.zoo import load_model
        from microtrain.sparse.scheme import resolve_scheme

        model = load_model(job.model_spec)
        _graphs[key] = build_training_graph(model, resolve_scheme(job.scheme, model), job.num_classes,
                                            TrainConfig(seed=job.seed))
    return _graphs[key]


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- partitions -----------------------------------------------------------------------------------------------------
def parse_partition(spec: str) -> tuple[str, float | None]:
    """'iid' -> ('iid', None); 'dirichlet:0.5' -> ('dirichlet', 0.5)."""
    if spec == "iid":
        return "iid", None
    m = re.fullmatch(r"dirichlet:([0-9.eE+-]+)", spec)
    try:
        alpha = float(m.group(1)) if m else -1.0
    except ValueError:
        alpha = -1.0
    if not (alpha > 0 and math.isfinite(alpha)):
        raise MicrotrainError(f"--partition must be iid or dirichlet:ALPHA with ALPHA > 0, got {spec!r}")
    return "dirichlet", alpha


def partition(labels: np.ndarray, num_classes: int, clients: int, spec: str, seed: int = 0) -> list[np.ndarray]:
    """Each client's training indices (disjoint, covering every image, none empty, sorted).

    iid: a seeded shuffle cut into `clients` near-equal parts. dirichlet:ALPHA (Hsu et al. 2019): for each class,
    the proportions of its images that go to each client are drawn from Dir(ALPHA * 1); small ALPHA gives each client
    a few dominant classes and unequal shard sizes. Draws leaving a client empty are redrawn (up to 1000 times)."""
    kind, alpha = parse_partition(spec)
    n = len(labels)
    if clients > n:
        raise MicrotrainError(f"{clients} clients but only {n} training images")
    rng = np.random.default_rng([seed, 0xF1EE7])
    if kind == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), clients)]
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for idx in by_class:
            p = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) > 0:
            return out
    raise MicrotrainError(f"dirichlet:{alpha:g} left a client without images in 1000 draws: use fewer clients, more "
                          "images or a larger ALPHA")


def sample_clients(job: Job, rnd: int) -> list[int]:
    """The devices taking part in round `rnd` (0-based): all of them, or a seeded sample of `job.per_round`."""
    if job.per_round >= job.clients:
        return list(range(job.clients))
    rng = np.random.default_rng([job.seed, 0x5A3B1E, rnd])
    return sorted(int(k) for k in rng.choice(job.clients, job.per_round, replace=False))


# ---- state -----------------------------------------------------------------------------------------------------------
def trainable_names(graph: Graph) -> list[str]:
    """The state that travels: the scheme's trainable tensors, without optimizer slots, in the graph's order."""
    return trainable(graph)


def initial_state(graph: Graph) -> dict[str, np.ndarray]:
    return {n: np.array(graph.tensors[n].data) for n in trainable_names(graph)}


def streams(graph: Graph) -> dict[str, int]:
    """The stochastic-rounding stream of each state tensor: the same numbering as GraphTrainStep and the C runtime."""
    return {n: i for i, n in enumerate(sorted(graph.meta["train"]["state"]))}


def payload_bytes(graph: Graph) -> int:
    """Bytes of the trainable state as the device stores it (what one transfer carries, without framing)."""
    return sum(graph.tensors[n].nbytes for n in trainable_names(graph))


def model_bytes(graph: Graph) -> int:
    """Bytes of the whole model as the device stores it: every conv weight (frozen and trainable parts) in int8,
    every bias in int32, the head in float32 (per-channel scales not counted). Sending the whole model would cost
    this per transfer."""
    slots = set(graph.meta["train"]["state"]) - set(trainable_names(graph))
    return sum(t.nbytes for n, t in graph.tensors.items()
               if t.data is not None and t.role in ("weight", "bias", "state") and n not in slots)


AGGREGATION_SEED = 0xF1EE7  # xor-ed into the run seed: the server's rounding stream differs from every device's


def device_seed(seed: int, client: int) -> int:
    """Device `client`'s stochastic-rounding seed."""
    return seed + 1 + client


def aggregate(graph: Graph, states: list[dict[str, np.ndarray]], weights: list[float], *, seed: int, step: int
              ) -> dict[str, np.ndarray]:
    """FedAvg of device states, stored back the way the device stores them.

    The average is taken in the real domain: a weight slice's real value is `q * s_w[o]`, a bias's `q * s_w[o] *
    s_x`, with scales that are frozen and identical on every device, so the weighted mean of the real values divided
    by the (shared) scale is exactly the weighted mean `m` of the integers, computed here in float64. Converting back
    uses the device's own rounding, which keeps the result QAS-consistent (QAS makes an int8 step equal an fp32 step on
    the real weights; averaging integers averages those real weights per channel):
      - int8 weight slices: stochastic rounding `clamp(floor(m + u), -128, 127)` with `u = sr_uniform(seed ^
        AGGREGATION_SEED, step, stream, n)`, the counter hash of the device's updates (unbiased: E[q] = m);
      - int32 biases: round half to even (the device's round-to-nearest of bias updates);
      - the float32 head: the mean, rounded to float32.
    `step` is the global step count after the round (so every round draws fresh uniforms)."""
    if not states or len(states) != len(weights) or min(weights) <= 0:
        raise MicrotrainError("aggregate needs one positive weight per state")
    w = np.asarray(weights, np.float64) / float(np.sum(weights))
    st = streams(graph)
    out: dict[str, np.ndarray] = {}
    for n in trainable_names(graph):
        t = graph.tensors[n]
        m = sum(wk * np.asarray(s[n], np.float64) for wk, s in zip(w, states, strict=True))
        if t.dtype == "int8":
            u = sr_uniform(seed ^ AGGREGATION_SEED, step, st[n], m.size).numpy().astype(np.float64).reshape(m.shape)
            out[n] = np.clip(np.floor(m + u), -128, 127).astype(np.int8)
        elif t.dtype == "int32":
            out[n] = np.clip(np.rint(m), -2**31, 2**31 - 1).astype(np.int32)
        else:
            out[n] = m.astype(np.float32)
    return out


# ---- a device ------------------------------------------------------------------------------------------------------
class Device:
    """One simulated device: its shard (resized once to the model resolution), its training step (batch 1, its own
    rounding seed, the frozen prefix cached per image variant: exact) and its data order."""

    def __init__(self, graph: Graph, shard: ImageDataset, client: int, job: Job):
        self.job, self.client = job, client
        self.step = GraphTrainStep(graph, "int8")
        self.step.cfg = type(self.step.cfg)(**{**asdict(self.step.cfg), "seed": device_seed(job.seed, client)})
        self.trainer = PrefixCache(self.step) if self.step.boundary != graph.inputs[:1] else self.step
        self.x = resize_batch(torch.from_numpy(shard.images), job.resolution, crop=1.0)
        self.y = torch.from_numpy(shard.labels)
        self.names = trainable_names(graph)
        self._perm: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.job.seed, self.client, epoch]).permutation(len(self.y)))
        return self._perm[1]

    def train_round(self, state: dict[str, np.ndarray], rnd: int, global_step: int
                    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Loads the global state, runs `local_steps` steps (continuing through this device's shuffled epochs, a flip
        drawn per step with augment=flip), returns the new trainable state and {loss, steps, examples}."""
        job = self.job
        self.step.load_state_dict({**state, "__step__": np.array(global_step, np.int64)})
        n, k = len(self.y), job.local_steps
        flips = np.random.default_rng([job.seed, self.client, rnd, 0xF11]).random(k) < 0.5
        warm = round(job.warmup_rounds * k)
        loss_sum = 0.0
        for i in range(k):
            p = rnd * k + i
            j = int(self._order(p // n)[p % n])
            x = self.x[j: j + 1]
            if job.augment == "flip" and flips[i]:
                x = x.flip(-1)
            lr = lr_at(global_step + i, job.total_steps, warm, job.lr)
            loss = self.trainer.step(x, self.y[j: j + 1], lr)
            if not math.isfinite(loss):
                raise MicrotrainError(f"device {self.client}: loss became non-finite in round {rnd + 1}, local step "
                                      f"{i + 1} (lower --lr)")
            loss_sum += loss
        new = self.step.state_dict()
        return {nm: new[nm] for nm in self.names}, {"loss": loss_sum / k, "steps": k, "examples": n}


# ---- the server's bookkeeping ---------------------------------------------------------------------------------------
class Server:
    """Global state, evaluation, checkpoints (resumable after any round), metrics, plot and state.bin of a run."""

    def __init__(self, job: Job, *, resume: bool):
        self.job = job
        self.run = Path(job.run_dir)
        self.graph = training_graph(job)
        self.names = trainable_names(self.graph)
        self.sizes = [len(p) for p in load_partition(self.run)]
        self.test = ImageDataset.load(self.run / DATA / "test.npz")
        step = GraphTrainStep(self.graph, "int8")
        self.eval_step = PrefixCache(step) if step.boundary != self.graph.inputs[:1] else step
        self.state, self.global_step, self.history = initial_state(self.graph), 0, []
        info = self.load() if resume else None
        if info is not None:
            self.global_step, self.history = info["global_step"], info["history"]

    @property
    def next_round(self) -> int:
        return len(self.history)

    def load(self) -> dict[str, Any] | None:
        """The last completed round's checkpoint (None if there is none)."""
        f, ck = self.run / STATE, self.run / CHECKPOINT
        if not f.is_file():
            return None
        info = json.loads(f.read_text())
        if not ck.is_file() or sha256(ck) != info["checkpoint_sha256"]:
            raise MicrotrainError(f"{ck} does not match {f} (interrupted while saving?); start again without --resume")
        with np.load(ck, allow_pickle=False) as z:
            self.state = {n: z[n] for n in self.names}
        return info

    def finish_round(self, rnd: int, clients: list[int], replies: dict[int, tuple[dict[str, np.ndarray],
                     dict[str, float]]], wire: dict[str, list[int]], seconds: float) -> dict[str, Any]:
        """Aggregates the replies of round `rnd`, evaluates, checkpoints; returns the round's record."""
        if sorted(replies) != sorted(clients):
            raise MicrotrainError(f"round {rnd + 1}: replies from devices {sorted(replies)}, expected {clients}")
        self.global_step += self.job.local_steps
        states = [replies[k][0] for k in clients]
        self.state = aggregate(self.graph, states, [self.sizes[k] for k in clients], seed=self.job.seed,
                               step=self.global_step)
        if self.job.keep_client_states:
            d = self.run / "rounds" / f"round-{rnd + 1}"
            d.mkdir(parents=True, exist_ok=True)
            for k in clients:
                np.savez(d / f"client-{k}.npz", **replies[k][0])
            np.savez(d / "aggregate.npz", **self.state)
        self.eval_step.load_state_dict({**self.state, "__step__": np.array(self.global_step, np.int64)})
        t0 = time.perf_counter()
        acc = evaluate(self.eval_step, self.test, batch_size=self.job.eval_batch, resolution=self.job.resolution,
                       eval_crop=1.0)
        eval_seconds = time.perf_counter() - t0
        n = sum(self.sizes[k] for k in clients)
        rec = {"round": rnd + 1, "clients": clients, "test_accuracy": acc,
               "train_loss": sum(replies[k][1]["loss"] * self.sizes[k] for k in clients) / n,
               "global_step": self.global_step, "payload_bytes_down_per_client": payload_bytes(self.graph),
               "payload_bytes_up_per_client": payload_bytes(self.graph),
               "wire_bytes_down": wire["down"], "wire_bytes_up": wire["up"], "seconds": round(seconds, 3),
               "eval_seconds": round(eval_seconds, 3)}
        self.history.append(rec)
        self.save()
        return rec

    def save(self) -> None:
        ck = self.run / CHECKPOINT
        tmp = ck.with_name("checkpoint.tmp.npz")
        np.savez(tmp, **self.state, __step__=np.array(self.global_step, np.int64))
        info = {"format": FORMAT, "global_step": self.global_step, "history": self.history,
                "checkpoint_sha256": sha256(tmp), "job": self.job.numbers()}
        os.replace(tmp, ck)
        write_json(self.run / STATE, info)
        if self.job.program:
            write_state_bin(self.run / STATE_BIN, self.state, self.global_step, self.job.program)


def load_partition(run: Path) -> list[np.ndarray]:
    with np.load(run / DATA / "partition.npz", allow_pickle=False) as z:
        return [z[f"client{k}"] for k in range(int(z["clients"]))]


def check_program(program_dir: str, graph: Graph) -> dict[str, Any]:
    """The C project's program.json, if its state is exactly the federation's trainable state (else one line)."""
    from microtrain.codegen.project import load_program

    prog = load_program(program_dir)
    want = {t["name"]: (tuple(t["shape"]), t["dtype"]) for t in prog["state"]}
    have = {n: (tuple(graph.tensors[n].shape), graph.tensors[n].dtype) for n in trainable_names(graph)}
    if want != have:
        diff = ", ".join(sorted(set(want) ^ set(have))[:3]) or "shapes or dtypes"
        raise MicrotrainError(f"{program_dir}: the program's state differs from the federation's ({diff}); compile "
                              "it from the same model and scheme (e.g. `microtrain compile --from RUN`)")
    return prog


def write_state_bin(path: Path, state: dict[str, np.ndarray], step: int, program_dir: str) -> None:
    """The aggregated state in the state format of the C project `program_dir` (codegen.project.write_state, the
    project's own writer), which its harness loads with `-i state.bin`."""
    from microtrain.codegen.project import load_program, write_state

    write_state(path, {**state, "__step__": np.array(step, np.int64)}, load_program(program_dir))


def plot_rounds(history: list[dict[str, Any]], path: Path, title: str,
                reference: tuple[str, float] | None = None) -> None:
    """Test accuracy over rounds (PNG); `reference` draws a labelled horizontal line (e.g. centralized training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot([h["round"] for h in history], [100 * h["test_accuracy"] for h in history], "o-", ms=3,
            label="federated (aggregate)")
    if reference:
        ax.axhline(100 * reference[1], color="tab:red", ls="--", label=f"{reference[0]} {100 * reference[1]:.2f}%")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
