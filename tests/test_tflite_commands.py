"""`--model path/to/model.tflite` in every command (predict, train, plan, compile --run on the host, contrib, search,
demo), each once on the smallest committed fixture (tests/fixtures/mbv1.tflite) with minimal sizes, in process; and
`train` on the gray plain_cnn fixture with the default augmentation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from microtrain.cli import main
from microtrain.codegen.project import toolchain
from test_tflite_fixtures import FIXTURES

MODEL = str(FIXTURES / "mbv1.tflite")
CLASSES = ("astronaut", "chelsea", "coffee")
no_host_cc = pytest.mark.skipif(toolchain("host") is not None, reason="host C toolchain (gcc, make) not installed")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 3-class ImageFolder of real photos (random 32x32-ish crops of scikit-image's astronaut, chelsea, coffee):
    8 training and 4 test images per class."""
    import skimage.data

    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        photo = np.asarray(getattr(skimage.data, c)())[..., :3]
        for split, n in (("train", 8), ("test", 4)):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                s = int(rng.integers(min(photo.shape[:2]) // 3, min(photo.shape[:2])))
                r, q = (int(rng.integers(0, e - s + 1)) for e in photo.shape[:2])
                Image.fromarray(photo[r:r + s, q:q + s]).resize((40, 40)).save(d / f"{i}.png")
    return root


def run_json(capsys, argv: list[str]):
    capsys.readouterr()
    rc = main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    rc = main(["train", "--model", MODEL, "--data", str(folder), "--scheme", "last:3", "--epochs", "1",
               "--warmup-epochs", "0", "--batch-size", "8", "--lr", "0.05", "--quiet", "--out", str(out)])
    assert rc == 0
    return out


def test_predict(folder, capsys):
    images = sorted(str(p) for p in (folder / "test").rglob("*.png"))[:3]
    res = run_json(capsys, ["predict", "--model", MODEL, "--json", *images])
    assert [r["image"] for r in res] == images
    for r in res:
        idx, _, score = zip(*r["top5"], strict=True)
        assert len(set(idx)) == 5 and all(0 <= i < 10 for i in idx)  # the fixture's 10 classes
        assert list(score) == sorted(score, reverse=True) and 0 < sum(score) <= 1 + 1e-6


def test_train_and_eval(trained, capsys):
    m = json.loads((trained / "metrics.json").read_text())
    assert m["status"] == "completed" and m["model"] == "mbv1" and m["classes"] == list(CLASSES)
    assert np.isfinite(m["train_loss"]).all() and 0 <= m["test_accuracy"] <= 1
    assert (trained / "checkpoint.npz").is_file() and (trained / "train_graph.json").is_file()
    ev = json.loads(run_json_line(capsys, ["eval", str(trained), "--json"]))
    assert ev["accuracy"] == pytest.approx(m["test_accuracy"]) and ev["images"] == 12


def run_json_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    rc = main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    return out.strip().splitlines()[-1]


def test_train_gray_model_default_augment(folder, tmp_path, capsys):
    """plain_cnn reads 1x28x28: the dataset's default augmentation (the paper's crop + colour jitter, for square RGB
    models) falls back to flip instead of stopping the run."""
    out = tmp_path / "gray"
    rc = main(["train", "--model", str(FIXTURES / "plain_cnn.tflite"), "--data", str(folder), "--scheme", "bias-only",
               "--epochs", "1", "--batch-size", "12", "--lr", "0.05", "--quiet", "--out", str(out), "--subset", "12",
               "--test-subset", "6"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "completed" and m["augment"] == "flip" and m["resolution"] == [1, 28, 28]


def test_plan(capsys):
    rep = run_json(capsys, ["plan", "--model", MODEL, "--scheme", "last:3", "--json"])
    assert rep["model"] == "mbv1" and rep["scheme"] == "last:3"
    assert rep["peak_sram_bytes"] >= rep["arena_bytes"] > 0 and rep["state_bytes"] > 0 and rep["flash_bytes"] > 0
    assert rep["peak_sram_bytes"] <= 256 * 1024


@no_host_cc
def test_compile_run_on_host(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["compile", "--model", MODEL, "--scheme", "last:3", "--target", "host", "-o", str(out), "--run",
                 "--steps", "2", "--data", "skimage"]) == 0
    text = capsys.readouterr().out
    assert "mbv1 last:3" in text and "trained 2 skimage images" in text
    mem = json.loads((out / "memory.json").read_text())
    assert mem["fits"] and mem["planned_peak_sram_bytes"] > 0 and (out / "state.bin").stat().st_size > 0


@pytest.fixture(scope="module")
def contrib_file(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("contrib") / "contrib.json"
    rc = main(["contrib", "--model", MODEL, "--data", str(folder), "--subset", "24", "--test-subset", "12",
               "--epochs", "1", "--batch-size", "8", "--lr", "0.05", "--warmup-epochs", "0", "--probe-epochs", "1",
               "--probe-lr", "0.05", "--k-grid", "1,2", "--base-k", "2", "--weight-convs", "8", "--workers", "1",
               "--quiet", "--out", str(out)])
    assert rc == 0
    return out


def test_contrib_and_search(contrib_file, tmp_path, capsys):
    from microtrain.frontends.zoo import load_model
    from microtrain.sparse.scheme import resolve_scheme

    c = json.loads(contrib_file.read_text())
    assert c["format"] == "microtrain-contrib/1" and c["model"] == "mbv1" and c["num_convs"] == 9
    assert len(c["bias"]) == 2 and len(c["weight"]) == 4 and "head" in c["baselines"]
    out = tmp_path / "s.yaml"
    res = run_json(capsys, ["search", "--model", MODEL, "--contrib", str(contrib_file), "--budget", "64KB",
                            "--samples", "40", "--random-samples", "20", "--population", "10", "-o", str(out),
                            "--json"])
    assert res["model"] == "mbv1" and 0 < res["planned_peak_bytes"] <= res["budget_bytes"] == 64 * 1024
    assert out.is_file()
    s = resolve_scheme(str(out), load_model(MODEL))  # the scheme validates against the imported model
    assert 0 <= s.n_bias_update <= 9


@no_host_cc
def test_demo(folder, tmp_path, capsys, monkeypatch):
    """demo --model a .tflite: no paper scheme for it (last:3 instead); the folder's images instead of CIFAR-10 and
    no QEMU stage, to stay small."""
    from microtrain.commands import demo
    from microtrain.data.datasets import open_dataset

    monkeypatch.setattr(demo, "_datasets", lambda subset: (open_dataset(str(folder), "train", progress=False),
                                                            open_dataset(str(folder), "test", progress=False),
                                                            str(folder)))
    monkeypatch.setattr(demo, "toolchain", lambda target: "qemu-system-arm (left out of this test)")
    rc = main(["demo", "--model", MODEL, "--epochs", "1", "--lr", "0.05", "--steps", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "scheme last:3" in out and "== 3. compile" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"] == "mbv1" and report["scheme"] == "last:3" and 0 <= report["accuracy_after"] <= 1
    assert report["host"]["fits"] and (tmp_path / "plan.png").stat().st_size > 0
