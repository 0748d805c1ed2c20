"""Run directories of `microtrain train`: one run at a time (a lock), nothing overwritten by accident, and `--resume`
only into the very run it continues.

`open_run_dir` is called before anything is written into RUN_DIR:
- it takes RUN_DIR/.lock (an flock: the kernel releases it when the process ends, kill -9 included), so a second run
  into the same directory fails with one line instead of mixing files;
- without --resume, a directory that holds a run (completed, or interrupted) is refused unless --force, which removes
  that run's files (and only those) first; a run that diverged may be retried without --force, as its error says;
- with --resume, the run's identity (RUN_DIR/run.json: model, data, scheme, optimizer, precision, QAS, update
  storage, int8 gradients, engine, classes, and the training graph's hash) must equal this invocation's, checked
  before a single file changes; `fit` then checks the training configuration (epochs, lr, batch size, ...).
Every write is atomic (temp file + rename).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from microtrain.errors import MicrotrainError
from microtrain.outputs import check_output_dir

RUN_FILE, LOCK_FILE = "run.json", ".lock"
RUN_FILES = ("metrics.json", "checkpoint.npz", "checkpoint.json", "checkpoint.npz.tmp", "checkpoint.json.tmp",
             "metrics.json.tmp", "train_graph.json", "train_graph.npz", "sweep.json", "sweep.json.tmp", RUN_FILE,
             RUN_FILE + ".tmp", "lr_selection.json", "lr_selection.json.tmp")
_held: dict[Path, Any] = {}  # run directory -> its open lock file, held by this process until it exits


def graph_hash(graph: Any) -> str:
    """sha256 of a graph's description and arrays: two runs train the same graph iff these are equal."""
    h = hashlib.sha256(json.dumps(graph.to_dict(), sort_keys=True, default=str).encode())
    for k, a in sorted(graph.arrays().items()):
        h.update(k.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MicrotrainError(f"{path}: unreadable ({getattr(e, 'strerror', None) or e})") from None


def _lock(out: Path) -> None:
    if out.resolve() in _held:  # this process holds it already (commands run one after another in one process)
        return
    path = out / LOCK_FILE
    try:
        f = open(path, "a+")  # noqa: SIM115 - held open for the life of the process
    except OSError as e:
        raise MicrotrainError(f"{out}: cannot write the run directory ({e.strerror})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = f.read().strip() or "?"
        f.close()
        raise MicrotrainError(f"{out}: another run is writing into this directory (pid {owner}); wait for it or "
                              "choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _held[out.resolve()] = f


def release_locks() -> None:
    """Release this process's run locks (tests run several commands in one process)."""
    while _held:
        _, f = _held.popitem()
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _status(d: Path) -> str | None:
    """None: no run here; else completed | running | diverged (from metrics.json / checkpoint.json)."""
    if (d / "metrics.json").is_file():
        m = _read_json(d / "metrics.json")
        return str(m.get("status", "running")) if isinstance(m, dict) else "running"
    if (d / "checkpoint.json").is_file():
        info = _read_json(d / "checkpoint.json")
        return "diverged" if isinstance(info, dict) and "diverged" in info else "running"
    return None


def _runs(out: Path) -> list[tuple[Path, str]]:
    """The runs in `out`: itself, or a sweep's lr-* sub-runs."""
    found = []
    for d in [out, *sorted(p for p in out.glob("lr-*") if p.is_dir())]:
        s = _status(d)
        if s is not None:
            found.append((d, s))
    return found


def _clear(out: Path) -> None:
    for d in [out, *sorted(p for p in out.glob("lr-*") if p.is_dir())]:
        for name in RUN_FILES:
            (d / name).unlink(missing_ok=True)
        shutil.rmtree(d / "device", ignore_errors=True)
        if d != out and not any(d.iterdir()):
            d.rmdir()


def open_run_dir(out: Path, identity: dict[str, Any], *, resume: bool, force: bool) -> None:
    """Lock `out` and check what it holds against this invocation (module docstring); writes run.json."""
    check_output_dir(out, "--out", "run directory")
    _lock(out)
    runs = _runs(out)
    identity = json.loads(json.dumps(identity))  # as it will read back
    if resume and force:
        raise MicrotrainError("--resume continues the run in --out, --force replaces it: give one of them")
    if resume:
        if not runs and not (out / RUN_FILE).is_file():
            raise MicrotrainError(f"{out}: nothing to resume (no checkpoint); run without --resume")
        if not (out / RUN_FILE).is_file():
            raise MicrotrainError(f"{out}: the run has no {RUN_FILE} (made by an older microtrain), so it cannot be "
                                  "checked against this command; rerun without --resume (with --force)")
        saved = _read_json(out / RUN_FILE)
        if not isinstance(saved, dict):
            raise MicrotrainError(f"{out / RUN_FILE}: not a run description")
        diff = [k for k in sorted(set(saved) | set(identity)) if saved.get(k) != identity.get(k)]
        if diff:
            def show(v: Any) -> str:
                return (v.get("name", "custom") if isinstance(v, dict) else str(v))[:60]
            raise MicrotrainError(f"cannot resume {out}: " + ", ".join(
                f"{k} is {show(identity.get(k))} here but {show(saved.get(k))} in the run" for k in diff[:4]))
        return
    live = [(d, s) for d, s in runs if s != "diverged"]
    if live and not force:
        d, s = live[0]
        what = "a completed run" if s == "completed" else "an unfinished run (--resume continues it)"
        raise MicrotrainError(f"{d} holds {what}; --force replaces it, or choose another --out")
    if runs or (out / RUN_FILE).is_file():
        _clear(out)
    _write_json(out / RUN_FILE, identity)


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """RUN_DIR/metrics.json as a dict, or one line saying why not."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise MicrotrainError(f"{run_dir}: not a training run (no metrics.json)")
    m = _read_json(path)
    res = m.get("resolution") if isinstance(m, dict) else None
    if not (isinstance(res, int) or (isinstance(res, list) and len(res) == 3 and all(isinstance(v, int) for v in res))):
        raise MicrotrainError(f"{path}: not the metrics of a training run")
    return m


def check_run_classes(metrics: dict[str, Any], classes: Sequence[Any], data: str) -> None:
    """A dataset used with a run (`eval --data`, the `compile --from --run` stream) must carry the run's classes in
    the run's order (when the run records them), or its labels would not match the head's outputs."""
    trained = metrics.get("classes")
    if trained is not None and list(classes) != list(trained):
        raise MicrotrainError(f"{data}: classes {', '.join(map(str, classes[:5]))}... are not the run's "
                              f"{', '.join(map(str, trained[:5]))}...: its labels would not match the head's outputs")


def load_run_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The run's last checkpoint, checked against the sha256 that checkpoint.json records for it (a torn or
    tampered checkpoint.npz is refused), as a state dict."""
    from microtrain.runtime.trainer import CHECKPOINT, STATE, load_checkpoint

    ckpt, state = run_dir / CHECKPOINT, run_dir / STATE
    if not ckpt.is_file() or not state.is_file():
        raise MicrotrainError(f"{run_dir}: no {CHECKPOINT} / {STATE} (the run never saved a checkpoint)")
    info = _read_json(state)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    if not isinstance(info, dict) or info.get("checkpoint_sha256") != digest:
        raise MicrotrainError(f"{ckpt}: does not match the sha256 in {STATE} (corrupt, or written by another run)")
    try:
        return load_checkpoint(ckpt)
    except (OSError, ValueError, EOFError, KeyError) as e:
        raise MicrotrainError(f"{ckpt}: unreadable checkpoint ({type(e).__name__}: {e})") from None
