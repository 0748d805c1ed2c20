"""`microtrain federate`: federated fine-tuning of a simulated fleet of devices on Flower's simulation runtime."""

from __future__ import annotations

import argparse
import fcntl
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from microtrain.data.datasets import DATASETS, open_dataset
from microtrain.errors import MicrotrainError
from microtrain.fleet import core
from microtrain.frontends.zoo import ZOO_MODELS, load_model
from microtrain.sparse.scheme import resolve_scheme

ENGINE = "torch engine at batch 1 (runtime.trainstep.GraphTrainStep, int8: the device's arithmetic)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "federate", help="federated fine-tuning of a simulated fleet of devices (Flower simulation)",
        description="Fine-tune one sparse update scheme on a fleet of N simulated devices with Flower (ServerApp / "
                    "ClientApp on its simulation runtime, started with `flwr run` on a local SuperLink). Every "
                    "device starts from the same pretrained model, holds its own shard of the training data (iid or "
                    "Dirichlet non-iid) and trains --local-steps steps per round at batch 1 with the host's torch "
                    "engine (the device's int8 arithmetic; the host twin of the generated C is not used yet). Only "
                    "the trainable state travels (int8 weight slices, int32 biases, the head); the server averages "
                    "it in the real domain and stores it back with the device's rounding, evaluates every round on "
                    "the test split, and checkpoints (--resume continues after the last round). Writes "
                    "RUN/metrics.json, RUN/accuracy.png, RUN/checkpoint.npz (so `microtrain compile --from RUN` "
                    "works) and, with --program, RUN/state.bin for that C program. Needs the optional package flwr "
                    "(pip install 'microtrain[fleet]').")
    p.add_argument("--model", required=True, help=f"zoo name ({', '.join(ZOO_MODELS)}) or model file")
    p.add_argument("--scheme", required=True, help="preset (paper-<label>, bias-only, last:K, ...) or scheme file")
    p.add_argument("--data", required=True, help=f"dataset name ({', '.join(DATASETS)}) or ImageFolder directory")
    p.add_argument("--clients", type=int, default=10, help="simulated devices (default 10)")
    p.add_argument("--rounds", type=int, default=20, help="communication rounds (default 20)")
    p.add_argument("--local-steps", type=int, default=50, help="training steps (images, batch 1) per device per "
                                                                "round (default 50)")
    p.add_argument("--partition", default="iid", help="iid (default) or dirichlet:ALPHA (non-iid label skew, e.g. "
                                                      "dirichlet:0.5)")
    p.add_argument("--sample", type=float, default=1.0, help="fraction of devices per round (default 1)")
    p.add_argument("--lr", type=float, default=0.005, help="peak learning rate of each device (default 0.005); "
                                                           "cosine decay over the device's rounds x local steps")
    p.add_argument("--warmup-rounds", type=float, default=0.0, help="linear warm-up, in rounds (default 0)")
    p.add_argument("--augment", choices=core.AUGMENTS, default="flip", help="flip (default) or none")
    p.add_argument("--subset", type=int, help="class-balanced subset of N training images, split among the devices")
    p.add_argument("--test-subset", type=int, help="class-balanced subset of N test images")
    p.add_argument("--workers", type=int, default=1, help="devices training at the same time (CPUs for Flower's Ray "
                                                          "backend, one per device; default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training device (default 1)")
    p.add_argument("--program", metavar="C_DIR", help="a `microtrain compile` project of the same model and scheme: "
                                                      "after every round RUN/state.bin holds the aggregate in its "
                                                      "state format (its harness loads it with -i)")
    p.add_argument("--keep-client-states", action="store_true",
                   help="also write every device's returned state and the aggregate under RUN/rounds/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue an interrupted federation in --out")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print metrics.json to stdout at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def app_dir() -> Path:
    return Path(str(resources.files("microtrain") / "fleet" / "app"))


