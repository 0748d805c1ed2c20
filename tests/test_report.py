"""benchmarks/report.py: docs/results.md and its figures come from the results files (not from the code), every
figure names the command and commit that made it, and a missing result says which command makes it."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


@pytest.fixture()
def results(tmp_path):
    """A copy of the committed results files the report reads."""
    d = tmp_path / "results"
    d.mkdir()
    for f, _, _ in report.BENCHMARKS.values():
        if (RESULTS / f).is_file():
            shutil.copy(RESULTS / f, d / f)
    return d


def test_report_from_committed_results(results, tmp_path):
    md = report.build(results, tmp_path / "docs", "python benchmarks/report.py").read_text()
    assert md.splitlines()[2].startswith("Regenerate with `python benchmarks/report.py`")
    figures = re.findall(r"!\[[^\]]*\]\(figures/([\w-]+\.png)\)", md)
    assert len(figures) >= 5
    for f in figures:
        assert (tmp_path / "docs" / "figures" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        caption = md[md.index(f"figures/{f})"):].split("\n\n")[1]
        assert "made by `python benchmarks/report.py` at commit" in caption and "benchmarks/results/" in caption
    # the paper's number sits beside ours
    assert "| mcunet-5fps (paper-99kb) |" in md and "(173)" in md and "546" in md


def test_numbers_follow_the_results_files(results, tmp_path):
    mem = json.loads((results / "memory.json").read_text())
    mem["models"]["mcunet-5fps"]["grid"]["reorder_on_patch_on"]["peak_sram_bytes"] = 123 * 1024
    (results / "memory.json").write_text(json.dumps(mem))
    (results / "qas_datasets.json").write_text(json.dumps({"rows": {"faces-x": {
        m: {"test_accuracy": a, "train_images": 150, "test_images": 50, "epochs": 50}
        for m, a in (("fp32", 0.61), ("int8", 0.52), ("int8-qas", 0.63))}}}))
    (results / "search_curves.json").unlink()
    md = report.build(results, tmp_path / "docs", "python benchmarks/report.py").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| mcunet-5fps (paper-99kb) |"))
    assert "| 123.0 (173) |" in row
    assert "| faces-x | 150 images, 50 epochs, 50 test, `--lr auto` | 61.0 | 52.0 | 63.0 |" in md
    assert "Not measured yet: `python benchmarks/search_curves.py`" in md
    assert not (tmp_path / "docs" / "figures" / "search_curves.png").exists()


def test_defaults_acceptance_is_reported_as_measured(results, tmp_path):
    def setting(acc):
        return {"metrics": {"test_accuracy": acc, "lr": 0.03, "lr_selection": {
            "candidates": [{"lr": 0.03, "status": "completed", "val_accuracy": 0.5}, {"lr": 0.1, "status": "diverged"}],
            "seconds": 10, "run_seconds": 190, "fraction_of_total": 0.05}}}

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import defaults

    settings = {"last6-int8-qas": setting(0.60), "last6-int8-noqas": setting(0.58), "last6-fp32": setting(0.61),
                "paper-99kb": setting(0.65)}
    acc = defaults.acceptance(settings)
    assert acc["qas_minus_noqas_points"] == 2.0 and not acc["qas_beats_noqas_by_3"] and not acc["passed"]
    (results / "defaults.json").write_text(json.dumps({"protocol": {"command_prefix": "microtrain train"},
                                                       "settings": settings, "acceptance": acc}))
    md = report.build(results, tmp_path / "docs", "python benchmarks/report.py").read_text()
    assert "| last6-int8-qas | 60.0 | 0.03 | 0.03: 50.0, 0.1: diverged | 10 | 190 | 5.0% | — |" in md
    assert "int8 + QAS − no-QAS = +2.00 points (≥ +3 ✗)" in md
