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


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.sampled_from([1, 3, 5]), stride=st.sampled_from([1, 2]),
       depthwise=st.booleans(), cin=st.sampled_from([3, 16, 600]), x_zero=st.integers(-128, 127),
       y_zero=st.integers(-128, 127), pads=st.sampled_from([None, (0, 1, 0, 1), (1, 2, 2, 1)]))
def test_float_path_conv_requant_is_bit_exact(seed, k, stride, depthwise, cin, x_zero, y_zero, pads):
    """The float32 fast path (FloatConv + conv_acc_f32 + requant_f32) gives the int8 output and the clamp mask of
    requantize(conv_acc(...)) bit for bit, or says it cannot (exact False); biases include saturated ones."""
    rng = np.random.default_rng(seed)
    if depthwise:
        cin = min(cin, 32)
    cout = cin if depthwise else 8
    groups = cin if depthwise else 1
    x = torch.from_numpy(rng.integers(-128, 128, size=(2, cin, 7, 7)).astype(np.int8))
    w = torch.from_numpy(rng.choice([-128, 127, -1, 3, 0], size=(cout, cin // groups, k, k)).astype(np.int8))
    b = torch.from_numpy(rng.choice([0, 1_000, -70_000, 2**24, 2**31 - 1, -2**31 + 5, 123_456_789], size=cout)
                         .astype(np.int32))
    m = torch.from_numpy(rng.uniform(1e-5, 0.01, size=cout).astype(np.float32))
    padding = k // 2 if pads is None else pads
    lo, hi = -128, int(rng.integers(0, 128))
    fc = K.FloatConv(w, b, x_zero)
    if not fc.exact:
        assert cin == 600 and not depthwise  # only the long reductions can exceed 2**24
        return
    acc = K.conv_acc(x, x_zero, w, stride, padding, groups)
    v = torch.round((acc + b.view(1, -1, 1, 1)).to(torch.float32) * m.view(1, -1, 1, 1)) + y_zero
    want = v.clamp(lo, hi).to(torch.int8)
    y, yc, keep = K.requant_f32(K.conv_acc_f32(K.centered(x, x_zero), fc, stride, padding, groups), m, y_zero, lo, hi,
                                True)
    assert torch.equal(y, want)
    assert torch.equal(keep, (v >= lo) & (v <= hi))
    assert torch.equal(yc, want.to(torch.float32) - y_zero)