def prepare(args: argparse.Namespace) -> core.Job:
    """Writes RUN/train_graph, RUN/fleet-data/ and RUN/federation.json; returns the job."""
    if args.workers < 1 or args.threads < 1:
        raise MicrotrainError(f"--workers and --threads must be >= 1 (got {args.workers}, {args.threads})")
    model = load_model(args.model)
    resolve_scheme(args.scheme, model)  # a bad scheme fails here, before any data is read
    progress = not args.quiet
    train_ds = open_dataset(args.data, "train", subset=args.subset, seed=args.seed, progress=progress)
    test_ds = open_dataset(args.data, "test", subset=args.test_subset, seed=args.seed, progress=progress)
    if len(test_ds) == 0:
        raise MicrotrainError(f"{args.data}: no test images")
    out = Path(args.out).resolve()
    data = str(Path(args.data).resolve()) if Path(args.data).is_dir() else args.data
    job = core.Job(run_dir=str(out), model=model.name,
                   scheme=str(Path(args.scheme).resolve()) if Path(args.scheme).is_file() else args.scheme,
                   data=data, clients=args.clients,
                   rounds=args.rounds, local_steps=args.local_steps, partition=args.partition, sample=args.sample,
                   lr=args.lr, warmup_rounds=args.warmup_rounds, augment=args.augment, seed=args.seed,
                   resolution=model.tensors[model.inputs[0]].shape[1], train_images=len(train_ds),
                   test_images=len(test_ds), keep_client_states=args.keep_client_states,
                   program=str(Path(args.program).resolve()) if args.program else None,
                   model_spec=str(Path(args.model).resolve()) if Path(args.model).is_file() else args.model,
                   num_classes=train_ds.num_classes)
    core.validate(job)
    if args.program:
        if not (Path(args.program) / "program.json").is_file():
            raise MicrotrainError(f"{args.program}: no program.json (not a `microtrain compile` project)")
        core.check_program(job.program, core.training_graph(job))
    if args.resume:
        f = out / core.STATE
        if not f.is_file():
            raise MicrotrainError(f"{out}: nothing to resume (no {core.STATE}); run without --resume")
        old = json.loads(f.read_text())["job"]
        diff = {k: (old.get(k), v) for k, v in job.numbers().items() if old.get(k) != v}
        if diff:
            raise MicrotrainError(f"cannot resume {out}: configuration changed "
                                  + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items()))
    else:
        for stale in (core.STATE, core.CHECKPOINT, core.PROGRESS, core.STATE_BIN, core.METRICS):
            (out / stale).unlink(missing_ok=True)
        shutil.rmtree(out / "rounds", ignore_errors=True)
    parts = core.partition(train_ds.labels, train_ds.num_classes, job.clients, job.partition, job.seed)
    out.mkdir(parents=True, exist_ok=True)
    core.training_graph(job).save(out / core.GRAPH)  # what `microtrain compile --from RUN` reads
    train_ds.save(out / core.DATA / "train.npz")
    test_ds.save(out / core.DATA / "test.npz")
    np.savez(out / core.DATA / "partition.npz", clients=np.array(job.clients),
             **{f"client{k}": p for k, p in enumerate(parts)})
    job.save(out / core.JOB)
    return job


def flower_command(job: core.Job, resume: bool, workers: int, threads: int) -> list[str]:
    beside = Path(sys.executable).parent / "flwr"  # the CLI of this interpreter's flwr, even outside PATH
    flwr = str(beside) if beside.is_file() else shutil.which("flwr")
    if flwr is None:
        raise MicrotrainError("federate needs the optional package flwr with its simulation runtime "
                              "(pip install 'microtrain[fleet]')")
    run_cfg = f"job={json.dumps(str(Path(job.run_dir) / core.JOB))} resume={str(resume).lower()} threads={threads}"
    fed_cfg = (f"num-supernodes={job.clients} client-resources-num-cpus=1 init-args-num-cpus={workers} "
               "init-args-logging-level='ERROR'")
    return [flwr, "run", str(app_dir()), "--run-config", run_cfg, "--federation-config", fed_cfg, "--stream"]


def simulate(job: core.Job, *, resume: bool, workers: int, threads: int, progress: bool) -> dict[str, Any]:
    """Runs the Flower simulation, showing the server's progress; returns the final progress record."""
    run = Path(job.run_dir)
    log = run / "flower.log"
    cmd = flower_command(job, resume, workers, threads)
    done0 = 0
    if resume and (run / core.STATE).is_file():
        done0 = len(json.loads((run / core.STATE).read_text())["history"]) * job.per_round
    bar = tqdm(total=job.rounds * job.per_round, initial=done0, desc=f"federate {job.clients} devices",
               unit="device-round", disable=not progress, dynamic_ncols=True)
    state: dict[str, Any] = {}
    lock = open(Path(tempfile.gettempdir()) / "microtrain-flower.lock", "wb")  # noqa: SIM115 (released below)
    with open(log, "wb") as f:
        # Flower starts its local SuperLink on first use: two federations starting at once would both try, so
        # starts are serialised on this machine until Flower has accepted the run
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=run)
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                if not lock.closed and b"Successfully started run" in log.read_bytes():
                    lock.close()
                state = _read_progress(run) or state
                if state.get("status") == "running":
                    bar.n = state["round"] * job.per_round + (state["done"] if state["done"] < state["of"] else 0)
                    bar.set_postfix_str(f"round {min(state['round'] + 1, job.rounds)}/{job.rounds}", refresh=False)
                    bar.refresh()
        except BaseException:
            proc.terminate()
            run_id = re.search(rb"Successfully started run (\d+)", log.read_bytes())
            if run_id:  # the run lives in the SuperLink, not in `flwr run`: stop it there
                subprocess.run([cmd[0], "stop", run_id.group(1).decode()], capture_output=True, timeout=60)
            raise
        finally:
            lock.close()
            bar.close()
    state = _read_progress(run) or state
    if state.get("status") != "completed":
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["no output"]
        reason = state.get("error") or tail[0].strip()
        raise MicrotrainError(f"the federation did not complete: {reason} (Flower's log: {log})")
    return state


