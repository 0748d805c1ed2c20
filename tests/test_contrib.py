"""Contribution analysis on a tiny model and the LFW subset: prefix tables are exact, trials are cached and resumed,
parallel processes give the same numbers, the CLI writes a file `search` accepts."""

from __future__ import annotations

import builtins
import json

import numpy as np
import pytest

from microtrain.cli import main
from microtrain.errors import MicrotrainError
from microtrain.frontends.zoo import ZOO_MODELS, load_model
from microtrain.sparse import contrib as C
from microtrain.sparse.scheme import resolve_scheme

from tiny import tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    stem = tmp_path_factory.mktemp("model") / "tiny"
    tiny_model(res=32, classes=2).save(stem)
    return f"{stem}.json"


def protocol(model: str, **kw) -> C.Protocol:
    kw = {"train_images": 48, "test_images": 24, "epochs": 1, "batch_size": 16, "probe_epochs": 1, **kw}
    return C.default_protocol(load_model(model), "lfw", **kw)


def test_default_protocol_and_trials():
    g = load_model("mcunet-5fps")
    p = C.default_protocol(g, "cifar10")
    assert p.base_k == 21 and p.weight_convs == tuple(range(21, 42))
    assert p.k_grid == (3, 6, 9, 12, 15, 18, 21, 27, 33, 39, 42)
    trials = C.plan_trials(p, g)
    assert len(trials) == 1 + 11 + 21 * 4 and len({t.key for t in trials}) == len(trials)
    for t in trials:
        t.scheme().validate(g)
    with pytest.raises(MicrotrainError, match="augment flip or none"):
        C.default_protocol(g, "cifar10", augment="paper")
    with pytest.raises(MicrotrainError, match="base bias count"):
        C.default_protocol(g, "cifar10", base_k=20, k_grid=(3, 6))


def test_tables_are_exact(tiny, tmp_path):
    """A trial started from a prefix table trains and evaluates bit-identically to one computing its own prefix."""
    p = protocol(tiny)
    a = C.prepare(tiny, p, tmp_path, progress=False)
    g = load_model(tiny)
    train, test = C._datasets(a.workdir, p)
    tables = C._tables(a.workdir)
    assert {t.name for t in tables} >= {"head", f"bias-{p.base_k}"}
    for trial in (C.Trial("head"), C.Trial("bias", 3), C.Trial("weight", p.base_k, p.weight_convs[1], 0.5)):
        ref = C._fit_trial(g, trial.scheme(), p, train, test, [], tmp_path / "r0", 2, p.lr, None)
        got = C._fit_trial(g, trial.scheme(), p, train, test, tables, tmp_path / "r1", 2, p.lr, None)
        assert got["table"] is not None and got["table_misses"] == 0 and ref["table"] is None
        assert got["accuracy"] == ref["accuracy"] and got["train_loss"] == ref["train_loss"]
        for k, v in ref["state"].items():
            np.testing.assert_array_equal(got["state"][k], v, err_msg=f"{trial.key}: {k}")


def test_resume_reuses_cached_trials(tiny, tmp_path, monkeypatch):
    p = protocol(tiny)
    first = C.analyse(tiny, p, cache_root=tmp_path, progress=False)
    a = C.prepare(tiny, p, tmp_path, progress=False)
    trial_files = sorted((a.workdir / "trials").glob("*.json"))
    assert len(trial_files) == len(a.trials) == 1 + len(first["bias"]) + len(first["weight"])
    # "interrupt": two results lost (one torn); only those two run again, and the summary is unchanged
    trial_files[0].unlink()
    trial_files[1].write_text('{"trial": "head", "accur')
    ran = []
    real = C.run_trial
    monkeypatch.setattr(C, "run_trial", lambda *args: ran.append(args[3]) or real(*args))
    again = C.analyse(tiny, p, cache_root=tmp_path, progress=False)
    assert len(ran) == 2
    volatile = ("created", "wall_seconds", "trial_seconds", "trials_from_cache")
    strip = lambda d: {k: v for k, v in d.items() if k not in volatile}  # noqa: E731
    assert strip(again) == strip(first)
    assert first["trials_from_cache"] == 0 and again["trials_from_cache"] == len(a.trials) - 2
    # a changed protocol gets its own trials (same decoded data and tables)
    b = C.prepare(tiny, protocol(tiny, lr=0.02), tmp_path, progress=False)
    assert b.workdir != a.workdir and b.workdir.parent == a.workdir.parent
    # so does other code (a cache written by an older microtrain is never reused)
    monkeypatch.setattr(C, "code_fingerprint", lambda: "other-code")
    c = C.prepare(tiny, p, tmp_path, progress=False)
    assert c.workdir.parent != a.workdir.parent and not list((c.workdir / "trials").glob("*.json"))


