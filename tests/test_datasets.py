"""Data layer: ImageFolder decoding with bad files, balanced subsets, caches, IDX parsing, LFW split, augmentation."""

from __future__ import annotations

import gzip
import math
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from microtrain.data import datasets as D
from microtrain.errors import MicrotrainError

from conftest import SHARED


def write_image(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path) -> Path:
    """train/ + test/, 3 classes of 5 (train) and 2 (test) 12x12 images, plus one garbage and one truncated JPEG
    and a non-image file in train."""
    rng = np.random.default_rng(0)
    root = tmp_path / "toy"
    for split, n in (("train", 5), ("test", 2)):
        for c, cls in enumerate(("cat", "ant", "bee")):
            for i in range(n):
                img = rng.integers(0, 256, (12, 12, 3))
                img[..., c] = 255
                write_image(root / split / cls / f"{i:02d}.png", img)
    (root / "train" / "bee" / "zz-garbage.jpg").write_bytes(b"this is not a jpeg")
    good = root / "train" / "ant" / "00.png"
    Image.open(good).save(root / "train" / "ant" / "zz-trunc.jpg", quality=95)
    data = (root / "train" / "ant" / "zz-trunc.jpg").read_bytes()
    (root / "train" / "ant" / "zz-trunc.jpg").write_bytes(data[: len(data) // 2])
    (root / "train" / "cat" / "notes.txt").write_text("ignored: not an image extension")
    return root


def test_image_folder_skips_and_counts_bad_files(folder):
    ds = D.ImageFolderDataset(folder, "train", progress=False)
    assert ds.classes == ["ant", "bee", "cat"]  # sorted by name
    assert len(ds) == 15 and ds.images.shape == (15, 3, 12, 12) and ds.images.dtype == np.uint8
    assert list(ds.class_counts()) == [5, 5, 5]
    bad = sorted(Path(p).name for p, _ in ds.skipped)
    assert bad == ["zz-garbage.jpg", "zz-trunc.jpg"]
    assert all(reason for _, reason in ds.skipped)
    # the dominant channel of each image is its class's channel (cat=0, ant=1, bee=2 by construction)
    channel = {"cat": 0, "ant": 1, "bee": 2}
    for img, y in zip(ds.images, ds.labels, strict=True):
        assert (img[channel[ds.classes[y]]] == 255).all()
    test = D.ImageFolderDataset(folder, "test", progress=False)
    assert len(test) == 6 and test.classes == ds.classes and not test.skipped


def test_subset_is_balanced_deterministic_and_replaces_bad_files(folder):
    a = D.ImageFolderDataset(folder, "train", subset=7, seed=3, progress=False)
    b = D.ImageFolderDataset(folder, "train", subset=7, seed=3, progress=False)
    assert len(a) == 7 and sorted(a.class_counts()) == [2, 2, 3]
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    seeds = {D.ImageFolderDataset(folder, "train", subset=7, seed=s, progress=False).images.tobytes()
             for s in range(6)}
    assert len(seeds) > 1
    # asking for every candidate: undecodable files are skipped, the rest are all taken
    full = D.ImageFolderDataset(folder, "train", subset=16, progress=False)
    assert len(full) == 15 and len(full.skipped) == 2
    with pytest.raises(MicrotrainError, match="subset"):
        D.ImageFolderDataset(folder, "train", subset=0, progress=False)


def test_balanced_indices_properties():
    labels = np.array([0] * 50 + [1] * 3 + [2] * 20)
    idx = D.balanced_indices(labels, 30, 3, seed=1)
    assert len(idx) == 30 and len(set(idx)) == 30 and np.all(np.diff(idx) > 0)
    assert list(np.bincount(labels[idx], minlength=3)) == [14, 3, 13]  # class 1 runs out, the others fill in
    assert np.array_equal(idx, D.balanced_indices(labels, 30, 3, seed=1))
    assert np.array_equal(D.balanced_indices(labels, 100, 3), np.arange(73))


def test_plain_class_layout_split_is_disjoint_and_deterministic(tmp_path):
    rng = np.random.default_rng(1)
    for cls in ("a", "b"):
        for i in range(10):
            write_image(tmp_path / "plain" / cls / f"{i}.png", rng.integers(0, 256, (8, 8, 3)))
    tr = D.ImageFolderDataset(tmp_path / "plain", "train", test_fraction=0.3, progress=False)
    te = D.ImageFolderDataset(tmp_path / "plain", "test", test_fraction=0.3, progress=False)
    assert list(tr.class_counts()) == [7, 7] and list(te.class_counts()) == [3, 3]
    rows = {im.tobytes() for im in tr.images} | {im.tobytes() for im in te.images}
    assert len(rows) == 20  # disjoint and complete
    again = D.ImageFolderDataset(tmp_path / "plain", "test", test_fraction=0.3, progress=False)
    assert np.array_equal(te.images, again.images)
    other = D.ImageFolderDataset(tmp_path / "plain", "test", test_fraction=0.3, split_seed=5, progress=False)
    assert not np.array_equal(te.images, other.images)


def test_mixed_sizes_stored_as_centre_squares(tmp_path):
    write_image(tmp_path / "m" / "x" / "0.png", np.zeros((20, 30, 3)))
    write_image(tmp_path / "m" / "x" / "1.png", np.full((40, 40, 3), 200))
    write_image(tmp_path / "m" / "y" / "0.png", np.full((300, 100, 3), 50))
    ds = D.ImageFolderDataset(tmp_path / "m", "train", test_fraction=0.01, progress=False)
    assert ds.images.shape == (3, 3, D.DEFAULT_STORE_SIZE, D.DEFAULT_STORE_SIZE)
    assert set(np.unique(ds.images)) == {0, 50, 200}
    small = D.ImageFolderDataset(tmp_path / "m", "train", test_fraction=0.01, size=16, progress=False)
    assert small.images.shape == (3, 3, 16, 16)


def test_decode_cache_roundtrip(folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    a = D.ImageFolderDataset(folder, "train", cache_dir=cache, progress=False)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1

    calls = []
    decode = D._decode
    monkeypatch.setattr(D, "_decode", lambda *a: calls.append(a) or decode(*a))
    b = D.ImageFolderDataset(folder, "train", cache_dir=cache, progress=False)
    assert not calls  # served from the cache
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert b.skipped == a.skipped and b.classes == a.classes
    write_image(folder / "train" / "cat" / "new.png", np.zeros((12, 12, 3)))  # the folder changed: decode again
    c = D.ImageFolderDataset(folder, "train", cache_dir=cache, progress=False)
    assert len(calls) == 18 and len(c) == 16 and len(list(cache.glob("*.npz"))) == 2


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def test_read_idx_roundtrip_and_errors(tmp_path):
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / "x-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(idx_bytes(x)))
    assert np.array_equal(D.read_idx(p), x)
    f = np.array([1.5, -2.0], dtype=">f4")
    (tmp_path / "f").write_bytes(idx_bytes(f, 0x0D))
    assert D.read_idx(tmp_path / "f").tolist() == [1.5, -2.0]
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\0" * 8)
    with pytest.raises(MicrotrainError, match="not an IDX"):
        D.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(idx_bytes(x)[:-5])
    with pytest.raises(MicrotrainError, match="payload"):
        D.read_idx(tmp_path / "short")


def test_fashion_mnist_from_idx_directory(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = np.arange(20, dtype=np.uint8) % 10
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(imgs)))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    ds = D.load_fashion_mnist("test", tmp_path)
    assert ds.images.shape == (20, 1, 28, 28) and np.array_equal(ds.images[:, 0], imgs)
    assert np.array_equal(ds.labels, labels) and ds.num_classes == 10
    with pytest.raises(MicrotrainError, match="not found"):
        D.load_fashion_mnist("train", tmp_path)


def test_fashion_mnist_debian_files():
    if not (D.DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    ds = D.open_dataset("fashion-mnist", "test")
    assert ds.images.shape == (10000, 1, 28, 28) and list(ds.class_counts()) == [1000] * 10
    assert ds.classes[9] == "Ankle boot"
    x, y = next(D.batches(ds, 4, resolution=32))
    assert x.shape == (4, 3, 32, 32) and torch.equal(x[:, 0], x[:, 2])  # grey -> 3 equal channels
    sub = D.open_dataset("fmnist", "test", subset=50, seed=2)
    assert list(sub.class_counts()) == [5] * 10


def test_lfw_subset_split():
    tr, te = D.open_dataset("lfw", "train"), D.open_dataset("lfw", "test")
    assert tr.classes == ["face", "non-face"] and len(tr) == 150 and len(te) == 50
    assert list(te.class_counts()) == [25, 25]
    rows = {im.tobytes() for im in tr.images} | {im.tobytes() for im in te.images}
    assert len(rows) == 200
    assert np.array_equal(te.images, D.load_lfw_subset("test").images)


def test_open_dataset_registry(folder, tmp_path, monkeypatch):
    with pytest.raises(MicrotrainError, match="unknown dataset"):
        D.open_dataset("no-such-set")
    monkeypatch.setenv("MICROTRAIN_DATA", str(tmp_path / "nothing-here"))
    if not any((r / "flowers-102").is_dir() or (r / "flowers102").is_dir() for r in D.data_roots()):
        with pytest.raises(MicrotrainError, match="not available locally"):
            D.open_dataset("flowers102")
    (tmp_path / "data").mkdir()
    folder.rename(tmp_path / "data" / "flowers-102")
    monkeypatch.setenv("MICROTRAIN_DATA", str(tmp_path / "data"))
    ds = D.open_dataset("Flowers", "test", progress=False)
    assert ds.name == "flowers102" and len(ds) == 6
    assert D.dataset_info("vww").augment == "flip" and D.dataset_info("vww").epochs == 10
    by_path = D.open_dataset(str(tmp_path / "data" / "flowers-102"), "test", progress=False)
    assert np.array_equal(by_path.images, ds.images)


def test_cifar10_subset_if_present():
    if not (SHARED / "datasets" / "cifar10" / "test").is_dir():
        pytest.skip("../shared/datasets/cifar10 is not beside the repository")
    ds = D.open_dataset("cifar10", "test", subset=30, progress=False)
    assert ds.images.shape == (30, 3, 32, 32) and list(ds.class_counts()) == [3] * 10 and not ds.skipped
    assert ds.classes[0] == "airplane"


# ---------------------------------------------------------------------------------------------------- augmentation

@pytest.fixture
def tiny() -> D.ImageDataset:
    rng = np.random.default_rng(0)
    return D.ImageDataset(rng.integers(0, 256, (10, 3, 20, 24), dtype=np.uint8), np.arange(10) % 2, ["a", "b"])


@pytest.mark.parametrize("mode", ["paper", "flip", "none", None])
@pytest.mark.parametrize("channels", [1, 3])
def test_batches_shapes_dtypes_ranges(mode, channels):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (10, channels, 20, 24), dtype=np.uint8)
    ds = D.ImageDataset(imgs, np.arange(10) % 2, ["a", "b"])
    out = list(D.batches(ds, 4, shuffle=True, seed=1, augment=mode, resolution=16))
    assert [len(y) for _, y in out] == [4, 4, 2]
    for x, y in out:
        assert x.dtype == torch.int8 and x.shape[1:] == (3, 16, 16) and y.dtype == torch.int64
    xs = torch.cat([x for x, _ in out]).float()
    assert xs.min() >= -128 and xs.max() <= 127 and xs.std() > 20  # real image content, not a constant
    assert sorted(torch.cat([y for _, y in out]).tolist()) == sorted(ds.labels.tolist())
    assert len(list(D.batches(ds, 4, drop_last=True))) == 2


def test_batches_deterministic_per_seed_and_epoch(tiny):
    def run(seed, epoch):
        return [(x.clone(), y.clone()) for x, y in D.batches(tiny, 3, shuffle=True, seed=seed, epoch=epoch,
                                                              augment="paper", resolution=16)]

    a, b, c, d = run(0, 0), run(0, 0), run(0, 1), run(1, 0)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c, strict=True))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, d, strict=True))


