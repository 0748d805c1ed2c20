"""The analytic memory model against every figure PAPER.md §3 prints (to 0.1 KB, as the paper rounds)."""

from __future__ import annotations

import pytest

from microtrain.frontends.zoo import load_model
from microtrain.sparse.cost import analytic_breakdown, analytic_extra_bytes, kb
from microtrain.sparse.scheme import Scheme, resolve_scheme

# (model, scheme, KB printed in PAPER.md)
PAPER_KB = [
    ("mcunet-5fps", "paper-49kb", "49.8"), ("mcunet-5fps", "paper-74kb", "74.8"),
    ("mcunet-5fps", "paper-99kb", "99.8"), ("mcunet-5fps", "paper-124kb", "125.0"),
    ("mcunet-5fps", "paper-148kb", "148.4"),
    ("mbv2-w0.35", "paper-49kb", "49.8"), ("mbv2-w0.35", "paper-73kb", "73.9"),
    ("mbv2-w0.35", "paper-99kb", "99.4"), ("mbv2-w0.35", "paper-123kb", "123.6"),
    ("mbv2-w0.35", "paper-138kb", "138.2"),
    ("proxyless-w0.3", "paper-49kb", "49.7"), ("proxyless-w0.3", "paper-74kb", "74.9"),
    ("proxyless-w0.3", "paper-98kb", "98.5"), ("proxyless-w0.3", "paper-120kb", "120.2"),
    ("proxyless-w0.3", "paper-148kb", "148.2"),
    ("mcunet-5fps", "full", "1400.4"), ("mbv2-w0.35", "full", "1306.4"), ("proxyless-w0.3", "full", "1210.7"),
    ("mcunet-5fps", "last:12", "448.0"),
]


@pytest.fixture(scope="module")
def graphs():
    return {m: load_model(m) for m in ("mcunet-5fps", "mbv2-w0.35", "proxyless-w0.3")}


@pytest.mark.parametrize("model,spec,paper", PAPER_KB, ids=[f"{m}:{s}" for m, s, _ in PAPER_KB])
def test_paper_figures(graphs, model, spec, paper):
    g = graphs[model]
    b = analytic_extra_bytes(g, resolve_scheme(spec, g))
    assert kb(b) == paper
    assert abs(b * 10 - round(float(paper) * 10) * 1024) <= 512  # within half a 0.1 KB step, in exact integers


def test_exact_bytes_hand_computed(graphs):
    """mcunet paper-49kb by hand: masks+biases of convs 22..41, inputs+weights of 24 (r=.25), 27, 30 (r=.5), fc."""
    g = graphs["mcunet-5fps"]
    shapes = {i: (g.tensors[c.outputs[0]].numel, g.tensors[c.outputs[0]].shape[0]) for i, c in enumerate(g.convs())}
    masks_bias = sum(n // 8 + 4 * c for i, (n, c) in shapes.items() if i >= 22)
    w24 = 8 * 8 * 12 + 144 * 12  # conv 24: 48 -> 144 1x1 at 8x8, 12 channels
    w27 = 8 * 8 * 24 + 192 * 24  # conv 27: 48 -> 192
    w30 = 8 * 8 * 24 + 240 * 24  # conv 30: 48 -> 240
    assert analytic_extra_bytes(g, resolve_scheme("paper-49kb", g)) == masks_bias + w24 + w27 + w30 + 160


def test_breakdown_terms(graphs):
    g = graphs["mbv2-w0.35"]
    bd = analytic_breakdown(g, resolve_scheme("paper-49kb", g))
    assert bd["total"] == sum(r["total"] for r in bd["convs"].values()) + bd["fc_input"] == 51002
    assert bd["fc_input"] == 112
    assert min(bd["convs"]) == 35 and max(bd["convs"]) == 50
    dw = bd["convs"][49]  # depthwise 336 ch, 3x3, 4x4 input, r = 1/8 -> 42 channels: weight is ch*k*k, not C_out*..
    assert (dw["input"], dw["weight"], dw["bias"]) == (4 * 4 * 42, 42 * 9, 4 * 336)
    assert bd["convs"][40]["input"] == bd["convs"][40]["weight"] == 0 and bd["convs"][40]["mask"] > 0


def test_mask_needed_below_bias_range(graphs):
    """A weight-updated conv below the bias range still needs the clamp masks of itself and all later convs."""
    g = graphs["mcunet-5fps"]
    s = Scheme("w40", 0, {40: 1.0}, head=False)
    bd = analytic_breakdown(g, s)
    assert sorted(bd["convs"]) == [40, 41] and bd["fc_input"] == 0
    assert bd["convs"][41] == {"mask": 160 * 16 // 8, "bias": 0, "input": 0, "weight": 0, "total": 320}
    assert bd["convs"][40]["total"] == 576 * 16 // 8 + 576 * 16 + 576 * 9


def test_trivial_and_monotone(graphs):
    g = graphs["proxyless-w0.3"]
    assert analytic_extra_bytes(g, Scheme("none", 0, {}, head=False)) == 0
    assert analytic_extra_bytes(g, resolve_scheme("head-only", g)) == 96
    costs = [analytic_extra_bytes(g, resolve_scheme(f"bias:{k}", g)) for k in range(0, 61, 10)]
    assert costs == sorted(costs) and len(set(costs)) == len(costs)
    assert analytic_extra_bytes(g, resolve_scheme("last:60", g)) == analytic_extra_bytes(g, resolve_scheme("full", g))
