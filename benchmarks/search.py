"""Scheme search benchmark (issue 6): evolutionary vs random search on the shipped contribution tables.

For every zoo model with a shipped contribution file:
- extra budgets 50 / 100 / 150 KB (the paper's analytic model): evolutionary best summed contribution with --samples
  samples vs random search with 4x as many, over several seeds; analytic memory and planned peak of the found scheme;
  wall time of the whole search;
- device budgets 256 / 192 KB (the planner's peak SRAM of the whole training step, no extra budget): the found
  scheme's planned peak.

    python benchmarks/search.py [--samples 2000] [--seeds 0,1,2] [--out search.json]

Contributions are shrunk by their estimated noise level first, as `microtrain search` does by default.
Writes benchmarks/results/search.json (with the command) and search-<model>.png (best score vs samples).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

from microtrain.frontends.zoo import ZOO_MODELS, load_model
from microtrain.sparse.contrib import Contributions, shipped_path
from microtrain.sparse.cost import kb
from microtrain.sparse.search import Space, planner_peak, plot_curves, search

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
KB = 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--models", nargs="*", default=list(ZOO_MODELS))
    ap.add_argument("--out", default="search.json", help="file name under benchmarks/results (plots: search-<model>"
                                                          "<suffix>.png, the suffix taken from this name)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out: dict = {"command": shlex.join(["python", "benchmarks/search.py", *sys.argv[1:]]),
                 "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                 "cpu_count": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                 "samples": args.samples, "random_samples": 4 * args.samples, "seeds": seeds, "models": {}}
    for m in args.models:
        if not shipped_path(m).is_file():
            print(f"{m}: no shipped contribution file, skipped", flush=True)
            continue
        g = load_model(m)
        contrib = Contributions.load(shipped_path(m))
        tau = contrib.noise()  # the CLI's default --shrink auto
        space = Space.build(g, contrib.shrunk(tau))
        peak = planner_peak(g)
        curves = []
        res: dict = {"contributions": {"file": f"src/microtrain/sparse/contrib/{m}.json",
                                       "command": contrib.meta.get("command")},
                     "shrink_points": round(100 * tau, 4),
                     "extra_budgets": {}, "device_budgets": {}}
        for extra in (50, 100, 150):
            runs = []
            for seed in seeds:
                t0 = time.perf_counter()
                r = search(space, extra_budget=extra * KB, samples=args.samples, seed=seed)
                wall = time.perf_counter() - t0
                runs.append({"seed": seed, "scheme": r.scheme.to_dict(), "evolution_best": round(r.score, 6),
                             "random_best": round(max(r.random.scores), 6),
                             "evolution_beats_random_4x": r.score > max(r.random.scores),
                             "analytic_extra_bytes": r.analytic_extra_bytes,
                             "analytic_extra_kb": float(kb(r.analytic_extra_bytes)),
                             "planned_peak_bytes": peak(r.scheme), "search_seconds": round(wall, 3),
                             "evolution_samples": r.evolution.samples, "random_samples": r.random.samples})
                if seed == seeds[0]:
                    curves.append((f"{extra} KB", r))
                    res.setdefault("paper_schemes", r.to_json(space)["paper_schemes"])
            res["extra_budgets"][f"{extra}KB"] = {"budget_bytes": extra * KB, "runs": runs,
                                                   "all_within_budget": all(x["analytic_extra_bytes"] <= extra * KB
                                                                            for x in runs),
                                                   "evolution_beats_random_4x_all_seeds":
                                                       all(x["evolution_beats_random_4x"] for x in runs)}
            best = runs[0]
            print(f"{m} extra {extra} KB: evolution {100 * best['evolution_best']:.2f} vs random(4x) "
                  f"{100 * best['random_best']:.2f}; scheme {best['analytic_extra_kb']} KB analytic, planned peak "
                  f"{kb(best['planned_peak_bytes'])} KB, {best['search_seconds']:.1f} s", flush=True)
        for dev in (256, 192):
            t0 = time.perf_counter()
            r = search(space, budget=dev * KB, samples=args.samples, seed=seeds[0], peak=peak)
            wall = time.perf_counter() - t0
            res["device_budgets"][f"{dev}KB"] = {
                "budget_bytes": dev * KB, "scheme": r.scheme.to_dict(), "score": round(r.score, 6),
                "planned_peak_bytes": r.planned_peak_bytes, "fits": r.planned_peak_bytes <= dev * KB,
                "analytic_extra_bytes": r.analytic_extra_bytes,
                "effective_extra_budget_bytes": r.effective_extra_budget,
                "rounds": len(r.rounds), "planner_calls": r.planner_calls, "search_seconds": round(wall, 3),
                "random_best": round(max(r.random.scores), 6)}
            print(f"{m} device {dev} KB: planned peak {kb(r.planned_peak_bytes)} KB, analytic "
                  f"{kb(r.analytic_extra_bytes)} KB, score {100 * r.score:.2f}, {r.planner_calls} planner calls, "
                  f"{wall:.1f} s", flush=True)
        out["models"][m] = res
        RESULTS.mkdir(exist_ok=True)
        suffix = Path(args.out).stem.removeprefix("search")
        plot_curves(curves, RESULTS / f"search-{m}{suffix}.png",
                    title=f"{m}: scheme search on the shipped contributions\n"
                    f"evolution ({args.samples} samples, solid) vs random search ({4 * args.samples}, dashed), "
                    f"seed {seeds[0]}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {RESULTS / args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
