"""`microtrain search`: choose a sparse update scheme under memory budgets from a contribution analysis."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from microtrain.compiler.boards import BOARDS, get_board
from microtrain.errors import MicrotrainError
from microtrain.frontends.zoo import ZOO_MODELS, load_model
from microtrain.outputs import check_output_file
from microtrain.sparse.contrib import Contributions, shipped_contributions
from microtrain.sparse.cost import kb
from microtrain.sparse.search import Space, parse_bytes, planner_peak, plot_curves, search


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search", help="evolutionary search of an update scheme under SRAM / analytic memory budgets",
        description="Maximise the summed contribution (dacc of the bias depth + dacc of each weight-updated conv at "
                    "its ratio) subject to --extra-budget (the paper's analytic extra memory) and --budget (the "
                    "planner's peak SRAM of the whole training step). Evolutionary search, with random search as the "
                    "baseline; writes a scheme file accepted wherever a preset name is (train, plan, compile).")
    p.add_argument("--model", required=True, help=f"zoo name ({', '.join(ZOO_MODELS)}) or model file")
    p.add_argument("--budget",
                   help="device SRAM for the whole training step, checked with the memory planner (default: the "
                        "board's SRAM, else 256KB; 'none' to skip the planner)")
    p.add_argument("--board", metavar="BOARD", help=f"take the SRAM budget from a board ({', '.join(BOARDS)})")
    p.add_argument("--extra-budget", help="bound on the analytic extra memory (e.g. 100KB; the paper's schemes use "
                                          "49-148 KB)")
    p.add_argument("--contrib", help="contribution file from `microtrain contrib` (default: the one shipped for zoo "
                                     "models)")
    p.add_argument("--shrink", default="auto",
                   help="soft-threshold every delta by this many accuracy points before searching (default auto: "
                        "the noise level estimated from the table; 0: raw deltas)")
    p.add_argument("--samples", type=int, default=2000, help="evolutionary search samples (default 2000)")
    p.add_argument("--random-samples", type=int, help="random search samples (default 4x --samples)")
    p.add_argument("--population", type=int, default=64)
    p.add_argument("--classes", type=int, default=10, help="classes of the new head (planned peak; default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", help="scheme name (default search-<extra budget>)")
    p.add_argument("-o", "--out", metavar="SCHEME.yaml", help="write the scheme (.yaml/.yml/.json)")
    p.add_argument("--plot", metavar="FILE.png", help="best score vs samples, evolutionary and random")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.samples < 1 or (args.random_samples is not None and args.random_samples < 0) or args.population < 2:
        raise MicrotrainError("--samples must be >= 1, --random-samples >= 0 and --population >= 2")
    if args.out and Path(args.out).suffix not in (".yaml", ".yml", ".json"):
        raise MicrotrainError(f"-o {args.out}: a scheme file ends in .yaml, .yml or .json")
    if args.population > 100_000 or args.samples > 10_000_000 or (args.random_samples or 0) > 10_000_000:
        raise MicrotrainError("--population must be <= 100000 and --samples / --random-samples <= 10000000")
    if not 1 <= args.classes <= 65536:
        raise MicrotrainError(f"--classes must be in [1, 65536], got {args.classes}")
    for flag, path in (("-o", args.out), ("--plot", args.plot)):
        if path:
            check_output_file(path, flag)  # before the search, not after it
    if args.plot and Path(args.plot).suffix.lower() != ".png":
        raise MicrotrainError(f"--plot writes a PNG: {args.plot} does not end in .png")
    graph = load_model(args.model)
    contrib = Contributions.load(args.contrib) if args.contrib else shipped_contributions(graph.name)
    try:
        tau = contrib.noise() if args.shrink == "auto" else float(args.shrink) / 100
    except ValueError:
        raise MicrotrainError(f"--shrink: 'auto' or accuracy points, got {args.shrink!r}") from None
    space = Space.build(graph, contrib.shrunk(tau))
    default = f"{get_board(args.board).sram_bytes}" if args.board else "256KB"
    budget, extra = parse_bytes(args.budget or default), parse_bytes(args.extra_budget)
    name = args.name or (f"search-{kb(extra).removesuffix('.0')}kb" if extra is not None else "search")
    r = search(space, extra_budget=extra, budget=budget, samples=args.samples, random_samples=args.random_samples,
               seed=args.seed, population=args.population,
               peak=planner_peak(graph, args.classes) if budget is not None else None, name=name)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        r.scheme.save(args.out)
    if args.plot:
        what = " ".join(x for x in (extra and f"extra <= {kb(extra)} KB", budget and f"peak <= {kb(budget)} KB") if x)
        plot_curves([(what or "no budget", r)], args.plot, title=f"{graph.name} scheme search ({what}); contributions "
                                                                   f"{Path(contrib.source).name}")
    out = r.to_json(space)
    out["shrink_points"] = round(100 * tau, 4)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    s = r.scheme
    ev, rd = out["evolution"], out["random"]
    peak = f"planned peak {kb(r.planned_peak_bytes)} KB" if r.planned_peak_bytes is not None else "not planned"
    print(f"{graph.name}: {s.name}: n_bias_update {s.n_bias_update}, weights "
          + (", ".join(f"{i}:{v:g}" for i, v in sorted(s.weight_ratios.items())) or "none"))
    print(f"  score {100 * r.score:.2f} points (summed dacc, each shrunk by {100 * tau:.2f}; contributions "
          f"{contrib.source})")
    print(f"  analytic extra {kb(r.analytic_extra_bytes)} KB" + (f" of {kb(extra)} KB" if extra is not None else "")
          + f"; {peak}" + (f" of {kb(budget)} KB" if budget is not None else ""))
    rbest = "n/a" if rd["best_score"] is None else f"{100 * rd['best_score']:.2f}"
    print(f"  under the analytic budget {kb(r.effective_extra_budget)} KB: evolution best {100 * ev['best_score']:.2f} "
          f"after {ev['samples']} samples, random search best {rbest} after {rd['samples']} samples; "
          f"{r.seconds:.1f} s, {r.planner_calls} planner calls")
    if args.out:
        print(f"  wrote {args.out}")
    return 0
