"""Acceptance of the foundation issue: integer-exact inference recognises real photos."""

from __future__ import annotations

import json

import pytest

from microtrain.cli import main

from conftest import MODELS

CAT, COFFEE = {281, 282, 285}, {967, 968}


@pytest.mark.parametrize("model", MODELS)
def test_predict_cat_and_coffee(model, sample_images, capsys):
    rc = main(["predict", "--model", model, "--json", sample_images["chelsea"], sample_images["coffee"]])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in out] == [sample_images["chelsea"], sample_images["coffee"]]
    top_cat = {i for i, _, _ in out[0]["top5"]}
    top_coffee = {i for i, _, _ in out[1]["top5"]}
    assert top_cat & CAT, out[0]
    assert top_coffee & COFFEE, out[1]
    assert all(isinstance(name, str) and 0 <= score <= 1 for _, name, score in out[0]["top5"])


def test_predict_from_pkl_equals_zoo(sample_images, capsys):
    from conftest import need_shared

    pkl = need_shared() / "mcunet-5fps.pkl"
    main(["predict", "--model", "mcunet-5fps", "--json", sample_images["chelsea"]])
    a = json.loads(capsys.readouterr().out)
    main(["predict", "--model", str(pkl), "--json", sample_images["chelsea"]])
    b = json.loads(capsys.readouterr().out)
    assert a == b


def test_predict_skips_undecodable_image(sample_images, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    rc = main(["predict", "--model", "mcunet-5fps", "--json", str(bad), sample_images["coffee"]])
    captured = capsys.readouterr()
    assert rc == 1
    assert len(json.loads(captured.out)) == 1
    assert "bad.jpg" in captured.err and "skipped" in captured.err


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(MODELS)
    # naive layer-by-layer peak of mbv2: block 2's stride-2 depthwise, 48x64x64 in and 48x32x32 out
    assert rows["mbv2-w0.35"]["inference_peak_activation_bytes"] == 48 * 64 * 64 + 48 * 32 * 32
    assert all(r["flash_bytes"] < 1024 * 1024 for r in rows.values())
