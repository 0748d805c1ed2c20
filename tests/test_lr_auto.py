"""`--lr auto` (issue 15): the learning rate chosen on a validation slice of the training images, never the test split;
an explicit rate wins; the choice and its candidates are recorded; a resumed run keeps its rate."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

import microtrain.commands.train as train_cmd
import microtrain.runtime.lr_select as L
from microtrain.autodiff.build import TrainConfig, build_training_graph
from microtrain.cli import main
from microtrain.data.datasets import open_dataset
from microtrain.errors import MicrotrainError
from microtrain.runtime.prefix_cache import PrefixCache
from microtrain.runtime.trainstep import GraphTrainStep
from microtrain.sparse.scheme import resolve_scheme

from tiny import CLASSES, tiny_model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, images32):
    """The tiny model (32x32) and an ImageFolder of real images of its classes: 3 per class held out as test."""
    root = tmp_path_factory.mktemp("lrauto")
    tiny_model(res=32).save(root / "tiny")
    x, y, _ = images32
    for c in range(CLASSES):
        for j, i in enumerate(np.flatnonzero(y == c)):
            d = root / "data" / ("test" if j < 3 else "train") / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x[i].astype(np.int16) + 128).astype(np.uint8).transpose(1, 2, 0)).save(d / f"{i}.png")
    return root


def argv(inputs, out, *extra):
    return ["train", "--model", str(inputs / "tiny.json"), "--data", str(inputs / "data"), "--scheme", "last:3",
            "--epochs", "2", "--warmup-epochs", "0", "--batch-size", "8", "--augment", "flip", "--quiet",
            "--out", str(out), "--json", *extra]


def digests(images: np.ndarray) -> set[bytes]:
    return {hashlib.blake2b(im.tobytes(), digest_size=16).digest() for im in images}


def test_auto_is_the_default_never_reads_the_test_split_and_is_recorded(inputs, tmp_path, capsys, monkeypatch):
    seen: list = []
    real = L.batches

    def spy(ds, *a, **k):
        seen.append(ds)
        return real(ds, *a, **k)

    monkeypatch.setattr(L, "batches", spy)
    assert main(argv(inputs, tmp_path / "run")) == 0
    m = json.loads(capsys.readouterr().out)
    sel = m["lr_selection"]
    assert sel["lr"] == m["lr"] and sel["mode"] == "auto"
    assert (tmp_path / "run" / "lr_selection.json").is_file()
    assert json.loads((tmp_path / "run" / "lr_selection.json").read_text())["lr"] == m["lr"]
    # every candidate is reported with its score (or why it diverged); the chosen one completed
    lrs = [c["lr"] for c in sel["candidates"]]
    assert len(lrs) >= 3 and m["lr"] in lrs and set(sel["grid"]) <= set(lrs)
    chosen = next(c for c in sel["candidates"] if c["lr"] == m["lr"])
    assert chosen["status"] == "completed" and 0 <= chosen["val_accuracy"] <= 1
    assert sel["seconds"] > 0 and 0 < sel["fraction_of_total"] < 1 and sel["run_seconds"] > 0
    assert 0 < sel["cpu_fraction_of_total"] < 1 and sel["cpu_seconds"] > 0
    # what the selection read: training images only, the validation slice disjoint from what candidates trained on
    assert seen and all(ds.split == "train" for ds in seen)
    test = open_dataset(str(inputs / "data"), "test", progress=False)
    train = open_dataset(str(inputs / "data"), "train", progress=False)
    read = set().union(*(digests(ds.images) for ds in seen))
    assert not read & digests(test.images) and read <= digests(train.images)
    assert sel["validation_images"] + sel["fit_images"] <= len(train)


def test_carved_slices_are_disjoint_balanced_and_from_train(inputs):
    train = open_dataset(str(inputs / "data"), "train", progress=False)
    sl = L.carve(train, 30, seed=0)
    assert len(sl.val) >= train.num_classes and len(sl.fit) == 30
    assert set(np.unique(sl.val.labels)) == set(range(train.num_classes))
    assert not digests(sl.val.images) & digests(sl.fit.images)
    assert sl.val.split == sl.fit.split == "train"


def test_explicit_lr_and_sweep_win(inputs, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("selection ran although a rate was given")

    monkeypatch.setattr(train_cmd, "select_lr", boom)
    assert main(argv(inputs, tmp_path / "fixed", "--lr", "0.02")) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["lr"] == 0.02 and "lr_selection" not in m
    assert not (tmp_path / "fixed" / "lr_selection.json").exists()
    assert main(argv(inputs, tmp_path / "sweep", "--lr-sweep", "0.01,0.02")) == 0
    assert json.loads(capsys.readouterr().out)["best_lr"] in (0.01, 0.02)


def test_resume_keeps_the_recorded_rate(inputs, tmp_path, capsys, monkeypatch):
    import microtrain.runtime.trainer as T

    real, calls = T.evaluate, []

    def interrupt(*a, **k):  # the run stops after its first epoch's evaluation
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(T, "evaluate", interrupt)
    assert main(argv(inputs, tmp_path / "r")) != 0  # the CLI reports the interruption
    assert json.loads((tmp_path / "r" / "checkpoint.json").read_text())["epoch"] == 1
    chosen = json.loads((tmp_path / "r" / "lr_selection.json").read_text())["lr"]
    monkeypatch.setattr(T, "evaluate", real)
    monkeypatch.setattr(train_cmd, "select_lr", lambda *a, **k: pytest.fail("re-selected on --resume"))
    capsys.readouterr()
    assert main(argv(inputs, tmp_path / "r", "--resume")) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["status"] == "completed" and m["lr"] == chosen and m["lr_selection"]["lr"] == chosen


def test_tiny_model_picks_a_rate_that_did_not_diverge(inputs):
    train = open_dataset(str(inputs / "data"), "train", progress=False)
    model = tiny_model(res=32)
    graph = build_training_graph(model, resolve_scheme("last:3", model), train.num_classes, TrainConfig())
    entries: dict = {}

    def make_step():
        return PrefixCache(GraphTrainStep(graph), entries=entries)

    rec = L.select_lr(make_step, train, grid=[0.003, 0.03, 1e30], ratio=10.0, epochs=2, batch_size=8,
                      warmup_epochs=0, resolution=32, progress=False)
    by_lr = {c["lr"]: c for c in rec["candidates"]}
    assert by_lr[1e30]["status"] == "diverged"
    assert rec["lr"] != 1e30 and by_lr[rec["lr"]]["status"] == "completed"
    done = [c["val_accuracy"] for c in rec["candidates"] if c["status"] == "completed"]
    assert by_lr[rec["lr"]]["val_accuracy"] >= max(done) - 0.5  # within the tie band, never a worse outlier
    with pytest.raises(MicrotrainError, match="every candidate diverged"):
        L.select_lr(make_step, train, grid=[1e30, 1e31], ratio=10.0, epochs=1, batch_size=8, warmup_epochs=0,
                    resolution=32, progress=False)


def test_grid_depends_on_precision_qas_optimizer_and_batch():
    qas, _ = L.base_grid("int8", True, "sgd", 64)
    noqas, _ = L.base_grid("int8", False, "sgd", 64)
    fp32, _ = L.base_grid("fp32", True, "sgd", 64)
    # the measured best rates at batch 64 (benchmarks/results/cifar10_transfer.json) lie inside their priors
    assert min(qas) <= 0.03 <= max(qas) and min(fp32) <= 0.01 <= max(fp32) and min(noqas) <= 0.1 <= max(noqas)
    assert max(noqas) > max(qas) > max(fp32)
    assert max(L.base_grid("int8", True, "sgd-m", 64)[0]) < max(qas)
    assert max(L.base_grid("int8", True, "sgd", 1)[0]) < max(qas)
    assert L.scale_rate(0.03, 64, 1) == 0.00375 and L.scale_rate(0.00375, 1, 64) == 0.03
    assert L.parse_lr("auto") == "auto" and L.parse_lr("0.5") == 0.5
    for bad in ("nan", "-1", "x"):
        with pytest.raises(MicrotrainError, match="--lr"):
            L.parse_lr(bad)


def test_contrib_probe_rate_is_chosen_and_recorded(inputs, tmp_path, capsys):
    out = tmp_path / "c.json"
    common = ["contrib", "--model", str(inputs / "tiny.json"), "--data", "lfw", "--subset", "48", "--test-subset",
              "24", "--epochs", "1", "--batch-size", "16", "--probe-epochs", "1", "--workers", "1", "--k-grid", "3",
              "--base-k", "3", "--weight-convs", "8", "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main([*common, "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    sel = d["probe_lr_selection"]
    assert sel["lr"] == d["protocol"]["probe_lr"] and f"--probe-lr {sel['lr']:g}" in d["command"]
    assert next(c for c in sel["candidates"] if c["lr"] == sel["lr"])["status"] == "completed"
    assert f"probe lr auto: {sel['lr']:g}" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "fixed.json"), "--probe-lr", "0.2"]) == 0
    fixed = json.loads((tmp_path / "fixed.json").read_text())
    assert fixed["protocol"]["probe_lr"] == 0.2 and "probe_lr_selection" not in fixed


def test_refine_tries_the_midpoint_towards_the_better_completed_neighbour():
    def rec(lr, acc=None):
        return {"lr": lr, "status": "completed", "val_accuracy": acc, "val_loss": 1.0} if acc is not None else \
            {"lr": lr, "status": "diverged"}

    tried: list[float] = []

    def run(lr):
        tried.append(lr)
        results[lr] = rec(lr, 0.1)

    results = {0.01: rec(0.01, 0.4), 0.1: rec(0.1, 0.5), 1.0: rec(1.0, 0.45)}
    assert L.refine(results, run, 500) == [0.316] == tried
    tried.clear()
    results = {0.01: rec(0.01, 0.46), 0.1: rec(0.1, 0.5), 1.0: rec(1.0, 0.45)}
    assert L.refine(results, run, 500) == [0.0316] == tried
    tried.clear()
    results = {0.01: rec(0.01, 0.4), 0.03: rec(0.03, 0.55), 0.1: rec(0.1)}  # never towards a diverged rate
    assert L.refine(results, run, 500) == [0.0173] == tried
    assert L.refine({0.1: rec(0.1)}, run, 500) == []


def test_confirm_averages_two_orders_and_drops_a_rate_that_diverges_on_the_second():
    def rec(lr, acc, loss):
        return {"lr": lr, "status": "completed", "val_accuracy": acc, "val_loss": loss, "final_train_loss": loss,
                "seconds": 1.0}

    results = {0.01: rec(0.01, 0.50, 1.5), 0.03: rec(0.03, 0.56, 1.3), 0.1: rec(0.1, 0.54, 1.4)}
    second = {0.03: rec(0.03, 0.48, 1.5), 0.1: {"lr": 0.1, "status": "diverged", "why": "loss blew up",
                                               "seconds": 0.5}}
    assert L.confirm(results, lambda lr: second[lr]) == [0.03, 0.1]
    assert results[0.03]["val_accuracy"] == pytest.approx(0.52) and len(results[0.03]["orders"]) == 2
    assert results[0.1]["status"] == "diverged" and "second batch order" in results[0.1]["why"]
    assert results[0.01]["val_accuracy"] == 0.50 and "orders" not in results[0.01]
    alone = {0.03: rec(0.03, 0.5, 1.0)}
    assert L.confirm(alone, lambda lr: pytest.fail("one candidate: nothing to confirm")) == []


def test_ties_within_one_standard_error_go_to_the_lower_validation_loss():
    def rec(lr, acc, loss):
        return {"lr": lr, "status": "completed", "val_accuracy": acc, "val_loss": loss}

    tied = [rec(0.0173, 0.55, 1.33), rec(0.03, 0.54, 1.28)]  # 1 point apart on 500 images: a tie
    assert L._best(tied, 500)["lr"] == 0.03
    apart = [rec(0.0173, 0.60, 1.33), rec(0.03, 0.54, 1.28)]  # 6 points apart: accuracy decides
    assert L._best(apart, 500)["lr"] == 0.0173


def test_a_chosen_rate_that_diverges_in_the_run_restarts_at_the_next_lower_candidate(inputs, tmp_path, capsys,
                                                                                      monkeypatch):
    # the selection's record as select_lr writes it, with a winner far past the edge of stability: the real run
    # diverges at it, restarts from the initial state at the largest completed candidate below, and says so
    def fake_select(*a, **k):
        return {"lr": 1e4, "batch_size": k["batch_size"], "seconds": 0.0, "cpu_seconds": 0.0, "candidates": [
            {"lr": 0.001, "status": "completed", "val_accuracy": 0.5},
            {"lr": 0.02, "status": "completed", "val_accuracy": 0.5},
            {"lr": 0.5e4, "status": "diverged"},
            {"lr": 1e4, "status": "completed", "val_accuracy": 0.6}]}

    monkeypatch.setattr(train_cmd, "select_lr", fake_select)
    assert main(argv(inputs, tmp_path / "f")) == 0
    cap = capsys.readouterr()
    m = json.loads(cap.out)
    assert m["status"] == "completed" and m["lr"] == 0.02 and np.isfinite(m["train_loss"]).all()
    assert [f["lr"] for f in m["lr_selection"]["fallbacks"]] == [1e4]
    assert "restarting from the initial state at 0.02" in cap.err
    assert json.loads((tmp_path / "f" / "lr_selection.json").read_text())["lr"] == 0.02


def test_fallback_rate_is_bounded_and_needs_a_selection():
    sel = {"batch_size": 64, "candidates": [{"lr": 0.01, "status": "completed"}, {"lr": 0.03, "status": "diverged"},
                                            {"lr": 0.1, "status": "completed"}]}
    assert train_cmd.fallback_rate(None, 0.1, 64) is None  # an explicit --lr is never changed
    assert train_cmd.fallback_rate(sel, 0.1, 64) == 0.01  # the diverged 0.03 is skipped
    # the device engine runs at batch 1: the candidates are compared and returned in its units
    assert train_cmd.fallback_rate(sel, L.scale_rate(0.1, 64, 1), 1) == L.scale_rate(0.01, 64, 1)
    assert train_cmd.fallback_rate(sel, 0.01, 64) is None
    sel["fallbacks"] = [{}] * train_cmd.MAX_FALLBACKS
    assert train_cmd.fallback_rate(sel, 0.1, 64) is None