def test_eval_transform_matches_constant_and_native_size():
    x = torch.full((2, 3, 40, 40), 200, dtype=torch.uint8)
    assert torch.equal(D.resize_batch(x, 16), torch.full((2, 3, 16, 16), 72, dtype=torch.int8))
    y = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).remainder(256).to(torch.uint8).view(2, 3, 8, 8)
    assert torch.equal(D.resize_batch(y, 8, crop=1.0), (y.to(torch.int16) - 128).to(torch.int8))
    # crop 0.5: shorter side 10 -> 16 (so 10x20 -> 16x32), then the central 8x8 = source columns 7.5..12.5
    wide = torch.zeros(1, 1, 10, 20, dtype=torch.uint8)
    wide[..., 5:15] = 255
    assert torch.equal(D.resize_batch(wide, 8, crop=0.5), torch.full((1, 3, 8, 8), 127, dtype=torch.int8))
    squashed = D.resize_batch(wide, 8, crop=1.0)  # plain resize keeps the black sides
    assert squashed.shape == (1, 3, 8, 8) and squashed.min() == -128 and squashed.max() == 127


def test_crop_resize_exact_on_integer_boxes():
    x = torch.rand(2, 3, 16, 16) * 255
    same = D.crop_resize(x, torch.tensor([[0.0, 0, 16, 16]] * 2), 16)
    assert torch.allclose(same, x, atol=1e-3)
    sub = D.crop_resize(x, torch.tensor([[2.0, 3, 8, 8], [5.0, 0, 8, 8]]), 8)
    assert torch.allclose(sub[0], x[0, :, 2:10, 3:11], atol=1e-3)
    assert torch.allclose(sub[1], x[1, :, 5:13, 0:8], atol=1e-3)
    flipped = D.crop_resize(x, torch.tensor([[0.0, 0, 16, 16]] * 2), 16, torch.tensor([True, False]))
    assert torch.allclose(flipped[0], x[0].flip(-1), atol=1e-3) and torch.allclose(flipped[1], x[1], atol=1e-3)