def _read_progress(run: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run / core.PROGRESS).read_text())
    except (OSError, ValueError):
        return None


def summarize(job: core.Job, command: str, wall: float) -> dict[str, Any]:
    """RUN/metrics.json from the server's checkpoint record; also draws RUN/accuracy.png."""
    run = Path(job.run_dir)
    graph = core.training_graph(job)
    info = json.loads((run / core.STATE).read_text())
    hist = info["history"]
    parts = core.load_partition(run)
    labels = np.load(run / core.DATA / "train.npz")["labels"]
    payload, full = core.payload_bytes(graph), core.model_bytes(graph)
    best = max(hist, key=lambda h: h["test_accuracy"])
    m = {"format": core.FORMAT, "status": "completed", "command": command, "engine": ENGINE,
         "transport": "Flower simulation runtime (flwr run, local SuperLink, Ray backend)",
         "model": job.model, "scheme": graph.meta["train"]["scheme"], "data": job.data,
         "clients": job.clients, "rounds": job.rounds, "local_steps": job.local_steps, "partition": job.partition,
         "sample": job.sample, "devices_per_round": job.per_round, "lr": job.lr, "warmup_rounds": job.warmup_rounds,
         "augment": job.augment, "seed": job.seed, "resolution": job.resolution, "train_images": job.train_images,
         "test_images": job.test_images,
         "shard_sizes": [len(p) for p in parts],
         "shard_class_counts": [np.bincount(labels[p], minlength=int(labels.max()) + 1).tolist() for p in parts],
         "test_accuracy": hist[-1]["test_accuracy"], "best_test_accuracy": best["test_accuracy"],
         "best_round": best["round"], "test_accuracy_per_round": [h["test_accuracy"] for h in hist],
         "train_loss_per_round": [h["train_loss"] for h in hist],
         "bytes": {"payload_per_transfer": payload, "full_model": full, "payload_vs_full_model": payload / full,
                   "per_round_per_client": {"down": payload, "up": payload},
                   "wire_per_round_per_client": {"down": hist[-1]["wire_bytes_down"][0],
                                                 "up": hist[-1]["wire_bytes_up"][0]},
                   "trainable_tensors": {n: {"shape": list(graph.tensors[n].shape), "dtype": graph.tensors[n].dtype,
                                             "bytes": graph.tensors[n].nbytes} for n in core.trainable_names(graph)},
                   "note": "payload: the trainable state as the device stores it (int8 slices, int32 biases, fp32 "
                           "head); wire: Flower's serialized ArrayRecord; full model: every weight int8, every bias "
                           "int32, the head fp32"},
         "round_seconds": [h["seconds"] for h in hist], "wall_seconds": round(wall, 1),
         "global_step": info["global_step"], "checkpoint": str(run / core.CHECKPOINT), "history": hist}
    if job.program:
        m["state_bin"] = str(run / core.STATE_BIN)
    core.write_json(run / core.METRICS, m)
    core.plot_rounds(hist, run / core.PLOT, f"{job.model} {job.scheme}, {job.clients} devices, {job.partition}, "
                                            f"{job.local_steps} local steps/round")
    return m


def _argv(args: argparse.Namespace, job: core.Job) -> list[str]:
    """The command line with every option spelled out (defaults resolved): the exact command."""
    argv = ["--model", args.model, "--scheme", args.scheme, "--data", args.data, "--clients", str(job.clients),
            "--rounds", str(job.rounds), "--local-steps", str(job.local_steps), "--partition", job.partition,
            "--sample", f"{job.sample:g}", "--lr", f"{job.lr:g}", "--warmup-rounds", f"{job.warmup_rounds:g}",
            "--augment", job.augment, "--workers", str(args.workers), "--threads", str(args.threads),
            "--seed", str(job.seed)]
    for flag in ("subset", "test_subset", "program"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    argv += ["--keep-client-states"] * args.keep_client_states + ["--resume"] * args.resume + ["--out", args.out]
    return argv


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    job = prepare(args)
    command = shlex.join(["microtrain", "federate", *_argv(args, job)])
    simulate(job, resume=args.resume, workers=args.workers, threads=args.threads, progress=not args.quiet)
    m = summarize(job, command, time.perf_counter() - t0)
    if args.json:
        print(json.dumps(m, indent=1))
    else:
        b = m["bytes"]
        print(f"{job.model} {job.scheme} on {job.clients} devices ({job.partition}), {job.rounds} rounds x "
              f"{job.local_steps} local steps: test accuracy {m['test_accuracy']:.2%} "
              f"(best {m['best_test_accuracy']:.2%} after round {m['best_round']}); {b['payload_per_transfer']} B "
              f"per device per direction per round vs "
              f"{b['full_model']} B for the whole int8 model ({b['payload_vs_full_model']:.1%}); run in {job.run_dir}")
    return 0
