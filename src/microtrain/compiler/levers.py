"""The fastest set of planner levers that fits a board: every candidate planned, the one with the fewest executed MACs
among those whose peak SRAM fits the budget.

The levers change where tensors live and what is recomputed, never the training arithmetic (each is bit-identical to
the plain schedule in the C program), so the choice is free. `--stream-input` and `--int8-grads` do change what the
device does (where pixels come from, how gradients are stored): they stay the user's choice and are kept as given.
The compiler executes nothing, so speed is ranked by executed MACs (the patch stage's halo recomputation and the
blocks' recomputed outputs included); at equal MACs a candidate earlier in `CANDIDATES` wins, because the
channel-serial block backward's loop costs instructions that MACs do not show. `compile --board ... --run` measures
the chosen one (instructions per step in QEMU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from microtrain.compiler.memory import executed_macs, plan_training_graph, state_bytes
from microtrain.errors import MicrotrainError
from microtrain.ir.graph import Graph

# SRAM the program needs beyond the planned peak: harness buffers, I/O state and the stack (measured 4.2 KB for
# mcunet-5fps on the Cortex-M4: 3.0 KB .data/.bss + 1.2 KB stack), so a chosen plan also links
RESERVE_BYTES = 6 * 1024
# name -> plan_training_graph keyword arguments; cheapest first
CANDIDATES: dict[str, dict[str, Any]] = {
    "whole early stage, op-by-op backward": {"patch": None, "block_backward": False},
    "patch stage (<=1.5x), op-by-op backward": {"max_recompute": 1.5, "block_backward": False},
    "patch stage (<=1.5x), channel-serial blocks": {"max_recompute": 1.5},
    "patch stage (<=3x), channel-serial blocks": {"max_recompute": 3.0},
    "patch stage (<=3x), channel-serial blocks recomputing masks": {"max_recompute": 3.0, "block_recompute": True},
    "patch stage (<=5x), channel-serial blocks recomputing masks": {"max_recompute": 5.0, "block_recompute": True},
}


@dataclass
class LeverOption:
    name: str
    levers: dict[str, Any]
    peak_sram_bytes: int
    executed_macs: int
    fits: bool

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "levers": self.levers, "peak_sram_bytes": self.peak_sram_bytes,
                "executed_macs": self.executed_macs, "fits": self.fits}


def choose_levers(tg: Graph, budget_bytes: int, *, stream_input: bool = False) -> tuple[LeverOption, list[LeverOption]]:
    """Plan the training graph `tg` with every candidate: the chosen option and all of them (candidate order). No
    option fits: a one-line error with the smallest peak found."""
    options = []
    for name, levers in CANDIDATES.items():
        if stream_input and levers.get("patch", "auto") is None:
            continue  # streaming needs a patch stage
        kw = {**levers, "stream_input": stream_input}
        try:
            sched, best = plan_training_graph(tg, **kw)
        except MicrotrainError:
            continue  # e.g. streaming without any frozen early stage
        peak = best.plan.arena_bytes + sum(state_bytes(sched).values())
        options.append(LeverOption(name, kw, peak, executed_macs(sched, best.stage),
                                   peak + RESERVE_BYTES <= budget_bytes))
    if not options:
        raise MicrotrainError("no planner configuration applies to this graph")
    fitting = [o for o in options if o.fits]
    if not fitting:
        low = min(options, key=lambda o: o.peak_sram_bytes)
        raise MicrotrainError(f"no lever set fits {budget_bytes / 1024:.1f} KB: the smallest peak is "
                              f"{low.peak_sram_bytes / 1024:.1f} KB ({low.name}) + {RESERVE_BYTES // 1024} KB for the "
                              "harness and stack"
                              + ("" if stream_input else "; try --stream-input or --int8-grads"))
    return min(fitting, key=lambda o: (o.executed_macs, options.index(o))), options


def lever_table(options: list[LeverOption], chosen: LeverOption, budget_bytes: int) -> str:
    """The alternatives, one line each: peak SRAM against the budget, executed MACs, the choice marked."""
    lines = [f"lever sets against {budget_bytes / 1024:.1f} KB, {RESERVE_BYTES // 1024} KB of it kept for the harness "
             "and stack (fastest that fits = fewest executed MACs):"]
    for o in options:
        mark = "->" if o is chosen else "  "
        lines.append(f" {mark} {o.name:<62} {o.peak_sram_bytes / 1024:7.1f} KB "
                     f"{'fits' if o.fits else 'too big'}  {o.executed_macs / 1e6:6.1f}M MACs")
    return "\n".join(lines)
