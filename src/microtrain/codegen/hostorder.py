"""The host's float summation orders, measured, so the generated C can add in exactly the same order.

Float addition is not associative: a dot product summed in another order differs in the last bits, and in int8
training one last-bit difference is enough to flip a stochastic rounding decision, after which the two trajectories
drift apart. The host's reductions come from torch's own kernels (whose orders `runtime/*.c` reimplement) and, for
the fp32 head's two small matrix products, from the BLAS (MKL), whose order depends on the CPU, the shapes and even
the output column. Those two are measured here with the FPRev method (Xie et al., "FPRev: Revealing the Order of
Floating-Point Summation"): feeding ones with one pair (+M, -M) of huge values, a result of n - s says the pair meets
in a subtree of s leaves; the subtree sizes of all pairs give the summation tree. Whether a product is fused into its
addition is then decided by replaying the tree both ways against the BLAS on random data.

A tree becomes a postfix program for `mt_dot_tree` (runtime/mt_dot_tree.c): `k` pushes the rounded product
a[k] * b[k]; `FMA + k` replaces the top t by fma(a[k], b[k], t); `ADD` pops the top and adds it to the new top.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

FMA, ADD = 1 << 14, -1
Tree = int | tuple  # a leaf index, or (left, right)


def _pairs_lca(n: int, cols: int, f) -> np.ndarray:
    """S[col, i, j] = leaves under the subtree where terms i and j first meet, for every output column."""
    big = float(2.0 ** (24 + int(np.ceil(np.log2(max(n, 2)))) + 2))
    s = np.zeros((cols, n, n), np.int64)
    for i in range(n):
        for j in range(i + 1, n):
            a = torch.ones(n)
            a[i], a[j] = big, -big
            s[:, i, j] = s[:, j, i] = n - f(a).astype(np.int64)
    return s


def _build(s: np.ndarray, leaves: list[int]) -> Tree:
    if len(leaves) == 1:
        return leaves[0]
    top = max(s[i, j] for i in leaves for j in leaves if i < j)
    groups: list[list[int]] = []
    for i in leaves:
        for grp in groups:
            if s[i, grp[0]] < top:
                grp.append(i)
                break
        else:
            groups.append([i])
    if len(groups) != 2:
        raise ValueError("not a binary summation tree")
    return (_build(s, groups[0]), _build(s, groups[1]))


def program(tree: Tree, fuse: dict[tuple[int, ...], str], path: tuple[int, ...] = ()) -> list[int]:
    """Postfix program of a tree; `fuse[path]` says how the node at `path` adds: "right" (its right child, a leaf, is
    fused into the left partial sum), "left" (the other way round) or absent (a plain addition)."""
    if isinstance(tree, int):
        return [tree]
    left, right = tree
    how = fuse.get(path)
    if how == "right":
        return [*program(left, fuse, (*path, 0)), FMA + right]
    if how == "left":
        return [*program(right, fuse, (*path, 1)), FMA + left]
    return [*program(left, fuse, (*path, 0)), *program(right, fuse, (*path, 1)), ADD]


def _leaves(tree: Tree) -> list[int]:
    return [tree] if isinstance(tree, int) else _leaves(tree[0]) + _leaves(tree[1])


def _joins(tree: Tree, path: tuple[int, ...] = ()) -> list[tuple[tuple[int, ...], Tree, Tree]]:
    if isinstance(tree, int):
        return []
    return [(path, *tree), *_joins(tree[0], (*path, 0)), *_joins(tree[1], (*path, 1))]


EXACT_ONE_PLUS = float(np.float32(1 + 2.0 ** -12))  # (1 + 2^-12)^2 rounds in float32; fused, -1 + it does not


def _fusion(tree: Tree, n: int, dot) -> dict[tuple[int, ...], str]:
    """For every node that adds a leaf: is the leaf's product fused into the addition? Probe with one product of
    exactly -1 inside the partial sum and one inexact product: a fused addition keeps the product's last bits."""
    fused_result = float(np.float32(2.0 ** -11 + 2.0 ** -24))

    def fused(into: int, leaf: int) -> bool:
        a, b = np.zeros(n, np.float32), np.zeros(n, np.float32)
        a[into], b[into] = 1.0, -1.0
        a[leaf] = b[leaf] = EXACT_ONE_PLUS
        return float(dot(a, b)) == fused_result

    out: dict[tuple[int, ...], str] = {}
    for path, left, right in _joins(tree):
        if isinstance(right, int) and fused(_leaves(left)[0], right):
            out[path] = "right"
        elif isinstance(left, int) and fused(_leaves(right)[0], left):
            out[path] = "left"
    return out