def reference_rrc_area(h: int, w: int, rng: random.Random) -> float:
    """Area fraction of torchvision's RandomResizedCrop.get_params, one image at a time (scale 0.08-1, 3/4-4/3)."""
    for _ in range(10):
        target = h * w * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return ch * cw / (h * w)
    return 1.0


@pytest.mark.parametrize("hw", [(32, 48), (32, 32)])
def test_random_resized_crop_boxes_follow_torchvision(hw):
    h, w = hw
    b = D.random_resized_crop_boxes(8000, h, w, torch.Generator().manual_seed(0))
    top, left, bh, bw = b.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
    assert (bh >= 1).all() and (bw >= 1).all() and (b == b.round()).all()
    frac = bh * bw / (h * w)
    rng = random.Random(0)
    ref = sum(reference_rrc_area(h, w, rng) for _ in range(8000)) / 8000
    assert frac.min() > 0.06 and frac.max() <= 1.0 and abs(frac.mean().item() - ref) < 0.015
    aspect = bw / bh
    assert aspect.min() > 0.6 and aspect.max() < 1.6
    assert len({tuple(r) for r in b.tolist()}) > 1000
    # positions are uniform over the valid range: both edges get used
    assert (top == 0).any() and (top + bh == h).any() and (left == 0).any() and (left + bw == w).any()


