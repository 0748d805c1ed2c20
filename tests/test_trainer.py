"""Training loop: schedule, metrics.json, resume equals an uninterrupted run, divergence stop, learning-rate sweep.

`LeastSquaresStep` below is a test double for the int8 training step (the shipped one comes from the training
graph): a small but real trainable float classifier, so that the loop is exercised end to end."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from microtrain.data.datasets import ImageDataset
from microtrain.errors import MicrotrainError
from microtrain.runtime import trainer as T


class LeastSquaresStep:
    """Test double: linear classifier on 4x4 average-pooled dequantized pixels, gradient descent on the squared error
    to one-hot targets (so a too-large learning rate really diverges to inf/nan), with 10% feature dropout drawn from
    torch's global RNG (so resuming must restore that RNG to reproduce a run)."""

    def __init__(self, classes: int = 3, pool: int = 4):
        self.pool, self.classes = pool, classes
        self.w = torch.zeros(classes, 3 * pool * pool)
        self.b = torch.zeros(classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x.float() / 128, self.pool).flatten(1)

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
        f = self.features(x) * (torch.rand(len(x), self.w.shape[1]) > 0.1).float() / 0.9
        err = f @ self.w.t() + self.b - F.one_hot(y, self.classes).float()
        loss = 0.5 * (err * err).sum(1).mean()
        self.w -= lr * err.t() @ f / len(x)
        self.b -= lr * err.mean(0)
        return float(loss)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x) @ self.w.t() + self.b

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"head/weight": self.w.numpy().copy(), "head/bias": self.b.numpy().copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.w = torch.from_numpy(np.array(state["head/weight"]))
        self.b = torch.from_numpy(np.array(state["head/bias"]))


class Interrupted(LeastSquaresStep):
    """Raises KeyboardInterrupt (as Ctrl-C would) on its n-th step."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def step(self, x, y, lr):
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt
        return super().step(x, y, lr)


def colour_classes(n: int, seed: int) -> ImageDataset:
    """Noisy 16x16 images whose class is the dominant colour channel."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.integers(0, 120, (n, 3, 16, 16))
    x[np.arange(n), y] += 120
    return ImageDataset(x.astype(np.uint8), y, ["red", "green", "blue"], "colours", "train" if seed else "test")


@pytest.fixture(scope="module")
def data() -> tuple[ImageDataset, ImageDataset]:
    return colour_classes(60, 1), colour_classes(30, 0)


KW = dict(epochs=3, batch_size=10, resolution=16, augment="paper", seed=5, progress=False)


def test_lr_schedule():
    lrs = [T.lr_at(i, 100, 10, 1.0) for i in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False)) and lrs[-1] < 0.001
    assert lrs[55] == pytest.approx(0.5)  # half-way through the decay
    assert T.lr_at(50, 100, 0, 0.3, "constant") == 0.3 and T.lr_at(0, 100, 0, 0.3) == 0.3


def test_fit_learns_and_writes_metrics(data, tmp_path):
    train, test = data
    train.skipped = [("/x/broken.jpg", "OSError: cannot identify image file")]
    try:
        torch.manual_seed(0)
        step = LeastSquaresStep()
        m = T.fit(step, train, test, lr=0.05, warmup_epochs=1, out_dir=tmp_path, eval_every=2,
                  extra={"scheme": "head-only", "model": "test-double"}, **KW)
    finally:
        train.skipped = []
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == m
    assert m["status"] == "completed" and m["scheme"] == "head-only" and m["model"] == "test-double"
    assert m["test_accuracy"] >= 0.9 and m["test_accuracy"] == T.evaluate(step, test, resolution=16)
    assert m["test_accuracy_per_epoch"][0] is None and m["test_accuracy_per_epoch"][2] == m["test_accuracy"]
    assert len(m["train_loss"]) == 3 and m["train_loss"][2] < m["train_loss"][0]
    assert m["images_per_second"] > 0 and m["epochs"] == 3 and m["epochs_completed"] == 3
    assert m["iterations"] == 18 and m["lr"] == 0.05 and m["batch_size"] == 10 and m["eval_crop"] == 0.875
    assert m["skipped_images"] == 1 and m["skipped_files"][0]["path"] == "/x/broken.jpg"
    assert m["train_images"] == 60 and m["test_images"] == 30 and m["num_classes"] == 3
    ckpt = T.load_checkpoint(tmp_path / "checkpoint.npz")
    assert np.array_equal(ckpt["head/weight"], step.state_dict()["head/weight"])
    state = json.loads((tmp_path / "checkpoint.json").read_text())
    assert state["epoch"] == 3 and state["iteration"] == 18
    with pytest.raises(MicrotrainError, match="overwrite"):
        T.fit(LeastSquaresStep(), train, test, lr=0.05, out_dir=tmp_path / "x", extra={"lr": 1}, **KW)


