"""Sparse update schemes: presets, validation, channel counts, YAML/JSON round trips, one-line errors."""

from __future__ import annotations

import json

import pytest

from microtrain.errors import MicrotrainError
from microtrain.frontends.zoo import load_model
from microtrain.sparse.scheme import Scheme, preset_names, resolve_scheme


@pytest.fixture(scope="module")
def mcunet():
    return load_model("mcunet-5fps")


@pytest.fixture(scope="module")
def mbv2():
    return load_model("mbv2-w0.35")


def test_paper_preset(mcunet):
    s = resolve_scheme("paper-99kb", mcunet)
    assert s.name == "paper-99kb" and s.n_bias_update == 22 and s.head
    assert s.weight_ratios == {21: 1.0, 24: 1.0, 27: 1.0, 30: 1.0, 36: 0.125, 39: 0.25}
    assert s.bias_convs(mcunet) == list(range(20, 42))
    assert s.earliest_updated(mcunet) == 20
    assert s.updated_channels(mcunet, 36) == 12  # 96 input channels / 8
    assert s.updated_channels(mcunet, 39) == 24  # 96 / 4
    assert s.updated_channels(mcunet, 21) == 40
    assert s.updated_channels(mcunet, 22) == 0  # bias only


def test_ratio_zero_is_dropped(mcunet, mbv2):
    assert resolve_scheme("paper-49kb", mcunet).weight_ratios == {24: 0.25, 27: 0.5, 30: 0.5}
    assert 40 not in resolve_scheme("paper-49kb", mbv2).weight_ratios
    assert Scheme.from_dict({"n_bias_update": 1, "weight_ratios": {"40": 0, "41": 1}}).weight_ratios == {41: 1.0}


def test_every_preset_resolves_on_every_model():
    for m in ("mcunet-5fps", "mbv2-w0.35", "proxyless-w0.3"):
        g = load_model(m)
        names = preset_names(g)
        assert sum(n.startswith("paper-") for n in names) == 5
        for n in names:
            s = resolve_scheme(n, g)
            assert s.name == n
            assert all(s.updated_channels(g, i) > 0 for i in s.weight_ratios)
            assert all(i >= s.earliest_updated(g) for i in s.weight_ratios)


def test_generic_presets(mcunet):
    n = len(mcunet.convs())
    full = resolve_scheme("full", mcunet)
    assert full.n_bias_update == n and full.weight_ratios == {i: 1.0 for i in range(n)} and full.head
    assert full.earliest_updated(mcunet) == 0 and full.updated_channels(mcunet, 0) == 3
    assert full.updated_channels(mcunet, 1) == 16  # depthwise: channels
    bias = resolve_scheme("bias-only", mcunet)
    assert bias.bias_convs(mcunet) == list(range(n)) and not bias.weight_ratios
    head = resolve_scheme("head-only", mcunet)
    assert head.bias_convs(mcunet) == [] and head.earliest_updated(mcunet) is None and head.head
    last = resolve_scheme("last:12", mcunet)
    assert last.bias_convs(mcunet) == list(range(30, 42)) and sorted(last.weight_ratios) == list(range(30, 42))
    b5 = resolve_scheme("bias:5", mcunet)
    assert b5.bias_convs(mcunet) == [37, 38, 39, 40, 41] and not b5.weight_ratios
    assert resolve_scheme("bias:0", mcunet).earliest_updated(mcunet) is None


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_file_round_trip(tmp_path, mcunet, suffix):
    s = resolve_scheme("paper-124kb", mcunet)
    p = tmp_path / f"s{suffix}"
    s.save(p)
    assert Scheme.load(p) == s and hash(Scheme.load(p)) == hash(s)
    assert resolve_scheme(str(p), mcunet) == s
    if suffix == ".json":
        assert json.loads(p.read_text())["weight_ratios"]["33"] == 0.5


def test_hand_written_yaml(tmp_path, mcunet):
    p = tmp_path / "mine.yaml"
    p.write_text("n_bias_update: 3\nweight_ratios:\n  40: 0.5\n  41: 1\nhead: false\n")
    s = resolve_scheme(str(p), mcunet)
    assert s == Scheme("mine", 3, {40: 0.5, 41: 1.0}, head=False)
    assert s.updated_channels(mcunet, 40) == 288


BAD_FILES = {
    "syntax.yaml": ("n_bias_update: [1,\n", "malformed"),
    "syntax.json": ("{\"n_bias_update\": ", "malformed"),
    "list.yaml": ("- 1\n- 2\n", "mapping"),
    "ratio.yaml": ("n_bias_update: 1\nweight_ratios: {40: 0.3}\n", "not allowed"),
    "index.yaml": ("n_bias_update: 1\nweight_ratios: {42: 1}\n", "out of range"),
    "key.yaml": ("n_bias_update: 1\nweight_ratio: {40: 1}\n", "unknown keys"),
    "nbias.yaml": ("n_bias_update: 43\n", "only 42 convs"),
    "neg.yaml": ("n_bias_update: -1\n", ">= 0"),
    "head.yaml": ("n_bias_update: 1\nhead: maybe\n", "head"),
    "idx.json": ("{\"weight_ratios\": {\"x\": 1}}", "not an integer"),
    "str.json": ("{\"weight_ratios\": {\"40\": \"half\"}}", "not a number"),
    "zero_ch.yaml": ("weight_ratios: {0: 0.125}\n", "no input channel"),  # stem: int(3 / 8) = 0
}


@pytest.mark.parametrize("fname", sorted(BAD_FILES))
def test_bad_files_one_line_error(tmp_path, mcunet, fname):
    text, needle = BAD_FILES[fname]
    p = tmp_path / fname
    p.write_text(text)
    with pytest.raises(MicrotrainError, match=needle) as e:
        resolve_scheme(str(p), mcunet)
    assert "\n" not in str(e.value)


def test_unknown_names(mcunet, mbv2):
    with pytest.raises(MicrotrainError) as e:
        resolve_scheme("paper-98kb", mcunet)  # a proxyless label
    msg = str(e.value)
    assert "\n" not in msg and "paper-99kb" in msg and "paper-148kb" in msg and "full" in msg
    with pytest.raises(MicrotrainError, match="paper-73kb"):
        resolve_scheme("nonsense", mbv2)
    with pytest.raises(MicrotrainError, match="0..42"):
        resolve_scheme("last:43", mcunet)
    with pytest.raises(MicrotrainError, match="cannot read"):
        resolve_scheme("/nonexistent/scheme.yaml", mcunet)
    with pytest.raises(MicrotrainError, match="not allowed"):
        Scheme("x", 0, {3: 0.75})
