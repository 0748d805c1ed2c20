"""Scheme search (PAPER.md §3): maximise the summed contribution of a sparse update scheme under memory budgets.

    maximise  dacc_b[n_bias] + sum_i dacc_W[i, r_i]
    s.t.      analytic extra memory (sparse/cost.py)    <= extra_budget   (the paper's 49-148 KB schemes)
              planned peak SRAM of the whole step       <= budget         (compiler/memory.py, optional)

A candidate is `n_bias` in 0..k_max (the deepest measured bias count) and one ratio index per weight-updatable conv
(0 = frozen, 1..4 = RATIOS). Scoring and the analytic cost are vectorised over whole batches of candidates (prefix
sums of the per-conv terms of `analytic_breakdown`, checked against it by the tests), so tens of thousands of samples
take about a second. The planner costs ~0.2 s per scheme, so it never runs inside the loop: the search runs on the
analytic budget, then the best candidates are planned (cached per scheme) and, if none fits the device budget, the
analytic budget is tightened by the observed overshoot and the search repeats.

Evolutionary search (population, top-quarter parents, mutation of n_bias / which convs / ratios, uniform crossover,
only feasible children kept, every sample a distinct scheme) against random search (uniform n_bias, a random density
of updated convs per sample, uniform ratios, rejection of infeasible ones). Both are seeded and deterministic.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from microtrain.errors import MicrotrainError
from microtrain.ir.graph import Graph
from microtrain.sparse.contrib import Contributions
from microtrain.sparse.cost import analytic_breakdown, analytic_extra_bytes, kb
from microtrain.sparse.scheme import PAPER_SCHEMES, RATIOS, Scheme, resolve_scheme

CHOICES = (0.0, *RATIOS)  # ratio index -> ratio (0 = not weight-updated)


def parse_bytes(text: str | int | None) -> int | None:
    """'256KB', '100 KiB', '0.25MB', '262144' -> bytes (KB = 1024 B, the paper's convention); 'none' -> None."""
    if text is None or isinstance(text, int):
        return text
    t = text.strip().lower().replace(" ", "")
    if t in ("", "none", "off"):
        return None
    for suffix, mult in (("kib", 1024), ("mib", 1 << 20), ("kb", 1024), ("mb", 1 << 20), ("k", 1024), ("m", 1 << 20),
                         ("b", 1), ("", 1)):
        if t.endswith(suffix):
            try:
                v = float(t[: len(t) - len(suffix)] if suffix else t)
            except ValueError:
                break
            if v < 0 or not np.isfinite(v):
                break
            return int(round(v * mult))
    raise MicrotrainError(f"not a memory size: {text!r} (e.g. 256KB, 100KiB, 0.25MB or bytes)")


# ---- the search space -----------------------------------------------------------------------------------------
@dataclass
class Space:
    """Vectorised scoring and analytic cost of candidates (nb [B], R [B, J]) of one model and contribution table."""

    graph: Graph
    contrib: Contributions
    convs: np.ndarray  # the J weight-updatable conv indices, ascending
    bias_gain: np.ndarray  # [k_max + 1]
    w_gain: np.ndarray  # [J, 5], -inf where a choice was not measured (never offered)
    w_cost: np.ndarray  # [J, 5] bytes: saved input slice + weight copy
    mask_suffix: np.ndarray  # [n + 1]: masks of convs s..n-1
    bias_suffix: np.ndarray  # [n + 1]: bias copies of convs s..n-1
    fc: int

    @property
    def n(self) -> int:
        return len(self.mask_suffix) - 1

    @property
    def k_max(self) -> int:
        return len(self.bias_gain) - 1

    @property
    def allowed(self) -> np.ndarray:
        return np.isfinite(self.w_gain)

    @classmethod
    def build(cls, graph: Graph, contrib: Contributions) -> Space:
        n = len(graph.convs())
        if contrib.num_convs != n or contrib.model != graph.name:
            raise MicrotrainError(f"contributions {contrib.source or ''} are for {contrib.model} ({contrib.num_convs} "
                                  f"convs), not {graph.name} ({n} convs)")
        full = analytic_breakdown(graph, Scheme("all", n, {}))  # masks and bias copies of every conv
        mask = np.array([full["convs"][i]["mask"] for i in range(n)], np.int64)
        bias = np.array([full["convs"][i]["bias"] for i in range(n)], np.int64)
        suffix = lambda a: np.concatenate([np.cumsum(a[::-1])[::-1], [0]])  # noqa: E731
        convs = np.array(sorted(contrib.weight), np.int64)
        gain = np.full((len(convs), len(CHOICES)), -np.inf)
        cost = np.zeros((len(convs), len(CHOICES)), np.int64)
        gain[:, 0] = 0.0
        for j, i in enumerate(convs):
            for c, r in enumerate(CHOICES[1:], start=1):
                s = Scheme("w", 0, {int(i): r})
                if r in contrib.weight[int(i)] and s.updated_channels(graph, int(i)) > 0:
                    row = analytic_breakdown(graph, s)["convs"][int(i)]
                    gain[j, c] = contrib.weight[int(i)][r]
                    cost[j, c] = row["input"] + row["weight"]
        k_max = min(contrib.k_max, n)
        fc = analytic_breakdown(graph, Scheme("head", 0, {}))["fc_input"]
        return cls(graph, contrib, convs, contrib.bias_table()[: k_max + 1], gain, cost, suffix(mask), suffix(bias), fc)

    # ---- vectorised evaluation ----------------------------------------------------------------------------------
    def cost(self, nb: np.ndarray, R: np.ndarray) -> np.ndarray:
        """Analytic extra bytes (= analytic_extra_bytes of the decoded scheme)."""
        n, J = self.n, len(self.convs)
        on = R > 0
        first = np.where(on.any(axis=1), self.convs[np.argmax(on, axis=1)] if J else n, n)
        start = np.minimum(n - nb, first)
        w = self.w_cost[np.arange(J), R].sum(axis=1) if J else 0
        return self.fc + self.mask_suffix[start] + self.bias_suffix[n - nb] + w

    def score(self, nb: np.ndarray, R: np.ndarray) -> np.ndarray:
        J = len(self.convs)
        return self.bias_gain[nb] + (self.w_gain[np.arange(J), R].sum(axis=1) if J else 0.0)

    # ---- schemes ------------------------------------------------------------------------------------------------
    def scheme(self, nb: int, row: np.ndarray, name: str = "searched") -> Scheme:
        return Scheme(name, int(nb), {int(i): CHOICES[c] for i, c in zip(self.convs, row, strict=True) if c})

    def encode(self, s: Scheme) -> tuple[int, np.ndarray] | None:
        """A scheme as a candidate, or None if it lies outside the space (deeper bias, unmeasured conv/ratio)."""
        row = np.zeros(len(self.convs), np.int64)
        pos = {int(i): j for j, i in enumerate(self.convs)}
        for i, r in s.weight_ratios.items():
            if i not in pos or not self.allowed[pos[i], CHOICES.index(r)]:
                return None
            row[pos[i]] = CHOICES.index(r)
        return (s.n_bias_update, row) if s.n_bias_update <= self.k_max else None

    def random(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Uniform n_bias; per candidate a uniform density of updated convs; uniform measured ratios."""
        nb = rng.integers(0, self.k_max + 1, size)
        dens = rng.random((size, 1))
        R = np.where(rng.random((size, len(self.convs))) < dens, rng.integers(1, len(CHOICES), (size, len(self.convs))),
                     0)
        return nb, np.where(self.allowed[np.arange(len(self.convs)), R], R, 0)


# ---- search loops -----------------------------------------------------------------------------------------------
@dataclass
class Trace:
    """One search run: every distinct feasible sample in order, and the best so far."""

    method: str
    nb: list[int] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    costs: list[int] = field(default_factory=list)
    seconds: float = 0.0
    proposals: int = 0

    def add(self, nb: np.ndarray, R: np.ndarray, scores: np.ndarray, costs: np.ndarray, limit: int) -> int:
        take = min(len(nb), limit - len(self.scores))
        self.nb += [int(v) for v in nb[:take]]
        self.rows += list(R[:take])
        self.scores += [float(v) for v in scores[:take]]
        self.costs += [int(v) for v in costs[:take]]
        return take

    @property
    def samples(self) -> int:
        return len(self.scores)

    def best_curve(self) -> np.ndarray:
        return np.maximum.accumulate(np.array(self.scores)) if self.scores else np.zeros(0)

    def best(self) -> int:
        return int(np.argmax(self.scores))

    def ranked(self) -> list[int]:
        """Sample indices by score (best first), ties by lower cost."""
        return sorted(range(self.samples), key=lambda i: (-self.scores[i], self.costs[i], i))

    def curve_points(self, points: int = 60) -> list[list[float]]:
        """(samples, best score) on a log grid, for reports."""
        c = self.best_curve()
        if not len(c):
            return []
        xs = np.unique(np.geomspace(1, len(c), points).round().astype(int))
        return [[int(x), round(float(c[x - 1]), 6)] for x in xs]


def _distinct(nb: np.ndarray, R: np.ndarray, seen: set[bytes]) -> np.ndarray:
    """Mask of candidates not seen before (and not repeated within the batch); marks them seen."""
    keep = np.zeros(len(nb), bool)
    for b in range(len(nb)):
        key = int(nb[b]).to_bytes(2, "little") + R[b].astype(np.int8).tobytes()
        if key not in seen:
            seen.add(key)
            keep[b] = True
    return keep


def random_search(space: Space, extra_budget: int, samples: int, seed: int = 0, batch: int = 1024,
                  max_proposals: int | None = None) -> Trace:
    rng = np.random.default_rng([seed, 1])
    tr, seen, t0 = Trace("random"), set(), time.perf_counter()
    max_proposals = max_proposals or 200 * samples + 10_000
    while tr.samples < samples and tr.proposals < max_proposals:
        nb, R = space.random(rng, batch)
        tr.proposals += batch
        cost = space.cost(nb, R)
        ok = cost <= extra_budget
        ok[ok] &= _distinct(nb[ok], R[ok], seen)
        tr.add(nb[ok], R[ok], space.score(nb[ok], R[ok]), cost[ok], samples)
    tr.seconds = time.perf_counter() - t0
    return tr


def evolutionary_search(space: Space, extra_budget: int, samples: int, seed: int = 0, population: int = 64,
                        parent_frac: float = 0.25, mutate_prob: float = 0.15, patience: int = 30) -> Trace:
    """Population of feasible distinct schemes; each generation, half the children mutate a parent (each gene with
    `mutate_prob`: n_bias by a Gaussian step of 3, a conv's ratio uniformly, 0 included), half cross two parents
    (uniform per gene); infeasible or already seen children are dropped; the population keeps the best. Stops at
    `samples` or after `patience` generations without a new sample."""
    rng = np.random.default_rng([seed, 2])
    tr, seen, t0 = Trace("evolution"), set(), time.perf_counter()
    J, K = len(space.convs), space.k_max
    allowed = space.allowed
    pop_nb, pop_R = np.zeros(0, np.int64), np.zeros((0, J), np.int64)
    tries = 0
    while len(pop_nb) < min(population, samples) and tries < 1000:  # initial population: random feasible
        nb, R = space.random(rng, 4 * population)
        tries += 1
        tr.proposals += len(nb)
        cost = space.cost(nb, R)
        ok = cost <= extra_budget
        ok[ok] &= _distinct(nb[ok], R[ok], seen)
        need = min(population, samples) - len(pop_nb)
        idx = np.flatnonzero(ok)[:need]
        tr.add(nb[idx], R[idx], space.score(nb[idx], R[idx]), cost[idx], samples)
        pop_nb, pop_R = np.concatenate([pop_nb, nb[idx]]), np.concatenate([pop_R, R[idx]])
    stale = 0
    while tr.samples < samples and stale < patience and len(pop_nb):
        order = np.argsort(-space.score(pop_nb, pop_R), kind="stable")
        par = order[: max(2, int(len(order) * parent_frac))]
        m = population // 2
        pa = rng.choice(par, m)
        nb_m = pop_nb[pa].copy()
        R_m = pop_R[pa].copy()
        step = np.rint(rng.normal(0, 3, m)).astype(np.int64)
        nb_m = np.where(rng.random(m) < mutate_prob * 3, np.clip(nb_m + step, 0, K), nb_m)
        flip = rng.random((m, J)) < mutate_prob
        R_m = np.where(flip, rng.integers(0, len(CHOICES), (m, J)), R_m)
        a, b = rng.choice(par, population - m), rng.choice(par, population - m)
        pick = rng.random((population - m, J)) < 0.5
        R_c = np.where(pick, pop_R[a], pop_R[b])
        nb_c = np.where(rng.random(population - m) < 0.5, pop_nb[a], pop_nb[b])
        nb, R = np.concatenate([nb_m, nb_c]), np.concatenate([R_m, R_c])
        R = np.where(allowed[np.arange(J), R], R, 0)
        tr.proposals += len(nb)
        cost = space.cost(nb, R)
        ok = cost <= extra_budget
        ok[ok] &= _distinct(nb[ok], R[ok], seen)
        idx = np.flatnonzero(ok)
        took = tr.add(nb[idx], R[idx], space.score(nb[idx], R[idx]), cost[idx], samples)
        stale = 0 if took else stale + 1
        idx = idx[:took]
        all_nb, all_R = np.concatenate([pop_nb, nb[idx]]), np.concatenate([pop_R, R[idx]])
        keep = np.argsort(-space.score(all_nb, all_R), kind="stable")[:population]
        pop_nb, pop_R = all_nb[keep], all_R[keep]
    tr.seconds = time.perf_counter() - t0
    return tr


# ---- the whole search with the device budget ------------------------------------------------------------------------
PeakFn = Callable[[Scheme], int]


def planner_peak(graph: Graph, num_classes: int = 10) -> PeakFn:
    """The planner's peak SRAM of the whole training step (compiler/memory.py), cached per scheme."""
    from microtrain.compiler.memory import compile_memory

    cache: dict[Scheme, int] = {}

    def peak(s: Scheme) -> int:
        key = Scheme("k", s.n_bias_update, dict(s.weight_ratios), s.head)
        if key not in cache:
            cache[key] = compile_memory(graph, s, num_classes=num_classes).peak_sram_bytes
        return cache[key]

    peak.cache = cache  # type: ignore[attr-defined]
    return peak


@dataclass
class SearchResult:
    scheme: Scheme
    score: float
    analytic_extra_bytes: int
    planned_peak_bytes: int | None
    evolution: Trace
    random: Trace
    extra_budget: int | None
    budget: int | None
    effective_extra_budget: int
    rounds: list[dict[str, Any]]
    planner_calls: int
    seconds: float

    def to_json(self, space: Space) -> dict[str, Any]:
        ev, rd = self.evolution, self.random
        return {
            "model": space.graph.name, "scheme": self.scheme.to_dict(), "score": round(self.score, 6),
            "analytic_extra_bytes": self.analytic_extra_bytes,
            "analytic_extra_kb": float(kb(self.analytic_extra_bytes)),
            "planned_peak_bytes": self.planned_peak_bytes,
            "extra_budget_bytes": self.extra_budget, "budget_bytes": self.budget,
            "effective_extra_budget_bytes": self.effective_extra_budget,
            "evolution": {"samples": ev.samples, "best_score": round(max(ev.scores), 6),
                          "seconds": round(ev.seconds, 3), "proposals": ev.proposals, "curve": ev.curve_points()},
            "random": {"samples": rd.samples, "best_score": round(max(rd.scores), 6) if rd.scores else None,
                       "seconds": round(rd.seconds, 3), "proposals": rd.proposals, "curve": rd.curve_points()},
            "rounds": self.rounds, "planner_calls": self.planner_calls, "seconds": round(self.seconds, 3),
            "contributions": {"source": space.contrib.source, **{k: space.contrib.meta.get(k)
                                                                 for k in ("data", "command")}},
            "paper_schemes": paper_scores(space),
        }


def paper_scores(space: Space) -> dict[str, dict[str, Any]]:
    """The paper's schemes of this model scored with the same contributions (score None where outside the space)."""
    out = {}
    for label in PAPER_SCHEMES.get(space.graph.name, {}):
        s = resolve_scheme(f"paper-{label}", space.graph)
        c = space.encode(s)
        out[label] = {"score": None if c is None else round(float(space.score(np.array([c[0]]), c[1][None])[0]), 6),
                      "analytic_extra_bytes": analytic_extra_bytes(space.graph, s)}
    return out


def minimum_budgets(space: Space, peak: PeakFn | None) -> tuple[int, int | None]:
    """The cheapest scheme of the space: head only (no conv trained)."""
    head = space.scheme(0, np.zeros(len(space.convs), np.int64), "head-only")
    return int(space.cost(np.array([0]), np.zeros((1, len(space.convs)), np.int64))[0]), (peak(head) if peak else None)


def search(space: Space, *, extra_budget: int | None = None, budget: int | None = None, samples: int = 2000,
           random_samples: int | None = None, seed: int = 0, population: int = 64, peak: PeakFn | None = None,
           check: int = 24, max_rounds: int = 10, tolerance: int = 4096, name: str = "searched") -> SearchResult:
    """Evolutionary search under the analytic budget; with a device `budget`, the planner checks the `check` best
    candidates of each round. If none fits, the analytic budget is bracketed: [cheapest scheme (fits), last failing
    budget], the next one guessed from the observed planned-minus-analytic offsets when that lies inside the bracket,
    else bisected; once one fits, bisection continues upwards to within `tolerance` bytes. The best fitting candidate
    of all rounds wins. Random search runs under the final analytic budget with `random_samples` (default 4x)."""
    t0 = time.perf_counter()
    if budget is not None and peak is None:
        raise MicrotrainError("--budget needs the memory planner (microtrain.compiler.memory)")
    min_extra, min_peak = minimum_budgets(space, peak if budget is not None else None)
    if extra_budget is not None and extra_budget < min_extra:
        raise MicrotrainError(f"extra budget {kb(extra_budget)} KB is infeasible for {space.graph.name}: the smallest "
                              f"feasible extra budget is {kb(min_extra)} KB (head only)")
    if budget is not None and min_peak is not None and budget < min_peak:
        raise MicrotrainError(f"budget {kb(budget)} KB is infeasible for {space.graph.name}: the smallest feasible "
                              f"budget is {kb(min_peak)} KB (planned peak SRAM of head-only training)")
    cap = int(space.cost(np.array([space.k_max]), np.where(space.allowed, np.arange(len(CHOICES)), 0).max(1)[None])[0])
    eff = cap if extra_budget is None else min(extra_budget, cap)
    calls_before = len(getattr(peak, "cache", {})) if peak else 0
    rounds: list[dict[str, Any]] = []
    best: tuple[Trace, int, int] | None = None  # trace, index, analytic budget of its round
    lo, hi = min_extra, None  # analytic budgets known to fit (head only) / to fail
    for _ in range(max_rounds):
        evo = evolutionary_search(space, eff, samples, seed, population)
        if budget is None:
            best = (evo, evo.ranked()[0], eff)
            break
        checked, fit = [], None
        for i in evo.ranked()[:check]:
            p = peak(space.scheme(evo.nb[i], evo.rows[i]))  # type: ignore[misc]
            checked.append((i, p))
            if p <= budget:
                fit = i
                break
        rounds.append({"extra_budget_bytes": eff, "fits": fit is not None,
                       "checked": [{"score": round(evo.scores[i], 6), "analytic_extra_bytes": evo.costs[i],
                                    "planned_peak_bytes": p} for i, p in checked]})
        if fit is not None:
            if best is None or evo.scores[fit] > best[0].scores[best[1]]:
                best = (evo, fit, eff)
            lo = eff
            if hi is None:
                break  # the analytic optimum fits the device too
        else:
            hi = min(eff, min(evo.costs[i] for i, _ in checked)) - 1
            guess = budget - int(np.median([p - evo.costs[i] for i, p in checked]))
        if hi - lo <= tolerance:
            break
        eff = guess if fit is None and lo < guess < hi and len(rounds) <= 2 else (lo + hi) // 2
    if best is None:  # nothing better than the cheapest scheme fits (checked above): take it
        evo = Trace("evolution")
        evo.add(np.array([0]), np.zeros((1, len(space.convs)), np.int64), np.array([0.0]), np.array([min_extra]), 1)
        best = (evo, 0, min_extra)
    tr, i, eff = best
    scheme = space.scheme(tr.nb[i], tr.rows[i], name)
    rand = random_search(space, eff, random_samples if random_samples is not None else 4 * samples, seed)
    planned = peak(scheme) if peak else None
    calls = len(getattr(peak, "cache", {})) - calls_before if peak else 0
    return SearchResult(scheme, tr.scores[i], tr.costs[i], planned, tr, rand, extra_budget, budget, eff, rounds,
                        calls, time.perf_counter() - t0)


def plot_curves(results: list[tuple[str, SearchResult]], path: str | Path, title: str = "") -> None:
    """Best summed contribution vs samples, evolutionary (solid) and random (dashed), one colour per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    floor = 0.0
    for k, (label, r) in enumerate(results):
        colour = f"C{k % 10}"
        for tr, style in ((r.evolution, "-"), (r.random, "--")):
            c = tr.best_curve()
            if len(c):
                ax.plot(np.arange(1, len(c) + 1), 100 * c, style, color=colour,
                        label=f"{label} {tr.method} ({100 * c[-1]:.2f})")
                floor = min(floor, 100 * c[min(9, len(c) - 1)])
    ax.set_ylim(bottom=floor - 0.5)  # the first few random draws can be far below: not the interesting part
    ax.set_xscale("log")
    ax.set_xlabel("samples (distinct feasible schemes)")
    ax.set_ylabel("best summed contribution (accuracy points)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