def reference_jitter(img: torch.Tensor, factors: torch.Tensor, order: list[int]) -> torch.Tensor:
    """ColorJitter one image at a time, as torchvision's functional ops do it on float images in [0, 255]."""
    gray = lambda t: (0.2989 * t[0] + 0.587 * t[1] + 0.114 * t[2]).unsqueeze(0)  # noqa: E731
    for op in order:
        f = float(factors[op])
        if op == 0:
            img = (img * f).clamp(0, 255)
        elif op == 1:
            img = (f * img + (1 - f) * gray(img).mean()).clamp(0, 255)
        else:
            img = (f * img + (1 - f) * gray(img)).clamp(0, 255)
    return img


def test_color_jitter_matches_per_image_reference():
    x = torch.rand(16, 3, 8, 8) * 255
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    out = D.color_jitter(x, g1, 0.4)
    f = torch.empty(16, 3).uniform_(0.6, 1.4, generator=g2)
    order = torch.argsort(torch.rand(16, 3, generator=g2), dim=1)
    assert len({tuple(o) for o in order.tolist()}) > 2  # the random order really varies per image
    for i in range(16):
        ref = reference_jitter(x[i], f[i], order[i].tolist())
        assert torch.allclose(out[i], ref, atol=1e-3), i
    assert not torch.allclose(out, x)


def test_paper_augmentation_keeps_grey_grey_and_flip_mirrors():
    grey = torch.full((8, 1, 10, 10), 100, dtype=torch.uint8)
    x = D.augment_batch(grey, "paper", 12, torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    v = x[:, 0, 0, 0].float() + 128  # brightness * contrast around a constant: within 100 * 0.6 .. 100 * 1.4
    assert (v >= 59).all() and (v <= 141).all() and len(set(v.tolist())) > 1
    ramp = torch.arange(10, dtype=torch.uint8).mul(20).expand(6, 3, 10, 10).contiguous()
    flipped = D.augment_batch(ramp, "flip", 10, torch.Generator().manual_seed(1))
    plain = D.resize_batch(ramp, 10, crop=1.0)
    mirrored = [bool(torch.equal(f, plain[0].flip(-1))) for f in flipped]
    assert all(m or torch.equal(f, plain[0]) for m, f in zip(mirrored, flipped, strict=True))
    assert any(mirrored) and not all(mirrored)


def test_unknown_augment_rejected(tiny):
    with pytest.raises(MicrotrainError, match="augment"):
        next(D.batches(tiny, 2, augment="heavy"))
