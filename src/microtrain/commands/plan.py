"""`microtrain plan`: the planned SRAM and flash of one on-device training step, against the device budget."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from microtrain.autodiff.build import OPTIMIZERS, TrainConfig, build_training_graph
from microtrain.compiler.boards import BOARDS, DEFAULT_BOARD, get_board
from microtrain.compiler.levers import choose_levers, lever_table
from microtrain.compiler.memory import FLASH_BUDGET, SRAM_BUDGET, MemoryReport, compile_memory
from microtrain.errors import MicrotrainError
from microtrain.frontends.zoo import load_model
from microtrain.sparse.scheme import resolve_scheme
from microtrain.sparse.search import parse_bytes


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="plan the memory of one training step (peak SRAM, flash, what is live at the peak)",
        description="Build the training graph of MODEL under SCHEME, schedule it, run its frozen early stage patch by "
                    "patch (chosen automatically), and plan every tensor into one arena. Peak SRAM = arena + resident "
                    "state (trainable weight slices, biases, fp32 head, optimizer slots). These are the numbers the "
                    "generated C allocates.")
    p.add_argument("--model", required=True, help="zoo name, .pkl, or microtrain .json/.npz")
    p.add_argument("--scheme", required=True, help="preset (paper-99kb, full, bias-only, last:K, ...) or a scheme file")
    p.add_argument("--classes", type=int, default=10, help="classes of the new head (default 10)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="sgd (default), sgd-m or adam: slots in SRAM")
    p.add_argument("--update-storage", choices=("int8", "fp32"), default="int8",
                   help="trainable slices kept as int8 (default, stochastic rounding) or as float32 shadows")
    p.add_argument("--int8-grads", action="store_true",
                   help="activation gradients as per-channel quantized int8 (1 B/element + a float scale per channel)")
    p.add_argument("--no-reorder", action="store_true",
                   help="materialise all weight gradients and apply them after the backward (no operator reordering)")
    p.add_argument("--no-patch", action="store_true", help="run the early stage whole (no patch-based stage)")
    add_planner_levers(p)
    p.add_argument("--board", metavar="BOARD",
                   help=f"plan for a board ({', '.join(BOARDS)}): its SRAM and flash are the budget, and the "
                        "planner levers are chosen for it (the fastest set that fits; --stream-input and "
                        "--int8-grads stay yours), with the alternatives listed")
    p.add_argument("--budget", metavar="SIZE",
                   help="SRAM budget instead of the board's (e.g. 135KB); implies choosing the levers as --board does")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw the arena over the schedule, peak marked")
    p.set_defaults(run=run)


def add_planner_levers(p: argparse.ArgumentParser) -> None:
    """The planner's options that `plan` and `compile` share (`planner_levers` reads them back)."""
    p.add_argument("--stream-input", action="store_true",
                   help="the camera (or file) delivers each patch's input region: the whole image is never in SRAM "
                        "(reported as an option, not the default)")
    p.add_argument("--max-recompute", type=float, default=1.5,
                   help="cap on the patch stage's MACs tiled / whole (halo recomputation; default 1.5)")
    p.add_argument("--recompute-blocks", action="store_true",
                   help="in the channel-serial block backward, recompute pw1's and dw's output channel by channel "
                        "instead of keeping their masks from the forward pass (their MACs once more; kept where it "
                        "lowers the peak)")
    p.add_argument("--no-block-backward", action="store_true",
                   help="run every backward op on whole tensors (no channel-serial backward of inverted-residual "
                        "blocks; by default chosen where it lowers the peak)")


def planner_levers(args: argparse.Namespace) -> dict[str, Any]:
    """`add_planner_levers`' options as keyword arguments of `compile_memory` / `plan_training_graph`."""
    if args.max_recompute < 1:
        raise MicrotrainError(f"--max-recompute must be >= 1, got {args.max_recompute}")
    return {"stream_input": args.stream_input, "max_recompute": args.max_recompute,
            "block_backward": not args.no_block_backward, "block_recompute": args.recompute_blocks}


def _kb(n: int) -> str:
    return f"{n / 1024:.1f} KB"


