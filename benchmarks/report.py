"""Our results beside the paper's, in one page: builds docs/results.md and its figures (docs/figures/*.png) from the
committed benchmark results (benchmarks/results/*.json), so a reader sees at a glance how we compare.

    python benchmarks/report.py                      # from the committed results (seconds)
    python benchmarks/report.py --rerun defaults     # re-measure first (names below, or 'cheap' / 'all'), then build

Every number comes from a results file (which records the command that measured it and, where it does, the commit);
the paper's numbers are PAPER.md's (the paper's tables and text). Every figure names, inside the image and in its
caption, the command and the commit that made it and the results file it was drawn from. A section whose results
file is missing says so and names the command that makes it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# name -> (results file, command that re-measures it, about how long it takes on a 2-core CPU)
BENCHMARKS: dict[str, tuple[str, str, str]] = {
    "defaults": ("defaults.json", "python benchmarks/defaults.py", "~30 min"),
    "qas_datasets": ("qas_datasets.json", "python benchmarks/qas_datasets.py", "~10 min"),
    "batch_size": ("batch_size.json", "python benchmarks/batch_size.py", "~15 min"),
    "pytorch_memory": ("pytorch_memory.json", "python benchmarks/pytorch_memory.py", "~1 min"),
    "search_curves": ("search_curves.json", "python benchmarks/search_curves.py", "~1 min"),
    "memory": ("memory.json", "python benchmarks/memory.py", "~10 min"),
    "device_speed": ("device_speed.json", "python benchmarks/device_speed.py", "~15 min, needs QEMU"),
    "cifar10_transfer": ("cifar10_transfer.json", "python benchmarks/cifar10_transfer.py", "hours"),
    "search_transfer": ("search_transfer.json", "python benchmarks/search_transfer.py --lrs 0.01,0.03,0.1", "~1 h"),
}
CHEAP = ("pytorch_memory", "search_curves")
MODELS = ("mbv2-w0.35", "proxyless-w0.3", "mcunet-5fps")

# The paper's numbers (PAPER.md, from the paper's Table 1, Fig. 9, Fig. 10 and text).
PAPER_QAS_CIFAR10 = {"fp32": 86.0, "int8": 75.4, "int8-qas": 86.9}  # MCUNet-5FPS, last two blocks, SGD-M, 50 epochs
PAPER_FLOWERS = {"sparse 100 KB": (100.0, 88.84), "last-12": (448.0, 87.74)}  # (extra KB, accuracy %)
PAPER_LATENCY_MS = {  # STM32F746, per training step: TF-Lite full (projected), TF-Lite sparse, TTE sparse
    "mbv2-w0.35": (8501, 3448, 373), "proxyless-w0.3": (10523, 4111, 443), "mcunet-5fps": (13398, 5607, 546)}
PAPER_PYTORCH_MB = 303  # MobileNetV2-w0.35, 128x128, batch 1


def git(*args: str) -> str:
    r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip()


def load(results: Path | None, name: str, file: str | None = None) -> dict[str, Any] | None:
    """A results file (`file`, else the benchmark's own): from `results` when given, else as committed at HEAD (not
    the working tree, where another benchmark may be half-way through rewriting it)."""
    file = file or BENCHMARKS[name][0]
    if results is None:
        r = subprocess.run(["git", "show", f"HEAD:benchmarks/results/{file}"], cwd=ROOT, capture_output=True,
                           text=True)
        return json.loads(r.stdout) if r.returncode == 0 else None
    path = results / file
    return json.loads(path.read_text()) if path.is_file() else None


def src_commit(data: dict[str, Any]) -> str:
    """The commit a results file says it was measured at (its own key, or that of its rows), else 'not recorded'."""
    for k in ("commit", "git"):
        if data.get(k):
            return str(data[k])
    for row in (data.get("settings") or {}).values():
        if isinstance(row, dict) and row.get("commit"):
            return str(row["commit"])
    return "not recorded"


def src_command(data: dict[str, Any], name: str) -> str:
    return str(data.get("command") or BENCHMARKS[name][1])


class Report:
    """Collects the markdown and writes the figures, each stamped with the command and the commit that made it."""

    def __init__(self, results: Path | None, out: Path, command: str):
        self.results, self.out, self.command = results, out, command
        self.figdir = out / "figures"
        self.figdir.mkdir(parents=True, exist_ok=True)
        self.commit = git("rev-parse", "--short", "HEAD") or "unknown"
        self.md: list[str] = []

    def add(self, *lines: str) -> None:
        self.md.extend(lines)

    def figure(self, fig: Any, stem: str, caption: str, sources: list[str]) -> None:
        """Saves fig as docs/figures/<stem>.png with a footer naming the report command, its commit and the data."""
        data = "; ".join(sources)
        stamp = f"made by `{self.command}` at commit {self.commit} from {data}"
        fig.text(0.01, 0.005, "\n".join(_wrap(stamp.replace("`", ""), 150)), fontsize=6, va="bottom", color="0.35")
        fig.savefig(self.figdir / f"{stem}.png", dpi=110, metadata={"Software": None})
        plt.close(fig)
        self.add(f"![{caption}](figures/{stem}.png)", "", f"*{caption}* — {stamp}.", "")

    def missing(self, name: str) -> None:
        self.add(f"*Not measured yet: `{BENCHMARKS[name][1]}` writes `benchmarks/results/{BENCHMARKS[name][0]}` "
                 f"({BENCHMARKS[name][2]}).*", "")

    def source(self, name: str, data: dict[str, Any]) -> str:
        return (f"`benchmarks/results/{BENCHMARKS[name][0]}` (measured by `{src_command(data, name)}`, commit "
                f"{src_commit(data)})")


def _wrap(text: str, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    return lines + [cur]


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


# ------------------------------------------------------------------------------------------------------ sections

def section_defaults(r: Report) -> None:
    r.add("## Accuracy with the defaults (`--lr auto`)", "")
    d = load(r.results, "defaults")
    if d is None:
        return r.missing("defaults")
    r.add(f"`{d['protocol']['command_prefix']} ...`: mcunet-5fps, 5,000 CIFAR-10 training images, 3 epochs, the "
          "full test set, no `--lr` (the rate is chosen on a validation slice of the training images), every other "
          f"option at its default. Data: {r.source('defaults', d)}.", "",
          "| setting | test accuracy % | chosen lr | candidates (validation accuracy %) | selection s | run s | "
          "selection share of wall time | of CPU time |", "|---|---|---|---|---|---|---|---|")
    for name, s in d["settings"].items():
        m = s["metrics"]
        sel = m.get("lr_selection") or {}
        cands = ", ".join(f"{c['lr']:g}: " + (pct(c["val_accuracy"]) if c["status"] == "completed" else "diverged")
                          for c in sel.get("candidates", []))
        share, cpu = sel.get("fraction_of_total"), sel.get("cpu_fraction_of_total")
        r.add(f"| {name} | {pct(m['test_accuracy'])} | {m['lr']:g} | {cands} | {sel.get('seconds', 0):.0f} | "
              f"{sel.get('run_seconds', 0):.0f} | {'—' if share is None else f'{100 * share:.1f}%'} | "
              f"{'—' if cpu is None else f'{100 * cpu:.1f}%'} |")
    a = d.get("acceptance")
    if a:
        ok = lambda b: "✓" if b else "✗"  # noqa: E731
        r.add("", f"Acceptance (issue 15): int8 + QAS − no-QAS = {a['qas_minus_noqas_points']:+.2f} points (≥ +3 "
                  f"{ok(a['qas_beats_noqas_by_3'])}); int8 + QAS − fp32 = {a['qas_minus_fp32_points']:+.2f} (≥ −2 "
                  f"{ok(a['qas_within_2_of_fp32'])}); paper-99kb − last:6 = {a['paper99kb_minus_last6_points']:+.2f} "
                  f"(≥ 0 {ok(a['paper99kb_at_least_last6'])}).")
    margins = {0: a["qas_minus_noqas_points"]} if a else {}
    for seed in (1, 2, 3, 4):  # the same two commands with --seed N (python benchmarks/defaults.py --seed N ...)
        e = load(r.results, "defaults", f"defaults-seed{seed}.json")
        acc = {k: (v.get("metrics") or {}).get("test_accuracy") for k, v in ((e or {}).get("settings") or {}).items()}
        if acc.get("last6-int8-qas") is not None and acc.get("last6-int8-noqas") is not None:
            margins[seed] = round(100 * (acc["last6-int8-qas"] - acc["last6-int8-noqas"]), 2)
            lrs = {k: e["settings"][k]["metrics"]["lr"] for k in ("last6-int8-qas", "last6-int8-noqas")}
            r.add("", f"Seed {seed} (`defaults-seed{seed}.json`): int8 + QAS {pct(acc['last6-int8-qas'])} (lr "
                      f"{lrs['last6-int8-qas']:g}), no-QAS {pct(acc['last6-int8-noqas'])} (lr "
                      f"{lrs['last6-int8-noqas']:g}): {margins[seed]:+.2f} points.")
    if len(margins) > 1:
        r.add("", f"QAS − no-QAS over seeds {', '.join(map(str, margins))}: mean "
                  f"{sum(margins.values()) / len(margins):+.2f} points (one standard error of one run's test "
                  f"accuracy on 10,000 images is ~0.5 points).")
    r.add("")
    section_batch_size(r)


def section_batch_size(r: Report) -> None:
    """Why the default batch is what it is: the defaults protocol at several batch sizes, QAS and no-QAS."""
    b = load(r.results, "batch_size")
    if b is None:
        return r.missing("batch_size")
    rows = b["rows"]
    sizes = sorted({row["batch_size"] for row in rows})
    margins = ", ".join(f"{k}: {v:+.2f}" for k, v in b["qas_minus_noqas_points"].items())
    r.add("### Batch size", "", f"The same protocol at batch {' / '.join(map(str, reversed(sizes)))}, `--lr auto` "
          f"each; data: {r.source('batch_size', b)}. QAS − no-QAS by batch: {margins} points.", "")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for mode in ("int8-qas", "int8-noqas"):
        pts = sorted((row["batch_size"], 100 * row["test_accuracy"]) for row in rows if row["mode"] == mode)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(x) for x in sizes])
    ax.set_xlabel("batch size (images per step)")
    ax.set_ylabel("test accuracy %")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.subplots_adjust(bottom=0.22)
    r.figure(fig, "batch_size", "CIFAR-10 test accuracy against batch size (mcunet-5fps last:6, 5,000 images, "
             "3 epochs, --lr auto)", [f"benchmarks/results/{BENCHMARKS['batch_size'][0]}"])


def section_qas(r: Report) -> None:
    r.add("## Quantization-Aware Scaling (the paper's Table 1)", "")
    d, t, q = load(r.results, "defaults"), load(r.results, "cifar10_transfer"), load(r.results, "qas_datasets")
    r.add("mcunet-5fps, last two blocks (`last:6`) trained, SGD without momentum. fp32 = the float relaxation of the "
          "same graph; int8 = the int8 graph without QAS; int8 + QAS = ours by default. The paper trains with "
          "SGD-M for 50 epochs on the full datasets (it has no Fashion-MNIST or face rows).", "",
          "| dataset | protocol | fp32 % | int8 % | int8 + QAS % | paper fp32 / int8 / int8 + QAS % | source |",
          "|---|---|---|---|---|---|---|")
    rows: list[tuple[str, dict[str, float | None]]] = []
    paper = " / ".join(f"{PAPER_QAS_CIFAR10[k]:.1f}" for k in ("fp32", "int8", "int8-qas"))
    if d:
        acc = {k: (d["settings"].get(n) or {}).get("metrics", {}).get("test_accuracy")
               for k, n in (("fp32", "last6-fp32"), ("int8", "last6-int8-noqas"), ("int8-qas", "last6-int8-qas"))}
        rows.append(("CIFAR-10 (defaults)", acc))
        r.add(f"| CIFAR-10 | 5,000 images, 3 epochs, `--lr auto` | {pct(acc['fp32'])} | {pct(acc['int8'])} | "
              f"{pct(acc['int8-qas'])} | {paper} | defaults.json |")
    if t:
        s = t["settings"]
        acc = {k: (s.get(n) or {}).get("best_test_accuracy") for k, n in
               (("fp32", "last2blocks-fp32"), ("int8", "last2blocks-int8-noqas"), ("int8-qas", "last2blocks-int8-qas"))}
        rows.append(("CIFAR-10 (lr swept)", acc))
        r.add(f"| CIFAR-10 | 10,000 images, 5 epochs, best of an lr sweep | {pct(acc['fp32'])} | {pct(acc['int8'])} "
              f"| {pct(acc['int8-qas'])} | {paper} | cifar10_transfer.json |")
    if q:
        for data, modes in q["rows"].items():
            acc = {k: (modes.get(k) or {}).get("test_accuracy") for k in ("fp32", "int8", "int8-qas")}
            any_row = next(iter(modes.values()))
            rows.append((data, acc))
            r.add(f"| {data} | {any_row['train_images']:,} images, {any_row['epochs']} epochs, "
                  f"{any_row['test_images']:,} test, `--lr auto` | {pct(acc['fp32'])} | {pct(acc['int8'])} | "
                  f"{pct(acc['int8-qas'])} | — (not in the paper) | qas_datasets.json |")
    if not rows:
        return r.missing("qas_datasets")
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.2
    for j, (mode, color) in enumerate((("fp32", "#888"), ("int8", "#d62728"), ("int8-qas", "#1f77b4"))):
        xs = [i + (j - 1) * width for i in range(len(rows))]
        ax.bar(xs, [100 * (a[mode] or 0) for _, a in rows], width, color=color,
               label={"fp32": "fp32", "int8": "int8 (no QAS)", "int8-qas": "int8 + QAS"}[mode])
        ax.scatter([i + (j - 1) * width for i, (n, _) in enumerate(rows) if n.startswith("CIFAR")],
                   [PAPER_QAS_CIFAR10[mode] for n, _ in rows if n.startswith("CIFAR")], marker="_", s=300,
                   color="k", zorder=3, label="paper (SGD-M, 50 epochs)" if j == 0 else None)
    ax.set_xticks(range(len(rows)), [n for n, _ in rows], fontsize=8)
    ax.set_ylabel("test accuracy %")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.set_title("QAS: fp32 / int8 / int8 + QAS, mcunet-5fps last two blocks", fontsize=9)
    fig.subplots_adjust(bottom=0.2)
    used = [f"benchmarks/results/{BENCHMARKS[n][0]}" for n, x in (("defaults", d), ("cifar10_transfer", t),
                                                                  ("qas_datasets", q)) if x]
    r.add("")
    r.figure(fig, "qas", "QAS table as bars; black ticks: the paper's CIFAR-10 numbers", used)
    if q:
        r.add(f"Fashion-MNIST and faces: {r.source('qas_datasets', q)}; each row's command is in the file.", "")


def section_sparse(r: Report) -> None:
    r.add("## Accuracy vs extra memory: sparse update, last-k layers, bias only (the paper's Fig. 9)", "")
    t, st = load(r.results, "cifar10_transfer"), load(r.results, "search_transfer")
    if t is None:
        return r.missing("cifar10_transfer")
    kinds = {"paper-99kb": "sparse", "paper-99kb-int8-grads": "sparse", "last2blocks-int8-qas": "last-k",
             "last12": "last-k", "bias-22": "bias-only", "bias-only": "bias-only"}
    labels = {"last2blocks-int8-qas": "last:6", "last12": "last:12", "paper-99kb-int8-grads": "paper-99kb int8 grads"}
    pts = [(labels.get(n, n), kinds[n], s["analytic_extra_bytes"] / 1024, s["best_test_accuracy"], s["best_lr"])
           for n, s in t["settings"].items() if n in kinds and s.get("best_test_accuracy") is not None]
    if st:
        pts.append(("searched 100 KB", "sparse", st["search"]["analytic_extra_bytes"] / 1024,
                    st["searched"]["best_test_accuracy"], st["searched"]["best_lr"]))
    r.add(f"CIFAR-10, mcunet-5fps int8 + QAS, {t['protocol']['train_images']:,} images, {t['protocol']['epochs']} "
          f"epochs, the best of an lr sweep per scheme; extra memory = the paper's analytic model. Data: "
          f"{r.source('cifar10_transfer', t)}" + (f" and {r.source('search_transfer', st)}" if st else "") + ". The "
          "paper's figure is on Flowers-102 (sparse 100 KB 88.84%, last-12 87.74% at 448 KB, full update 1.09%: "
          "diverged); its shape — sparse at least as accurate as last-k with several times less memory — is what to "
          "compare.", "", "| scheme | kind | extra KB | test accuracy % | best lr |", "|---|---|---|---|---|")
    for name, kind, kb, acc, lr in sorted(pts, key=lambda p: p[2]):
        r.add(f"| {name} | {kind} | {kb:.1f} | {pct(acc)} | {lr:g} |")
    r.add("| paper (Flowers-102): sparse 100 KB / last-12 | | 100 / 448 | 88.84 / 87.74 | |", "")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    colors = {"sparse": "#1f77b4", "last-k": "#ff7f0e", "bias-only": "#2ca02c"}
    for name, kind, kb, acc, _ in pts:
        a1.scatter(kb, 100 * acc, color=colors[kind], s=40)
        a1.annotate(name, (kb, 100 * acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for kind, c in colors.items():
        a1.scatter([], [], color=c, label=kind)
    a1.set(xlabel="extra memory, KB (analytic)", ylabel="test accuracy %", title="ours: CIFAR-10")
    a1.legend(fontsize=7)
    for name, (kb, acc) in PAPER_FLOWERS.items():
        a2.scatter(kb, acc, color=colors["sparse" if "sparse" in name else "last-k"], s=40)
        a2.annotate(name, (kb, acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
    a2.set(xlabel="extra memory, KB", title="paper: Flowers-102")
    for a in (a1, a2):
        a.title.set_fontsize(9)
    fig.subplots_adjust(bottom=0.22, wspace=0.3)
    r.figure(fig, "sparse_vs_memory", "accuracy vs extra memory (sparse / last-k / bias-only), ours and the paper's",
             [f"benchmarks/results/{BENCHMARKS[n][0]}" for n, x in (("cifar10_transfer", t), ("search_transfer", st))
              if x])


def section_memory(r: Report) -> None:
    r.add("## Peak memory of one training step: full / sparse / sparse + reorder (the paper's Fig. 10a)", "")
    m = load(r.results, "memory")
    if m is None:
        return r.missing("memory")
    r.add(f"Planned peak SRAM (arena + trainable state), batch 1, 128x128, the model's 100 KB paper scheme; full = "
          f"every weight trained, reordering off; sparse = reordering off; sparse + reorder = our default. Data: "
          f"{r.source('memory', m)}.", "",
          "| model | full KB (paper) | sparse KB (paper) | sparse + reorder KB (paper) | "
          "full / sparse+reorder (paper) |",
          "|---|---|---|---|---|")
    vals = {}
    for model in MODELS:
        v = m["models"].get(model)
        if not v:
            continue
        ours = (v["full"]["reorder_off"]["peak_sram_bytes"] / 1024, v["grid"]["reorder_off_patch_on"]["peak_sram_bytes"]
                / 1024, v["grid"]["reorder_on_patch_on"]["peak_sram_bytes"] / 1024)
        pap = (v["paper_kb"]["full"], v["paper_kb"]["sparse"], v["paper_kb"]["sparse_reorder"])
        vals[model] = (ours, pap)
        r.add(f"| {model} ({v['scheme']}) | {ours[0]:.0f} ({pap[0]}) | {ours[1]:.0f} ({pap[1]}) | {ours[2]:.1f} "
              f"({pap[2]}) | {ours[0] / ours[2]:.1f}x ({pap[0] / pap[2]:.1f}x) |")
    r.add("")
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.13
    for i, (ours, pap) in enumerate(vals.values()):
        for j, (label, c) in enumerate((("full", "#d62728"), ("sparse", "#ff7f0e"), ("sparse+reorder", "#1f77b4"))):
            x = i + (j - 1) * 2 * width
            ax.bar(x - width / 2, ours[j], width, color=c, label=label if i == 0 else None)
            ax.bar(x + width / 2, pap[j], width, color=c, alpha=0.35, hatch="//",
                   label=f"{label} (paper)" if i == 0 else None)
    ax.axhline(256, color="k", lw=0.8, ls="--")
    ax.text(len(vals) - 0.5, 270, "256 KB", fontsize=7, ha="right")
    ax.set_yscale("log")
    ax.set_xticks(range(len(vals)), list(vals), fontsize=8)
    ax.set_ylabel("peak memory, KB (log)")
    ax.set_ylim(top=ax.get_ylim()[1] * 4)  # room for the legend
    ax.legend(fontsize=6, ncol=3)
    ax.set_title("peak memory per training step: ours (solid) vs the paper (hatched)", fontsize=9)
    fig.subplots_adjust(bottom=0.2)
    r.figure(fig, "memory", "peak memory, full / sparse / sparse + reorder per model",
             ["benchmarks/results/memory.json"])


def section_speed(r: Report) -> None:
    r.add("## Training step on the device: instructions vs the paper's latency (the paper's Fig. 10c)", "")
    s = load(r.results, "device_speed")
    if s is None:
        return r.missing("device_speed")
    rows = [x for x in s["rows"] if x.get("config") == "default"]
    r.add(f"Cortex-M4 instructions per training step of the generated C (QEMU, `-icount`), the 100 KB paper scheme; "
          f"our milliseconds are an estimate at 216 MHz and one instruction per cycle (a real Cortex-M7 issues up to "
          f"two). The paper measures milliseconds on an STM32F746 (216 MHz). Data: {r.source('device_speed', s)}.",
          "", "| model | scheme | our M instructions / step | our est. ms | paper TTE ms (M cycles) | paper TF-Lite "
          "sparse / full ms |", "|---|---|---|---|---|---|")
    for x in rows:
        full, sparse, _tte = PAPER_LATENCY_MS[x["model"]]
        r.add(f"| {x['model']} | {x['scheme']} | {x['m4_instructions_per_step'] / 1e6:.1f} | "
              f"{x['est_ms_at_216mhz_one_instruction_per_cycle']:.0f} | {x['paper_ms_stm32f746']:.0f} "
              f"({x['paper_cycles'] / 1e6:.1f}) | {sparse} / {full} |")
    others = [x for x in s["rows"] if x.get("config") != "default"]
    if others:
        r.add("", "Other configurations: " + "; ".join(
            f"{x['model']} `{x['config']}` {x['m4_instructions_per_step'] / 1e6:.1f}M" for x in others) + ".")
    r.add("")
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.2
    for i, x in enumerate(rows):
        full, sparse, _ = PAPER_LATENCY_MS[x["model"]]
        ax.bar(i - 1.5 * width, x["est_ms_at_216mhz_one_instruction_per_cycle"], width, color="#1f77b4",
               label="ours (M4 instructions at 216 MHz)" if i == 0 else None)
        ax.bar(i - 0.5 * width, x["paper_ms_stm32f746"], width, color="#1f77b4", alpha=0.35, hatch="//",
               label="paper TTE sparse" if i == 0 else None)
        ax.bar(i + 0.5 * width, sparse, width, color="#ff7f0e", alpha=0.5, label="paper TF-Lite sparse" if i == 0
               else None)
        ax.bar(i + 1.5 * width, full, width, color="#d62728", alpha=0.5, label="paper TF-Lite full (projected)"
               if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), [x["model"] for x in rows], fontsize=8)
    ax.set_ylabel("ms per training step (log)")
    ax.set_ylim(top=ax.get_ylim()[1] * 4)  # room for the legend
    ax.legend(fontsize=6, ncol=2)
    ax.set_title("one training step on the microcontroller", fontsize=9)
    fig.subplots_adjust(bottom=0.2)
    r.figure(fig, "device_speed", "training step latency: ours (estimated from instructions) vs the paper's",
             ["benchmarks/results/device_speed.json"])


def section_search(r: Report) -> None:
    r.add("## Scheme search: evolution vs random (the paper's search curves)", "")
    c = load(r.results, "search_curves")
    if c is None:
        return r.missing("search_curves")
    r.add(f"Best summed contribution vs samples under an extra-memory budget: evolutionary search "
          f"({c['samples']} samples) against random search ({c['random_samples']}), seed {c['seed']}. Paper: "
          f"{c['paper']}. Data: {r.source('search_curves', c)}.", "",
          "| model | budget | evolution best | random best (4x samples) |", "|---|---|---|---|")
    for model, budgets in c["models"].items():
        for b, v in budgets.items():
            r.add(f"| {model} | {b} | {100 * v['evolution_best']:.2f} | {100 * v['random_best']:.2f} |")
    r.add("")
    fig, axes = plt.subplots(1, len(c["models"]), figsize=(10, 3.6), squeeze=False)
    for ax, (model, budgets) in zip(axes[0], c["models"].items(), strict=True):
        for (b, v), color in zip(budgets.items(), ("#1f77b4", "#ff7f0e", "#2ca02c"), strict=False):
            for kind, ls in (("evolution", "-"), ("random", "--")):
                pts = v[kind]
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], ls, color=color,
                        label=f"{b} {kind}" if kind == "evolution" else f"{b} random")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)  # the first random samples score far below zero; the race is above it
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("samples")
    axes[0][0].set_ylabel("best summed contribution, points")
    axes[0][-1].legend(fontsize=6)
    fig.subplots_adjust(bottom=0.24, wspace=0.3)
    r.figure(fig, "search_curves", "search curves: evolution (solid) vs random (dashed)",
             ["benchmarks/results/search_curves.json"])


def section_pytorch(r: Report) -> None:
    r.add("## PyTorch's memory for the same step", "")
    p, m = load(r.results, "pytorch_memory"), load(r.results, "memory")
    if p is None:
        return r.missing("pytorch_memory")
    r.add(f"{p['setting']}: what one autograd step adds to the process (peak resident set during the steps minus "
          f"before), and the whole process's peak (the kind of number the paper quotes: PyTorch "
          f"{p['paper']['pytorch_mb']} MB, TensorFlow {p['paper']['tensorflow_mb']} MB for mbv2-w0.35). Beside it "
          f"our planned peak SRAM of the same model's step. Data: {r.source('pytorch_memory', p)}"
          + (f" and {r.source('memory', m)}" if m else "") + ".", "",
          "| model | PyTorch step MB | PyTorch process MB (paper) | ours full KB | ours sparse + reorder KB | "
          "PyTorch process / ours |", "|---|---|---|---|---|---|")
    bars = []
    for row in p["rows"]:
        v = (m or {}).get("models", {}).get(row["model"])
        full = v["full"]["reorder_off"]["peak_sram_bytes"] if v else None
        sparse = v["grid"]["reorder_on_patch_on"]["peak_sram_bytes"] if v else None
        paper = f" ({p['paper']['pytorch_mb']})" if row["model"] == p["paper"]["model"] else ""
        ratio = "—" if sparse is None else f"{row['process_peak_bytes'] / sparse:.0f}x"
        r.add(f"| {row['model']} | {row['step_peak_bytes'] / 2**20:.1f} | {row['process_peak_bytes'] / 2**20:.0f}"
              f"{paper} | {'—' if full is None else f'{full / 1024:.0f}'} | "
              f"{'—' if sparse is None else f'{sparse / 1024:.1f}'} | "
              f"{ratio} |")
        bars.append((row["model"], row["process_peak_bytes"], row["step_peak_bytes"], full, sparse))
    r.add("")
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.18
    for i, (model, proc, step, full, sparse) in enumerate(bars):
        for j, (v, label, color) in enumerate(((proc, "PyTorch process peak", "#d62728"),
                                               (step, "PyTorch step", "#ff7f0e"), (full, "ours full", "#9467bd"),
                                               (sparse, "ours sparse + reorder", "#1f77b4"))):
            if v is not None:
                ax.bar(i + (j - 1.5) * width, v / 1024, width, color=color, label=label if i == 0 else None)
        if model == p["paper"]["model"]:
            ax.scatter(i - 1.5 * width, p["paper"]["pytorch_mb"] * 1024, marker="_", s=300, color="k", zorder=3,
                       label="paper: PyTorch")
    ax.set_yscale("log")
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("KB (log)")
    ax.set_ylim(top=ax.get_ylim()[1] * 8)  # room for the legend
    ax.legend(fontsize=6, ncol=3)
    ax.set_title("memory of one batch-1 training step", fontsize=9)
    fig.subplots_adjust(bottom=0.2)
    r.figure(fig, "pytorch_memory", "PyTorch's memory for the step vs ours",
             [f"benchmarks/results/{BENCHMARKS[n][0]}" for n, x in (("pytorch_memory", p), ("memory", m)) if x])


SECTIONS: list[Callable[[Report], None]] = [section_defaults, section_qas, section_sparse, section_memory,
                                            section_speed, section_search, section_pytorch]


def build(results: Path | None, out: Path, command: str) -> Path:
    """Writes out/results.md and out/figures/*.png from the results directory; returns the markdown's path."""
    r = Report(results, out, command)
    r.add("# Results: microtrain beside the paper", "",
          f"Regenerate with `{command}` (add `--rerun NAME ...` to re-measure first; names: "
          f"{', '.join(BENCHMARKS)}, or `cheap` / `all`). Built at commit {r.commit} on "
          f"{datetime.date.today().isoformat()} from `benchmarks/results/` as committed; the paper's numbers "
          "are from `../shared/PAPER.md` (the paper's tables and text).", "")
    for section in SECTIONS:
        section(r)
    path = out / "results.md"
    path.write_text("\n".join(r.md).rstrip() + "\n")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", help="results directory (default: benchmarks/results as committed at HEAD)")
    ap.add_argument("--out", default=str(ROOT / "docs"), help="where results.md and figures/ go (default docs)")
    ap.add_argument("--rerun", nargs="*", metavar="NAME",
                    help=f"re-measure these first: {', '.join(BENCHMARKS)}; 'cheap' = {', '.join(CHEAP)}; 'all'")
    args = ap.parse_args()
    if args.rerun is not None:
        names = list(BENCHMARKS) if "all" in args.rerun else [
            n for x in (args.rerun or ["cheap"]) for n in (CHEAP if x == "cheap" else [x])]
        for n in names:
            if n not in BENCHMARKS:
                ap.error(f"--rerun: unknown benchmark {n!r} (choose from {', '.join(BENCHMARKS)}, cheap, all)")
            cmd = BENCHMARKS[n][1]
            print(f"$ {cmd}  ({BENCHMARKS[n][2]})", flush=True)
            subprocess.run(shlex.split(cmd), cwd=ROOT, check=True)
    path = build(Path(args.results) if args.results else None, Path(args.out), "python benchmarks/report.py")
    print(f"wrote {path} and {Path(args.out) / 'figures'}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
