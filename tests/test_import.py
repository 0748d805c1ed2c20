"""`microtrain import`: float ONNX / torch.export models quantized into microtrain int8 models.

The fixtures (tests/fixtures/*.onnx and *.pt2, made by tests/fixtures/make_float_models.py): float_cnn, a CIFAR-10
CNN with BatchNorm, a depthwise conv, a residual add, ReLU / ReLU6 / clamp and a linear head; gray_cnn, a gray
Fashion-MNIST CNN with max pooling, a windowed average pool, a fully-connected layer on the flattened map and a head.
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from microtrain.cli import main

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ONNX, PT2 = FIXTURES / "float_cnn.onnx", FIXTURES / "float_cnn.pt2"
DATA = {"float_cnn": ("cifar10", 32), "gray_cnn": ("fashion-mnist", [1, 28, 28])}
# the imports the session runs: model file -> (--calib data, --held-out images); 500 where another import or the
# benchmark in docs/import.md already covers 1000, to keep the suite short
IMPORTS = {"float_cnn.onnx": ("cifar10", 1000), "float_cnn.pt2": ("cifar10", 500),
           "gray_cnn.pt2": ("fashion-mnist", 500)}


def images(data: str, split: str, n: int, seed: int = 0, resolution=32) -> tuple[torch.Tensor, torch.Tensor]:
    from microtrain.data.datasets import batches, open_dataset

    try:
        ds = open_dataset(data, split, subset=n, seed=seed, progress=False)
    except Exception as e:  # the shared datasets are beside the checkout, not in it
        pytest.skip(f"{data} is not available: {e}")
    xs, ys = zip(*batches(ds, 256, resolution=resolution, eval_crop=1.0), strict=True)
    return torch.cat(xs), torch.cat(ys)


def cifar(split: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return images("cifar10", split, n, seed)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="session")
def imported(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """The fixtures of IMPORTS imported with the CLI (calibrated on 256 training images, agreement on held-out test
    images): {file name: (MODEL.json, the --json report)}."""
    import contextlib

    out = {}
    d = tmp_path_factory.mktemp("imported")
    for name, (data, held_out) in IMPORTS.items():
        images(data, "test", 1)  # skips when the dataset is absent
        dst = d / f"{name.replace('.', '_')}.json"
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(["import", str(FIXTURES / name), "--calib", data, "-o", str(dst), "--calib-count", "256",
                       "--held-out", str(held_out), "--json"])
        assert rc == 0
        out[name] = (dst, json.loads(buf.getvalue()))
    return out


KINDS = {"float_cnn": ["conv", "conv", "conv", "conv", "add", "conv", "gap", "linear"],
         "gray_cnn": ["conv", "maxpool", "conv", "avgpool", "fc", "linear"]}


@pytest.mark.parametrize("name", ["float_cnn.onnx", "float_cnn.pt2", "gray_cnn.onnx", "gray_cnn.pt2"])
def test_parsed_float_graph_computes_the_original_model(name):
    """The float graph read from the file (BatchNorm folded, clamps fused, flatten read by the FC layer) computes
    what the original computes: ONNX Runtime on the .onnx, the ExportedProgram itself on the .pt2, on real images
    normalized as the file states."""
    from microtrain.frontends.float_graph import run_float
    from microtrain.frontends.ptq import input_quant, normalize

    path = FIXTURES / name
    model = path.stem
    if path.suffix == ".onnx":
        ort = pytest.importorskip("onnxruntime")
        from microtrain.frontends.onnx_import import load_onnx

        fg = load_onnx(path)
    else:
        from microtrain.frontends.torch_import import load_pt2

        fg = load_pt2(path)
    x, _ = images(*DATA[model][:1], "test", 16, seed=2, resolution=DATA[model][1])
    u = normalize(x, input_quant(fg.mean, fg.std, fg.input_shape[0]))
    if path.suffix == ".onnx":
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ref = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: u[i:i + 1].numpy()})[0]
                              for i in range(len(u))])
    else:
        mod = torch.export.load(str(path)).module()  # our own fixture: trusted
        with torch.no_grad():
            ref = torch.cat([mod(u[i:i + 1]) for i in range(len(u))]).numpy()
    assert [n.kind for n in fg.nodes] == KINDS[model]
    if model == "float_cnn":
        assert fg.nodes[0].clamp == (0.0, np.inf) and fg.nodes[1].clamp == (0.0, 6.0)  # ReLU, ReLU6 fused
        assert fg.nodes[2].attrs["groups"] == fg.nodes[2].w.shape[0] > 1  # depthwise
    else:
        assert fg.nodes[4].clamp == (0.0, np.inf) and fg.shapes[fg.nodes[4].inputs[0]] == (16, 7, 7)
    with torch.no_grad():
        ours = run_float(fg, u).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_onnx_batchnorm_is_folded(tmp_path):
    """An ONNX BatchNormalization (the fixture's exporter folds them itself): each conv of float_cnn.onnx split into a
    conv with rescaled weights and a BatchNormalization with non-trivial statistics computes the same network; the
    importer folds it back (ONNX Runtime on the variant = our float graph of it = our float graph of the original)."""
    import onnx
    from onnx import helper, numpy_helper

    from microtrain.frontends.float_graph import run_float
    from microtrain.frontends.onnx_import import load_onnx

    ort = pytest.importorskip("onnxruntime")
    m = onnx.load(str(ONNX))
    inits = {t.name: t for t in m.graph.initializer}
    rng = np.random.default_rng(0)
    nodes = []
    for node in m.graph.node:
        nodes.append(node)
        if node.op_type != "Conv":
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        o = w.shape[0]
        gamma, beta = rng.uniform(0.5, 2, o), rng.normal(size=o)
        mean, var = rng.normal(size=o), rng.uniform(0.5, 2, o)
        k = gamma / np.sqrt(var + 1e-5)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array((w / k[:, None, None, None]).astype(np.float32),
                                                              node.input[1]))
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(((b - beta) / k + mean).astype(np.float32),
                                                              node.input[2]))
        y = node.output[0]
        node.output[0] = f"{y}_pre_bn"
        stats = [f"{node.name}_bn_{s}" for s in ("scale", "bias", "mean", "var")]
        for name, v in zip(stats, (gamma, beta, mean, var), strict=True):
            m.graph.initializer.append(numpy_helper.from_array(v.astype(np.float32), name))
        nodes.append(helper.make_node("BatchNormalization", [node.output[0], *stats], [y], epsilon=1e-5))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    variant = tmp_path / "bn.onnx"
    variant.write_bytes(m.SerializeToString())
    assert sum(n.op_type == "BatchNormalization" for n in m.graph.node) == 5
    u = torch.from_numpy(rng.normal(size=(8, 3, 32, 32)).astype(np.float32))
    sess = ort.InferenceSession(str(variant), providers=["CPUExecutionProvider"])
    ref = np.concatenate([sess.run(None, {"image": u[i:i + 1].numpy()})[0] for i in range(len(u))])
    with torch.no_grad():
        folded, orig = run_float(load_onnx(variant), u).numpy(), run_float(load_onnx(ONNX), u).numpy()
    np.testing.assert_allclose(folded, ref, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(folded, orig, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(IMPORTS))
def test_int8_top1_equals_float_on_held_out_images(imported, name):
    """Acceptance: the imported int8 model's top-1 equals the float model's on >= 95% of held-out test images (and
    the written model is an ordinary microtrain model: per-channel int8 weights, int32 biases, the input
    normalization recorded, the zoo models' requantization rule)."""
    from microtrain.frontends.zoo import load_model
    from microtrain.ir.quant import Requant

    path, rep = imported[name]
    held = rep["held_out"]
    assert held["images"] == IMPORTS[name][1]
    assert held["top1_equal"] >= 0.95, held
    assert rep["calibration"]["images"] == 256 and rep["calibration"]["top1_equal"] >= 0.95
    assert held["int8_top1"] > 3 * 0.1  # trained models, 10 classes: agreement means something (3x chance)
    g = load_model(path)
    assert g.requant == Requant.FLOAT32 and g.ops[-1].kind == "linear"
    for op in g.ops:
        if op.kind in ("conv2d", "linear"):
            w, b = g.tensors[op.inputs[1]], g.tensors[op.inputs[2]]
            assert w.data.dtype == np.int8 and w.scale.shape == (w.shape[0],) and b.data.dtype == np.int32
            assert (np.abs(w.data.reshape(w.shape[0], -1)).max(axis=1) == 127).all()  # symmetric, per channel
    relu = g.tensors[g.convs()[0].outputs[0]]
    assert relu.zero == -128  # the ReLU is the int8 clamp of its output quantization
    if name.startswith("float_cnn"):
        assert g.meta["input_norm"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
        assert [o.attrs["groups"] for o in g.convs()] == [1, 1, 32, 1, 1]
    else:
        assert g.meta["input_norm"] == {"mean": [0.286], "std": [0.353]}  # read from the file
        assert [o.kind for o in g.ops] == ["conv2d", "maxpool2d", "conv2d", "avgpool2d", "conv2d", "reshape",
                                           "linear"]
        fc = g.convs()[-1]
        assert fc.attrs.get("fc") and g.tensors[fc.inputs[1]].shape == (32, 16, 7, 7)


def test_onnx_and_pt2_import_to_the_same_predictions(imported):
    """The two files of one network (BatchNorm folded by the ONNX exporter in one, by us in the other) give int8
    models that agree on nearly every image."""
    from microtrain.frontends.zoo import load_model
    from microtrain.runtime.executor import Executor

    x, _ = cifar("test", 200, seed=3)
    preds = []
    for name in ("float_cnn.onnx", "float_cnn.pt2"):
        g = load_model(imported[name][0])
        preds.append(Executor(g).run(x)[g.outputs[0]].argmax(1))
    assert (preds[0] == preds[1]).float().mean() >= 0.97


SLOW = bool(os.environ.get("MICROTRAIN_SLOW"))


@pytest.mark.parametrize("name,scheme,lr,qemu", [("float_cnn.pt2", "last:2", 0.05, True),
                                                 ("gray_cnn.pt2", "full", 0.02, SLOW)])
def test_imported_model_trains_plans_and_runs_in_qemu(imported, name, scheme, lr, qemu, tmp_path):
    """The imported model trains (torch engine, 18 steps: the loss of the new head on its 96 training images falls
    from ln 10), plans, compiles for the Cortex-M4, links into 256 KB / 1 MB, and QEMU ends with exactly the host's
    state and losses. (gray_cnn's maxpool2d / avgpool2d / FC kernels are tested against QEMU in
    test_tflite_fixtures.py; its QEMU run here is MICROTRAIN_SLOW=1 only, to keep the suite short.)"""
    import torch.nn.functional as F

    from microtrain.autodiff.build import build_training_graph
    from microtrain.codegen.project import SRAM_BUDGET, measure_memory, run_host_and_device, toolchain
    from microtrain.compiler.memory import plan_training_graph
    from microtrain.frontends.zoo import load_model
    from microtrain.runtime.trainstep import GraphTrainStep
    from microtrain.sparse.scheme import resolve_scheme

    g = load_model(imported[name][0])
    data, res = DATA[name.split(".")[0]]
    x, y = images(data, "train", 96, seed=5, resolution=res)
    order = torch.randperm(96, generator=torch.Generator().manual_seed(0))  # the subset comes class by class
    x, y = x[order], y[order]
    tg = build_training_graph(g, resolve_scheme(scheme, g), 10)
    step = GraphTrainStep(tg)
    before = float(F.cross_entropy(step.logits(x), y))
    for _ in range(3):
        for i in range(0, 96, 16):
            step.step(x[i:i + 16], y[i:i + 16], lr)
    after = float(F.cross_entropy(step.logits(x), y))
    assert after < before - 0.1, (before, after)
    sched, best = plan_training_graph(tg)
    assert 0 < best.plan.arena_bytes < SRAM_BUDGET
    if not qemu:
        return
    if toolchain("cortex-m4") is not None:
        pytest.skip("arm-none-eabi-gcc / qemu-system-arm not installed")
    xs, ys = x[:6].numpy(), y[:6].numpy()
    res_host, res_m4 = run_host_and_device(sched, best.plan, tmp_path, xs, ys, np.full(6, 0.05, np.float32))
    assert (res_host["dir"] / "state.bin").read_bytes() == (res_m4["dir"] / "state.bin").read_bytes()
    assert np.float32(res_host["losses"]).tobytes() == np.float32(res_m4["losses"]).tobytes()
    mem = measure_memory(res_m4["dir"], res_m4, best.plan)
    assert mem["fits"] and mem["sram_total_bytes"] <= SRAM_BUDGET
    print(f"{name} {scheme}: SRAM {mem['sram_total_bytes'] / 1024:.1f} KB, flash {mem['flash_bytes'] / 1024:.1f} KB")


def test_input_normalization_folds_into_the_first_conv():
    """Per-channel mean / std become a per-tensor input quantization plus a per-channel affine folded into the first
    conv: exact wherever the conv reads no padding, and off only on the zero-padded border (where the model saw 0);
    a single mean / std folds to the whole-pixel rounding of the mean only."""
    from microtrain.frontends.float_graph import FloatBuilder, run_float
    from microtrain.frontends.ptq import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        dequantize_input,
        fold_input,
        input_quant,
        normalize,
    )

    rng = np.random.default_rng(0)
    b = FloatBuilder("m", "m", "test", {"x": 1, "c": 1, "p": 1, "y": 1})
    b.set_input("x", (3, 9, 9))
    b.conv("c", "x", "c", rng.normal(size=(4, 3, 3, 3)), rng.normal(size=4), (1, 1), (1, 1, 1, 1), 1)
    b.gap("p", "c", "p")
    b.linear("y", "p", "y", rng.normal(size=(2, 4)), None)
    fg = b.finish("y", None, None)
    x = torch.from_numpy(rng.integers(-128, 128, size=(5, 3, 9, 9)).astype(np.int8))
    iq = input_quant(IMAGENET_MEAN, IMAGENET_STD, 3)
    assert not iq.exact and len(set(iq.gain)) == 3
    folded = fold_input(fg, iq)
    conv_maps = {}
    for name, graph, inp in (("orig", fg, normalize(x, iq)), ("folded", folded, dequantize_input(x, iq))):
        run_float(graph, inp, lambda t, v, name=name: conv_maps.setdefault(name, v) if t == "c" else None)
    a, f = conv_maps["orig"], conv_maps["folded"]
    torch.testing.assert_close(a[:, :, 1:-1, 1:-1], f[:, :, 1:-1, 1:-1], atol=1e-4, rtol=1e-5)  # interior: exact
    assert (a[:, :, 0] - f[:, :, 0]).abs().max() > 1e-3  # the border: the padded taps differ
    one = input_quant((0.5,), (0.25,), 3)
    assert one.gain == (1.0, 1.0, 1.0) and abs(one.offset[0]) <= 0.5 / 255 / 0.25 + 1e-12
    assert one.scale == pytest.approx(1 / (255 * 0.25)) and one.zero == 0


# ---- refusals: one line, exit 2, nothing written ---------------------------------------------------------------
def _onnx_variant(tmp_path: Path, edit) -> Path:
    import onnx

    m = onnx.load(str(ONNX))
    edit(m)
    p = tmp_path / "variant.onnx"
    p.write_bytes(m.SerializeToString())
    return p


def _sigmoid(m) -> None:
    next(n for n in m.graph.node if n.op_type == "Relu").op_type = "Sigmoid"


def _external(m) -> None:
    from onnx import TensorProto

    t = max(m.graph.initializer, key=lambda t: len(t.raw_data))
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    e = t.external_data.add()
    e.key, e.value = "location", "weights.bin"


def _dynamic(m) -> None:
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"


def _rewrite_pt2(tmp_path: Path, replace: dict[str, bytes], name: str = "variant.pt2") -> Path:
    """The fixture .pt2 with some archive entries (relative to its root) replaced or added."""
    src = zipfile.ZipFile(PT2)
    root = src.namelist()[0].split("/")[0]
    p = tmp_path / name
    with zipfile.ZipFile(p, "w") as z:
        for info in src.infolist():
            rel = info.filename.split("/", 1)[1]
            z.writestr(info.filename, replace.pop(rel, None) or src.read(info.filename))
        for rel, data in replace.items():
            z.writestr(f"{root}/{rel}", data)
    return p


class _Marker:
    """Unpickling this object creates a file: the evidence that a pickle ran code."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _pickled_weight(tmp_path: Path) -> Path:
    cfg_name = "data/weights/model_weights_config.json"
    src = zipfile.ZipFile(PT2)
    root = src.namelist()[0].split("/")[0]
    cfg = json.loads(src.read(f"{root}/{cfg_name}"))
    fqn = next(iter(cfg["config"]))
    cfg["config"][fqn]["use_pickle"] = True
    path_name = cfg["config"][fqn]["path_name"]
    payload = pickle.dumps(_Marker(tmp_path / "PWNED"))
    return _rewrite_pt2(tmp_path, {cfg_name: json.dumps(cfg).encode(), f"data/weights/{path_name}": payload})


def _pickled_inputs(tmp_path: Path) -> Path:
    buf = io.BytesIO()
    torch.save((_Marker(tmp_path / "PWNED"),), buf)
    return _rewrite_pt2(tmp_path, {"data/sample_inputs/model.pt": buf.getvalue()})


def _shared_library(tmp_path: Path) -> Path:
    return _rewrite_pt2(tmp_path, {"data/aotinductor/model/model.so": b"\x7fELF"})


def _pt2_sigmoid(tmp_path: Path) -> Path:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Sigmoid(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    p = tmp_path / "sigmoid.pt2"
    torch.export.save(torch.export.export(net, (torch.zeros(1, 3, 8, 8),)), str(p))
    return p


def _truncated(suffix: str):
    def make(tmp_path: Path) -> Path:
        src = ONNX if suffix == ".onnx" else PT2
        p = tmp_path / f"truncated{suffix}"
        p.write_bytes(src.read_bytes()[: src.stat().st_size // 3])
        return p
    return make


@pytest.mark.parametrize("make,reason", [
    (lambda t: _onnx_variant(t, _sigmoid), "unsupported op Sigmoid"),
    (lambda t: _onnx_variant(t, _external), "external data"),
    (lambda t: _onnx_variant(t, _dynamic), "dynamic height"),
    (_truncated(".onnx"), "ONNX model"),
    (_truncated(".pt2"), "torch.export"),
    (_pickled_weight, "pickled object"),
    (_pickled_inputs, "restricted unpickler"),
    (_shared_library, "compiled code"),
    (_pt2_sigmoid, "unsupported op sigmoid"),
], ids=["onnx-sigmoid", "onnx-external-data", "onnx-dynamic-hw", "onnx-corrupt", "pt2-corrupt", "pt2-pickled-weight",
        "pt2-pickled-sample-inputs", "pt2-shared-library", "pt2-sigmoid"])
def test_refusals_are_one_line_exit_2_nothing_written(make, reason, tmp_path, capsys):
    src = make(tmp_path)
    out = tmp_path / "out" / "m.json"
    out.parent.mkdir()
    rc, stdout, err = run_cli(["import", str(src), "--calib", "cifar10", "-o", str(out), "--json"], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("microtrain: error:") and reason in lines[0], err
    assert not list(out.parent.iterdir())  # nothing written
    assert not (tmp_path / "PWNED").exists()  # and no pickled code ran


@pytest.mark.parametrize("args,reason", [
    (["--mean", "0.5,0.5"], "--mean has 2 values for a 3-channel input"),
    (["--std", "0,1,1"], "std must be positive"),
    (["--mean", "a,b,c"], "not a comma-separated list of numbers"),
])
def test_bad_normalization_flags_are_one_line(args, reason, tmp_path, capsys):
    out = tmp_path / "m.json"
    rc, _, err = run_cli(["import", str(ONNX), "--calib", "cifar10", "-o", str(out), *args], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and reason in err, err
    assert not list(tmp_path.iterdir())


def test_frontends_import_no_runtime_codegen_or_commands():
    """Layering: the importers produce IR; only commands/import_model.py wires them to the executor and the data."""
    src = Path(__file__).resolve().parents[1] / "src" / "microtrain" / "frontends"
    for name in ("float_graph.py", "onnx_import.py", "torch_import.py", "ptq.py"):
        tree = ast.parse((src / name).read_text())
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        bad = [m for m in mods if m.startswith(("microtrain.runtime", "microtrain.codegen", "microtrain.commands"))]
        assert not bad, (name, bad)
