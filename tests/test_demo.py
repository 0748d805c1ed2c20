"""`microtrain demo` (what `make demo` runs), on a small budget: every stage runs and reports, the trained model beats
the zero head, and the C program fits the device budget, with the default and the lowest-memory options."""

from __future__ import annotations

import json
import re

import pytest

from microtrain.cli import main
from microtrain.codegen.project import toolchain


@pytest.mark.skipif(toolchain("host") is not None, reason="host C toolchain (gcc, make) not installed")
@pytest.mark.parametrize("flags", [[], ["--int8-grads", "--stream-input", "--lr", "0.03"]],
                         ids=["default", "lowest-memory"])  # default: --lr auto
def test_demo_end_to_end(flags, tmp_path, capsys):
    rc = main(["demo", "--subset", "200", "--epochs", "1", "--steps", "4", "--out", str(tmp_path), *flags])
    out = capsys.readouterr().out
    assert rc == 0, out
    for stage in ("== 1. plan", "== 2. fine-tune", "== 3. compile", "== 4."):
        assert stage in out
    before, after = map(float, re.search(r"test accuracy ([\d.]+)% \(new zero head\) -> ([\d.]+)%", out).groups())
    assert after > before
    planned = float(re.search(r"peak SRAM ([\d.]+) KB", out).group(1))
    host = json.loads((tmp_path / "host" / "memory.json").read_text())
    report = json.loads((tmp_path / "report.json").read_text())  # everything is in --out, nothing in a temp dir
    assert (tmp_path / "plan.png").stat().st_size > 0 and report["host"] == host
    assert report["accuracy_after"] == pytest.approx(after / 100, abs=5e-4)
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert host["fits"] and abs(host["planned_peak_sram_bytes"] / 1024 - planned) < 0.05
    if flags:
        assert "input streamed tile by tile, int8 activation gradients" in out and planned < 130
    if toolchain("cortex-m4") is None:
        m4 = json.loads((tmp_path / "m4" / "memory.json").read_text())
        assert m4["fits"] and m4["sram_total_bytes"] <= 256 * 1024
        assert m4["planned_peak_sram_bytes"] == host["planned_peak_sram_bytes"]
