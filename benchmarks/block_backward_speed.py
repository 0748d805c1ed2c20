"""Cortex-M4 instructions per training step with the channel-serial block backward on and off.

For mcunet-5fps and mbv2-w0.35 `paper-99kb` (float32 gradients), with default levers and with `--stream-input
--max-recompute 3`, the C program is generated for the Cortex-M4, built, and trained on 4 real images under
`qemu-system-arm -icount shift=0` (the harness's train_ns then counts instructions). The patch stage is chosen per
plan, so where the block backward moves the peak into the forward pass, the planner may pick a deeper stage with more
halo recomputation (its MACs are recorded). Writes benchmarks/results/block_backward_speed.json.
Run: `python benchmarks/block_backward_speed.py` (about 4 minutes).
"""

from __future__ import annotations

import datetime
import itertools
import json
import sys
import tempfile
from pathlib import Path

from microtrain.autodiff.build import TrainConfig, build_training_graph
from microtrain.codegen.project import build, emit_project, harness_args, run_qemu, write_records
from microtrain.compiler.memory import plan_training_graph
from microtrain.data.samples import real_images
from microtrain.frontends.zoo import load_model
from microtrain.sparse.scheme import resolve_scheme

RESULTS = Path(__file__).resolve().parent / "results"
CASES = [("mcunet-5fps", "paper-99kb"), ("mbv2-w0.35", "paper-99kb")]
CONFIGS = {"default": {}, "stream-cap3": {"stream_input": True, "max_recompute": 3.0}}


def main() -> int:
    x, y, _ = real_images(4, 128, seed=3)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, scheme in CASES:
            g = load_model(model)
            for (config, opts), on in itertools.product(CONFIGS.items(), (True, False)):
                tg = build_training_graph(g, resolve_scheme(scheme, g), 10, TrainConfig())
                sched, best = plan_training_graph(tg, block_backward=on, **opts)
                d = Path(tmp) / f"{model}-{config}-{on}"
                emit_project(sched, best.plan, d, "cortex-m4")
                build(d)
                write_records(d / "stream.bin", x, y, 0.005)
                res = run_qemu(d, harness_args("stream.bin"), icount=True)
                stage = best.stage
                rows.append({"model": model, "scheme": scheme, "config": config, "block_backward": on,
                             "groups": len(sched.meta["block_grads"]), "arena_bytes": best.plan.arena_bytes,
                             "patch_stage": {"output": stage.output, "grid": stage.grid, "macs": stage.macs,
                                             "whole_macs": stage.whole_macs} if stage else None,
                             "step_macs": sched.macs(),
                             "m4_instructions_per_step": res["train_ns"] / len(res["losses"])})
                print(rows[-1], flush=True)
    out = {"command": "python benchmarks/block_backward_speed.py",
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "options": "float32 gradients, 4 steps", "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "block_backward_speed.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
