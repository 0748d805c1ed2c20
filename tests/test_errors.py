"""Issue 12: every user-facing failure is one line (`microtrain: error: <what>: <why>`, exit 2; --debug shows the
traceback), piped output closes quietly, and data is handled honestly (empty / one-class datasets, 16-bit images,
eval on another dataset's classes, corrupt runs)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from microtrain.codegen.project import toolchain
from microtrain.data.datasets import open_dataset
from microtrain.data.images import load_image
from microtrain.errors import MicrotrainError
from test_hostile_inputs import cli, one_line

from conftest import SHARED
from tiny import tiny_model

CIFAR = SHARED / "datasets" / "cifar10"


def png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h pixels (a decompression bomb for PIL's limit) and holds almost nothing."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_decompression_bomb_image_is_one_line(tmp_path):
    bomb = tmp_path / "bomb.png"
    png_header_only(bomb, 40000, 40000)
    one_line(cli("predict", "--model", "mcunet-5fps", str(bomb)), str(bomb), "refused")


def test_debug_shows_the_traceback(tmp_path):
    r = cli("--debug", "predict", "--model", str(tmp_path / "none.json"), "x.png")
    assert r.returncode != 0 and "Traceback" in r.stderr and "ModelLoadError" in r.stderr
    r = cli("predict", "--model", str(tmp_path / "none.json"), "x.png", env={"MICROTRAIN_DEBUG": "1"})
    assert "Traceback" in r.stderr
    one_line(cli("predict", "--model", str(tmp_path / "none.json"), "x.png"), "no such file")


def test_piped_output_closes_quietly():
    """`microtrain models --json | head -0`: the reader is gone before the first write; no BrokenPipeError."""
    p = subprocess.Popen([sys.executable, "-m", "microtrain", "models", "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and err == "", err


def test_output_paths_are_checked_before_the_work(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    one_line(cli("compile", "--model", "mcunet-5fps", "--scheme", "bias-only", "-o", str(f)), "-o", "not a directory")
    one_line(cli("search", "--model", "mcunet-5fps", "-o", str(f / "s.yaml"), "--samples", "10"),
             "is not a directory")
    one_line(cli("search", "--model", "mcunet-5fps", "--plot", str(tmp_path), "--samples", "10"), "is a directory")
    one_line(cli("search", "--model", "mcunet-5fps", "--population", str(10 ** 9)), "--population")
    one_line(cli("search", "--model", "mcunet-5fps", "--classes", str(10 ** 9)), "--classes")
    one_line(cli("compile", "--model", "mcunet-5fps", "--scheme", "bias-only", "--classes", str(10 ** 9), "-o",
                 str(tmp_path / "c")), "--classes")


def test_contrib_out_is_checked_before_the_trials(tmp_path):
    d = _folder(tmp_path / "data", {"a": 2, "b": 2})
    r = cli("contrib", "--model", "mcunet-5fps", "--data", str(d), "--out", str(tmp_path), "--subset", "4",
            "--test-subset", "4", "--epochs", "1", "--workers", "1")
    one_line(r, "--out", "is a directory")
    assert "trial" not in r.stdout.lower()


def test_contribution_file_that_is_a_list(tmp_path):
    c = tmp_path / "contrib.json"
    c.write_text(json.dumps([1, 2, 3]))
    one_line(cli("search", "--model", "mcunet-5fps", "--contrib", str(c), "--samples", "10"), str(c))
    c.write_text(json.dumps({"format": "microtrain-contrib/1", "bias": "x"}))
    r = cli("search", "--model", "mcunet-5fps", "--contrib", str(c), "--samples", "10")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.skipif(toolchain("host") is not None, reason="host C toolchain not installed")
def test_compile_run_with_a_relative_out_dir(tmp_path):
    """The README's `-o out/m4` form: a relative -o with --run (the program runs inside OUT_DIR)."""
    tiny_model(res=16).save(tmp_path / "tiny")
    r = cli("compile", "--model", "tiny.json", "--scheme", "last:2", "--classes", "5", "-o", "out/rel", "--run",
            "--steps", "3", "--data", "skimage", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "trained 3" in r.stdout and (tmp_path / "out" / "rel" / "state.bin").is_file()


# ---- data handling ---------------------------------------------------------------------------------------------------
def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    a = np.full((8, 8), 65535, np.uint16)
    a[:, :4] = 32896  # 128 * 257
    p = tmp_path / "g16.png"
    Image.fromarray(a).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I")
    px = load_image(p, 8)
    assert px[:, :, :4].max() == px[:, :, :4].min() == 128 and px[:, :, 4:].min() == 255
    d = tmp_path / "ds"
    for c in ("a", "b"):
        (d / "train" / c).mkdir(parents=True)
        (d / "test" / c).mkdir(parents=True)
        for split in ("train", "test"):
            shutil.copy(p, d / split / c / "x.png")
    ds = open_dataset(str(d), "train", progress=False)
    assert ds.images[:, :, :, :4].max() == 128 and ds.images[:, :, :, 4:].min() == 255


def _folder(root: Path, counts: dict[str, int]) -> Path:
    img = Image.fromarray(np.full((8, 8, 3), 100, np.uint8))
    for split in ("train", "test"):
        for c, n in counts.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img.save(root / split / c / f"{i}.png")
    return root


def test_empty_class_and_one_class_datasets_are_errors(tmp_path):
    with pytest.raises(MicrotrainError, match="class b has no images"):
        open_dataset(str(_folder(tmp_path / "e", {"a": 2, "b": 0})), "train", progress=False)
    with pytest.raises(MicrotrainError, match="need at least 2"):
        open_dataset(str(_folder(tmp_path / "one", {"a": 3})), "train", progress=False)
    bad = _folder(tmp_path / "u", {"a": 2, "b": 1})
    (bad / "train" / "b" / "0.png").write_bytes(b"not a png")
    with pytest.raises(MicrotrainError, match="class b has no images after skipping undecodable images"):
        open_dataset(str(bad), "train", progress=False)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    if not CIFAR.is_dir():
        pytest.skip("../shared/datasets/cifar10 not present")
    root = tmp_path_factory.mktemp("data")
    for classes, name in ((("airplane", "ship"), "as"), (("cat", "dog"), "cd")):
        for split, n in (("train", 8), ("test", 4)):
            for c in classes:
                (root / name / split / c).mkdir(parents=True)
                for f in sorted((CIFAR / split / c).glob("*.jpg"))[:n]:
                    shutil.copy(f, root / name / split / c / f.name)
    (root / "as" / "train" / "ship" / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    run = root / "run"
    r = cli("train", "--model", "proxyless-w0.3", "--data", str(root / "as"), "--scheme", "bias:2", "--epochs", "1",
            "--warmup-epochs", "0", "--batch-size", "8", "--augment", "none", "--quiet", "--lr", "0.05", "--out",
            str(run))
    assert r.returncode == 0, r.stderr
    assert "skipped 1 undecodable image(s) in as/train (first:" in r.stderr and "broken.jpg" in r.stderr
    return root, run


def test_eval_refuses_other_classes_and_corrupt_runs(trained_run, tmp_path):
    root, run = trained_run
    assert cli("eval", str(run)).returncode == 0
    one_line(cli("eval", str(run), "--data", str(root / "cd"), "--json"), "are not the run's", "labels would not match")
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    raw = bytearray((bad / "checkpoint.npz").read_bytes())
    raw[len(raw) // 2] ^= 1
    (bad / "checkpoint.npz").write_bytes(bytes(raw))
    one_line(cli("eval", str(bad)), "checkpoint.npz", "sha256")
    one_line(cli("compile", "--from", str(bad), "-o", str(tmp_path / "c")), "sha256")
    (bad / "metrics.json").write_text("{ not json")
    one_line(cli("eval", str(bad)), "metrics.json", "unreadable")
    nock = tmp_path / "nock"
    shutil.copytree(run, nock)
    (nock / "checkpoint.npz").unlink()
    one_line(cli("compile", "--from", str(nock), "-o", str(tmp_path / "d")), "never saved a checkpoint")


def test_symlink_loop_in_a_dataset_is_one_line(tmp_path):
    d = _folder(tmp_path / "loop", {"a": 2, "b": 2})
    os.symlink("x.jpg", d / "train" / "a" / "x.jpg")
    r = cli("train", "--model", "mcunet-5fps", "--data", str(d), "--epochs", "1", "--out", str(tmp_path / "o"))
    one_line(r, "x.jpg")


def test_demo_subset_zero_does_not_switch_datasets(tmp_path):
    one_line(cli("demo", "--subset", "0", "--out", str(tmp_path)), "--subset must be >= 1")