def test_resume_after_interruption_equals_uninterrupted_run(data, tmp_path):
    train, test = data
    torch.manual_seed(0)
    whole = LeastSquaresStep()
    ref = T.fit(whole, train, test, lr=0.05, warmup_epochs=1, out_dir=tmp_path / "a", **KW)

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):  # 6 steps per epoch: dies in the middle of epoch 2
        T.fit(Interrupted(9), train, test, lr=0.05, warmup_epochs=1, out_dir=tmp_path / "b", **KW)
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["epoch"] == 1
    torch.manual_seed(12345)  # a different global RNG stream: resume must restore the saved one
    resumed = LeastSquaresStep()
    got = T.fit(resumed, train, test, lr=0.05, warmup_epochs=1, out_dir=tmp_path / "b", resume=True, **KW)
    for k, v in whole.state_dict().items():
        assert np.array_equal(v, resumed.state_dict()[k]), k
    assert got["train_loss"] == ref["train_loss"] and got["test_accuracy_per_epoch"] == ref["test_accuracy_per_epoch"]
    assert got["iterations"] == ref["iterations"] == 18

    # a finished run resumes to the same metrics without training; a changed configuration is refused
    again = T.fit(LeastSquaresStep(), train, test, lr=0.05, warmup_epochs=1, out_dir=tmp_path / "b", resume=True,
                  **KW)
    assert again["train_loss"] == ref["train_loss"]
    with pytest.raises(MicrotrainError, match=r"configuration changed lr 0\.05 -> 0\.1"):
        T.fit(LeastSquaresStep(), train, test, lr=0.1, warmup_epochs=1, out_dir=tmp_path / "b", resume=True, **KW)


def test_without_restoring_rng_the_run_would_differ(data, tmp_path):
    """Guards the resume test: the double's dropout really depends on the global RNG."""
    train, test = data
    states = []
    for s in (0, 1):
        torch.manual_seed(s)
        step = LeastSquaresStep()
        T.fit(step, train, test, lr=0.05, out_dir=tmp_path / str(s), **{**KW, "epochs": 1})
        states.append(step.state_dict()["head/weight"])
    assert not np.array_equal(*states)


def test_divergence_stops_with_loadable_checkpoint(data, tmp_path):
    train, test = data
    torch.manual_seed(0)
    step = LeastSquaresStep()
    with pytest.raises(T.DivergedError) as ei:
        T.fit(step, train, test, lr=50.0, out_dir=tmp_path, **{**KW, "epochs": 6})
    e = ei.value
    msg = str(e)
    assert re.fullmatch(rf"loss became (nan|inf) at epoch {e.epoch}, iteration {e.iteration}; last good "
                        rf"checkpoint: {re.escape(str(tmp_path / 'checkpoint.npz'))}", msg), msg
    assert e.epoch >= 2 and (e.epoch - 1) * 6 < e.iteration <= e.epoch * 6  # it did train for a while first
    info = json.loads((tmp_path / "checkpoint.json").read_text())
    assert info["epoch"] == e.epoch - 1 and info["diverged"]["iteration"] == e.iteration
    good = T.load_checkpoint(e.checkpoint)
    assert all(np.isfinite(v).all() for v in good.values()) and np.abs(good["head/weight"]).max() > 1
    fresh = LeastSquaresStep()
    fresh.load_state_dict(good)
    assert 0 <= T.evaluate(fresh, test, resolution=16) <= 1
    assert np.array_equal(step.state_dict()["head/weight"], good["head/weight"])  # the step was rolled back
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["status"] == "diverged" and m["test_accuracy"] is None and m["diverged"]["epoch"] == e.epoch
    assert len(m["train_loss"]) == e.epoch - 1
    with pytest.raises(T.DivergedError, match="earlier attempt"):  # resuming would only diverge again
        T.fit(LeastSquaresStep(), train, test, lr=50.0, out_dir=tmp_path, resume=True, **{**KW, "epochs": 6})


class Saturating(LeastSquaresStep):
    """Like int8 weights clamped at +-127: from step `after` on the loss is huge yet finite, forever."""

    def __init__(self, after: int):
        super().__init__()
        self.after = after

    def step(self, x, y, lr):
        loss = super().step(x, y, lr)
        self.after -= 1
        return loss if self.after > 0 else 1e3


