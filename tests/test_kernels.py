"""The torch int8 kernels equal a plain int64 numpy reference of the op table's semantics, bit for bit."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from microtrain.runtime import kernels as K


def conv_reference(x, x_zero, w, stride, pad, groups):
    """Direct int64 loops-over-taps convolution (no float anywhere)."""
    n, c, h, wd = x.shape
    o, cg, k, _ = w.shape
    xp = np.pad(x.astype(np.int64) - x_zero, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    out = np.zeros((n, o, ho, wo), np.int64)
    og = o // groups
    for oc in range(o):
        g = oc // og
        for i in range(k):
            for j in range(k):
                patch = xp[:, g * cg:(g + 1) * cg, i:i + stride * ho:stride, j:j + stride * wo:stride]
                out[:, oc] += np.einsum("nchw,c->nhw", patch, w[oc, :, i, j].astype(np.int64))
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.sampled_from([1, 3, 5]), stride=st.sampled_from([1, 2]),
       depthwise=st.booleans(), cin=st.sampled_from([3, 16, 600]), x_zero=st.integers(-128, 127))
def test_conv_accumulator_exact(seed, k, stride, depthwise, cin, x_zero):
    rng = np.random.default_rng(seed)
    if depthwise:
        cin = min(cin, 32)
    cout = cin if depthwise else 8
    groups = cin if depthwise else 1
    # extreme values stress the float32 chunking: |x - x_zero| up to 255, |w| up to 128
    x = rng.choice([-128, 127, 0, 5], size=(2, cin, 6, 6)).astype(np.int8)
    w = rng.choice([-128, 127, -1, 3], size=(cout, cin // groups, k, k)).astype(np.int8)
    acc = K.conv_acc(torch.from_numpy(x), x_zero, torch.from_numpy(w), stride, k // 2, groups)
    np.testing.assert_array_equal(acc.numpy(), conv_reference(x, x_zero, w, stride, k // 2, groups))


def test_requantize_rounds_half_to_even_and_clamps():
    acc = torch.tensor([[1, 3, 5, -1, -3, 10_000, -10_000]], dtype=torch.int32)
    m = torch.full((7,), 0.5, dtype=torch.float32)
    y = K.requantize(acc, torch.zeros(7, dtype=torch.int32), m, y_zero=0)
    assert y.tolist() == [[0, 2, 2, 0, -2, 127, -128]]


def test_avgpool_rounds_to_nearest():
    x = torch.tensor([[[[1, 2], [2, 2]], [[-1, -2], [-2, -2]]]], dtype=torch.int8)  # means 1.75, -1.75
    assert K.avgpool_int8(x).tolist() == [[2, -2]]
