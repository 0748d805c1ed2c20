"""Issue 12: run directories. A lock, --resume checked against the run before any file changes, a finished run is
never overwritten without --force, numeric options that no run can use are one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from microtrain.cli import main

from conftest import SHARED

CIFAR = SHARED / "datasets" / "cifar10"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two tiny ImageFolders of real CIFAR-10 images: (airplane, ship) and (cat, dog)."""
    if not CIFAR.is_dir():
        pytest.skip("../shared/datasets/cifar10 not present")
    out = []
    for classes in (("airplane", "ship"), ("cat", "dog")):
        root = tmp_path_factory.mktemp("-".join(classes))
        for split, n in (("train", 8), ("test", 4)):
            for c in classes:
                (root / split / c).mkdir(parents=True)
                for f in sorted((CIFAR / split / c).glob("*.jpg"))[:n]:
                    shutil.copy(f, root / split / c / f.name)
        out.append(root)
    return out


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", "proxyless-w0.3", "--data", str(data), "--scheme", "bias:2", "--epochs", "1",
            "--warmup-epochs", "0", "--batch-size", "8", "--augment", "none", "--quiet", "--lr", "0.05", "--out",
            str(out), *extra]


def snapshot(d: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def fails(argv: list[str], capsys, *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("microtrain: error: "), err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture(scope="module")
def finished(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "done"
    assert main(train_argv(folders[0], out)) == 0
    assert json.loads((out / "metrics.json").read_text())["status"] == "completed"
    return out


@pytest.mark.parametrize("change,needle", [
    (["--scheme", "bias:3"], "scheme is bias:3 here but bias:2 in the run"),
    (["--optimizer", "adam"], "optimizer is adam here but sgd in the run"),
    (["--precision", "fp32"], "precision is fp32 here but int8 in the run"),
    (["--no-qas"], "qas is False here but True in the run"),
    (["--update-storage", "fp32"], "update_storage is fp32 here but int8 in the run"),
    (["--model", "mbv2-w0.35"], "model is mbv2-w0.35 here but proxyless-w0.3 in the run"),
    (["DATA"], "data is"),
])
def test_resume_is_checked_before_anything_changes(folders, finished, change, needle, capsys):
    before = snapshot(finished)
    argv = train_argv(folders[1] if change == ["DATA"] else folders[0], finished, "--resume")
    if change != ["DATA"]:
        flag = change[0]
        if flag in argv:
            i = argv.index(flag)
            argv[i:i + len(change)] = change
        else:
            argv += change
    fails(argv, capsys, "cannot resume", needle)
    assert snapshot(finished) == before  # train_graph.json, checkpoints, metrics: not a byte, not a timestamp


def test_finished_run_is_not_overwritten_without_force(folders, finished, capsys, tmp_path):
    before = snapshot(finished)
    fails(train_argv(folders[0], finished), capsys, "holds a completed run", "--force")
    assert snapshot(finished) == before
    # the same command with --resume continues it (nothing left to train), with --force it starts over
    assert main(train_argv(folders[0], finished, "--resume")) == 0
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    assert main(train_argv(folders[1], copy, "--force")) == 0
    m = json.loads((copy / "metrics.json").read_text())
    assert m["status"] == "completed" and m["classes"] == ["cat", "dog"]
    fails(train_argv(folders[1], copy, "--force", "--resume"), capsys, "give one of them")


def test_unfinished_run_needs_resume_or_force(folders, finished, capsys, tmp_path):
    run = tmp_path / "unfinished"
    shutil.copytree(finished, run)
    m = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**m, "status": "running"}))
    before = snapshot(run)
    fails(train_argv(folders[0], run), capsys, "unfinished run", "--resume continues it")
    assert snapshot(run) == before
    fails(train_argv(folders[0], tmp_path / "empty", "--resume"), capsys, "nothing to resume")


def test_a_locked_run_directory_is_refused(folders, capsys, tmp_path):
    """A second run into a directory that another process is writing fails with one line (the lock is an flock,
    so a killed run leaves no stale lock behind)."""
    out = tmp_path / "locked"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"f = open({str(out / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write(str(os.getpid()));"
        " f.flush(); print('locked', flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        fails(train_argv(folders[0], out), capsys, "another run is writing into this directory",
              f"pid {holder.pid}")
        assert not (out / "metrics.json").exists() and not (out / "train_graph.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(train_argv(folders[0], out)) == 0  # the holder is gone: the lock went with it


@pytest.mark.parametrize("argv,needle", [
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--warmup-epochs", "nan"], "--warmup-epochs must be a finite number >= 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--subset", "-5"], "--subset must be an integer >= 1"),
])
def test_numeric_options_are_checked(folders, argv, needle, capsys, tmp_path):
    base = train_argv(folders[0], tmp_path / "x")
    flag = argv[0]
    if flag in base:
        i = base.index(flag)
        base[i:i + 2] = argv
    else:
        base += argv
    fails(base, capsys, needle)
    assert not (tmp_path / "x").exists()


def test_out_that_is_a_file(folders, capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("not a directory")
    fails(train_argv(folders[0], f), capsys, "is not a directory")
    fails(train_argv(folders[0], f / "sub"), capsys, "cannot create the run directory")
