"""Peak SRAM on the emulated Cortex-M4, measured, next to the plan (issue 4: "the numbers `plan` prints are the ones
the device gets").

For every zoo model's paper scheme nearest 100 KB and each device configuration, runs
`microtrain compile --target cortex-m4 --run` (arm-none-eabi-gcc against the 256 KB SRAM / 1 MB flash linker script,
then --steps real CIFAR-10 images trained in QEMU's mps2-an386) and collects OUT_DIR/memory.json: the planned peak
(arena + state), .data + .bss of the ELF, the painted stack's high-water mark and their sum, flash, and the paper's
measured sparse+reorder figure.

    python benchmarks/device_memory.py [--steps 10] [--configs default int8-grads int8-grads-stream]

Writes benchmarks/results/device_memory.json (with every command) and device_memory.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODELS = {"mbv2-w0.35": ("paper-99kb", 141), "proxyless-w0.3": ("paper-98kb", 135), "mcunet-5fps": ("paper-99kb", 173)}
CONFIGS = {"default": [], "int8-grads": ["--int8-grads"],
           "int8-grads-stream": ["--int8-grads", "--stream-input", "--max-recompute", "3"],
           "stream": ["--stream-input", "--max-recompute", "3"],
           "int8-grads-stream-cap5": ["--int8-grads", "--stream-input", "--max-recompute", "5"],
           "stream-recompute": ["--stream-input", "--max-recompute", "3", "--recompute-blocks"],
           "int8-grads-stream-recompute": ["--int8-grads", "--stream-input", "--max-recompute", "3",
                                           "--recompute-blocks"]}


def kb(n: int) -> str:
    return f"{n / 1024:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--configs", nargs="*", default=["default", "int8-grads", "int8-grads-stream"],
                    choices=list(CONFIGS))
    ap.add_argument("--work", default=str(HERE.parent / "runs" / "device_memory"))
    args = ap.parse_args()
    rows = []
    for model, (scheme, paper) in MODELS.items():
        for name in args.configs:
            out = Path(args.work) / f"{model}-{name}"
            cmd = ["microtrain", "compile", "--model", model, "--scheme", scheme, "--target", "cortex-m4", "-o",
                   str(out), "--run", "--steps", str(args.steps), *CONFIGS[name]]
            print("$", shlex.join(cmd), flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            row = {"model": model, "scheme": scheme, "config": name, "command": shlex.join(cmd),
                   "paper_sparse_reorder_kb": paper}
            if proc.returncode:
                row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1]
                print("  ", row["error"], flush=True)
            else:
                mem = json.loads((out / "memory.json").read_text())
                row.update({k: mem[k] for k in ("planned_peak_sram_bytes", "arena_bytes", "state_bytes",
                                                "ram_bytes", "stack_bytes", "sram_total_bytes", "flash_bytes",
                                                "fits")})
                row["at_or_below_paper"] = mem["planned_peak_sram_bytes"] <= paper * 1024
                row["output"] = proc.stdout.strip().splitlines()
                print(f"   planned {kb(mem['planned_peak_sram_bytes'])} KB, device {kb(mem['sram_total_bytes'])} KB "
                      f"(RAM {kb(mem['ram_bytes'])} + stack {kb(mem['stack_bytes'])}), paper {paper}", flush=True)
            rows.append(row)
    res = {"command": shlex.join(["python", "benchmarks/device_memory.py", *sys.argv[1:]]),
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "device_memory.json").write_text(json.dumps(res, indent=1) + "\n")
    md = ["# Peak SRAM measured on the emulated Cortex-M4 (QEMU mps2-an386, 256 KB / 1 MB linker script)\n",
          f"`{res['command']}` on {res['date']}. KB = bytes / 1024. Device = .data + .bss of the ELF + the painted "
          f"stack's high-water mark after {args.steps} training steps on real CIFAR-10 images. Planned = arena + "
          "state, as `microtrain plan` prints it.\n",
          "| model | scheme | configuration | planned peak | device SRAM (RAM + stack) | flash "
          "| paper sparse+reorder |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['model']} | {r['scheme']} | {r['config']} | - | {r['error']} | - | "
                      f"{r['paper_sparse_reorder_kb']} |")
            continue
        ok = "✓" if r["at_or_below_paper"] else "✗"
        md.append(f"| {r['model']} | {r['scheme']} | {r['config']} | {kb(r['planned_peak_sram_bytes'])} {ok} | "
                  f"{kb(r['sram_total_bytes'])} ({kb(r['ram_bytes'])} + {kb(r['stack_bytes'])}) | "
                  f"{kb(r['flash_bytes'])} | {r['paper_sparse_reorder_kb']} |")
    md.append("\nConfigurations: " + "; ".join(f"{k}: `{' '.join(v) or '(none)'}`" for k, v in CONFIGS.items()
                                               if k in args.configs) + ".")
    (RESULTS / "device_memory.md").write_text("\n".join(md) + "\n")
    print(f"wrote {RESULTS / 'device_memory.json'} and device_memory.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
