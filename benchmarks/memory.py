"""Planned peak SRAM of one training step per zoo model and paper scheme, lever by lever, against the paper.

Writes benchmarks/results/memory.json (every number, what is live at each peak, the command line and date) and
benchmarks/results/memory.md (the table). Run: `python benchmarks/memory.py`.

The "int8 gradients" rows use the real `--int8-grads` option of the training graph: activation gradients stored as
per-channel quantized int8 (1 byte per element + one float32 scale per channel), executed by the host trainer and
counted by the planner like any other tensor. Its accuracy cost is measured in benchmarks/cifar10_transfer.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from microtrain.autodiff.build import TrainConfig
from microtrain.compiler.memory import MemoryReport, compile_memory
from microtrain.frontends.zoo import load_model


@functools.lru_cache(maxsize=8)
def _model(name: str):
    return load_model(name)


def memory_of(model: str, scheme, **kw) -> MemoryReport:
    """compile_memory of a zoo model (loaded once)."""
    return compile_memory(_model(model), scheme, **kw)


RESULTS = Path(__file__).resolve().parent / "results"

# The paper's measured figures (PAPER.md §4, STM32F746, KB): full update / sparse / sparse+reorder, and its scheme.
PAPER = {"mbv2-w0.35": ("paper-99kb", 2939, 335, 141),
         "proxyless-w0.3": ("paper-98kb", 2745, 326, 135),
         "mcunet-5fps": ("paper-99kb", 3650, 560, 173)}

# Cumulative levers, reorder on: (label, compile_memory keyword arguments).
LEVERS: list[tuple[str, dict[str, Any]]] = [
    ("naive (forward in-place only, builder order, no patch)", {"backward_inplace": False, "schedule": False,
                                                                "patch": None, "block_backward": False}),
    ("+ patch stage (recompute <= 1.5x)", {"backward_inplace": False, "schedule": False, "block_backward": False}),
    ("+ backward in-place rules", {"schedule": False, "block_backward": False}),
    ("+ schedule: hoist updates", {"block_backward": False}),
    ("+ channel-serial block backward", {}),
    ("+ --stream-input (option)", {"stream_input": True}),
    ("+ recompute cap 3x", {"stream_input": True, "max_recompute": 3.0}),
    ("+ --recompute-blocks (option)", {"stream_input": True, "max_recompute": 3.0, "block_recompute": True}),
]
LOWEST = {"stream_input": True, "max_recompute": 3.0}  # the lowest-memory levers (options the default leaves off)


def with_int8_grads(model: str, scheme: str, cfg: TrainConfig, **kw: Any) -> dict[str, Any]:
    """The same plan with `--int8-grads`."""
    return summary(memory_of(model, scheme, cfg=dataclasses.replace(cfg, int8_grads=True), **kw))


def summary(r: MemoryReport) -> dict[str, Any]:
    b = r.breakdown()
    g = r.graph
    # reorder off: every weight gradient exists at once; with the resident state, no plan can go below that
    wgrads = sum(t.nbytes for n, t in g.tensors.items() if t.role == "grad" and n.startswith("grad:")
                 and n.removeprefix("grad:") in g.meta["train"]["state"])
    return {"peak_sram_bytes": r.peak_sram_bytes, "arena_bytes": r.arena_bytes, "state_bytes": r.state_bytes,
            "floor_bytes": r.state_bytes + wgrads if not r.config.reorder else r.state_bytes,
            "block_backward": r.block_backward(),
            "flash_bytes": r.flash_bytes, "analytic_extra_bytes": r.analytic_extra_bytes,
            "peak_op": b["peak_op"], "peak_phase": b["peak_phase"], "arena_by_role": b["arena_by_role"],
            "arena_live_peak_by_phase": b["arena_live_peak_by_phase"],
            "live_at_peak": [[e["tensor"], e["bytes"]] for e in b["live_at_peak"][:8]], "patch": r.patch()}


def kb(n: float) -> str:
    return f"{n / 1024:.1f}"


def run_model(model: str) -> dict[str, Any]:
    scheme, p_full, p_sparse, p_reorder = PAPER[model]
    on, off = TrainConfig(), TrainConfig(reorder=False)
    out: dict[str, Any] = {"scheme": scheme, "paper_kb": {"full": p_full, "sparse": p_sparse,
                                                          "sparse_reorder": p_reorder}}
    out["levers"] = [{"lever": name, **summary(memory_of(model, scheme, cfg=on, **kw))} for name, kw in LEVERS]
    out["grid"] = {f"reorder_{ro}_patch_{pa}": summary(memory_of(model, scheme, cfg=cfg,
                                                                      patch="auto" if pa == "on" else None))
                   for ro, cfg in (("on", on), ("off", off)) for pa in ("on", "off")}
    out["full"] = {"reorder_off": summary(memory_of(model, "full", cfg=off)),
                   "reorder_on": summary(memory_of(model, "full", cfg=on)),
                   "reorder_off_no_block_backward": summary(memory_of(model, "full", cfg=off,
                                                                           block_backward=False))}
    out["fp32_lowest"] = {"sparse_reorder": summary(memory_of(model, scheme, cfg=on, **LOWEST)),
                          "sparse": summary(memory_of(model, scheme, cfg=off, **LOWEST))}
    out["int8_grads"] = {
        "sparse_reorder": with_int8_grads(model, scheme, on),
        "sparse_reorder_stream_cap3": with_int8_grads(model, scheme, on, stream_input=True, max_recompute=3.0),
        "sparse": with_int8_grads(model, scheme, off),
        "sparse_stream_cap3": with_int8_grads(model, scheme, off, stream_input=True, max_recompute=3.0),
        "full": with_int8_grads(model, "full", off),
        "sparse_reorder_stream_cap5": with_int8_grads(model, scheme, on, stream_input=True, max_recompute=5.0)}
    out["fp32_lowest"]["sparse_reorder_cap5"] = summary(memory_of(model, scheme, cfg=on, stream_input=True,
                                                                       max_recompute=5.0))
    # --recompute-blocks on both sides of each ratio (it shrinks the full update too: its masks and saved inputs)
    rc = {"block_recompute": True}
    out["recompute_blocks"] = {
        "fp32": {"sparse_reorder": summary(memory_of(model, scheme, cfg=on, **LOWEST, **rc)),
                 "sparse": summary(memory_of(model, scheme, cfg=off, **LOWEST, **rc)),
                 "full": summary(memory_of(model, "full", cfg=off, **rc))},
        "int8_grads": {"sparse_reorder": with_int8_grads(model, scheme, on, **LOWEST, **rc),
                       "sparse": with_int8_grads(model, scheme, off, **LOWEST, **rc),
                       "full": with_int8_grads(model, "full", off, **rc)}}
    out["full_naive_planner"] = summary(memory_of(model, "full", cfg=off, backward_inplace=False,
                                                       schedule=False))
    g = out["grid"]
    sr, s, f = (g["reorder_on_patch_on"]["peak_sram_bytes"], g["reorder_off_patch_on"]["peak_sram_bytes"],
                out["full"]["reorder_off"]["peak_sram_bytes"])
    w = out["int8_grads"]
    out["ratios"] = {"full_over_sparse_reorder": f / sr, "reorder_off_over_on": s / sr,
                     "full_naive_planner_over_sparse_reorder": out["full_naive_planner"]["peak_sram_bytes"] / sr,
                     "fp32_stream_cap3": {
                         "full_over_sparse_reorder": f / out["fp32_lowest"]["sparse_reorder"]["peak_sram_bytes"],
                         "full_no_block_backward_over_sparse_reorder":
                             out["full"]["reorder_off_no_block_backward"]["peak_sram_bytes"]
                             / out["fp32_lowest"]["sparse_reorder"]["peak_sram_bytes"],
                         "reorder_off_over_on": out["fp32_lowest"]["sparse"]["peak_sram_bytes"]
                         / out["fp32_lowest"]["sparse_reorder"]["peak_sram_bytes"]},
                     "int8_grads": {"full_over_sparse_reorder": w["full"]["peak_sram_bytes"]
                                      / w["sparse_reorder"]["peak_sram_bytes"],
                                      "reorder_off_over_on": w["sparse"]["peak_sram_bytes"]
                                      / w["sparse_reorder"]["peak_sram_bytes"]},
                     "int8_grads_stream_cap3": {
                         "full_over_sparse_reorder": w["full"]["peak_sram_bytes"]
                         / w["sparse_reorder_stream_cap3"]["peak_sram_bytes"],
                         "reorder_off_over_on": w["sparse_stream_cap3"]["peak_sram_bytes"]
                         / w["sparse_reorder_stream_cap3"]["peak_sram_bytes"]},
                     "paper": {"full_over_sparse_reorder": p_full / p_reorder,
                               "reorder_off_over_on": p_sparse / p_reorder}}
    return out


def accuracy_cost() -> dict[str, Any] | None:
    """paper-99kb with and without --int8-grads from benchmarks/cifar10_transfer.py's results, if it has run both."""
    f = RESULTS / "cifar10_transfer.json"
    if not f.is_file():
        return None
    d = json.loads(f.read_text())
    a, b = d["settings"].get("paper-99kb-int8-grads"), d["settings"].get("paper-99kb")
    if not (a and b and a.get("best_test_accuracy") and b.get("best_test_accuracy")):
        return None
    p = d["protocol"]
    return {"with": a["best_test_accuracy"], "without": b["best_test_accuracy"],
            "protocol": f"{p['model']} on CIFAR-10, {p['train_images']} training images, {p['epochs']} epochs, "
                        f"full test set"}


