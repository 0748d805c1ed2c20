"""`microtrain compile`: the training step as a self-contained C project for the host or a Cortex-M4 (and run it)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from microtrain.autodiff.build import OPTIMIZERS, TrainConfig, build_training_graph
from microtrain.codegen.emit import TARGETS
from microtrain.codegen.project import (
    build,
    emit_project,
    harness_args,
    is_device,
    measure_memory,
    run_host,
    run_profile,
    run_qemu,
    toolchain,
    write_records,
)
from microtrain.commands.plan import add_planner_levers, planner_levers
from microtrain.compiler.boards import BOARDS, DEFAULT_BOARD, default_board, get_board
from microtrain.compiler.levers import choose_levers, lever_table
from microtrain.compiler.memory import plan_training_graph
from microtrain.data.datasets import model_resolution, open_dataset
from microtrain.data.samples import dataset_stream, real_images
from microtrain.errors import MicrotrainError
from microtrain.frontends.zoo import load_model
from microtrain.ir.graph import Graph
from microtrain.outputs import check_output_dir
from microtrain.runtime.rundir import check_run_classes, read_metrics
from microtrain.sparse.scheme import resolve_scheme


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compile", help="generate the C training program (host, Cortex-M4 or Cortex-M7), build and run it",
        description="Emit the scheduled, memory-planned training step of MODEL under SCHEME as a C99 project: frozen "
                    "weights in flash, trainable state in SRAM, one static arena of exactly the planned size, the "
                    "forward, backward and in-place updates as a straight line of kernel calls, and a harness that "
                    "trains on a stream of images. --build compiles it (gcc, or arm-none-eabi-gcc against a linker "
                    "script of the board's SRAM and flash: 256 KB / 1 MB by default); --run also trains it for "
                    "--steps real images (on the host, or in QEMU with its instruction count: instructions per step "
                    "and milliseconds at the board's clock) and writes OUT_DIR/memory.json.")
    p.add_argument("--model", help="zoo name or model file (taken from --from when omitted)")
    p.add_argument("--scheme", help="preset or scheme file (taken from --from when omitted)")
    p.add_argument("--from", dest="run_dir", metavar="RUN_DIR",
                   help="a `microtrain train` run: its training graph and checkpoint, so the device starts from the "
                        "host-trained state")
    p.add_argument("--classes", type=int, default=10, help="classes of the new head (default 10; ignored with --from)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="sgd (default), sgd-m or adam")
    p.add_argument("--no-reorder", action="store_true", help="apply all updates after the backward pass")
    p.add_argument("--int8-grads", action="store_true",
                   help="activation gradients as per-channel quantized int8, as `microtrain plan --int8-grads` (taken "
                        "from --from when omitted)")
    add_planner_levers(p)
    p.add_argument("--target", choices=TARGETS, default=None,
                   help="host (default), cortex-m4 (QEMU mps2-an386) or cortex-m7 (QEMU mps2-an500)")
    p.add_argument("--board", metavar="BOARD",
                   help=f"the board's core, SRAM and flash regions and clock ({', '.join(BOARDS)}; default "
                        f"{DEFAULT_BOARD} for a device target): the linker script allows exactly its memory")
    p.add_argument("--profile", action="store_true",
                   help="with --run: also run the profile build and print instructions (host: ns) per step per op "
                        "kind")
    p.add_argument("-o", "--out", required=True, metavar="OUT_DIR")
    p.add_argument("--build", action="store_true", help="compile the project")
    p.add_argument("--run", dest="train_run", action="store_true",
                   help="compile, train on --steps images, write memory.json")
    p.add_argument("--steps", type=int, default=20, help="images to train on with --run (default 20)")
    p.add_argument("--lr", type=float, default=0.005, help="learning rate of the --run stream (default 0.005)")
    p.add_argument("--data", default=None,
                   help="images of the --run stream: a dataset name or ImageFolder directory (its train split, "
                        "labelled by the run's classes), or cifar10 / skimage for sample photos. Default: with "
                        "--from, the run's own training data (training the run's head on other labels would undo "
                        "it); else CIFAR-10 when on disk, else scikit-image photos")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def training_graph(args: argparse.Namespace) -> tuple[Graph, dict[str, np.ndarray] | None]:
    """The training graph and the state to start from: a run directory's, or a fresh one."""
    if args.run_dir:
        from microtrain.commands.train import GRAPH
        from microtrain.runtime.rundir import load_run_checkpoint

        run_dir = Path(args.run_dir)
        if not (run_dir / f"{GRAPH}.json").is_file():
            raise MicrotrainError(f"{run_dir}: no {GRAPH}.json (not a `microtrain train` run directory)")
        tg = Graph.load(run_dir / GRAPH)
        tr, name = tg.meta["train"], tg.name.removesuffix(":train")
        if args.model and load_model(args.model).name != name:
            raise MicrotrainError(f"--model {args.model} does not match the run's model {name}")
        if args.scheme and args.scheme != tr["scheme"]["name"]:
            raise MicrotrainError(f"--scheme {args.scheme} does not match the run's scheme {tr['scheme']['name']}")
        if args.int8_grads and not tr["config"].get("int8_grads"):
            raise MicrotrainError("--int8-grads does not match the run (trained with float32 activation gradients)")
        return tg, load_run_checkpoint(run_dir)
    if not (args.model and args.scheme):
        raise MicrotrainError("give --model and --scheme, or --from RUN_DIR")
    if not 1 <= args.classes <= 65536:
        raise MicrotrainError(f"--classes must be in [1, 65536], got {args.classes}")
    model = load_model(args.model)
    cfg = TrainConfig(optimizer=args.optimizer, reorder=not args.no_reorder, int8_grads=args.int8_grads, seed=args.seed)
    return build_training_graph(model, resolve_scheme(args.scheme, model), args.classes, cfg), None


