"""`train --lr-sweep` with the learning rates trained at the same time: a spawned process pool and Ray tasks (a local
Ray instance with 2 CPUs, shut down afterwards) give the same runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from microtrain.cli import main
from microtrain.runtime.trainer import load_checkpoint

from tiny import CLASSES, tiny_model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, images32):
    root = tmp_path_factory.mktemp("sweep")
    tiny_model(res=32).save(root / "tiny")
    x, y, _ = images32
    for c in range(CLASSES):
        for j, i in enumerate(np.flatnonzero(y == c)):
            d = root / "data" / ("test" if j < 3 else "train") / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x[i].astype(np.int16) + 128).astype(np.uint8).transpose(1, 2, 0)).save(d / f"{i}.png")
    return root


def sweep(inputs, out, *extra):
    argv = ["train", "--model", str(inputs / "tiny.json"), "--data", str(inputs / "data"), "--scheme", "last:3",
            "--epochs", "2", "--warmup-epochs", "0", "--batch-size", "8", "--augment", "flip",
            "--lr-sweep", "0.003,0.03,0.3", "--workers", "2", "--quiet", "--out", str(out), *extra]
    assert main(argv) == 0
    return json.loads((out / "sweep.json").read_text())


def test_ray_sweep_equals_the_process_pool(inputs, tmp_path, capsys):
    ray = pytest.importorskip("ray")
    pool = sweep(inputs, tmp_path / "pool")
    try:
        on_ray = sweep(inputs, tmp_path / "ray", "--ray", "local")
    finally:
        ray.shutdown()
    assert not ray.is_initialized()
    capsys.readouterr()
    assert [r["lr"] for r in pool["runs"]] == [r["lr"] for r in on_ray["runs"]] == [0.003, 0.03, 0.3]
    keys = ("status", "test_accuracy", "final_train_loss")
    assert [{k: r.get(k) for k in keys} for r in pool["runs"]] == [{k: r.get(k) for k in keys} for r in on_ray["runs"]]
    assert pool["best_lr"] == on_ray["best_lr"] and on_ray["parallel"] == {"workers": 2, "ray": "local"}
    for r in pool["runs"]:
        if r["status"] == "completed":
            a = load_checkpoint(tmp_path / "pool" / f"lr-{r['lr']:g}" / "checkpoint.npz")
            b = load_checkpoint(tmp_path / "ray" / f"lr-{r['lr']:g}" / "checkpoint.npz")
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # the learning rates really trained differently
    assert len({r["final_train_loss"] for r in pool["runs"] if r["status"] == "completed"}) > 1
