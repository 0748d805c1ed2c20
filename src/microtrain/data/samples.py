"""Small sets of real images for parity checks, benchmarks and `compile --run`: CIFAR-10 when it is on disk, else crops
of scikit-image's bundled photos (no download either way)."""

from __future__ import annotations

import numpy as np
import torch

from microtrain.data.datasets import Resolution, batches, open_dataset, resize_batch
from microtrain.errors import MicrotrainError

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")


def dataset_stream(ds, resolution: Resolution, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image of `ds` as the model's int8 input (the evaluation transform) with its label, in a seeded shuffled
    order."""
    xs, ys = zip(*((x.numpy(), y.numpy()) for x, y in batches(ds, 256, augment=None, resolution=resolution)),
                 strict=True)
    order = np.random.default_rng(seed).permutation(len(ds))
    return np.concatenate(xs)[order], np.concatenate(ys)[order]


def real_images(n: int, resolution: Resolution, seed: int = 0, num_classes: int = 10, source: str = "auto"
                ) -> tuple[np.ndarray, np.ndarray, str]:
    """n real images as the model's int8 input [n, 3, R, R] (or [n, C, H, W] for a resolution (C, H, W)) with
    labels, in a seeded shuffled order: CIFAR-10 (the
    evaluation transform) when it is on disk (source "auto" or "cifar10"), else random crops of scikit-image's
    bundled photos (label = photo; source "skimage")."""
    order = np.random.default_rng(seed).permutation(n)
    try:
        if source == "skimage":
            raise MicrotrainError("scikit-image photos requested")
        x, y = dataset_stream(open_dataset("cifar10", "train", subset=n, seed=seed, progress=False), resolution,
                              seed)
        return x, y % num_classes, "cifar10"
    except MicrotrainError:
        if source == "cifar10":
            raise
        import skimage.data

        rng = np.random.default_rng(seed)
        photos = [np.asarray(getattr(skimage.data, p)())[..., :3] for p in SKIMAGE_PHOTOS]
        xs, ys = [], []
        for i in range(n):
            k = i % len(photos)
            p = photos[k]
            s = int(rng.integers(min(p.shape[:2]) // 3, min(p.shape[:2]) + 1))
            r, c = (int(rng.integers(0, d - s + 1)) for d in p.shape[:2])
            crop = np.ascontiguousarray(p[r:r + s, c:c + s].transpose(2, 0, 1))[None]
            xs.append(resize_batch(torch.from_numpy(crop), resolution, crop=1.0).numpy())
            ys.append(k % num_classes)
        return np.concatenate(xs)[order], np.asarray(ys)[order], "skimage"