def run_stream(args: argparse.Namespace, res: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The --run stream: --steps images of the run's own training data (with --from, unless --data names the sample
    photos), checked to carry the run's classes in the run's order, or the sample photos (labels = photo modulo the
    head's classes: a stream for measuring, not for learning anything)."""
    if args.data in ("skimage", "cifar10") or not (args.run_dir or args.data):
        return real_images(args.steps, res, seed=args.seed, num_classes=num_classes, source=args.data or "auto")
    data, metrics = args.data, {}
    if args.run_dir:
        metrics = read_metrics(Path(args.run_dir))
        data = data or metrics.get("data", metrics.get("dataset"))
        if data is None:
            raise MicrotrainError(f"{args.run_dir}: the run does not record its training data; --data names it (or "
                                  f"--data skimage: a stream for measuring only)")
    try:
        ds = open_dataset(data, "train", subset=args.steps, seed=args.seed, progress=False)
    except MicrotrainError as e:
        if args.data:
            raise
        raise MicrotrainError(f"{e} (the run's training data; --data names another dataset with the run's classes, "
                              f"--data skimage a stream of sample photos for measuring only)") from None
    check_run_classes(metrics, ds.classes, f"--data {data}")
    if len(ds.classes) != num_classes:
        raise MicrotrainError(f"--data {data} has {len(ds.classes)} classes, the head {num_classes}")
    x, y = dataset_stream(ds, res, args.seed)
    return x, y, ds.name


def _kb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:.1f} KB"