def text_report(r: MemoryReport, sram_budget: int = SRAM_BUDGET, flash_budget: int = FLASH_BUDGET) -> str:
    b = r.breakdown()
    cfg = r.config
    fit = "fits" if r.peak_sram_bytes <= sram_budget else "DOES NOT FIT"
    ffit = "fits" if r.flash_bytes <= flash_budget else "DOES NOT FIT"
    lines = [f"{r.model}  scheme {r.scheme.name}  {r.graph.meta['train']['num_classes']} classes  {cfg.optimizer}  "
             f"reorder {'on' if cfg.reorder else 'off'}",
             f"peak SRAM  {_kb(r.peak_sram_bytes):>10}  of {_kb(sram_budget)}: {fit}",
             f"  arena    {_kb(r.arena_bytes):>10}  (live max {_kb(b['arena_live_bytes'])}, at op {b['peak_step']} "
             f"{b['peak_op']}, {b['peak_phase']})",
             f"  state    {_kb(r.state_bytes):>10}  " + ", ".join(f"{k.replace('_', ' ')} {_kb(v)}"
                                                                for k, v in r.state.items() if v),
             f"flash      {_kb(r.flash_bytes):>10}  of {_kb(flash_budget)}: {ffit}  "
             + ", ".join(f"{k.replace('_', ' ')} {_kb(v)}" for k, v in r.flash.items() if v),
             f"analytic extra memory of the scheme (paper's model): {_kb(r.analytic_extra_bytes)}"]
    pt = r.patch()
    if pt:
        lines.append(f"patch stage: {len(pt['ops'])} ops up to {pt['output']}, {pt['grid']}x{pt['grid']} tiles, "
                     f"tile arena {_kb(pt['scratch_bytes'])}, MACs x{pt['recompute']:.2f} in the stage "
                     f"(+{100 * pt['step_overhead']:.1f}% of the step)"
                     + (", input streamed tile by tile" if pt["stream_input"] else ""))
    else:
        lines.append("patch stage: none")
    groups = r.graph.meta.get("block_grads", [])
    bb = r.block_backward()
    lines.append(f"channel-serial backward: {len(groups)} blocks ({', '.join(gr['block'] for gr in groups)}), "
                 f"largest {max(gr['channels'] for gr in groups)} channels one at a time"
                 + (f", {bb['recompute_blocks']} recomputing their masks (+{100 * bb['step_overhead']:.1f}% of the "
                    "step's MACs)" if bb["recompute_blocks"] else "") if groups
                 else "channel-serial backward: none" + ("" if r.levers.get("block_backward") else " (switched off)"))
    lines.append("live at the peak: " + ", ".join(f"{e['tensor']} {_kb(e['bytes'])}"
                                                  for e in b["live_at_peak"][:6]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    levers = planner_levers(args)
    if args.plot and Path(args.plot).suffix.lower() != ".png":
        raise MicrotrainError(f"--plot writes a PNG: {args.plot} does not end in .png")
    cfg = TrainConfig(optimizer=args.optimizer, reorder=not args.no_reorder, update_storage=args.update_storage,
                      int8_grads=args.int8_grads)
    model = load_model(args.model)
    board, choice = get_board(args.board) if args.board else None, None
    if args.budget:
        sram = parse_bytes(args.budget)
        if not sram or sram <= 0:
            raise MicrotrainError(f"--budget must be a positive size, got {args.budget!r}")
        base = board or get_board(DEFAULT_BOARD)
        board = dataclasses.replace(base, name=f"{base.name} with {sram / 1024:g} KB", sram_bytes=sram)
    if board:
        tg = build_training_graph(model, resolve_scheme(args.scheme, model), args.classes, cfg)
        chosen, options = choose_levers(tg, board.sram_bytes, stream_input=args.stream_input)
        choice = {"board": board.to_dict(), "chosen": chosen.to_json(), "options": [o.to_json() for o in options]}
        levers = chosen.levers
    elif args.no_patch:
        levers["patch"] = None
    r = compile_memory(model, args.scheme, num_classes=args.classes, cfg=cfg, **levers)
    if args.plot:
        try:
            r.plot(args.plot)
        except OSError as e:
            raise MicrotrainError(f"{args.plot}: cannot write the plot ({e.strerror or e})") from None
    budgets = (board.sram_bytes, board.flash_bytes) if board else (SRAM_BUDGET, FLASH_BUDGET)
    if args.json:
        print(json.dumps({**r.to_json(), **({"lever_choice": choice} if choice else {})}, indent=1))
    else:
        print(text_report(r, *budgets))
        if choice:
            print(lever_table(options, chosen, board.sram_bytes))
        if args.plot:
            print(f"plot: {args.plot}")
    return 0
