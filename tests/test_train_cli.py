"""`microtrain train` / `eval` end to end on small real data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from microtrain.cli import main
from microtrain.runtime.trainer import load_checkpoint

from conftest import SHARED

CIFAR = SHARED / "datasets" / "cifar10"


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """A 3-class ImageFolder of real CIFAR-10 images plus one corrupt file in train/."""
    if not CIFAR.is_dir():
        pytest.skip("../shared/datasets/cifar10 not present")
    root = tmp_path_factory.mktemp("folder")
    for split, n in (("train", 24), ("test", 8)):
        for c in ("airplane", "cat", "ship"):
            d = root / split / c
            d.mkdir(parents=True)
            for f in sorted((CIFAR / split / c).glob("*.jpg"))[:n]:
                shutil.copy(f, d / f.name)
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    return root


def test_train_writes_metrics_and_eval_reproduces(small_folder, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--model", "mcunet-5fps", "--data", str(small_folder), "--scheme", "paper-49kb",
               "--epochs", "2", "--warmup-epochs", "0", "--batch-size", "16", "--augment", "flip", "--quiet",
               "--lr", "0.05", "--out", str(out), "--json"])
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    assert m["status"] == "completed" and 0 <= m["test_accuracy"] <= 1
    assert len(m["train_loss"]) == 2 and all(np.isfinite(m["train_loss"]))
    assert m["scheme"]["name"] == "paper-49kb" and m["images_per_second"] > 0
    assert m["skipped_images"] == 1 and "broken.jpg" in json.dumps(m["skipped_files"])
    assert m["analytic_extra_bytes"] == 50944
    assert main(["eval", str(out), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["accuracy"] == pytest.approx(m["test_accuracy"])
    state = load_checkpoint(out / "checkpoint.npz")
    assert state["b11.pw1.w_train"].dtype == np.int8 and state["head.w"].dtype == np.float32


def test_sweep_reports_every_lr_including_divergence(small_folder, tmp_path):
    out = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "microtrain", "train", "--model", "proxyless-w0.3", "--data",
                        str(small_folder), "--scheme", "bias:4", "--epochs", "1", "--warmup-epochs", "0",
                        "--batch-size", "24", "--augment", "none", "--quiet", "--out", str(out),
                        "--lr-sweep", "0.01,1e38"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    sweep = json.loads((out / "sweep.json").read_text())
    assert [run["lr"] for run in sweep["runs"]] == [0.01, 1e38]
    assert sweep["diverged_lrs"] == [1e38] and sweep["best_lr"] == 0.01
    assert "last good checkpoint" in sweep["runs"][1]["message"]
    state = load_checkpoint(out / "lr-1e+38" / "checkpoint.npz")  # the last good checkpoint stays usable
    assert all(np.isfinite(v).all() for v in state.values())


def test_divergence_is_one_clear_line(small_folder, tmp_path):
    r = subprocess.run([sys.executable, "-m", "microtrain", "train", "--model", "mcunet-5fps", "--data",
                        str(small_folder), "--scheme", "head-only", "--epochs", "1", "--batch-size", "24",
                        "--augment", "none", "--quiet", "--out", str(tmp_path / "nan"), "--lr", "1e38"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "loss became" in r.stderr.strip().splitlines()[-1]


def test_bad_scheme_and_dataset_are_one_line_errors(tmp_path):
    for argv in (["--scheme", "paper-1kb", "--data", "cifar10"], ["--scheme", "last:2", "--data", str(tmp_path)]):
        r = subprocess.run([sys.executable, "-m", "microtrain", "train", "--model", "mcunet-5fps", "--epochs", "1",
                            "--out", str(tmp_path / "x"), *argv], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.strip().startswith("microtrain: error:")
