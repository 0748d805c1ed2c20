"""`microtrain demo`: the main job on built-in defaults (grows into train -> plan -> compile as those land)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from PIL import Image

from microtrain.commands.models import model_summary
from microtrain.commands.predict import predict
from microtrain.frontends.zoo import ZOO_MODELS, load_model


def sample_images(folder: Path) -> list[str]:
    """scikit-image's sample photos, written as PNG files (real images that ship with a registry package)."""
    import skimage.data

    paths = []
    for name in ("chelsea", "coffee", "astronaut"):
        p = folder / f"{name}.png"
        Image.fromarray(getattr(skimage.data, name)()).save(p)
        paths.append(str(p))
    return paths


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main pipeline on built-in defaults",
                       description="Load every zoo model, report its size against a 256 KB SRAM / 1 MB flash "
                                   "budget, and classify scikit-image's sample photos with integer-exact inference.")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        images = sample_images(Path(tmp))
        for name in ZOO_MODELS:
            s = model_summary(name, load_model(name))
            print(f"== {name}: {s['params']:,} params, {s['macs'] / 1e6:.1f}M MACs, flash {s['flash_bytes'] / 1024:.0f}"
                  f"/1024 KB, inference activations {s['inference_peak_activation_bytes'] / 1024:.0f}/256 KB")
            results, _ = predict(name, images)
            for r in results:
                top = ", ".join(f"{n.split(',')[0]} {p:.0%}" for _, n, p in r["top5"][:3])
                print(f"   {Path(r['image']).stem:10s} -> {top}")
    return 0
