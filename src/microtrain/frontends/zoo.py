"""The model zoo: the paper's three int8 models, shipped as JSON graph + npz arrays (no pickle), and `load_model`.

Rebuild the shipped files from the original `.pkl`s with
`python -m microtrain.frontends.zoo ../shared/models/tiny-training`.
"""

from __future__ import annotations

import json
import sys
import zipfile
from importlib import resources
from pathlib import Path

from microtrain.frontends.pkl import ModelLoadError, load_pkl_model, pkl_to_graph, read_pkl
from microtrain.ir.graph import Graph, GraphFormatError

ZOO_MODELS = ("mbv2-w0.35", "proxyless-w0.3", "mcunet-5fps")


def zoo_dir() -> Path:
    return Path(str(resources.files("microtrain") / "zoo"))


def load_model(spec: str | Path) -> Graph:
    """Load a model by zoo name, a tiny-training `.pkl`, a microtrain `.json`/`.npz` pair (either path), or an int8
    TensorFlow Lite `.tflite` model (frontends/tflite.py)."""
    spec = str(spec)
    if spec in ZOO_MODELS:
        return Graph.load(zoo_dir() / spec)
    path = Path(spec)
    if not path.exists():
        raise ModelLoadError(f"{spec}: no such file, and not a zoo model (known: {', '.join(ZOO_MODELS)})")
    if path.suffix == ".tflite":
        from microtrain.frontends.tflite import load_tflite

        return load_tflite(path)
    if path.suffix in (".json", ".npz"):
        try:
            return Graph.load(path.with_suffix(""))
        except GraphFormatError as e:
            raise ModelLoadError(str(e)) from None
        except (OSError, ValueError, KeyError, json.JSONDecodeError, zipfile.BadZipFile, EOFError) as e:
            raise ModelLoadError(f"{path}: corrupt microtrain model ({type(e).__name__}: {e})") from None
    return load_pkl_model(path)


def class_names() -> list[str]:
    """ImageNet-1k class names, index-aligned with the zoo models' 1000 logits."""
    lines = (zoo_dir() / "imagenet_classes.txt").read_text().splitlines()
    return [ln.split("\t", 1)[1] for ln in lines if ln and not ln.startswith("#")]


def rebuild(src_dir: Path) -> None:
    for name in ZOO_MODELS:
        g = pkl_to_graph(read_pkl(src_dir / f"{name}.pkl"), name=name)
        g.save(zoo_dir() / name)
        print(f"wrote {zoo_dir() / name}.json/.npz")


if __name__ == "__main__":
    rebuild(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/models/tiny-training"))