def evaluate(prog: list[int], a: np.ndarray, b: np.ndarray) -> np.float32:
    """What mt_dot_tree computes (float32, with exact fused multiply-adds)."""
    stack: list[np.float32] = []
    for op in prog:
        if op == ADD:
            y = stack.pop()
            stack[-1] = np.float32(stack[-1] + y)
        elif op >= FMA:
            k = op - FMA
            stack[-1] = np.float32(np.float64(a[k]) * np.float64(b[k]) + np.float64(stack[-1]))
        else:
            stack.append(np.float32(a[op] * b[op]))
    return stack[0]


def _measure(n: int, cols: int, dot) -> list[list[int]] | None:
    """Per output column, the program of `dot(a, b)[col] = sum_i a[i] * b[col, i]`, validated on random data."""
    s = _pairs_lca(n, cols, lambda a: dot(a.numpy(), np.ones((cols, n), np.float32)))
    progs = []
    for col in range(cols):
        tree = _build(s[col], list(range(n)))

        def one(a: np.ndarray, b: np.ndarray, col: int = col) -> np.float32:
            bb = np.zeros((cols, n), np.float32)
            bb[col] = b
            return dot(a, bb)[col]

        progs.append(program(tree, _fusion(tree, n, one)))
    rng = np.random.default_rng(0)
    for _ in range(8):
        a, b = rng.standard_normal(n).astype(np.float32), rng.standard_normal((cols, n)).astype(np.float32)
        ref = dot(a, b)
        if any(evaluate(p, a, b[c]) != ref[c] for c, p in enumerate(progs)):
            return None
    return progs


@lru_cache(maxsize=32)
def head_programs(c: int, k: int) -> tuple[tuple[tuple[int, ...], ...] | None, tuple[tuple[int, ...], ...] | None]:
    """Programs of the host's fp32 head for C features and K classes, batch 1 (runtime/trainstep.py: `f @ w.t()` and
    `g @ w`): forward logits[n] = sum_c f[c] * w[n, c], one per class; input gradient gx[c] = sum_n g[n] * w[n, c],
    one per feature. None where the measured order does not reproduce the host (the C then uses a plain chain)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def fwd(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # b: [k, c] = w
            return (torch.from_numpy(a)[None] @ torch.from_numpy(b).t()).numpy()[0]

        def gi(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # b: [c, k] = w.t()
            return (torch.from_numpy(a)[None] @ torch.from_numpy(np.ascontiguousarray(b.T))).numpy()[0]

        try:
            f, g = _measure(c, k, fwd), _measure(k, c, gi)
        except ValueError:
            return None, None
    finally:
        torch.set_num_threads(old)
    return (tuple(map(tuple, f)) if f else None, tuple(map(tuple, g)) if g else None)


@lru_cache(maxsize=1)
def sum_lanes() -> int:
    """The vector width of torch's float sum kernel (aten SumKernel.cpp: rows of >= lanes elements are summed as
    lanes-wide vectors): the width whose emulation reproduces torch.sum on random rows."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 97)).astype(np.float32)
    ref = torch.from_numpy(x).sum(dim=1).numpy()
    for lanes in (8, 16, 4):
        if all(_torch_sum(row, lanes) == r for row, r in zip(x, ref, strict=True)):
            return lanes
    return 8


