"""The paper's analytic extra-memory model of a sparse update scheme (PAPER.md §3), batch 1.

It is the cost the scheme search optimises, so it stays the paper's formula, not a plan: the static planner
(`compiler/planner.py`) gives the real peak of a scheduled training graph.

Per conv i (int8 activations, 1 byte per element):
- mask:   1 bit per output element (the clamp mask the backward needs), for every conv the backward passes through,
          i.e. every conv from `scheme.earliest_updated` on, whether its bias is trained or not. Each conv's mask is
          its own buffer, so its bits round up to whole bytes.
- bias:   4 bytes per output channel (int32 bias copy in SRAM) if the bias is trained.
- input:  H_in * W_in * ch bytes (the saved int8 input slice) if the weight is trained, ch = int(C_in * r).
- weight: ch * (C_out / groups) * k * k bytes (the SRAM copy of the trainable int8 weights): C_out*ch*k*k for a
          normal conv, ch*k*k for a depthwise one.
plus the fc (head) input, 1 byte per element, when the head is trained. The fc weight and bias and all gradient
buffers are not counted.

Conventions found against the paper's table (all 15 schemes, full update of the three models, last:12 on mcunet):
all 19 figures match with the formula above when bytes / 1024 is rounded half-to-even to 0.1 KB (Python's
`f"{kb:.1f}"`): mcunet 49kb (49.75 -> 49.8), mbv2 138kb (138.25 -> 138.2) and proxyless 120kb (120.25 -> 120.2)
are exact ties, and only half-to-even gives all three. The table cannot tell the other conventions apart: every
conv output of the three models has a multiple of 8 elements (so bit rounding per conv or in total is the same), and
in every paper scheme the weight-updated convs lie inside the bias-updated range (so masks for all convs from the
earliest updated one = masks for the bias-updated ones); the mask rule above is the one a backward pass needs.
"""

from __future__ import annotations

from typing import Any

from microtrain.ir.graph import Graph
from microtrain.sparse.scheme import Scheme


def analytic_breakdown(graph: Graph, scheme: Scheme) -> dict[str, Any]:
    """{"convs": {conv_index: {"mask", "bias", "input", "weight", "total"}}, "fc_input": bytes, "total": bytes},
    convs listed only where something is counted."""
    scheme.validate(graph)
    start = scheme.earliest_updated(graph)
    bias = set(scheme.bias_convs(graph))
    convs: dict[int, dict[str, int]] = {}
    for op in graph.convs():
        i = op.attrs["conv_index"]
        if start is None or i < start:
            continue
        x, w, y = (graph.tensors[n] for n in (op.inputs[0], op.inputs[1], op.outputs[0]))
        _, h_in, w_in = x.shape
        c_out, _, kh, kw = w.shape
        ch = scheme.updated_channels(graph, i)
        row = {"mask": -(-y.numel // 8),
               "bias": 4 * c_out if i in bias else 0,
               "input": h_in * w_in * ch,
               "weight": ch * (c_out // op.attrs.get("groups", 1)) * kh * kw}
        row["total"] = sum(row.values())
        convs[i] = row
    heads = [op for op in graph.ops if op.kind == "linear"]
    fc = graph.tensors[heads[-1].inputs[0]].numel if scheme.head and heads else 0
    return {"convs": convs, "fc_input": fc, "total": fc + sum(r["total"] for r in convs.values())}


def analytic_extra_bytes(graph: Graph, scheme: Scheme) -> int:
    """Extra SRAM bytes training with `scheme` needs beyond inference, by the paper's model."""
    return analytic_breakdown(graph, scheme)["total"]


def kb(nbytes: int) -> str:
    """Bytes as the paper prints KB: / 1024, one decimal, ties to even."""
    return f"{nbytes / 1024:.1f}"
