"""Issue 12's acceptance fuzzing run: N mutated inputs per loader (default 10,000) through every loader of untrusted
files: model JSON / NPZ / PKL, scheme files and state files (host readers), and the C program's record and state
files (the harness built with AddressSanitizer + UBSan, one forked child per input). Writes
benchmarks/results/fuzz.json: per loader the inputs, how many loaded, how many were refused with one line, and every
finding (a traceback, a multi-line error, a hang, code execution, a signal or a sanitizer report).

    python benchmarks/fuzz.py [--n 10000] [--seed 12] [--loaders json,npz,...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from microtrain.codegen.project import toolchain
from microtrain.fuzz import LOADERS, Loaders, make_c_project, run_loader, tiny_graph

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--loaders", default=",".join(LOADERS))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fuzz.json"))
    a = ap.parse_args()
    names = [n for n in a.loaders.split(",") if n]
    results = {"command": "python benchmarks/fuzz.py " + " ".join(sys.argv[1:]), "n": a.n, "seed": a.seed,
               "loaders": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        loaders = Loaders(tiny_graph(), work / "py")
        c = make_c_project(work / "c", REPO / "tests" / "c" / "fuzz_harness.c") if toolchain("host") is None else None
        for name in names:
            if name.startswith("c-") and c is None:
                results["loaders"][name] = {"skipped": "no host C toolchain"}
                continue
            t0 = time.perf_counter()
            t = run_loader(name, a.n, loaders, c, work / name, a.seed)
            results["loaders"][name] = {"inputs": t.total, "loaded": t.loaded, "refused_one_line": t.refused,
                                        "findings": len(t.findings), "examples": t.findings[:20],
                                        "seconds": round(time.perf_counter() - t0, 1)}
            print(f"{name}: {t.total} inputs, {t.loaded} loaded, {t.refused} refused with one line, "
                  f"{len(t.findings)} findings ({time.perf_counter() - t0:.0f} s)", flush=True)
    Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    return 1 if any(r.get("findings") for r in results["loaders"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
