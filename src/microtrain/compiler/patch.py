"""Patch-based execution of the frozen early stage (MCUNetV2-style), so high-resolution activations never exist whole.

The first layers of a mobile CNN hold the largest activations (mbv2-w0.35 at 128x128: 48x64x64 bytes in one
depthwise conv). Their output at the end of a stage is small. We compute that stage output tile by tile: each tile
back-projects to an input region (receptive field with halo), and only the per-tile intermediates are alive. The
result is bit-identical to whole-tensor execution (same integer arithmetic on the same pixels, the image border
padded with each tensor's zero point), so the host executor need not change; the planner and the C generator
read the `patch_stage` description stored in the training graph's meta.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from microtrain.ir.graph import Graph, Op, Tensor

Region = tuple[int, int, int, int]  # rows [r0, r1), cols [c0, c1) in the tensor's own coordinates


@dataclass
class PatchStage:
    ops: list[str]  # forward ops run tile by tile (a prefix of the schedule, all frozen)
    output: str  # the stage output, assembled whole
    grid: int  # grid x grid output tiles
    tiles: list[dict[str, Region]] = field(default_factory=list)  # per tile, the region of every stage tensor
    macs: int = 0  # MACs of the stage computed tile by tile (halos recomputed)
    whole_macs: int = 0  # MACs of the same stage computed whole

    def to_dict(self) -> dict[str, Any]:
        return {"ops": self.ops, "output": self.output, "grid": self.grid, "macs": self.macs,
                "whole_macs": self.whole_macs}


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    step = -(-n // parts)
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def needed_region(op: Op, g: Graph, region: Region) -> Region:
    """Input region (unclipped) an op needs to produce `region` of its output."""
    r0, r1, c0, c1 = region
    if op.kind != "conv2d":
        return region
    k = g.tensors[op.inputs[1]].shape[2]
    s, p = op.attrs["stride"], op.attrs["padding"]
    return r0 * s - p, (r1 - 1) * s - p + k, c0 * s - p, (c1 - 1) * s - p + k


def _clip(region: Region, shape: tuple[int, ...]) -> Region:
    r0, r1, c0, c1 = region
    return max(r0, 0), min(r1, shape[1]), max(c0, 0), min(c1, shape[2])


def _union(a: Region | None, b: Region) -> Region:
    if a is None:
        return b
    return min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3])


def stage_tiles(g: Graph, ops: list[Op], output: str, grid: int) -> list[dict[str, Region]]:
    """For each output tile, the clipped region of every tensor of the stage that the tile needs."""
    h, w = g.tensors[output].shape[1:]
    tiles = []
    for r in _split(h, grid):
        for c in _split(w, grid):
            regions: dict[str, Region] = {output: (r[0], r[1], c[0], c[1])}
            for op in reversed(ops):
                out = regions.get(op.outputs[0])
                if out is None:
                    continue
                for n in op.inputs:
                    t = g.tensors[n]
                    if t.role in ("act", "input"):
                        regions[n] = _union(regions.get(n), _clip(needed_region(op, g, out), t.shape))
            tiles.append(regions)
    return tiles


def _conv_macs_region(op: Op, g: Graph, region: Region) -> int:
    o, ci, kh, kw = g.tensors[op.inputs[1]].shape
    return o * ci * kh * kw * (region[1] - region[0]) * (region[3] - region[2])


def make_stage(g: Graph, ops: list[Op], output: str, grid: int) -> PatchStage:
    tiles = stage_tiles(g, ops, output, grid)
    macs = sum(_conv_macs_region(op, g, t[op.outputs[0]]) for t in tiles for op in ops
               if op.kind == "conv2d" and op.outputs[0] in t)
    whole = sum(_conv_macs_region(op, g, (0, g.tensors[op.outputs[0]].shape[1], 0, g.tensors[op.outputs[0]].shape[2]))
                for op in ops if op.kind == "conv2d")
    return PatchStage([o.name for o in ops], output, grid, tiles, macs, whole)


def tile_graph(g: Graph, stage: PatchStage) -> Graph:
    """The stage as a graph of worst-case tile-shaped intermediates: what one tile keeps alive. Its input (the whole
    image) and output (the whole stage output) live in the outer arena, so they are marked role 'const' here."""
    t = Graph(f"{g.name}:tile")
    shapes: dict[str, tuple[int, ...]] = {}
    for regions in stage.tiles:
        for n, (r0, r1, c0, c1) in regions.items():
            c = g.tensors[n].shape[0]
            old = shapes.get(n, (c, 0, 0))
            shapes[n] = (c, max(old[1], r1 - r0), max(old[2], c1 - c0))
    outer = {g.inputs[0], stage.output}
    for n, shape in shapes.items():
        src = g.tensors[n]
        t.add_tensor(Tensor(n, shape, src.dtype, "const" if n in outer else "act", src.scale, src.zero))
    for name in stage.ops:
        op = g.op(name)
        for n in op.inputs:
            if n not in t.tensors:
                t.add_tensor(g.tensors[n])
        t.ops.append(op)
    t.inputs = [g.inputs[0]]
    t.outputs = [stage.output]
    return t


def candidate_stages(g: Graph, frozen: list[Op]) -> list[tuple[list[Op], str]]:
    """Prefixes of the frozen forward ops whose end leaves exactly one tensor alive (no pending residual), made of
    the kinds that run tile by tile (conv2d, add: a pool or reshape ends the candidates)."""
    out = []
    for i in range(len(frozen)):
        prefix = frozen[: i + 1]
        if frozen[i].kind not in ("conv2d", "add"):
            break
        produced = {n for o in prefix for n in o.outputs}
        later = {n for o in g.ops[i + 1:] for n in o.inputs}
        alive = produced & later
        if len(alive) == 1 and frozen[i].kind in ("conv2d", "add"):
            out.append((prefix, alive.pop()))
    return out