def test_parallel_workers_give_the_same_numbers(tiny, tmp_path):
    p = protocol(tiny, weight_convs=(6, 9), k_grid=(2, 5), base_k=5)
    serial = C.analyse(tiny, p, cache_root=tmp_path / "a", progress=False)
    parallel = C.analyse(tiny, p, cache_root=tmp_path / "b", workers=2, progress=False)
    assert serial["bias"] == parallel["bias"] and serial["weight"] == parallel["weight"]
    assert serial["baselines"] == parallel["baselines"]


def test_cli_contrib_then_search(tiny, tmp_path, capsys):
    out = tmp_path / "tiny.json"
    rc = main(["contrib", "--model", tiny, "--data", "lfw", "--subset", "48", "--test-subset", "24", "--epochs", "1",
               "--batch-size", "16", "--probe-epochs", "1", "--workers", "1", "--cache-dir", str(tmp_path / "c"),
               "--out", str(out), "--quiet"])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["format"] == C.FORMAT and d["protocol"]["train_images"] == 48
    assert d["command"].startswith(f"microtrain contrib --model {tiny} --data lfw --out {out} --subset 48")
    assert "--k-grid 3,5,10" in d["command"] and d["table_misses"] == 0 and "protocol_text" in d
    capsys.readouterr()
    scheme = tmp_path / "s.json"
    rc = main(["search", "--model", tiny, "--contrib", str(out), "--budget", "none", "--extra-budget", "3KB",
               "--samples", "200", "-o", str(scheme)])
    assert rc == 0
    s = resolve_scheme(str(scheme), load_model(tiny))
    assert s.n_bias_update <= 10 and "analytic extra" in capsys.readouterr().out


def test_ray_missing_is_one_line(tiny, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_ray(name, *a, **kw):
        if name == "ray":
            raise ImportError("no ray")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(MicrotrainError, match=r"--ray needs the optional package ray"):
        C.analyse(tiny, protocol(tiny), cache_root=tmp_path, ray_address="local", progress=False)


def test_ray_local_equals_the_process_pool(tiny, tmp_path):
    ray = pytest.importorskip("ray")
    p = protocol(tiny, weight_convs=(9,), k_grid=(2, 5), base_k=5)
    pool = C.analyse(tiny, p, cache_root=tmp_path / "a", workers=2, progress=False)
    try:
        on_ray = C.analyse(tiny, p, cache_root=tmp_path / "b", workers=2, ray_address="local", progress=False)
    finally:
        ray.shutdown()
    assert not ray.is_initialized()  # the local instance it started is shut down
    assert on_ray["trials_from_cache"] == pool["trials_from_cache"] == 0
    assert on_ray["bias"] == pool["bias"] and on_ray["weight"] == pool["weight"]
    assert on_ray["baselines"] == pool["baselines"] and len(on_ray["weight"]) > 0


def test_shipped_files_match_their_models():
    for m in ZOO_MODELS:
        if C.shipped_path(m).is_file():
            c = C.Contributions.load(C.shipped_path(m))
            g = load_model(m)
            assert c.model == m and c.num_convs == len(g.convs())
            d = json.loads(C.shipped_path(m).read_text())
            assert d["command"].startswith(f"microtrain contrib --model {m}")
            assert d["model_fingerprint"] == C.model_fingerprint(g) and not d["table_misses"]
