"""Cortex-M4 instructions per training step, per op kind, for the three zoo models' paper schemes.

For mbv2-w0.35 `paper-99kb`, proxyless-w0.3 `paper-98kb` and mcunet-5fps `paper-99kb` with default levers (and
mcunet-5fps with `--int8-grads`, and with `--stream-input --max-recompute 3`; and proxyless-w0.3 `paper-98kb` under
the paper's 135 KB with `--stream-input`, its levers chosen as `plan --budget 135KB` chooses them, with the reason no
lever set fits 135 KB without streaming), the training step is generated for
the Cortex-M4, built (`make`: arm-none-eabi-gcc -O3, the DSP kernels) and trained on 4 real images under
`qemu-system-arm -M mps2-an386 -icount shift=0` (one instruction = 1 ns of virtual time, so the harness's train_ns
counts instructions). The profile build (`make profile`, -DMT_PROFILE: a mark after every op) gives the
instructions per op kind. The host build trains the same images and must end with the same state.bin, byte for byte.
Also reported: flash (.text + .data) and milliseconds per step at the paper board's clock (STM32F746, 216 MHz) if
each instruction took one cycle (an estimate: QEMU counts instructions, not cycles), against the paper's measured
milliseconds. Writes benchmarks/results/device_speed.json.
Run: `python benchmarks/device_speed.py` (about 5 minutes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

from microtrain.autodiff.build import TrainConfig, build_training_graph
from microtrain.codegen.project import harness_args, run_host_and_device, run_profile, section_sizes
from microtrain.compiler.levers import choose_levers
from microtrain.compiler.memory import plan_training_graph
from microtrain.data.samples import real_images
from microtrain.errors import MicrotrainError
from microtrain.frontends.zoo import load_model
from microtrain.sparse.scheme import resolve_scheme

RESULTS = Path(__file__).resolve().parent / "results"
# the paper's engine on an STM32F746 (Cortex-M7, 216 MHz): ms per training step, and that many cycles
PAPER_MS = {"mbv2-w0.35": 373.0, "proxyless-w0.3": 443.0, "mcunet-5fps": 546.0}
PAPER_MHZ = 216
CASES = [("mbv2-w0.35", "paper-99kb", "default"), ("proxyless-w0.3", "paper-98kb", "default"),
         ("mcunet-5fps", "paper-99kb", "default"), ("mcunet-5fps", "paper-99kb", "int8-grads"),
         ("mcunet-5fps", "paper-99kb", "stream-cap3"), ("proxyless-w0.3", "paper-98kb", "budget-135kb-stream")]
BUDGET = 135 * 1024  # the paper's proxyless-w0.3 training memory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "device_speed.json"))
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, scheme, config in CASES:
            g = load_model(model)
            cfg = TrainConfig(int8_grads=config == "int8-grads")
            levers = {"stream_input": True, "max_recompute": 3.0} if config == "stream-cap3" else {}
            tg = build_training_graph(g, resolve_scheme(scheme, g), 10, cfg)
            budget = {}
            if config.startswith("budget"):
                try:
                    choose_levers(tg, BUDGET)
                    budget["without_stream_input"] = "fits"
                except MicrotrainError as e:
                    budget["without_stream_input"] = str(e)
                chosen, options = choose_levers(tg, BUDGET, stream_input=True)
                levers = chosen.levers
                budget.update(budget_bytes=BUDGET, chosen=chosen.to_json(), options=[o.to_json() for o in options])
            sched, best = plan_training_graph(tg, **levers)
            x, y, _ = real_images(args.steps, g.tensors[g.inputs[0]].shape[1], seed=3)
            host_res, res = run_host_and_device(sched, best.plan, Path(tmp) / f"{model}-{config}", x, y, 0.005,
                                                icount=True)
            host, m4 = host_res["dir"], res["dir"]
            ins = res["train_ns"] / res["steps"]
            sec = section_sizes(m4 / "prog.elf", "cortex-m4")
            row = {"model": model, "scheme": scheme, "config": config, "step_macs": sched.macs(),
                   "m4_instructions_per_step": round(ins), "instructions_per_mac": round(ins / sched.macs(), 2),
                   "host_state_equals_m4": (host / "state.bin").read_bytes() == (m4 / "state.bin").read_bytes(),
                   "flash_bytes": sec["text"] + sec["data"], "arena_bytes": best.plan.arena_bytes,
                   "est_ms_at_216mhz_one_instruction_per_cycle": round(ins / PAPER_MHZ / 1e3, 1),
                   "paper_ms_stm32f746": PAPER_MS[model], "paper_cycles": round(PAPER_MS[model] * PAPER_MHZ * 1e3),
                   "profile_instructions_per_step": run_profile(m4, harness_args("stream.bin", max_steps=args.steps),
                                                                args.steps), **({"budget": budget} if budget else {})}
            rows.append(row)
            print(f"{model} {scheme} {config}: {ins / 1e6:.1f}M instructions/step (paper "
                  f"{row['paper_cycles'] / 1e6:.1f}M cycles), host == M4: {row['host_state_equals_m4']}, "
                  f"flash {row['flash_bytes']}", flush=True)
    out = {"command": "python benchmarks/device_speed.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "measure": "qemu-system-arm -M mps2-an386 -icount shift=0, train_step only (SysTick at 25 MHz: +-40 "
                      "instructions); profile: the -DMT_PROFILE build (a mark after every op, a few dozen "
                      "instructions each, charged to the next op)",
           "build": "arm-none-eabi-gcc -O3 -mcpu=cortex-m4 -mfpu=fpv4-sp-d16 -mfloat-abi=hard -ffp-contract=off",
           "steps": args.steps, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
