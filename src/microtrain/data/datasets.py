"""Image classification datasets held in memory as decoded uint8 arrays, and the batched augmentation pipeline.

Decoding JPEGs is the slow part of host training, so every image is decoded exactly once into a uint8 array
`images[N, C, h, w]` (C = 3, or 1 for greyscale sources, expanded to 3 channels per batch) at its native size when
the dataset has one uniform small size (CIFAR 32x32, Fashion-MNIST 28x28), otherwise as a centre square resized to
`size`. Augmentation and resizing to the model resolution then run vectorised per batch in torch, and the output
is the models' int8 input encoding `pixel - 128` (see `images.to_int8`).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from microtrain.data.images import to_rgb
from microtrain.errors import MicrotrainError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
MAX_NATIVE_SIDE = 256      # uniform datasets up to this side are cached at native size
DEFAULT_STORE_SIZE = 160   # otherwise: centre square resized to this (>= ceil(128 / 0.875) = 147)
AUGMENTS = ("paper", "flip", "none")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class ImageDataset:
    """Decoded images in memory: `images` uint8 [N, C, h, w] (C in {1, 3}), `labels` int64 [N], class names sorted
    as the label indices, and the files that could not be decoded as (path, reason) pairs."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    name: str = "dataset"
    split: str = "train"
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[1] not in (1, 3):
            raise MicrotrainError(f"{self.name}: images must be uint8 [N, 1|3, h, w], got {self.images.dtype} "
                                  f"{self.images.shape}")
        self.images = np.ascontiguousarray(self.images)  # NCHW in memory: the batch ops are fastest on it
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.labels) != len(self.images):
            raise MicrotrainError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) and not 0 <= self.labels.min() <= self.labels.max() < len(self.classes):
            raise MicrotrainError(f"{self.name}: labels outside 0..{len(self.classes) - 1}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def take(self, index: np.ndarray) -> ImageDataset:
        """The samples at `index` (same classes, same skipped list)."""
        return ImageDataset(self.images[index], self.labels[index], list(self.classes), self.name, self.split,
                            list(self.skipped))

    def subset(self, n: int, seed: int = 0) -> ImageDataset:
        """A class-balanced deterministic subset of n samples (see `balanced_indices`)."""
        if n < 1:
            raise MicrotrainError(f"subset must be >= 1, got {n}")
        return self.take(balanced_indices(self.labels, n, self.num_classes, seed))

    def save(self, path: str | Path) -> Path:
        """Writes the decoded cache as an .npz (no pickle) that `ImageDataset.load` reads back."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        sk = np.array([[p, r] for p, r in self.skipped], dtype=str).reshape(-1, 2)
        np.savez(tmp, images=self.images, labels=self.labels, classes=np.array(self.classes, dtype=str),
                 name=np.array(self.name), split=np.array(self.split), skipped=sk)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ImageDataset:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["images"], z["labels"], [str(c) for c in z["classes"]], str(z["name"]), str(z["split"]),
                       [(str(p), str(r)) for p, r in z["skipped"]])


def balanced_indices(labels: np.ndarray, n: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-balanced subset of size min(n, len(labels)): each class is shuffled with `seed`,
    then classes are taken round-robin, so class counts differ by at most one unless a class runs out."""
    return np.sort(_round_robin(labels, num_classes, seed)[:n]) if n < len(labels) else np.arange(len(labels))


def _round_robin(labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """All indices ordered round-robin over classes (each class in a seeded random order): every prefix is
    class-balanced."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    rank = np.empty(len(labels), dtype=np.int64)
    for idx in per_class:
        rank[idx] = np.arange(len(idx))
    return np.lexsort((labels, rank))  # by rank within class, then by class index


# ---------------------------------------------------------------------------------------------------------- decoding

def _decode(path: Path, size: int | None) -> np.ndarray:
    """uint8 [3, h, w]: native size if size is None, else the centre square resized to size x size."""
    with Image.open(path) as im:
        if size is not None and im.format == "JPEG":
            im.draft("RGB", (size, size))  # DCT-domain downscale: large JPEGs decode several times faster
        im = to_rgb(im)
        if size is not None:
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BILINEAR)
        return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))


class _NeedStoreSize(Exception):
    """Native-size decoding found a large or a differently sized image: decode again at DEFAULT_STORE_SIZE."""


def decode_files(paths: Sequence[Path], size: int | None = None, *, desc: str = "decoding",
                 progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]], int]:
    """Decodes image files once. Returns (images uint8 [M, 3, h, w], kept indices into `paths`, skipped
    (path, reason) pairs, the stored size or 0 for native). With size None the native size is kept while all images
    agree and the side is <= MAX_NATIVE_SIDE; the first one that does not restarts the pass at DEFAULT_STORE_SIZE
    (for a mixed-size folder that happens at the second image, so nearly nothing is decoded twice)."""
    try:
        return _decode_all(paths, size, desc, progress)
    except _NeedStoreSize:
        return _decode_all(paths, DEFAULT_STORE_SIZE, desc, progress)


def _decode_all(paths: Sequence[Path], size: int | None, desc: str, progress: bool
                ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]], int]:
    arrays, kept, skipped = [], [], []
    shape = None
    for i, p in enumerate(tqdm(paths, desc=desc, unit="img", disable=not progress, leave=False)):
        try:
            a = _decode(p, size)
        except Exception as e:  # a bad file must never stop a run: PIL raises many exception types
            skipped.append((str(p), f"{type(e).__name__}: {e}"))
            continue
        if size is None and (a.shape != (shape or a.shape) or max(a.shape[1:]) > MAX_NATIVE_SIDE):
            raise _NeedStoreSize
        shape = a.shape
        arrays.append(a)
        kept.append(i)
    images = np.stack(arrays) if arrays else np.zeros((0, 3, size or 1, size or 1), np.uint8)
    return images, np.array(kept, dtype=np.int64), skipped, size or 0


def _subdirs(d: Path) -> list[str]:
    with os.scandir(d) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())


def _image_files(d: Path) -> list[Path]:
    """Image files (by extension, hidden files excluded) in name order. scandir avoids a stat per file."""
    with os.scandir(d) as it:
        names = sorted(e.name for e in it if not e.name.startswith(".") and e.is_file()
                       and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
    return [d / n for n in names]


def _fingerprint(files: Sequence[Path], *parts: object) -> str:
    h = hashlib.sha1(repr(parts).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class ImageFolderDataset(ImageDataset):
    """`root/<split>/<class>/*` (ImageFolder; "test" falls back to "val"), or a plain `root/<class>/*` split
    deterministically per class into train/test (`test_fraction`, `split_seed`). Classes are the sorted class
    directory names (the union over the root's split directories, so train and test agree on label indices).

    subset=N decodes only a class-balanced deterministic subset (seeded by `seed`; undecodable files are replaced by
    the next candidates). Undecodable files are skipped and listed in `.skipped`. `cache_dir` saves the decoded
    arrays as an .npz keyed by the files' names, sizes and mtimes, and reuses it on the next run."""

    def __init__(self, root: str | Path, split: str = "train", *, subset: int | None = None, seed: int = 0,
                 size: int | None = None, test_fraction: float = 0.2, split_seed: int = 0,
                 cache_dir: str | Path | None = None, progress: bool = True, name: str | None = None):
        root = Path(root)
        if subset is not None and subset < 1:
            raise MicrotrainError(f"subset must be >= 1, got {subset}")
        if not root.is_dir():
            raise MicrotrainError(f"dataset directory {root} does not exist")
        name = name or root.name
        files, labels, classes = _scan_folder(root, split, test_fraction, split_seed)
        if not files:
            raise MicrotrainError(f"{root}: no image files found for split {split!r}")
        check_classes(f"{root}/{split}", classes, labels, split)
        order = _round_robin(labels, len(classes), seed) if subset is not None and subset < len(files) else None
        cache = None
        if cache_dir is not None:
            key = _fingerprint(files, split, subset, seed, size, test_fraction, split_seed)
            cache = Path(cache_dir) / f"{name}-{split}-{key}.npz"
            if cache.is_file():
                ds = ImageDataset.load(cache)
                super().__init__(ds.images, ds.labels, classes, name, split, ds.skipped)
                return
        if order is None:
            images, kept, skipped, _ = decode_files(files, size, desc=f"decoding {name}/{split}", progress=progress)
        else:
            images, kept, skipped = self._decode_subset(files, order, subset, size, f"decoding {name}/{split}",
                                                        progress)
        super().__init__(images, labels[kept], classes, name, split, skipped)
        if subset is None:
            check_classes(f"{root}/{split}", classes, self.labels, split, "after skipping undecodable images")
        if cache is not None:
            self.save(cache)

    @staticmethod
    def _decode_subset(files: list[Path], order: np.ndarray, n: int, size: int | None, desc: str, progress: bool
                       ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
        """Decodes the first n of `order`, then further candidates in place of undecodable ones; keeps file order.
        Every chunk uses the storage size the first chunk settled on (restarting at DEFAULT_STORE_SIZE if a later
        chunk disagrees)."""
        parts, kept, skipped, pos, want = [], [], [], 0, n
        while want > 0 and pos < len(order):
            chunk = order[pos: pos + want]
            pos += len(chunk)
            imgs, k, sk, stored = decode_files([files[i] for i in chunk], size, desc=desc, progress=progress)
            if size is None and stored:
                size = stored
            if parts and len(imgs) and imgs.shape[1:] != parts[0].shape[1:]:
                return ImageFolderDataset._decode_subset(files, order, n, DEFAULT_STORE_SIZE, desc, progress)
            if len(imgs):
                parts.append(imgs)
            kept.append(chunk[k])
            skipped += sk
            want -= len(k)
        idx = np.concatenate(kept)
        images = np.concatenate(parts) if parts else np.zeros((0, 3, 1, 1), np.uint8)
        srt = np.argsort(idx, kind="stable")
        return images[srt], idx[srt], skipped


def check_classes(where: str, classes: Sequence[str], labels: np.ndarray, split: str, when: str = "") -> None:
    """A dataset to train on needs two classes or more, and (training split) images of every class: a class with no
    images would be a head output that is never trained, and one class is "100% accuracy" by construction."""
    if len(classes) < 2:
        raise MicrotrainError(f"{where}: {len(classes)} class ({', '.join(classes)}): need at least 2 to train a "
                              "classifier")
    if split == "train":
        counts = np.bincount(np.asarray(labels, np.int64), minlength=len(classes))
        empty = [c for c, n in zip(classes, counts, strict=True) if n == 0]
        if empty:
            raise MicrotrainError(f"{where}: class{'es' if len(empty) > 1 else ''} {', '.join(empty[:5])} "
                                  f"ha{'ve' if len(empty) > 1 else 's'} no images{' ' + when if when else ''}")


def _scan_folder(root: Path, split: str, test_fraction: float, split_seed: int
                 ) -> tuple[list[Path], np.ndarray, list[str]]:
    split_dirs = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    if split_dirs:
        d = split_dirs.get(split) or (split_dirs.get("val") if split == "test" else None)
        if d is None:
            raise MicrotrainError(f"{root}: no {split!r} directory (found {', '.join(sorted(split_dirs))})")
        classes = sorted({c for sd in split_dirs.values() for c in _subdirs(sd)})
        files, labels = [], []
        for c, cls in enumerate(classes):
            fs = _image_files(d / cls) if (d / cls).is_dir() else []
            files += fs
            labels += [c] * len(fs)
        return files, np.array(labels, dtype=np.int64), classes
    if split not in ("train", "test", "val"):
        raise MicrotrainError(f"{root}: split must be train or test for a plain <class>/ layout, got {split!r}")
    if not 0 < test_fraction < 1:
        raise MicrotrainError(f"test_fraction must be in (0, 1), got {test_fraction}")
    classes = _subdirs(root)
    if not classes:
        raise MicrotrainError(f"{root}: expected <split>/<class>/ or <class>/ sub-directories")
    files, labels = [], []
    for c, cls in enumerate(classes):
        fs = _image_files(root / cls)
        perm = np.random.default_rng([split_seed, c]).permutation(len(fs))
        n_test = int(round(len(fs) * test_fraction))
        pick = np.sort(perm[:n_test] if split != "train" else perm[n_test:])
        files += [fs[i] for i in pick]
        labels += [c] * len(pick)
    return files, np.array(labels, dtype=np.int64), classes


# ------------------------------------------------------------------------------------------- Fashion-MNIST and LFW

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parses an IDX file (MNIST format, optionally .gz): 2 zero bytes, dtype code, ndim, big-endian uint32 dims."""
    path = Path(path)
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        try:
            data = f.read()
        except (OSError, EOFError) as e:
            raise MicrotrainError(f"{path}: cannot read ({e})") from None
    if len(data) < 4 or data[0] or data[1] or data[2] not in _IDX_DTYPES:
        raise MicrotrainError(f"{path}: not an IDX file (bad magic {data[:4].hex()})")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise MicrotrainError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4: 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    n = math.prod(dims)
    if len(data) - 4 - 4 * ndim != n * dtype.itemsize:
        raise MicrotrainError(f"{path}: IDX payload has {len(data) - 4 - 4 * ndim} bytes, dims {dims} need "
                              f"{n * dtype.itemsize}")
    return np.frombuffer(data, dtype, count=n, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str = "train", root: str | Path | None = None, *, subset: int | None = None,
                       seed: int = 0) -> ImageDataset:
    """Fashion-MNIST from its IDX .gz files (default: Debian's dataset-fashion-mnist), 28x28 greyscale stored as one
    channel and expanded to RGB per batch. split: train (60,000) or test (10,000)."""
    root = Path(root) if root is not None else DEBIAN_FASHION_MNIST
    prefix = {"train": "train", "test": "t10k", "val": "t10k"}.get(split)
    if prefix is None:
        raise MicrotrainError(f"fashion-mnist: split must be train or test, got {split!r}")

    def find(stem: str) -> Path:
        for p in (root / f"{stem}.gz", root / stem):
            if p.is_file():
                return p
        raise MicrotrainError(f"fashion-mnist: {root / stem}.gz not found (install Debian's dataset-fashion-mnist "
                              "or pass the directory holding the IDX files)")

    x = read_idx(find(f"{prefix}-images-idx3-ubyte"))
    y = read_idx(find(f"{prefix}-labels-idx1-ubyte"))
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or x.dtype != np.uint8:
        raise MicrotrainError(f"fashion-mnist: unexpected IDX shapes {x.shape} / {y.shape}")
    ds = ImageDataset(x[:, None].copy(), y.astype(np.int64), list(FASHION_MNIST_CLASSES), "fashion-mnist", split)
    return ds.subset(subset, seed) if subset is not None else ds


def load_lfw_subset(split: str = "train", *, test_fraction: float = 0.25, split_seed: int = 0,
                    subset: int | None = None, seed: int = 0) -> ImageDataset:
    """scikit-image's `lfw_subset()`: 100 faces then 100 non-faces, 25x25 greyscale, as a tiny 2-class
    person/no-person task. The split is stratified and deterministic (`split_seed`)."""
    from skimage.data import lfw_subset

    x = np.asarray(lfw_subset())
    if x.dtype != np.uint8:
        x = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    y = np.repeat(np.arange(2), len(x) // 2)
    if split not in ("train", "test", "val"):
        raise MicrotrainError(f"lfw: split must be train or test, got {split!r}")
    keep = []
    for c in range(2):
        idx = np.flatnonzero(y == c)
        perm = np.random.default_rng([split_seed, c]).permutation(idx)
        n_test = int(round(len(idx) * test_fraction))
        keep.append(perm[:n_test] if split != "train" else perm[n_test:])
    idx = np.sort(np.concatenate(keep))
    ds = ImageDataset(x[idx][:, None].copy(), y[idx], ["face", "non-face"], "lfw", split)
    return ds.subset(subset, seed) if subset is not None else ds


# ----------------------------------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class DatasetInfo:
    """A named dataset: where to look for it and the paper's training protocol for it (PAPER.md §5)."""

    name: str
    dirnames: tuple[str, ...]
    augment: str = "paper"
    epochs: int = 50
    warmup_epochs: int = 5
    kind: str = "folder"  # folder | fashion-mnist | lfw


DATASETS: dict[str, DatasetInfo] = {d.name: d for d in (
    DatasetInfo("cifar10", ("cifar10", "cifar-10")),
    DatasetInfo("cifar100", ("cifar100", "cifar-100")),
    DatasetInfo("vww", ("vww", "visual-wake-words", "vww-s256"), augment="flip", epochs=10, warmup_epochs=1),
    DatasetInfo("flowers102", ("flowers102", "flowers-102", "flowers", "oxford-flowers102")),
    DatasetInfo("pets", ("pets", "oxford-pets", "oxford-iiit-pet")),
    DatasetInfo("cub200", ("cub200", "cub", "cub-200", "cub-200-2011")),
    DatasetInfo("cars", ("cars", "stanford-cars")),
    DatasetInfo("food101", ("food101", "food-101")),
    DatasetInfo("fashion-mnist", ("fashion-mnist",), kind="fashion-mnist"),
    DatasetInfo("lfw", (), augment="flip", kind="lfw"),
)}
ALIASES = {"cifar-10": "cifar10", "cifar-100": "cifar100", "flowers": "flowers102", "flowers-102": "flowers102",
           "cub": "cub200", "food-101": "food101", "fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist",
           "lfw-subset": "lfw", "visual-wake-words": "vww"}


def data_roots() -> list[Path]:
    """Where named datasets are looked up: $MICROTRAIN_DATA (os.pathsep-separated), then `shared/datasets` inside and
    beside the repository checkout."""
    roots = [Path(p) for p in os.environ.get("MICROTRAIN_DATA", "").split(os.pathsep) if p]
    repo = Path(__file__).resolve().parents[3]
    return roots + [repo / "shared" / "datasets", repo.parent / "shared" / "datasets"]


def dataset_info(name_or_path: str) -> DatasetInfo | None:
    """The registry entry for a dataset name (aliases allowed) or None for a path / unknown name."""
    key = name_or_path.lower()
    return DATASETS.get(ALIASES.get(key, key))


def open_dataset(name_or_path: str | Path, split: str = "train", *, subset: int | None = None, seed: int = 0,
                 size: int | None = None, cache_dir: str | Path | None = None, progress: bool = True,
                 test_fraction: float = 0.2, split_seed: int = 0) -> ImageDataset:
    """Opens a dataset by registry name ("cifar10", "fashion-mnist", "lfw", "vww", "flowers102", "pets", "cub200",
    "cars", "food101", "cifar100") or by ImageFolder path. Folder datasets are found under `data_roots()`; see
    `ImageFolderDataset` for subset / size / cache_dir / test_fraction / split_seed."""
    p = Path(name_or_path)
    info = dataset_info(str(name_or_path))
    if info is None or (p.is_dir() and os.sep in str(name_or_path)):
        if not p.is_dir():
            raise MicrotrainError(f"unknown dataset {str(name_or_path)!r}: not a directory and not one of "
                                  f"{', '.join(DATASETS)}")
        return ImageFolderDataset(p, split, subset=subset, seed=seed, size=size, test_fraction=test_fraction,
                                  split_seed=split_seed, cache_dir=cache_dir, progress=progress)
    if info.kind == "fashion-mnist":
        root = next((r / "fashion-mnist" for r in data_roots() if (r / "fashion-mnist").is_dir()), None)
        return load_fashion_mnist(split, root, subset=subset, seed=seed)
    if info.kind == "lfw":
        return load_lfw_subset(split, split_seed=split_seed, subset=subset, seed=seed)
    for r in data_roots():
        for d in info.dirnames:
            if (r / d).is_dir():
                return ImageFolderDataset(r / d, split, subset=subset, seed=seed, size=size,
                                          test_fraction=test_fraction, split_seed=split_seed, cache_dir=cache_dir,
                                          progress=progress, name=info.name)
    raise MicrotrainError(f"dataset {info.name!r} is not available locally (nothing can be downloaded): put an "
                          f"ImageFolder copy (train/<class>/*, test/<class>/*) at $MICROTRAIN_DATA/{info.dirnames[0]} "
                          f"or pass its directory")


# ------------------------------------------------------------------------------------------------- augmentation

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _generator(seed: int, epoch: int) -> torch.Generator:
    """Independent, reproducible stream per (seed, epoch)."""
    s = int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch]).generate_state(2, np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(s)


def random_resized_crop_boxes(n: int, h: int, w: int, g: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                              ratio: tuple[float, float] = (3 / 4, 4 / 3), tries: int = 10) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params, vectorised: float [n, 4] boxes (top, left, height, width) in
    source pixels. Up to `tries` area/aspect draws per image; the first that fits wins, else the fallback crop."""
    area = h * w
    target = area * torch.empty(n, tries).uniform_(scale[0], scale[1], generator=g)
    aspect = torch.exp(torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g))
    cw = torch.round(torch.sqrt(target * aspect))
    ch = torch.round(torch.sqrt(target / aspect))
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.to(torch.int8).argmax(dim=1, keepdim=True)
    cw, ch, found = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0], ok.any(dim=1)
    in_ratio = w / h  # fallback: the central crop with the aspect clamped to `ratio`
    fw, fh = (w, round(w / ratio[0])) if in_ratio < ratio[0] else ((round(h * ratio[1]), h) if in_ratio > ratio[1]
                                                                    else (w, h))
    cw = torch.where(found, cw, torch.tensor(float(fw)))
    ch = torch.where(found, ch, torch.tensor(float(fh)))
    u = torch.rand(n, 2, generator=g)
    top = torch.where(found, torch.floor(u[:, 0] * (h - ch + 1)), torch.floor((h - ch) / 2))
    left = torch.where(found, torch.floor(u[:, 1] * (w - cw + 1)), torch.floor((w - cw) / 2))
    return torch.stack([top, left, ch, cw], dim=1)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear crop-and-resize of every image to its box (top, left, height, width), optionally mirrored: one
    `grid_sample` for the whole batch. x float [N, C, H, W] -> [N, C, size, size]. Output pixel centres map to the
    box's pixel centres (align_corners=False), as crop + resize does; the axis-aligned grid is built separably."""
    n, _, h, w = x.shape
    top, left, bh, bw = boxes.unbind(1)
    u = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1  # output centres in [-1, 1]
    sx = bw / w if flip is None else torch.where(flip, -bw / w, bw / w)
    gx = sx[:, None] * u + ((2 * left + bw) / w - 1)[:, None]
    gy = (bh / h)[:, None] * u + ((2 * top + bh) / h - 1)[:, None]
    grid = torch.stack((gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(x: torch.Tensor, g: torch.Generator, strength: float = 0.4) -> torch.Tensor:
    """torchvision ColorJitter(brightness, contrast, saturation = strength) on float RGB [N, 3, H, W] in [0, 255],
    per image in a random order. Each op is `f*x + b*gray(x) + c*mean(gray(x))` (brightness: b = c = 0; contrast:
    c = 1 - f; saturation: b = 1 - f), i.e. a per-image 3x3 colour matrix plus an offset, so every stage is one
    `baddbmm` and a clamp whichever op each image draws."""
    n, _, h, w = x.shape
    f = torch.empty(n, 3).uniform_(max(0.0, 1 - strength), 1 + strength, generator=g)
    order = torch.argsort(torch.rand(n, 3, generator=g), dim=1)  # per-image permutation of (bright, contrast, sat)
    gray, eye, zero = torch.tensor(GRAY), torch.eye(3), torch.zeros(())
    x = x.reshape(n, 3, h * w)
    for stage in range(3):
        op = order[:, stage]
        fac = f.gather(1, op[:, None])[:, 0]
        b = torch.where(op == 2, 1 - fac, zero)
        c = torch.where(op == 1, 1 - fac, zero)
        matrix = fac.view(n, 1, 1) * eye + b.view(n, 1, 1) * gray.view(1, 1, 3)
        offset = (c * (x.mean(dim=2) @ gray)).view(n, 1, 1)
        x = torch.baddbmm(offset, matrix, x).clamp_(0, 255)
    return x.view(n, 3, h, w)


def _to_int8(x: torch.Tensor) -> torch.Tensor:
    """float pixels -> the model encoding round(pixel) - 128 as int8."""
    return x.round_().clamp_(0, 255).sub_(128).to(torch.int8)


def _rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


Resolution = int | tuple[int, ...] | list[int]  # R (3 x R x R), or a model's input shape (C, H, W) with C in {1, 3}


def geometry(resolution: Resolution) -> tuple[int, int, int]:
    """(channels, height, width) of a resolution: R is RGB R x R; a model input shape (C, H, W) is itself (an
    imported model may be grayscale and non-square)."""
    if isinstance(resolution, int):
        return 3, resolution, resolution
    c, h, w = (int(v) for v in resolution)
    if c not in (1, 3) or h < 1 or w < 1:
        raise MicrotrainError(f"model input {c}x{h}x{w}: only 1 (gray) or 3 (RGB) channels are supported")
    return c, h, w


def model_resolution(graph) -> Resolution:
    """The resolution the data pipeline makes for `graph`'s input: R for an RGB R x R model (the zoo), else its input
    shape (C, H, W) as a list."""
    c, h, w = graph.tensors[graph.inputs[0]].shape
    return h if (c, h) == (3, w) else [c, h, w]


def _channels(x: torch.Tensor, c: int) -> torch.Tensor:
    """Float pixels [N, C, H, W] in 0..255 as c channels: RGB (gray expanded), or gray (torchvision's weights,
    summed red + green + blue in that order: one rounding per operation, the same on every machine)."""
    if c == 3:
        return _rgb(x)
    if x.shape[1] == 1:
        return x
    return (x[:, 0:1] * GRAY[0] + x[:, 1:2] * GRAY[1]) + x[:, 2:3] * GRAY[2]


RESAMPLE_BITS = 14  # fixed-point weights of the evaluation resize (the sums stay exact integers in float64)


@functools.lru_cache(maxsize=256)
def _resample_matrix(n_in: int, n_out: int, start: int, stop: int) -> torch.Tensor:
    """Antialiased bilinear resampling from n_in to n_out samples (a triangle filter widened by the downscale
    factor, as PIL and torch's antialias=True), output samples start..stop-1, as a [stop - start, n_in] float64
    matrix of integers: each row's weights rounded to sum to 2**RESAMPLE_BITS."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    m = torch.zeros(stop - start, n_in, dtype=torch.float64)
    for row, i in enumerate(range(start, stop)):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        w = [max(0.0, 1.0 - abs((j - centre + 0.5) / support)) for j in range(lo, hi)]
        total = math.fsum(w)
        q = [round(v / total * (1 << RESAMPLE_BITS)) for v in w]
        q[q.index(max(q))] += (1 << RESAMPLE_BITS) - sum(q)
        m[row, lo:hi] = torch.tensor(q, dtype=torch.float64)
    return m


def _resample_axis(x: torch.Tensor, dim: int, n_out: int, start: int, stop: int) -> torch.Tensor:
    """Resample float64 `x` (integers) along `dim` (2 or 3; output samples start..stop-1 of n_out) by a matrix
    product: integer pixels times integer weights, every partial sum an integer below 2**53, so the product is exact
    whatever order the BLAS on this machine sums in."""
    m = _resample_matrix(x.shape[dim], n_out, start, stop)
    return x @ m.T if dim == 3 else m @ x


def _resize_crop(x: torch.Tensor, size: tuple[int, int], top: int, left: int, rh: int, rw: int) -> torch.Tensor:
    """uint8 [N, C, h, w] resized to `size` (antialiased bilinear, fixed-point weights) and the rh x rw window at
    (top, left) taken: float64 pixels, exactly k / 2**(2 * RESAMPLE_BITS) for integers k, so the same bits on every
    machine (float32 interpolation kernels differ by CPU in the last bit, and a pixel at .5 then rounds either way)."""
    y = _resample_axis(x.to(torch.float64), 3, size[1], left, left + rw)
    y = _resample_axis(y, 2, size[0], top, top + rh)
    return y.mul_(2.0 ** (-2 * RESAMPLE_BITS))


def _resize_to(x: torch.Tensor, resolution: Resolution, crop: float) -> torch.Tensor:
    """resize_batch for a model input shape (C, H, W): the shorter side of the box ceil((H, W) / crop) covered,
    the central H x W taken; int8 [N, C, H, W]."""
    c, rh, rw = geometry(resolution)
    h, w = x.shape[2:]
    if crop >= 1.0:
        size = (rh, rw)
    else:
        sh, sw = math.ceil(rh / crop), math.ceil(rw / crop)
        f = max(sh / h, sw / w)
        size = (max(sh, round(h * f)), max(sw, round(w * f)))
    top, left = (size[0] - rh) // 2, (size[1] - rw) // 2
    if (h, w) == size:
        y = x[:, :, top: top + rh, left: left + rw].to(torch.float64)
    else:
        y = _resize_crop(x, size, top, left, rh, rw)
    return _to_int8(_channels(y, c).contiguous())


def augment_batch(images: torch.Tensor | np.ndarray, mode: str, resolution: int, g: torch.Generator
                  ) -> torch.Tensor:
    """Training transform of a uint8 batch [N, C, h, w] -> int8 [N, 3, R, R].
    paper: random resized crop (scale 0.08-1, aspect 3/4-4/3) + horizontal flip + colour jitter 0.4 (timm's
    transform used by tiny-training); flip: resize to R x R + flip (the paper's VWW transform); none: resize only."""
    if mode not in AUGMENTS:
        raise MicrotrainError(f"augment must be one of {', '.join(AUGMENTS)}, got {mode!r}")
    x = torch.as_tensor(images)
    n, _, h, w = x.shape
    if not isinstance(resolution, int):  # a model input shape (C, H, W): resize (and flip) only
        if mode == "paper":
            raise MicrotrainError("--augment paper needs a square RGB model; use flip or none")
        y = resize_batch(x, resolution, crop=1.0)
        if mode == "none":
            return y
        flip = torch.rand(n, generator=g) < 0.5
        return torch.where(flip.view(n, 1, 1, 1), y.flip(-1), y)
    if mode == "none":
        return resize_batch(x, resolution, crop=1.0)
    flip = torch.rand(n, generator=g) < 0.5
    if mode == "flip":
        y = resize_batch(x, resolution, crop=1.0)
        return torch.where(flip.view(n, 1, 1, 1), y.flip(-1), y)
    boxes = random_resized_crop_boxes(n, h, w, g)
    y = _rgb(crop_resize(x.float(), boxes, resolution, flip))
    return _to_int8(color_jitter(y, g))


def resize_batch(images: torch.Tensor | np.ndarray, resolution: int, crop: float = 0.875) -> torch.Tensor:
    """Evaluation transform: resize the shorter side to ceil(R / crop) (antialiased bilinear) and take the central
    R x R, as torchvision Resize + CenterCrop; crop=1 resizes straight to R x R (the paper's VWW eval). Fixed-point
    weights and exact sums (`_resize_crop`): the same int8 image on every machine.
    uint8 [N, C, h, w] -> int8 [N, 3, R, R]."""
    x = torch.as_tensor(images)
    if not isinstance(resolution, int):
        return _resize_to(x, resolution, crop)
    h, w = x.shape[2:]
    if crop >= 1.0:
        size = (resolution, resolution)
    else:
        s = math.ceil(resolution / crop)
        size = (s, max(s, round(w * s / h))) if h <= w else (max(s, round(h * s / w)), s)
    if (h, w) == size and size == (resolution, resolution):
        return _rgb(x).to(torch.int16).sub(128).to(torch.int8)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return _to_int8(_rgb(_resize_crop(x, size, top, left, resolution, resolution)).contiguous())


def batches(dataset: ImageDataset, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
            augment: str | None = None, resolution: int = 128, eval_crop: float = 0.875, drop_last: bool = False
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (x int8 [N, 3, R, R], y int64 [N]). The order and every random augmentation draw come from one
    generator seeded by (seed, epoch), so an epoch is reproducible on its own (resuming needs no RNG replay).
    augment: "paper" | "flip" | "none" for training; None = the evaluation transform (`resize_batch(eval_crop)`)."""
    if batch_size < 1:
        raise MicrotrainError(f"batch size must be >= 1, got {batch_size}")
    g = _generator(seed, epoch)
    n = len(dataset)
    order = torch.randperm(n, generator=g).numpy() if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for s in range(0, stop, batch_size):
        idx = order[s: s + batch_size]
        imgs = torch.from_numpy(dataset.images[idx])
        x = resize_batch(imgs, resolution, eval_crop) if augment is None else augment_batch(imgs, augment,
                                                                                           resolution, g)
        yield x, torch.from_numpy(dataset.labels[idx])


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)
