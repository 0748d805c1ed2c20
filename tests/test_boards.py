"""Boards and device targets: the lever choice under a board's SRAM, the Cortex-M7 target, and what `compile
--board ... --run` reports (instructions per step from QEMU's count, the board's memory regions)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from microtrain.autodiff.build import build_training_graph
from microtrain.cli import main
from microtrain.codegen.project import run_host_and_device, toolchain
from microtrain.compiler.boards import get_board
from microtrain.compiler.levers import RESERVE_BYTES, choose_levers
from microtrain.compiler.memory import plan_training_graph
from microtrain.data.samples import real_images
from microtrain.errors import MicrotrainError
from microtrain.frontends.zoo import load_model
from microtrain.sparse.scheme import resolve_scheme

M = pytest.mark.skipif(toolchain("cortex-m4") is not None, reason="arm-none-eabi-gcc / qemu-system-arm not installed")


@pytest.fixture(scope="module")
def proxyless_tg():
    g = load_model("proxyless-w0.3")
    return build_training_graph(g, resolve_scheme("paper-98kb", g), 10)


def test_lever_choice_is_the_fewest_macs_that_fit(proxyless_tg):
    _, options = choose_levers(proxyless_tg, 10 * 1024 * 1024)  # everything fits: the fewest MACs
    peaks = sorted({o.peak_sram_bytes for o in options})
    assert len(peaks) >= 2
    budget = peaks[1] + RESERVE_BYTES  # the smallest peak does not fit, the next one does
    chosen, options = choose_levers(proxyless_tg, budget)
    fitting = [o for o in options if o.peak_sram_bytes + RESERVE_BYTES <= budget]
    assert chosen.fits and chosen.executed_macs == min(o.executed_macs for o in fitting)
    assert any(not o.fits for o in options)
    with pytest.raises(MicrotrainError, match=f"smallest peak is {min(peaks) / 1024:.1f} KB"):
        choose_levers(proxyless_tg, min(peaks))


def test_plan_budget_and_board_are_one_line_errors_or_tables(capsys):
    assert main(["plan", "--model", "proxyless-w0.3", "--scheme", "paper-98kb", "--budget", "100KB"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("microtrain: error: no lever set fits 100.0 KB") and "\n" not in err
    assert main(["plan", "--model", "proxyless-w0.3", "--scheme", "paper-98kb", "--board", "stm32f746", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    choice = out["lever_choice"]
    assert choice["board"]["sram_bytes"] == 320 * 1024 and choice["chosen"]["fits"]
    assert main(["plan", "--model", "proxyless-w0.3", "--scheme", "paper-98kb", "--board", "nope"]) == 2
    assert "unknown board 'nope'" in capsys.readouterr().err


@M
def test_host_equals_cortex_m7(tmp_path):
    """The Cortex-M7 build (QEMU mps2-an500, FPv5) ends 4 steps with the host build's state, byte for byte."""
    g = load_model("mcunet-5fps")
    tg = build_training_graph(g, resolve_scheme("paper-99kb", g), 10)
    sched, best = plan_training_graph(tg)
    x, y, _ = real_images(4, 128, seed=3)
    ref, res = run_host_and_device(sched, best.plan, tmp_path, x, y, 0.005, "cortex-m7", get_board("stm32f746"),
                                   icount=True)
    assert "LENGTH = 320K" in (res["dir"] / "mt_m4.ld").read_text()
    assert (ref["dir"] / "state.bin").read_bytes() == (res["dir"] / "state.bin").read_bytes()
    assert np.float32(ref["losses"]).tobytes() == np.float32(res["losses"]).tobytes()
    assert res["train_ns"] > sched.macs()  # at least an instruction per MAC


@M
def test_compile_board_run_reports_speed(tmp_path, capsys):
    out = tmp_path / "nrf"
    assert main(["compile", "--model", "mcunet-5fps", "--scheme", "paper-49kb", "--board", "nrf52840", "-o",
                 str(out), "--run", "--steps", "2", "--data", "skimage", "--profile"]) == 0
    printed = capsys.readouterr().out
    assert "cortex-m4 instructions per step" in printed and "at 64 MHz" in printed
    mem = json.loads((out / "memory.json").read_text())
    assert mem["board"] == "nrf52840" and mem["budget"]["sram_bytes"] == 256 * 1024 and mem["fits"]
    assert mem["instructions_per_step"] > mem["step_macs"] > 0
    assert mem["lever_choice"]["chosen"]["fits"]
    # the per-kind profile adds up to about the step (marks cost a little)
    total = sum(mem["profile_per_step"].values())
    assert 0.9 * mem["instructions_per_step"] < total < 1.2 * mem["instructions_per_step"]
    assert main(["compile", "--model", "mcunet-5fps", "--scheme", "paper-49kb", "--board", "nrf52840", "--target",
                 "cortex-m7", "-o", str(tmp_path / "x")]) == 2
    assert "does not match" in capsys.readouterr().err