def test_finite_blowup_counts_as_diverged(data, tmp_path, monkeypatch):
    train, test = data
    monkeypatch.setattr(T, "BLOWUP_WINDOW", 4)
    # the window spans epochs: epoch 1's last 3 losses and the first blown-up one of epoch 2
    with pytest.raises(T.DivergedError, match=r"loss blew up \(mean 2\d\d over the last 4 iterations, above "
                                              r"11 = 10x chance\) at epoch 2, iteration 7;") as ei:
        T.fit(Saturating(after=7), train, test, lr=0.01, out_dir=tmp_path, **KW)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "diverged" and ei.value.epoch == 2
    # a short spike does not stop the run, and the guard can be switched off
    m = T.fit(Saturating(after=10**9), train, test, lr=0.01, out_dir=tmp_path / "ok", **KW)
    assert m["status"] == "completed"
    m = T.fit(Saturating(after=7), train, test, lr=0.01, out_dir=tmp_path / "off", stop_on_blowup=False, **KW)
    assert m["status"] == "completed" and m["train_loss"][-1] == 1e3


def test_blowup_stop_with_fewer_iterations_than_the_window(data, tmp_path):
    """Issue 12: 3 epochs of 6 iterations (18 < BLOWUP_WINDOW = 50) whose loss saturates from the 3rd step on: the
    whole run is the window, and the run ends diverged instead of "completed" with a loss of 1e3."""
    train, test = data
    assert T.BLOWUP_WINDOW > 3 * 6
    with pytest.raises(T.DivergedError, match=r"loss blew up \(mean \d+ over the last 18 iterations") as ei:
        T.fit(Saturating(after=3), train, test, lr=0.01, out_dir=tmp_path, **KW)
    assert ei.value.epoch == 3 and ei.value.iteration == 18
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "diverged"


def test_sweep_reports_every_lr_including_diverged(data, tmp_path):
    train, test = data
    torch.manual_seed(0)
    res = T.sweep(LeastSquaresStep, [0.005, 0.05, 50.0], train, test, out_dir=tmp_path, **KW)
    assert [r["lr"] for r in res["runs"]] == [0.005, 0.05, 50.0]
    assert [r["status"] for r in res["runs"]] == ["completed", "completed", "diverged"]
    assert res["diverged_lrs"] == [50.0] and "loss became" in res["runs"][2]["message"]
    done = res["runs"][:2]
    assert res["best_test_accuracy"] == max(r["test_accuracy"] for r in done)
    assert res["best_lr"] in (0.005, 0.05) and (tmp_path / "lr-0.05" / "metrics.json").is_file()
    assert json.loads((tmp_path / "sweep.json").read_text()) == res
    with pytest.raises(MicrotrainError, match="all 2 learning rates diverged"):
        T.sweep(LeastSquaresStep, [50.0, 80.0], train, test, out_dir=tmp_path / "bad", **KW)
    assert len(json.loads((tmp_path / "bad" / "sweep.json").read_text())["runs"]) == 2


def test_fit_rejects_bad_arguments(data, tmp_path):
    train, test = data
    with pytest.raises(MicrotrainError, match="learning rate"):
        T.fit(LeastSquaresStep(), train, test, lr=float("nan"), out_dir=tmp_path, **KW)
    other = ImageDataset(test.images, test.labels % 2, ["a", "b"])
    with pytest.raises(MicrotrainError, match="classes"):
        T.fit(LeastSquaresStep(), train, other, lr=0.1, out_dir=tmp_path, **KW)
    assert isinstance(LeastSquaresStep(), T.TrainStep)


def test_stochastic_rounding_hash_is_the_c_runtimes():
    """sr_uniform element by element against the C runtime's definition (mt_sr_uniform_at in mt_runtime.h) written
    with Python integers modulo 2**32, at indices across a large parameter and seeds/steps beyond 32 bits."""
    from microtrain.runtime.trainstep import sr_uniform

    def c_hash(seed: int, step: int, stream: int, i: int) -> float:
        m = 0xFFFFFFFF
        x = (i * 0x9E3779B1 + ((step * 0x85EBCA77 + stream * 0xC2B2AE3D + seed * 0x27D4EB2F) & m)) & m
        x ^= x >> 16
        x = (x * 0x7FEB352D) & m
        x ^= x >> 15
        x = (x * 0x846CA68B) & m
        x ^= x >> 16
        return (x >> 8) / float(1 << 24)

    for seed, step, stream in [(0, 1, 0), (7, 123456, 3), (2**40 + 5, 2**32 + 9, 2**31 + 1)]:
        u = sr_uniform(seed, step, stream, 100_003).numpy()
        assert u.dtype == np.float32 and u.shape == (100_003,)
        for i in (0, 1, 2, 977, 65_535, 65_536, 100_002):
            assert float(u[i]) == c_hash(seed, step, stream, i)
        assert 0.45 < float(u.mean()) < 0.55 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
