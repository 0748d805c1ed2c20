"""The shipped zoo reproduces the original .pkl files bit for bit, and the graph round-trips through JSON+npz."""

from __future__ import annotations

import numpy as np
import pytest

from microtrain.frontends.pkl import read_pkl
from microtrain.frontends.zoo import class_names, load_model
from microtrain.ir.graph import Graph

from conftest import MODELS, need_shared


def _pkl_convs(d):
    yield "stem", d["first_conv"]
    for i, b in enumerate(d["blocks"], start=1):
        for key, short in (("pointwise1", "pw1"), ("depthwise", "dw"), ("pointwise2", "pw2")):
            if b.get(key):
                yield f"b{i}.{short}", b[key]
    yield "head", d["classifier"]


@pytest.mark.parametrize("model", MODELS)
def test_zoo_matches_pkl_bit_for_bit(model):
    d = read_pkl(need_shared() / f"{model}.pkl")
    g = load_model(model)
    n_arrays = 0
    for name, conv in _pkl_convs(d):
        p = conv["params"]
        w, b = g.tensors[f"{name}.w"], g.tensors[f"{name}.b"]
        for ours, theirs in ((w.data, p["weight"]), (b.data, p["bias"]), (w.scale, p["w_scales"])):
            assert ours.dtype == theirs.dtype
            assert ours.tobytes() == theirs.tobytes()
            n_arrays += 1
        assert g.tensors[g.op(name).inputs[0]].scale == p["x_scale"]
        assert g.tensors[g.op(name).outputs[0]].scale == p["y_scale"]
        assert g.tensors[g.op(name).outputs[0]].zero == p["y_zero"]
    assert n_arrays == 3 * (len(g.convs()) + 1)


@pytest.mark.parametrize("model", MODELS)
def test_conv_count_matches_paper(model):
    expected = {"mbv2-w0.35": 51, "proxyless-w0.3": 60, "mcunet-5fps": 42}[model]
    assert [o.attrs["conv_index"] for o in load_model(model).convs()] == list(range(expected))


def test_graph_roundtrip_and_print(tmp_path):
    g = load_model("mcunet-5fps")
    g.save(tmp_path / "m")
    h = Graph.load(tmp_path / "m")
    assert str(g) == str(h)
    assert all(np.array_equal(g.arrays()[k], v) for k, v in h.arrays().items())
    text = str(g)
    assert len(text.splitlines()) == len(g.ops) + 2
    assert "%b14.pw2.y = conv2d(%b14.dw.y, %b14.pw2.w, %b14.pw2.b)" in text


def test_class_names():
    names = class_names()
    assert len(names) == 1000
    assert names[281].startswith("tabby") and names[967] == "espresso"
