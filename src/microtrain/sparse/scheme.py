"""The sparse update scheme as data: which biases, which weight sub-tensors and whether the head are trained.

A scheme is four plain fields, so it round-trips through YAML/JSON and reads the same on the host trainer, the
memory planner and the C generator. Updated input channels of a weight-updated conv are always the *first*
`int(C_in * r)` (no magnitude-based selection): host and device train exactly the same elements, nothing is permuted.

Presets (`resolve_scheme`): `paper-<label>` (the schemes of the paper, per model), `full`, `bias-only`, `bias:K`,
`last:K`, `head-only`; anything ending in .yaml/.yml/.json is read as a file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from microtrain.errors import MicrotrainError
from microtrain.ir.graph import Graph, Op

RATIOS = (0.125, 0.25, 0.5, 1.0)

# The searched schemes of the paper (PAPER.md §3) as printed there, per model: label -> (n_bias_update, weight-updated
# conv indices, their ratios). A ratio of 0 means "not weight-updated" and is dropped when the preset is built.
PAPER_SCHEMES: dict[str, dict[str, tuple[int, tuple[int, ...], tuple[float, ...]]]] = {
    "mcunet-5fps": {
        "49kb": (20, (23, 24, 27, 30, 33, 39), (0, .25, .5, .5, 0, 0)),
        "74kb": (21, (21, 23, 24, 26, 27, 30), (1, 0, 1, 0, .5, 1)),
        "99kb": (22, (21, 24, 27, 30, 36, 39), (1, 1, 1, 1, .125, .25)),
        "124kb": (24, (21, 24, 27, 30, 33, 39), (.25, 1, 1, 1, .5, .5)),
        "148kb": (23, (21, 24, 27, 30, 36, 39), (1, 1, 1, 1, 1, .5)),
    },
    "mbv2-w0.35": {
        "49kb": (16, (36, 39, 40, 41, 42, 45, 48, 49), (1, 1, 0, .25, .125, .125, .125, .125)),
        "73kb": (20, (32, 33, 36, 39, 41, 42, 45, 48), (.125, .5, .5, 1, .25, .125, .125, 1)),
        "99kb": (25, (27, 30, 33, 36, 39, 42, 45, 48), (1, 1, 1, 1, 1, .125, .5, 1)),
        "123kb": (31, (27, 30, 33, 36, 39, 42, 45, 48), (1, 1, 1, 1, 1, .5, 1, 1)),
        "138kb": (34, (27, 30, 33, 36, 39, 42, 45, 48), (1, 1, 1, 1, 1, 1, 1, 1)),
    },
    "proxyless-w0.3": {
        "49kb": (21, (39, 42, 44, 45, 50, 51, 54, 57), (.25, 1, 0, 1, 0, .125, .25, .25)),
        "74kb": (28, (33, 36, 39, 42, 45, 51, 54, 57), (.5, .25, 1, 1, 1, .5, .25, .5)),
        "98kb": (25, (36, 39, 42, 45, 48, 51, 54, 57), (1, .5, 1, 1, .25, .5, 1, 1)),
        "120kb": (32, (36, 39, 42, 45, 48, 51, 54, 57), (1, 1, 1, 1, .5, 1, 1, 1)),
        "148kb": (45, (36, 39, 42, 45, 48, 51, 54, 57), (1, 1, 1, 1, 1, 1, 1, 1)),
    },
}


def conv_by_index(graph: Graph, conv_index: int) -> Op:
    convs = graph.convs()
    if not 0 <= conv_index < len(convs):
        raise MicrotrainError(f"conv index {conv_index} out of range: {graph.name} has convs 0..{len(convs) - 1}")
    return convs[conv_index]


@dataclass(frozen=True)
class Scheme:
    name: str
    n_bias_update: int  # biases of the last n backbone convs are trained
    weight_ratios: dict[int, float] = field(default_factory=dict)  # conv_index -> ratio of input channels updated
    head: bool = True  # the (new) classifier head is trained

    def __post_init__(self) -> None:
        if not isinstance(self.n_bias_update, int) or isinstance(self.n_bias_update, bool) or self.n_bias_update < 0:
            raise MicrotrainError(f"scheme {self.name}: n_bias_update must be an integer >= 0, "
                                  f"got {self.n_bias_update!r}")
        for i, r in self.weight_ratios.items():
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise MicrotrainError(f"scheme {self.name}: conv index must be an integer >= 0, got {i!r}")
            if isinstance(r, bool) or not isinstance(r, (int, float)) or float(r) not in RATIOS:
                raise MicrotrainError(f"scheme {self.name}: ratio {r!r} of conv {i} not allowed "
                                      f"(one of {', '.join(map(str, RATIOS))})")

    def __hash__(self) -> int:  # the generated one would hash the dict and fail
        return hash((self.name, self.n_bias_update, tuple(sorted(self.weight_ratios.items())), self.head))

    # ---- queries on a graph -----------------------------------------------------------------------------------
    def validate(self, graph: Graph) -> Scheme:
        """Check every index against the graph, and that every weight-updated conv gets at least one channel."""
        n = len(graph.convs())
        if self.n_bias_update > n:
            raise MicrotrainError(f"scheme {self.name}: n_bias_update={self.n_bias_update} but {graph.name} has "
                                  f"only {n} convs")
        for i in sorted(self.weight_ratios):
            if self.updated_channels(graph, i) == 0:
                raise MicrotrainError(f"scheme {self.name}: ratio {self.weight_ratios[i]} of conv {i} selects no "
                                      f"input channel")
        return self

    def updated_channels(self, graph: Graph, conv_index: int) -> int:
        """int(C_in * r): the first that many input channels (depthwise: channels) are trained; 0 if frozen."""
        r = self.weight_ratios.get(conv_index)
        if not r:
            return 0
        op = conv_by_index(graph, conv_index)
        return int(graph.tensors[op.inputs[0]].shape[0] * r)

    def bias_convs(self, graph: Graph) -> list[int]:
        n = len(graph.convs())
        return list(range(max(n - self.n_bias_update, 0), n))

    def earliest_updated(self, graph: Graph) -> int | None:
        """Backward stops here: convs before it run forward only."""
        idx = [*self.bias_convs(graph), *self.weight_ratios]
        return min(idx) if idx else None

    # ---- serialisation ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "n_bias_update": self.n_bias_update,
                "weight_ratios": {int(i): float(r) for i, r in sorted(self.weight_ratios.items())}, "head": self.head}

    @classmethod
    def from_dict(cls, d: Any, default_name: str = "custom") -> Scheme:
        if not isinstance(d, dict):
            raise MicrotrainError(f"scheme {default_name}: expected a mapping, got {type(d).__name__}")
        unknown = set(d) - {"name", "n_bias_update", "weight_ratios", "head"}
        if unknown:
            raise MicrotrainError(f"scheme {default_name}: unknown keys {', '.join(sorted(map(str, unknown)))}")
        name = d.get("name", default_name)
        if not isinstance(name, str) or not name or len(name) > 100 or not name.isprintable():
            shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(name))[:60]
            raise MicrotrainError(f"scheme {default_name}: name {shown!r} is not one line of at most 100 printable "
                                  "characters")
        wr = d.get("weight_ratios") or {}
        if not isinstance(wr, dict):
            raise MicrotrainError(f"scheme {name}: weight_ratios must map conv index -> ratio")
        ratios: dict[int, float] = {}
        for k, r in wr.items():
            try:
                i = int(k)  # JSON keys are strings
            except (TypeError, ValueError):
                raise MicrotrainError(f"scheme {name}: conv index {k!r} is not an integer") from None
            if isinstance(r, bool) or not isinstance(r, (int, float)):
                raise MicrotrainError(f"scheme {name}: ratio {r!r} of conv {i} is not a number")
            if r:  # the paper's convention: ratio 0 = not weight-updated
                ratios[i] = float(r)
        head = d.get("head", True)
        if not isinstance(head, bool):
            raise MicrotrainError(f"scheme {name}: head must be true or false, got {head!r}")
        return cls(name, d.get("n_bias_update", 0), ratios, head)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Scheme:
        path = Path(path)
        try:
            text = path.read_text()
            d = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        except OSError as e:
            raise MicrotrainError(f"{path}: cannot read scheme ({e.strerror or e})") from None
        except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
            msg = " ".join(str(e).split())
            raise MicrotrainError(f"{path}: malformed scheme file ({type(e).__name__}: {msg})") from None
        return cls.from_dict(d, default_name=path.stem)


# ---- presets ----------------------------------------------------------------------------------------------------
def preset_names(graph: Graph) -> list[str]:
    """The named presets of this graph; the parametric `bias:K` and `last:K` (K in 0..#convs) are not listed."""
    return ["full", "bias-only", "head-only", *(f"paper-{label}" for label in PAPER_SCHEMES.get(graph.name, {}))]


def _last_k(spec: str, n: int) -> int:
    k = int(spec.split(":", 1)[1])
    if not 0 <= k <= n:
        raise MicrotrainError(f"scheme {spec}: K must be in 0..{n}")
    return k


def resolve_scheme(spec: str, graph: Graph) -> Scheme:
    """A preset name or a scheme file, validated against `graph`."""
    n = len(graph.convs())
    spec = str(spec)
    if spec == "full":
        s = Scheme("full", n, {i: 1.0 for i in range(n)})
    elif spec == "bias-only":
        s = Scheme("bias-only", n, {})
    elif spec == "head-only":
        s = Scheme("head-only", 0, {})
    elif re.fullmatch(r"bias:\d+", spec):
        s = Scheme(spec, _last_k(spec, n), {})
    elif re.fullmatch(r"last:\d+", spec):
        k = _last_k(spec, n)
        s = Scheme(spec, k, {i: 1.0 for i in range(n - k, n)})
    elif spec.startswith("paper-") and spec[6:] in PAPER_SCHEMES.get(graph.name, {}):
        nb, idx, ratios = PAPER_SCHEMES[graph.name][spec[6:]]
        s = Scheme(spec, nb, {i: float(r) for i, r in zip(idx, ratios, strict=True) if r})
    elif Path(spec).suffix in (".yaml", ".yml", ".json"):
        s = Scheme.load(spec)
    else:
        raise MicrotrainError(f"unknown scheme {spec!r} for {graph.name}; presets: {', '.join(preset_names(graph))} "
                              f"(bias:K and last:K for K in 0..{n}), or a .yaml/.yml/.json file")
    return s.validate(graph)