def acceptance_row(m: str, r: dict[str, Any], sparse_reorder: dict[str, Any], full: dict[str, Any],
                   sparse: dict[str, Any], ratios: dict[str, Any]) -> str:
    """One model's row against issue 4's targets: sparse+reorder vs the paper, full / sparse+reorder >= 20x, sparse
    (reorder off), off / on >= 2.4x."""
    sr = sparse_reorder["peak_sram_bytes"]
    full_ratio, off_on = ratios["full_over_sparse_reorder"], ratios["reorder_off_over_on"]
    return (f"| {m} | {kb(sr)} {'✓' if sr <= r['paper_kb']['sparse_reorder'] * 1024 else '✗'} | "
            f"{r['paper_kb']['sparse_reorder']} | {kb(full['peak_sram_bytes'])} | {full_ratio:.1f}x "
            f"{'✓' if full_ratio >= 20 else '✗'} | {kb(sparse['peak_sram_bytes'])} | {off_on:.2f}x "
            f"{'✓' if off_on >= 2.4 else '✗'} |")


def markdown(res: dict[str, Any]) -> str:
    models = list(res["models"])
    lines = ["# Planned peak SRAM of one training step (batch 1, 128x128, 10 classes, SGD)\n",
             f"`{res['command']}` on {res['date']} (git {res['git']}). KB = bytes / 1024. Peak SRAM = planned arena "
             "+ resident state (trainable int8 weight slices, int32 biases, fp32 head). Float32 activation "
             "gradients unless marked --int8-grads.\n",
             "## Acceptance (issue 4)\n",
             "| model | scheme | sparse+reorder | paper | full (reorder off) | full / sparse+reorder | "
             "sparse (reorder off) | off / on |",
             "|---|---|---|---|---|---|---|---|"]
    for m in models:
        r = res["models"][m]
        g, ra = r["grid"], r["ratios"]
        lines.append(f"| {m} | {r['scheme']} | {kb(g['reorder_on_patch_on']['peak_sram_bytes'])} | "
                     f"{r['paper_kb']['sparse_reorder']} | {kb(r['full']['reorder_off']['peak_sram_bytes'])} | "
                     f"{ra['full_over_sparse_reorder']:.1f}x (paper {ra['paper']['full_over_sparse_reorder']:.1f}x, "
                     f"target >= 20x) | {kb(g['reorder_off_patch_on']['peak_sram_bytes'])} | "
                     f"{ra['reorder_off_over_on']:.2f}x (paper {ra['paper']['reorder_off_over_on']:.2f}x, "
                     f"target >= 2.4x) |")
    lines += ["", "### Float32 gradients (the paper's own setting), lowest-memory levers: `--stream-input "
              "--max-recompute 3`\n",
              "The full update is planned with every lever that applies to it (channel-serial block backward "
              "included where it lowers its peak; it has no frozen stage to stream). The last column but one is the "
              "full update planned without the channel-serial block backward, for comparison.\n",
              "| model | sparse+reorder | paper | full (reorder off) | full / sparse+reorder | sparse (reorder off) | "
              "off / on | full without block backward / sparse+reorder |", "|---|---|---|---|---|---|---|---|"]
    for m in models:
        r = res["models"][m]
        lo, ra = r["fp32_lowest"], r["ratios"]["fp32_stream_cap3"]
        lines.append(acceptance_row(m, r, lo["sparse_reorder"], r["full"]["reorder_off"], lo["sparse"], ra)
                     + f" {ra['full_no_block_backward_over_sparse_reorder']:.1f}x |")
    lines += ["", "### With the lowest-memory configuration: `--int8-grads --stream-input --max-recompute 3`\n",
              "Both sides of each ratio use the same levers (the full update has no frozen stage to stream, so its "
              "side is `--int8-grads`, reorder off). `benchmarks/results/device_memory.md` measures these "
              "configurations in the generated C on the emulated Cortex-M4.\n",
              "| model | sparse+reorder | paper | full (reorder off) | full / sparse+reorder | sparse (reorder off) | "
              "off / on |", "|---|---|---|---|---|---|---|"]
    for m in models:
        r = res["models"][m]
        w = r["int8_grads"]
        lines.append(acceptance_row(m, r, w["sparse_reorder_stream_cap3"], w["full"], w["sparse_stream_cap3"],
                                    r["ratios"]["int8_grads_stream_cap3"]))
    lines += ["", "### A higher recompute cap: `--stream-input --max-recompute 5`\n",
              "The patch stage may then recompute its halos up to 5x (the step's MACs in brackets: the extra work "
              "the chosen stage costs); the full update has no stage, so its side is unchanged.\n",
              "| model | float32 gradients | full / sparse+reorder | --int8-grads | full / sparse+reorder |",
              "|---|---|---|---|---|"]
    for m in models:
        r = res["models"][m]
        f5, q5 = r["fp32_lowest"]["sparse_reorder_cap5"], r["int8_grads"]["sparse_reorder_stream_cap5"]
        rf = r["full"]["reorder_off"]["peak_sram_bytes"] / f5["peak_sram_bytes"]
        rq = r["int8_grads"]["full"]["peak_sram_bytes"] / q5["peak_sram_bytes"]
        cells = []
        for e, ratio in ((f5, rf), (q5, rq)):
            p = e["patch"]
            cells += [f"{kb(e['peak_sram_bytes'])} (+{100 * p['step_overhead']:.0f}% MACs)",
                      f"{ratio:.1f}x {'✓' if ratio >= 20 else '✗'}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "### With `--recompute-blocks` as well (`--stream-input --max-recompute 3 --recompute-blocks`)\n",
              "pw1's and dw's outputs are recomputed channel by channel in the block backward instead of keeping "
              "their masks (and dw's saved input). It applies to the full update too, which it shrinks more (its "
              "masks and saved expanded inputs are far larger), so with the same levers on both sides the ratio "
              "falls: the limit is the full update's weights plus all its weight gradients at once (reorder off) "
              "over the sparse step's resident state.\n",
              "| model | gradients | sparse+reorder | +% step MACs | full (reorder off) | full / sparse+reorder | "
              "sparse (reorder off) | off / on | limit: full floor / sparse state |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        r = res["models"][m]
        for key, label in (("fp32", "float32"), ("int8_grads", "int8")):
            e = r["recompute_blocks"][key]
            sr, f, s_ = (e[k]["peak_sram_bytes"] for k in ("sparse_reorder", "full", "sparse"))
            bb = e["sparse_reorder"].get("block_backward") or {}
            floor = e["full"].get("floor_bytes", 0)
            lines.append(f"| {m} | {label} | {kb(sr)} | +{100 * bb.get('step_overhead', 0):.1f}% | {kb(f)} | "
                         f"{f / sr:.1f}x {'✓' if f / sr >= 20 else '✗'} | {kb(s_)} | {s_ / sr:.2f}x | "
                         f"{kb(floor)} / {kb(e['sparse_reorder']['state_bytes'])} = "
                         f"{floor / e['sparse_reorder']['state_bytes']:.1f}x |")
    acc = accuracy_cost()
    if acc:
        lines.append(f"\nAccuracy cost of `--int8-grads` ({acc['protocol']}, best of the learning-rate sweep): "
                     f"paper-99kb {acc['with']:.2%} with int8 gradients vs {acc['without']:.2%} with float32 "
                     f"gradients ({100 * (acc['with'] - acc['without']):+.2f} points).")
    lines += ["", "## Reorder x patch (default levers otherwise), and full update\n",
              "| model | reorder on, patch on | reorder on, patch off | reorder off, patch on | "
              "reorder off, patch off | full, reorder off | full, reorder on | paper full / sparse / sparse+reorder |",
              "|---|---|---|---|---|---|---|---|"]
    for m in models:
        r = res["models"][m]
        g = r["grid"]
        cells = [kb(g[f"reorder_{a}_patch_{b}"]["peak_sram_bytes"]) for a in ("on", "off") for b in ("on", "off")]
        p = r["paper_kb"]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {kb(r['full']['reorder_off']['peak_sram_bytes'])} | "
                     f"{kb(r['full']['reorder_on']['peak_sram_bytes'])} | {p['full']} / {p['sparse']} / "
                     f"{p['sparse_reorder']} |")
    lines += ["", "## Lever by lever (cumulative, reorder on): peak SRAM KB (arena + state), where the peak is\n",
              "| lever | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for i, (name, _) in enumerate(LEVERS):
        cells = []
        for m in models:
            e = res["models"][m]["levers"][i]
            ph = e["arena_live_peak_by_phase"]
            cells.append(f"**{kb(e['peak_sram_bytes'])}** = {kb(e['arena_bytes'])} + {kb(e['state_bytes'])}, at "
                         f"{e['peak_op']} (live fwd {kb(ph.get('forward', 0))} / bwd {kb(ph.get('backward', 0))})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for key, label in (("sparse_reorder", "--int8-grads (default levers)"),
                       ("sparse_reorder_stream_cap3", "--int8-grads + --stream-input + cap 3x")):
        cells = [f"{kb(res['models'][m]['int8_grads'][key]['peak_sram_bytes'])} at "
                 f"{res['models'][m]['int8_grads'][key]['peak_op']}" for m in models]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| paper, sparse+reorder | " + " | ".join(str(res["models"][m]["paper_kb"]["sparse_reorder"])
                                                        for m in models) + " |")
    lines += ["", "Ratios with other planners and options (both sides of a ratio use the same levers):\n",
              "| model | full (naive planner) / sparse+reorder | --int8-grads: full / sparse+reorder, off / on | "
              "--int8-grads + stream + cap 3x: full / sparse+reorder, off / on |", "|---|---|---|---|"]
    for m in models:
        ra = res["models"][m]["ratios"]
        a, b = ra["int8_grads"], ra["int8_grads_stream_cap3"]
        lines.append(f"| {m} | {ra['full_naive_planner_over_sparse_reorder']:.1f}x | "
                     f"{a['full_over_sparse_reorder']:.1f}x, {a['reorder_off_over_on']:.2f}x | "
                     f"{b['full_over_sparse_reorder']:.1f}x, {b['reorder_off_over_on']:.2f}x |")
    lines += ["", "## Live at the peak (default levers, reorder on)\n"]
    for m in models:
        e = res["models"][m]["grid"]["reorder_on_patch_on"]
        live = ", ".join(f"{t} {kb(b)}" for t, b in e["live_at_peak"][:6])
        lines.append(f"- **{m}** at `{e['peak_op']}` ({e['peak_phase']}): {live}; by role "
                     + ", ".join(f"{k} {kb(v)}" for k, v in e["arena_by_role"].items()))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(PAPER), choices=list(PAPER))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--render", action="store_true", help="only rewrite memory.md from the saved memory.json")
    args = ap.parse_args(argv)
    if args.render:
        (args.out / "memory.md").write_text(markdown(json.loads((args.out / "memory.json").read_text())))
        return 0
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=False).stdout.strip() or "unknown"
    except OSError:
        git = "unknown"
    res = {"command": " ".join(["python", "benchmarks/memory.py", *(argv if argv is not None else sys.argv[1:])]),
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "git": git,
           "models": {m: run_model(m) for m in args.models}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "memory.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