def _torch_sum(x: np.ndarray, lanes: int) -> np.float32:
    """Emulation of torch's cascade sum of one contiguous row (the algorithm runtime/mt_math.c implements)."""
    f32 = np.float32

    def row_sum(items: np.ndarray) -> np.ndarray:  # items [size, w]
        size, w = items.shape
        acc = np.zeros((4, 4, w), np.float32)
        rows = size // 4
        p = max(4, (int(rows - 1).bit_length() if rows > 2 else 1) // 4)
        step, mask, i = 1 << p, (1 << p) - 1, 0
        while i + step <= rows:
            for _ in range(step):
                acc[0] = (acc[0] + items[i * 4: i * 4 + 4]).astype(f32)
                i += 1
            for j in range(1, 4):
                acc[j] = (acc[j] + acc[j - 1]).astype(f32)
                acc[j - 1] = 0
                if i & (mask << (j * p)):
                    break
        for r in range(i, rows):
            acc[0] = (acc[0] + items[r * 4: r * 4 + 4]).astype(f32)
        for j in range(1, 4):
            acc[0] = (acc[0] + acc[j]).astype(f32)
        for r in range(rows * 4, size):
            acc[0, 0] = (acc[0, 0] + items[r]).astype(f32)
        for k in range(1, 4):
            acc[0, 0] = (acc[0, 0] + acc[0, k]).astype(f32)
        return acc[0, 0]

    n = len(x)
    if n >= lanes:
        nv = n // lanes
        vec = row_sum(x[: nv * lanes].reshape(nv, lanes))
        s = f32(0)
        for v in x[nv * lanes:]:
            s = f32(s + v)
        for v in vec:
            s = f32(s + v)
    else:
        s = row_sum(x.reshape(n, 1))[0]
    return f32(f32(0) + s)


def _sleef_expf(d: np.float32) -> np.float32:
    """SLEEF's expf (1-ulp, fused multiply-adds; what runtime/mt_math.c implements), in numpy."""
    f32 = np.float32

    def fma(a, b, c):
        return f32(np.float64(a) * np.float64(b) + np.float64(c))

    d = f32(d)
    q = f32(np.rint(f32(d * f32(1.442695040888963407359924681001892137))))
    s = fma(q, f32(-0.693145751953125), d)
    s = fma(q, f32(-1.428606765330187045e-06), s)
    u = f32(0.000198527617612853646278381)
    for c in (0.00139304355252534151077271, 0.00833336077630519866943359, 0.0416664853692054748535156,
              0.166666671633720397949219, 0.5):
        u = fma(u, s, f32(c))
    u = f32(f32(1) + fma(f32(s * s), u, s))
    if d < -104:
        return f32(0)
    qi = int(q)
    return f32(f32(u * f32(2.0 ** (qi >> 1))) * f32(2.0 ** (qi - (qi >> 1))))


def _softmax(z: np.ndarray, lanes: int) -> np.ndarray:
    """torch's softmax of one row as runtime/mt_softmax_ce.c computes it (reduce_all with `lanes`-wide vectors)."""
    f32 = np.float32
    e = np.array([_sleef_expf(f32(v - z.max())) for v in z], np.float32)
    if len(e) < lanes:
        s = e[0]
        for v in e[1:]:
            s = f32(s + v)
    else:
        acc, d = e[:lanes].copy(), lanes
        while d + lanes <= len(e):
            acc, d = (acc + e[d:d + lanes]).astype(f32), d + lanes
        acc[: len(e) - d] = (acc[: len(e) - d] + e[d:]).astype(f32)
        h = lanes // 2
        while h >= 1:
            acc, h = (acc + acc[np.arange(lanes) ^ h]).astype(f32), h // 2
        s = acc[0]
    return (e * f32(f32(1) / s)).astype(f32)


@lru_cache(maxsize=1)
def softmax_lanes() -> int:
    """The vector width of torch's softmax kernel, measured on rows long enough to tell 8, 16 and 32 apart."""
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((8, 45)) * 3).astype(np.float32)
    with torch.no_grad():
        ref = torch.softmax(torch.from_numpy(z), dim=1).numpy()
    for lanes in (16, 8, 32):
        if all((_softmax(row, lanes) == r).all() for row, r in zip(z, ref, strict=True)):
            return lanes
    return 16


def _blocked_chain(g: np.ndarray, w: np.ndarray, kb: int) -> np.ndarray:
    """sum_o g[o] * w[o] as ceil(O / kb) equal blocks of fused multiply-add chains, added in order (in numpy)."""
    o = len(g)
    size = -(-o // -(-o // kb))
    total = None
    for o0 in range(0, o, size):
        acc = np.zeros((w.shape[1], g.shape[1]), np.float32)
        for k in range(o0, min(o0 + size, o)):
            acc = (w[k][:, None].astype(np.float64) * g[k][None].astype(np.float64) + acc).astype(np.float32)
        total = acc if total is None else (total + acc).astype(np.float32)
    return total


@lru_cache(maxsize=1)
def conv_kblock() -> int:
    """The longest reduction over output channels that torch's pointwise-conv input gradient (oneDNN) runs as one
    chain of fused multiply-adds before it splits it into equal blocks added in order: the candidate whose emulation
    reproduces `conv2d_input` on random data for several channel counts (runtime/mt_conv2d_grad_input.c sums so)."""
    from torch.nn.grad import conv2d_input

    rng = np.random.default_rng(0)
    cases = []
    for o in (300, 400, 576, 800):
        g = rng.standard_normal((o, 8)).astype(np.float32)
        w = rng.standard_normal((o, 4)).astype(np.float32)
        with torch.no_grad():
            ref = conv2d_input((1, 4, 1, 8), torch.from_numpy(w[:, :, None, None]),
                               torch.from_numpy(g[None, :, None, :]), 1, 0).numpy()[0, :, 0, :]
        cases.append((g, w, ref))
    for kb in (384, 256, 512, 192, 128, 320, 448, 1 << 20):
        if all((_blocked_chain(g, w, kb) == ref).all() for g, w, ref in cases):
            return kb
    return 384
