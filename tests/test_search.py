"""Scheme search: vectorised cost = the paper's analytic model, budgets respected, evolution beats random search,
deterministic, one-line errors naming the smallest feasible budget, scheme files accepted by resolve_scheme."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microtrain.cli import main
from microtrain.errors import MicrotrainError
from microtrain.frontends.zoo import ZOO_MODELS, load_model
from microtrain.sparse.contrib import FORMAT, Contributions, shipped_path
from microtrain.sparse.cost import analytic_extra_bytes
from microtrain.sparse.scheme import Scheme, resolve_scheme
from microtrain.sparse.search import Space, evolutionary_search, parse_bytes, planner_peak, random_search, search

KB = 1024


def synthetic(graph, seed: int = 0) -> dict:
    """A contribution table shaped like the paper's findings (later layers and first pointwise convs contribute
    more, diminishing returns in k and r) plus noise."""
    rng = np.random.default_rng(seed)
    n = len(graph.convs())
    bias = [{"k": k, "delta": 0.05 * (1 - np.exp(-k / 10)) + rng.normal(0, 0.002)} for k in (*range(3, n, 3), n)]
    weight = []
    for op in graph.convs()[n // 2:]:
        i = op.attrs["conv_index"]
        for r in (0.125, 0.25, 0.5, 1.0):
            d = (0.01 if ".pw1" in op.name else 0.003) * (i / n) * np.sqrt(r) + rng.normal(0, 0.001)
            weight.append({"conv": i, "ratio": r, "delta": d})
    return {"format": FORMAT, "model": graph.name, "num_convs": n, "bias": bias, "weight": weight}


@pytest.fixture(scope="module")
def spaces() -> dict[str, Space]:
    out = {}
    for m in ZOO_MODELS:
        g = load_model(m)
        out[m] = Space.build(g, Contributions.from_dict(synthetic(g)))
    return out


@pytest.fixture(scope="module")
def mcunet_peak():
    return planner_peak(load_model("mcunet-5fps"))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), model=st.sampled_from(ZOO_MODELS))
def test_vectorised_cost_is_the_analytic_model(spaces, seed, model):
    sp = spaces[model]
    nb, R = sp.random(np.random.default_rng(seed), 16)
    cost = sp.cost(nb, R)
    for b in range(len(nb)):
        assert cost[b] == analytic_extra_bytes(sp.graph, sp.scheme(nb[b], R[b]))


def test_paper_schemes_encode_and_cost(spaces):
    sp = spaces["mcunet-5fps"]
    s = resolve_scheme("paper-99kb", sp.graph)
    nb, row = sp.encode(s)
    assert sp.scheme(nb, row).weight_ratios == s.weight_ratios
    assert sp.cost(np.array([nb]), row[None])[0] == analytic_extra_bytes(sp.graph, s)


def test_parse_bytes():
    assert parse_bytes("256KB") == 256 * KB == parse_bytes("256 kib") == parse_bytes("262144") == parse_bytes("0.25MB")
    assert parse_bytes("none") is None and parse_bytes(None) is None
    for bad in ("lots", "-3KB", "KB"):
        with pytest.raises(MicrotrainError, match="not a memory size"):
            parse_bytes(bad)


@pytest.mark.parametrize("model", ZOO_MODELS)
def test_evolution_respects_budget_and_beats_random(spaces, model):
    sp = spaces[model]
    for extra in (50 * KB, 100 * KB, 150 * KB):
        ev = evolutionary_search(sp, extra, 1000, seed=0)
        assert ev.samples == 1000 and max(ev.costs) <= extra
        s = sp.scheme(ev.nb[ev.best()], ev.rows[ev.best()])
        assert analytic_extra_bytes(sp.graph, s) <= extra
        for factor in (1, 4):
            rd = random_search(sp, extra, factor * 1000, seed=0)
            assert max(rd.costs) <= extra
            assert max(ev.scores) > max(rd.scores), (model, extra, factor)


def test_shipped_contributions_search(mcunet_peak):
    """On the shipped table (where present): budgets respected, evolution >= random search at 4x samples."""
    for m in ZOO_MODELS:
        if not shipped_path(m).is_file():
            continue
        g = load_model(m)
        sp = Space.build(g, Contributions.load(shipped_path(m)))
        for extra in (50 * KB, 100 * KB, 150 * KB):
            r = search(sp, extra_budget=extra, samples=2000, seed=0)
            assert r.analytic_extra_bytes <= extra
            assert r.score >= max(r.random.scores)
            assert r.random.samples == 8000


def test_device_budget_is_met_with_the_planner(spaces, mcunet_peak):
    sp = spaces["mcunet-5fps"]
    r = search(sp, extra_budget=150 * KB, budget=170 * KB, samples=1000, peak=mcunet_peak, check=8,
               tolerance=16 * KB)
    assert r.planned_peak_bytes <= 170 * KB and r.analytic_extra_bytes <= 150 * KB
    assert len(r.rounds) >= 2  # the 150 KB optimum (~184 KB planned) does not fit: the analytic budget was tightened
    assert not r.rounds[0]["fits"] and r.rounds[0]["checked"][0]["planned_peak_bytes"] > 170 * KB
    assert any(x["fits"] for x in r.rounds) and r.effective_extra_budget < 150 * KB


def test_deterministic(spaces):
    sp = spaces["proxyless-w0.3"]
    a = search(sp, extra_budget=100 * KB, samples=500)
    b = search(sp, extra_budget=100 * KB, samples=500)
    assert a.scheme == b.scheme and a.evolution.scores == b.evolution.scores and a.random.scores == b.random.scores
    c = search(sp, extra_budget=100 * KB, samples=500, seed=1)
    assert c.evolution.scores != a.evolution.scores


def test_infeasible_budgets_name_the_minimum(spaces, mcunet_peak):
    sp = spaces["mcunet-5fps"]
    with pytest.raises(MicrotrainError, match=r"smallest feasible extra budget is 0\.2 KB"):
        search(sp, extra_budget=100, samples=10)
    head = mcunet_peak(resolve_scheme("head-only", sp.graph))
    with pytest.raises(MicrotrainError, match=rf"smallest feasible budget is {head / KB:.1f} KB"):
        search(sp, budget=64 * KB, samples=10, peak=mcunet_peak)
    r = search(sp, budget=head, samples=200, peak=mcunet_peak, check=4, tolerance=64 * KB)  # head only fits
    assert r.planned_peak_bytes <= head


def test_cli_writes_a_scheme_every_command_accepts(tmp_path, capsys):
    g = load_model("mcunet-5fps")
    contrib = tmp_path / "c.json"
    contrib.write_text(json.dumps(synthetic(g)))
    out, plot = tmp_path / "s.yaml", tmp_path / "curve.png"
    rc = main(["search", "--model", "mcunet-5fps", "--contrib", str(contrib), "--extra-budget", "100KB",
               "--budget", "256KB", "--samples", "500", "-o", str(out), "--plot", str(plot), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    s = resolve_scheme(str(out), g)
    assert s.name == "search-100kb" and s == Scheme.from_dict(res["scheme"])
    assert analytic_extra_bytes(g, s) == res["analytic_extra_bytes"] <= 100 * KB
    assert res["planned_peak_bytes"] <= 256 * KB and plot.stat().st_size > 0
    assert res["evolution"]["best_score"] >= res["random"]["best_score"] and res["random"]["samples"] == 2000
    assert set(res["paper_schemes"]) == {"49kb", "74kb", "99kb", "124kb", "148kb"}
    rc = main(["search", "--model", "mcunet-5fps", "--contrib", str(contrib), "--budget", "10KB"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("microtrain: error: budget 10.0 KB is infeasible") and "smallest feasible budget" in err
    assert "\n" not in err


def test_noise_estimate_and_shrinkage(spaces):
    g = load_model("mcunet-5fps")
    raw = Contributions.from_dict(synthetic(g))  # weight noise: N(0, 0.001)
    assert 0.0005 < raw.noise() < 0.002
    assert raw.shrunk(0) is raw
    s = raw.shrunk(0.002)
    for i, rs in raw.weight.items():
        for r, v in rs.items():
            assert s.weight[i][r] == pytest.approx(np.sign(v) * max(abs(v) - 0.002, 0))
    assert np.allclose(s.bias_delta, np.sign(raw.bias_delta) * np.maximum(np.abs(raw.bias_delta) - 0.002, 0))
    a = search(Space.build(g, raw), extra_budget=100 * KB, samples=1000).scheme
    b = search(Space.build(g, s), extra_budget=100 * KB, samples=1000).scheme
    assert len(b.weight_ratios) <= len(a.weight_ratios)  # fewer small lucky terms
