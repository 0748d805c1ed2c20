from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

if os.environ.get("PYTEST_XDIST_WORKER"):  # one intra-op thread per worker: 2 workers x 2 threads thrash 2 cores
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

# Host C builds through ccache when it is installed (the Makefile installs it): the runtime's objects are the same
# in every generated project, so the suite compiles them once per flavour instead of once per test. The cache lives
# in the checkout (a fresh clone starts empty) and ignores the project directory (CCACHE_NOHASHDIR: -g objects).
if shutil.which("ccache") and "MICROTRAIN_HOST_CC" not in os.environ:
    os.environ["MICROTRAIN_HOST_CC"] = "ccache gcc"
    os.environ.setdefault("CCACHE_DIR", str(REPO / ".ccache"))
    os.environ["CCACHE_NOHASHDIR"] = "true"
SHARED = REPO.parent / "shared"
PKL_DIR = SHARED / "models" / "tiny-training"
MODELS = ("mbv2-w0.35", "proxyless-w0.3", "mcunet-5fps")


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory) -> dict[str, str]:
    """scikit-image's chelsea() and coffee() saved as PNG files."""
    import skimage.data

    d = tmp_path_factory.mktemp("samples")
    out = {}
    for name in ("chelsea", "coffee"):
        p = d / f"{name}.png"
        Image.fromarray(np.asarray(getattr(skimage.data, name)())).save(p)
        out[name] = str(p)
    return out


def load_images32():
    """80 real 32x32 images of the tiny model's classes: 60 to train on (labels), 20 held out."""
    from microtrain.data.samples import real_images

    from tiny import CLASSES

    x, y, _ = real_images(80, 32, seed=1, num_classes=CLASSES)
    return x[:60], y[:60], x[60:]


@pytest.fixture(scope="session")
def images32():
    return load_images32()


STREAM_IMAGES, STREAM_EPOCHS = 50, 2


@pytest.fixture(scope="session")
def stream128():
    """50 real 128x128 images, two shuffled passes (100 steps): enough for the loss to go down; and 8 held out."""
    from microtrain.data.samples import real_images

    x, y, _ = real_images(STREAM_IMAGES + 8, 128, seed=3)
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(STREAM_IMAGES) for _ in range(STREAM_EPOCHS)])
    return x[order], y[order], x[STREAM_IMAGES:]


def need_shared() -> Path:
    if not PKL_DIR.is_dir():
        pytest.skip("../shared/models/tiny-training is not beside the repository")
    return PKL_DIR
