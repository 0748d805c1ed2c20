"""Patch-based execution of the early stage is bit-identical to whole-tensor execution and keeps less alive."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from microtrain.compiler.liveness import live_bytes
from microtrain.compiler.patch import candidate_stages, make_stage, tile_graph
from microtrain.frontends.zoo import load_model
from microtrain.runtime.executor import Executor, run_stage_tiled


@pytest.mark.parametrize("model", ["mbv2-w0.35", "proxyless-w0.3", "mcunet-5fps"])
@pytest.mark.parametrize("grid", [2, 3, 4])
def test_tiled_stage_is_bit_exact(model, grid):
    g = load_model(model)
    frozen = [o for o in g.ops if o.kind in ("conv2d", "add")][:12]
    stages = candidate_stages(g, frozen)
    x = torch.from_numpy(np.random.default_rng(grid).integers(-128, 128, (2, 3, 128, 128)).astype(np.int8))
    ref = Executor(g).run(x, keep_all=True)
    for ops, out in stages[2::3]:  # a spread of stage ends, including one with a residual add inside
        stage = make_stage(g, ops, out, grid)
        assert torch.equal(run_stage_tiled(g, stage, x), ref[out]), (out, grid)
        assert stage.macs >= stage.whole_macs
        whole = max(live_bytes(g)[: len(ops)])
        assert max(live_bytes(tile_graph(g, stage))) < whole
