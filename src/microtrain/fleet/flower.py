"""The federation on Flower: a ServerApp (aggregation, evaluation, checkpoints) and a ClientApp (one simulated device
per SuperNode), run by Flower's simulation runtime (`flwr run` on a local SuperLink; `microtrain federate` starts it).

The Flower App that `flwr run` bundles is `fleet/app/pyproject.toml`; its components are `server_app` and
`client_app` below. The run config carries one key, `job`: the path of RUN/federation.json (`core.Job`). Devices
are the SuperNodes' partitions: `partition-id` k trains on shard k. Messages carry only the trainable state
(ArrayRecord, the device's dtypes) down and up; the server measures each ArrayRecord's serialized size.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from microtrain.data.datasets import ImageDataset
from microtrain.errors import MicrotrainError
from microtrain.fleet.core import (
    DATA,
    PROGRESS,
    Device,
    Job,
    Server,
    load_partition,
    sample_clients,
    trainable_names,
    training_graph,
    write_json,
)

NODE_WAIT_S = 120.0
POLL_S = 0.05

client_app = ClientApp()
server_app = ServerApp()

# A Ray actor of the simulation hosts several SuperNodes over a run: keep each device (its resized shard and prefix
# cache) alive between rounds, keyed by job file and partition.
_devices: dict[tuple[str, int], Device] = {}
_train_sets: dict[str, ImageDataset] = {}


def _device(job_path: str, pid: int) -> Device:
    key = (job_path, pid)
    if key not in _devices:
        job = Job.load(job_path)
        run = Path(job.run_dir)
        if job_path not in _train_sets:
            _train_sets[job_path] = ImageDataset.load(run / DATA / "train.npz")
        shard = _train_sets[job_path].take(load_partition(run)[pid])
        _devices[key] = Device(training_graph(job), shard, pid, job)
    return _devices[key]


def _arrays(state: dict[str, np.ndarray], names: list[str]) -> ArrayRecord:
    return ArrayRecord({n: Array(np.ascontiguousarray(state[n])) for n in names})


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    """Which shard this SuperNode holds."""
    pid = int(context.node_config["partition-id"])
    return Message(content=RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """One device's round: load the global trainable state, `local_steps` steps at batch 1, send the state back."""
    pid = int(context.node_config["partition-id"])
    cfg = msg.content["config"]
    torch.set_num_threads(int(cfg["threads"]))
    dev = _device(str(cfg["job"]), pid)
    state = {n: a.numpy() for n, a in msg.content["arrays"].items()}
    t0 = time.perf_counter()
    new, m = dev.train_round(state, int(cfg["round"]), int(cfg["global-step"]))
    metrics = MetricRecord({"partition-id": pid, "loss": float(m["loss"]), "steps": int(m["steps"]),
                            "examples": int(m["examples"]), "seconds": time.perf_counter() - t0})
    return Message(content=RecordDict({"arrays": _arrays(new, dev.names), "metrics": metrics}), reply_to=msg)


def _collect(grid: Grid, messages: list[Message], on_reply: Any = None) -> list[Message]:
    """Push `messages`, pull until every one has its reply; a device's error is raised here."""
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        for r in got:
            pending.discard(r.metadata.reply_to_message_id)
            if r.has_error():
                raise MicrotrainError(f"a device failed: {r.error.reason}")
            replies.append(r)
            if on_reply:
                on_reply(r)
        if not got:
            time.sleep(POLL_S)
    return replies


def _nodes(grid: Grid, clients: int) -> dict[int, int]:
    """partition id -> SuperNode id, once every simulated device is up."""
    t0 = time.monotonic()
    nodes = list(grid.get_node_ids())
    while len(nodes) < clients:
        if time.monotonic() - t0 > NODE_WAIT_S:
            raise MicrotrainError(f"only {len(nodes)} of {clients} simulated devices came up in {NODE_WAIT_S:.0f} s")
        time.sleep(0.2)
        nodes = list(grid.get_node_ids())
    msgs = [Message(content=RecordDict({"config": ConfigRecord({})}), message_type="query", dst_node_id=n)
            for n in nodes]
    out = {int(r.content["metrics"]["partition-id"]): r.metadata.src_node_id for r in _collect(grid, msgs)}
    if sorted(out) != list(range(clients)):
        raise MicrotrainError(f"expected partitions 0..{clients - 1}, the SuperNodes hold {sorted(out)}")
    return out


def serve(grid: Grid, job_path: str, resume: bool, threads: int) -> None:
    job = Job.load(job_path)
    run = Path(job.run_dir)
    server = Server(job, resume=resume)
    node = _nodes(grid, job.clients)
    names = trainable_names(server.graph)
    progress = {"status": "running", "round": server.next_round, "rounds": job.rounds, "done": 0, "of": 0}
    write_json(run / PROGRESS, progress)
    for rnd in range(server.next_round, job.rounds):
        t0 = time.perf_counter()
        clients = sample_clients(job, rnd)
        arrays = _arrays(server.state, names)
        config = ConfigRecord({"job": job_path, "round": rnd, "global-step": server.global_step, "threads": threads})
        msgs = [Message(content=RecordDict({"arrays": arrays, "config": config}), message_type="train",
                        dst_node_id=node[k]) for k in clients]
        progress.update(round=rnd, done=0, of=len(clients))
        write_json(run / PROGRESS, progress)

        def tick(_: Message) -> None:
            progress["done"] += 1
            write_json(run / PROGRESS, progress)  # noqa: B023 (called within this iteration only)

        replies: dict[int, tuple[dict[str, np.ndarray], dict[str, float]]] = {}
        up: dict[int, int] = {}
        for r in _collect(grid, msgs, tick):
            m = r.content["metrics"]
            k = int(m["partition-id"])
            replies[k] = ({n: a.numpy() for n, a in r.content["arrays"].items()},
                          {"loss": float(m["loss"]), "steps": int(m["steps"])})
            up[k] = r.content["arrays"].count_bytes()
        down = arrays.count_bytes()
        server.finish_round(rnd, clients, replies, {"down": [down] * len(clients), "up": [up[k] for k in clients]},
                            time.perf_counter() - t0)
        progress.update(round=rnd + 1, done=len(clients))
        write_json(run / PROGRESS, progress)
    write_json(run / PROGRESS, {**progress, "status": "completed"})


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    job_path = str(context.run_config["job"])
    run = Path(Job.load(job_path).run_dir)
    try:
        serve(grid, job_path, bool(context.run_config["resume"]), int(context.run_config["threads"]))
    except BaseException as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        write_json(run / PROGRESS, {"status": "failed", "error": reason})
        raise
