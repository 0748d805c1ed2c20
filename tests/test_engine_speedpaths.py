"""The torch engine's speed paths (runtime/kernels.py float32 backward fast paths, the update's float weight reuse)
compute what torch's convolution backward and the plain formulas compute: the same sums (float32 reassociation
only), the same non-finite positions, and bit-identical int8 forward values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.grad import conv2d_input, conv2d_weight

from microtrain.autodiff.build import build_training_graph
from microtrain.runtime import kernels as K
from microtrain.runtime.trainstep import GraphTrainStep
from microtrain.sparse.scheme import resolve_scheme

from tiny import CLASSES, tiny_model


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()) + 1e-6)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("channels_last", [True, False])
def test_pointwise_grads_are_matrix_products(n, channels_last):
    g = torch.Generator().manual_seed(n)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randint(-128, 128, (n, 24, 5, 3), generator=g).float().contiguous(memory_format=fmt)
    gacc = torch.randn(n, 40, 5, 3, generator=g).contiguous(memory_format=fmt)
    w = torch.randint(-128, 128, (40, 24, 1, 1), generator=g).float()
    _close(K.pointwise_grad_weight(gacc, x), conv2d_weight(x, w.shape, gacc))
    _close(K.pointwise_grad_input(gacc, w), conv2d_input(x.shape, w, gacc))


@pytest.mark.parametrize("k,pad", [(3, 1), (5, 2), (7, 3), (3, 0), (5, 1)])
@pytest.mark.parametrize("n", [1, 2])
def test_depthwise_grad_input_is_the_flipped_forward_conv(k, pad, n):
    g = torch.Generator().manual_seed(k * 10 + pad)
    c, h = 12, 6
    w = torch.randint(-128, 128, (c, 1, k, k), generator=g).float()
    ho = h + 2 * pad - k + 1
    gacc = torch.randn(n, c, ho, ho, generator=g)
    _close(K.depthwise_grad_input(gacc, w, pad), conv2d_input((n, c, h, h), w, gacc, 1, pad, 1, c))


@pytest.mark.parametrize("k,stride,pads,h", [(5, 1, (2, 2, 2, 2), 4), (3, 1, (1, 1, 1, 1), 3), (7, 1, (3, 3, 3, 3), 4),
                                             (5, 2, (1, 2, 1, 2), 5), (3, 2, (0, 1, 0, 1), 2), (5, 1, (2, 2, 2, 2), 2)])
@pytest.mark.parametrize("n", [1, 4])
def test_depthwise_grad_weight_small_maps(k, stride, pads, h, n):
    g = torch.Generator().manual_seed(k + stride + h)
    c = 9
    x = torch.randint(-128, 128, (n, c, h, h), generator=g).float().contiguous(memory_format=torch.channels_last)
    t, b, left, r = pads
    xp = torch.nn.functional.pad(x, (left, r, t, b))
    ho = (h + t + b - k) // stride + 1
    gacc = torch.randn(n, c, ho, ho, generator=g)
    want = conv2d_weight(xp, (c, 1, k, k), gacc, stride, 0, 1, c)
    _close(K.depthwise_grad_weight_small(x, gacc, k, stride, pads), want)
    # a non-finite gradient reaches exactly the taps that connect it to an input (padded taps are not products)
    gacc[0, 0, 0, 0] = float("inf")
    got = K.depthwise_grad_weight_small(x, gacc, k, stride, pads)
    inside = torch.tensor([[0 <= ky - t < h and 0 <= kx - left < h for kx in range(k)] for ky in range(k)])
    assert torch.equal(~torch.isfinite(got[0, 0]), inside)
    assert bool(torch.isfinite(got[1:]).all())


@pytest.mark.parametrize("scheme", ["last:3", "full"])
def test_update_float_weights_equal_the_int8_weights(scheme):
    """The float32 weights the forward reuses from the update hold exactly the stored int8 values, and the forward
    (int8, bit-exact) is the same as from freshly converted weights."""
    g = tiny_model(seed=3)
    tg = build_training_graph(g, resolve_scheme(scheme, g), CLASSES)
    step, fresh = GraphTrainStep(tg), GraphTrainStep(tg)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(-128, 128, size=(4, 3, 16, 16)).astype(np.int8))
    y = torch.from_numpy(rng.integers(0, CLASSES, size=4))
    for _ in range(3):
        step.step(x, y, 0.05)
    convs = [o for o in tg.ops if o.kind == "conv2d" and any(n in step._wfloat for n in o.inputs[1:-1])]
    assert convs
    for op in convs:
        assert torch.equal(step._float_weight(op), step._full_weight(op).to(torch.float32))
    fresh.load_state_dict(step.state_dict())
    assert torch.equal(step.logits(x), fresh.logits(x))


def test_prefix_cache_keys_are_the_blake2b_of_each_image():
    """The in-place keys equal blake2b-128 of each image's bytes (shared entries and tests compute them so)."""
    import hashlib

    from microtrain.runtime.prefix_cache import image_keys

    x = torch.randint(-128, 128, (5, 3, 8, 8), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    for batch in (x, x.flip(3), x[:1]):
        assert image_keys(batch) == [hashlib.blake2b(im.numpy().tobytes(), digest_size=16).digest() for im in batch]