def target_and_board(args: argparse.Namespace) -> tuple[str, Any]:
    """--target and --board agree: a board implies its core; a device target without a board gets the default."""
    board = get_board(args.board) if args.board else None
    target = args.target or (board.core if board else "host")
    if board and target != board.core:
        raise MicrotrainError(f"--board {board.name} has a {board.core}; --target {target} does not match")
    if is_device(target) and board is None:
        board = default_board(target)
    return target, board


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise MicrotrainError(f"--steps must be >= 1, got {args.steps}")
    args.target, board = target_and_board(args)
    levers = planner_levers(args)
    check_output_dir(args.out, "-o")
    tg, state = training_graph(args)
    lever_choice = None
    if args.board:  # the fastest lever set that fits the board (compiler/levers.py); --stream-input stays as given
        chosen, options = choose_levers(tg, board.sram_bytes, stream_input=args.stream_input)
        levers = chosen.levers
        lever_choice = {"chosen": chosen.to_json(), "options": [o.to_json() for o in options]}
        print(lever_table(options, chosen, board.sram_bytes))
    sched, best = plan_training_graph(tg, **levers)
    out = Path(args.out)
    prog = emit_project(sched, best.plan, out, args.target, state=state, board=board)
    stage = prog.patch
    where = f"{args.target}, {board.name}" if board else args.target
    print(f"{tg.name.removesuffix(':train')} {tg.meta['train']['scheme']['name']} -> {out} ({where}): arena "
          f"{_kb(prog.arena_bytes)}, state {_kb(sum(t['nbytes'] for t in prog.state))}"
          + (f", patch stage {stage['grid']}x{stage['grid']} up to {stage['output']}" if stage else "")
          + (", input streamed tile by tile" if prog.stream_input else "")
          + (", int8 activation gradients" if tg.meta["train"]["config"].get("int8_grads") else "")
          + (f", {len(sched.meta['block_grads'])} blocks' backward channel by channel"
             if sched.meta["block_grads"] else "")
          + (f", from {args.run_dir} (step {int(np.asarray(state.get('__step__', 0)))})" if state else ""))
    if not (args.build or args.train_run):
        return 0
    missing = toolchain(args.target)
    if missing:
        raise MicrotrainError(f"{missing} is not installed (see the README's set-up command)")
    build(out)
    if not args.train_run:
        print(f"built {out / ('prog.elf' if is_device(args.target) else 'prog')}")
        return 0
    res = model_resolution(tg)  # the model's own input shape (an imported gray / non-square model too)
    x, y, source = run_stream(args, res, prog.num_classes)
    write_records(out / "stream.bin", x, y, args.lr)
    hargs = harness_args("stream.bin", state_out="state.bin")
    device = is_device(args.target)
    result = run_qemu(out, hargs, icount=True) if device else run_host(out, hargs)
    speed: dict[str, Any] = {}
    if device and result.get("train_ns"):  # -icount shift=0: one ns of virtual time per instruction
        per_step = result["train_ns"] / len(result["losses"])
        speed = {"instructions_per_step": round(per_step), "step_macs": sched.macs(),
                 "instructions_per_mac": round(per_step / max(sched.macs(), 1), 2), "clock_mhz": board.mhz,
                 "est_ms_per_step_at_one_instruction_per_cycle": round(per_step / board.mhz / 1e3, 1)}
    if args.profile:
        speed["profile_per_step"] = run_profile(out, harness_args("stream.bin"), len(x))
    mem = measure_memory(out, result, best.plan, {"command": "microtrain compile " + " ".join(
        f"{k} {v}" for k, v in (("--model", args.model), ("--scheme", args.scheme), ("--from", args.run_dir),
                                ("--target", args.target), ("--board", args.board), ("--data", args.data),
                                ("-o", args.out)) if v)
        + (" --stream-input" if args.stream_input else "") + (" --int8-grads" if args.int8_grads else "")
        + (f" --max-recompute {args.max_recompute:g}" if args.max_recompute != 1.5 else "")
        + (" --no-block-backward" if args.no_block_backward else "")
        + (" --recompute-blocks" if args.recompute_blocks else "") + " --run", **speed,
        **({"lever_choice": lever_choice} if lever_choice else {})})
    losses = result["losses"]
    k = max(1, len(losses) // 4)
    print(f"trained {len(losses)} {source} images: loss {np.mean(losses[:k]):.3f} (first {k}) -> "
          f"{np.mean(losses[-k:]):.3f} (last {k})"
          + (f", {result['train_ns'] / 1e6 / len(losses):.1f} ms/step on this machine"
             if result.get("train_ns") and not device else ""))
    if "instructions_per_step" in speed:
        print(f"speed {speed['instructions_per_step'] / 1e6:.1f}M {args.target} instructions per step "
              f"({speed['instructions_per_mac']} per MAC, QEMU instruction count); about "
              f"{speed['est_ms_per_step_at_one_instruction_per_cycle']:.0f} ms per step at {board.mhz} MHz if every "
              "instruction took one cycle")
    for kind, n in speed.get("profile_per_step", {}).items():
        print(f"  {kind:<44} {n / 1e6:8.2f}M" if device else f"  {kind:<44} {n / 1e3:8.1f} us")
    sram_budget, flash_budget = mem["budget"]["sram_bytes"], mem["budget"]["flash_bytes"]
    fit = "fits" if mem["sram_total_bytes"] <= sram_budget else "DOES NOT FIT"
    ffit = "fits" if mem["flash_bytes"] <= flash_budget else "DOES NOT FIT"
    print(f"SRAM  {_kb(mem['sram_total_bytes'])} of {_kb(sram_budget)} ({fit}): .data+.bss {_kb(mem['ram_bytes'])} "
          f"(arena {_kb(mem['arena_bytes'])}, state {_kb(mem['state_bytes'])}), stack {_kb(mem['stack_bytes'])}")
    print(f"flash {_kb(mem['flash_bytes'])} of {_kb(flash_budget)} ({ffit}); {out / 'memory.json'}, final state "
          f"{out / 'state.bin'}")
    if not mem["fits"]:
        print(json.dumps(mem["sections"]))
    return 0
