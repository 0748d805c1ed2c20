"""Imported int8 TFLite models (frontends/tflite.py) compute what TFLite computes.

Oracle: LiteRT (`ai-edge-litert`) with its reference kernels (OpResolverType.BUILTIN_REF: the kernels TFLite Micro
shares), and independently the numpy int64 implementation of gemmlowp's fixed-point arithmetic in ir/quant.py.
The fixtures are small int8 models written in the test with the `tflite` package's flatbuffer builder
(frontends/tflite_write.py); no TensorFlow, no downloads. Every op is compared given LiteRT's own inputs (bit for
bit), and whole-model logits given the same image.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from microtrain.frontends.pkl import ModelLoadError
from microtrain.frontends.tflite_write import TFLiteWriter
from microtrain.frontends.zoo import load_model
from microtrain.ir import quant
from microtrain.runtime import kernels as K
from microtrain.runtime.executor import Executor

litert = pytest.importorskip("ai_edge_litert.interpreter")
class Net:
    """Random int8 layers whose output scales keep activations spread over int8 (scale from fan-in)."""

    def __init__(self, seed, hwc, float_in=False):
        self.w = TFLiteWriter()
        self.rng = np.random.default_rng(seed)
        h, w, c = hwc
        if float_in:
            self.inp = self.w.tensor((1, h, w, c), np.float32)
            self.x = self.w.tensor((1, h, w, c), scale=1 / 255, zero=-128)
            self.w.op("QUANTIZE", [self.inp], [self.x])
        else:
            self.x = self.inp = self.w.tensor((1, h, w, c), scale=1 / 255, zero=-128)
        self.shape, self.scale, self.zero = (h, w, c), 1 / 255, -128

    def _out(self, shape, fan_in, act):
        s = self.scale * float(self.rng.uniform(0.004, 0.01)) * 30 * np.sqrt(fan_in) / 4
        z = int(self.rng.integers(-128, -90)) if act in ("RELU", "RELU6") else int(self.rng.integers(-20, 20))
        if act == "RELU6":  # real values scaled up so that 6.0 is inside the int8 range: a real clamp at q(6)
            s = 6.0 / 150
        return self.w.tensor((1, *shape), scale=s, zero=z), s, z

    def conv(self, cout, k, stride=1, padding="SAME", act="RELU6", depthwise=False):
        h, w, c = self.shape
        if padding == "SAME":
            oh, ow = -(-h // stride), -(-w // stride)
        else:
            oh, ow = (h - k) // stride + 1, (w - k) // stride + 1
        if depthwise:
            cout = c
            wt = self.rng.integers(-127, 128, (1, k, k, c))
            fan = k * k
        else:
            wt = self.rng.integers(-127, 128, (cout, k, k, c))
            fan = k * k * c
        ws = self.rng.uniform(0.5, 1.5, cout).astype(np.float32) * 0.01
        natural = self.scale * 0.007 * 30 * np.sqrt(fan) / 4
        if act == "RELU6":  # the same integer distribution at the RELU6 output scale below
            ws = (ws * (6.0 / 150) / natural).astype(np.float32)
        wi = self.w.tensor(wt.shape, np.int8, scale=ws, zero=0, data=wt, axis=3 if depthwise else 0)
        bs = (self.scale * ws).astype(np.float32)
        bias = self.rng.integers(-3000, 3000, cout)
        bi = self.w.tensor((cout,), np.int32, scale=bs, zero=0, data=bias)
        y, s, z = self._out((oh, ow, cout), fan, act)
        self.w.op("DEPTHWISE_CONV_2D" if depthwise else "CONV_2D", [self.x, wi, bi], [y], stride=stride,
                  padding=padding, act=act)
        self.x, self.shape, self.scale, self.zero = y, (oh, ow, cout), s, z
        return y

    def pad(self, t, b, lf, r):
        h, w, c = self.shape
        p = self.w.tensor((4, 2), np.int32, data=np.array([[0, 0], [t, b], [lf, r], [0, 0]]))
        y = self.w.tensor((1, h + t + b, w + lf + r, c), scale=self.scale, zero=self.zero)
        self.w.op("PAD", [self.x, p], [y])
        self.x, self.shape = y, (h + t + b, w + lf + r, c)

    def add(self, other, other_scale, other_zero, act="NONE"):
        s = max(self.scale, other_scale) * 1.3
        y = self.w.tensor((1, *self.shape), scale=s, zero=3)
        self.w.op("ADD", [self.x, other], [y], act=act)
        self.x, self.scale, self.zero = y, s, 3

    def pool(self, mean=False):
        h, w, c = self.shape
        if mean:
            ax = self.w.tensor((2,), np.int32, data=np.array([1, 2]))
            y = self.w.tensor((1, c), scale=self.scale, zero=self.zero)
            self.w.op("MEAN", [self.x, ax], [y])
        else:
            y0 = self.w.tensor((1, 1, 1, c), scale=self.scale, zero=self.zero)
            self.w.op("AVERAGE_POOL_2D", [self.x], [y0], filter=(h, w), padding="VALID", stride=1)
            sh = self.w.tensor((2,), np.int32, data=np.array([1, c]))
            y = self.w.tensor((1, c), scale=self.scale, zero=self.zero)
            self.w.op("RESHAPE", [y0, sh], [y])
        self.x, self.shape = y, (c,)

    def fc(self, n, softmax=True, dequantize=False):
        (c,) = self.shape
        wt = self.rng.integers(-127, 128, (n, c))
        ws = np.float32(0.01)
        wi = self.w.tensor(wt.shape, np.int8, scale=ws, zero=0, data=wt)
        bi = self.w.tensor((n,), np.int32, scale=self.scale * ws, zero=0, data=self.rng.integers(-500, 500, n))
        y = self.w.tensor((1, n), scale=self.scale * float(ws) * np.sqrt(c) * 150, zero=0)  # logits spread out
        self.w.op("FULLY_CONNECTED", [self.x, wi, bi], [y])
        self.logits = y
        out = y
        if softmax:
            out = self.w.tensor((1, n), scale=1 / 256, zero=-128)
            self.w.op("SOFTMAX", [y], [out])
        if dequantize:
            d = self.w.tensor((1, n), np.float32)
            self.w.op("DEQUANTIZE", [out], [d])
            out = d
        return self.w.finish([self.inp], [out])


def mbv1_like(seed=0, hwc=(20, 28, 3), mean=False, logits=False):
    """MobileNetV1/V2-style: stride-2 SAME stem (TF's asymmetric padding), depthwise separable blocks, a residual
    add, Keras ZeroPadding2D + VALID stride-2 depthwise, global pool, FC head, softmax."""
    n = Net(seed, hwc)
    n.conv(8, 3, 2)
    n.conv(8, 3, 1, depthwise=True)
    n.conv(12, 1, 1, act="NONE")
    keep, ks, kz = n.x, n.scale, n.zero
    n.conv(24, 1, 1)
    n.conv(24, 3, 1, depthwise=True)
    n.conv(12, 1, 1, act="NONE")
    n.add(keep, ks, kz)
    n.pad(0, 1, 0, 1)
    n.conv(12, 3, 2, padding="VALID", depthwise=True)
    n.conv(16, 1, 1, act="RELU")
    n.pool(mean=mean)
    return n, n.fc(5, softmax=not logits)


def gray_odd(seed=1, hwc=(15, 11, 1), logits=False):
    """Grayscale, odd non-square input, float in (QUANTIZE) and out (DEQUANTIZE), 5x5 stride-2 SAME (pads 1/2)."""
    n = Net(seed, hwc, float_in=True)
    n.conv(6, 3, 2, act="RELU")
    n.conv(10, 5, 2, act="RELU6")
    n.pool()
    return n, n.fc(4, softmax=not logits, dequantize=not logits)


def resnet_like(seed=2, hwc=(16, 12, 3), logits=False):
    """No depthwise: plain convs with residual adds (fused RELU on the add), MEAN pooling."""
    n = Net(seed, hwc)
    n.conv(8, 3, 2, act="RELU")
    keep, ks, kz = n.x, n.scale, n.zero
    n.conv(8, 3, 1, act="RELU")
    n.conv(8, 3, 1, act="NONE")
    n.add(keep, ks, kz, act="RELU")
    n.conv(16, 3, 2, act="RELU6")
    n.pool(mean=True)
    return n, n.fc(3, softmax=not logits)


FIXTURES = {"mbv1": mbv1_like, "gray_odd": gray_odd, "resnet": resnet_like}


def interpreter(path, ref=True):
    kw = {"experimental_op_resolver_type": litert.OpResolverType.BUILTIN_REF} if ref else {}
    it = litert.Interpreter(model_path=str(path), experimental_preserve_all_tensors=True, **kw)
    it.allocate_tensors()
    return it


def feed(it, x_chw):
    inp = it.get_input_details()[0]
    x = x_chw.transpose(1, 2, 0)[None]
    if inp["dtype"] == np.float32:  # QUANTIZE at the input: the real value whose quantization is x
        s, z = inp["quantization"] if inp["quantization"][0] else (1 / 255, -128)
        x = ((x.astype(np.float32) - z) * np.float32(s)).astype(np.float32)
    it.set_tensor(inp["index"], x)
    it.invoke()


def ref_tensor(it, name, shape):
    r = it.get_tensor(int(name[1:]))
    return r.reshape((shape[1], shape[2], shape[0])).transpose(2, 0, 1) if len(shape) == 3 else r.reshape(shape)


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def model(request, tmp_path_factory):
    net, buf = FIXTURES[request.param]()
    p = tmp_path_factory.mktemp("tfl") / f"{request.param}.tflite"
    p.write_bytes(buf)
    return p, net


def test_every_op_bit_exact_vs_litert_reference(model):
    path, _ = model
    g = load_model(path)
    assert g.requant == quant.Requant.TFLITE
    it, ex = interpreter(path), Executor(g)
    c, h, w = g.tensors[g.inputs[0]].shape
    xs = np.random.default_rng(5).integers(-128, 128, (6, c, h, w)).astype(np.int8)
    compared, clamped, spread = 0, 0, set()
    for x in xs:
        feed(it, x)
        for op in g.ops:
            env = {n: torch.from_numpy(ref_tensor(it, n, g.tensors[n].shape)[None].copy())
                   for n in op.inputs if g.tensors[n].role in ("act", "input")}
            ours = ex.run_op(op, env)[0].numpy()
            ref = ref_tensor(it, op.outputs[0], g.tensors[op.outputs[0]].shape)
            np.testing.assert_array_equal(ours, ref, err_msg=f"{path.name} {op.name} ({op.kind})")
            lo, hi = op.attrs.get("act_min", -128), op.attrs.get("act_max", 127)
            clamped += int(((ref == lo) & (lo > -128)).sum() + ((ref == hi) & (hi < 127)).sum())
            spread.update(np.unique(ref).tolist())
            compared += ref.size
    assert compared > 1000 and len(spread) > 100  # not a saturated, trivially equal model
    assert clamped > 0  # the fused activations' clamps are exercised


def test_whole_model_logits_and_top1(model):
    path, net = model
    g = load_model(path)
    it = interpreter(path)
    c, h, w = g.tensors[g.inputs[0]].shape
    xs = np.random.default_rng(6).integers(-128, 128, (16, c, h, w)).astype(np.int8)
    ours = Executor(g).run(torch.from_numpy(xs))[g.outputs[0]].numpy()
    refs = []
    for x in xs:
        feed(it, x)
        refs.append(it.get_tensor(net.logits).reshape(-1))
    refs = np.stack(refs)
    np.testing.assert_array_equal(ours, refs)
    assert (ours.argmax(1) == refs.argmax(1)).all() and len(np.unique(refs)) > 20


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_logits_equal_tflite_micro_on_real_images(name, tmp_path):
    """The second oracle, TensorFlow Lite Micro's own interpreter (`tflite-micro`): the models ending at their
    int8 logits give the same logits, bit for bit, on real images (TFLM's FULLY_CONNECTED rounds twice, as
    ir/ops.py states; LiteRT's rounds once, so LiteRT can differ by one step on a near-tie)."""
    tflm = pytest.importorskip("tflite_micro.python.tflite_micro.runtime")
    net, buf = FIXTURES[name](logits=True)
    p = tmp_path / f"{name}.tflite"
    p.write_bytes(buf)
    g = load_model(p)
    x, _ = model_images(g, 60, seed=7)
    ours = Executor(g).run(torch.from_numpy(x))[g.outputs[0]].numpy()
    it = tflm.Interpreter.from_bytes(buf, arena_size=1 << 20)
    ref = []
    for img in x:
        xin = img.transpose(1, 2, 0)[None]
        if it.get_input_details(0)["dtype"] == np.float32:  # QUANTIZE at the input, scale 1/255, zero -128
            xin = ((xin.astype(np.float32) + 128) * np.float32(1 / 255)).astype(np.float32)
        it.set_input(xin, 0)
        it.invoke()
        ref.append(it.get_output(0).reshape(-1))
    np.testing.assert_array_equal(ours, np.stack(ref))
    assert len(np.unique(ours)) > 20


def test_shapes_quantization_and_padding_come_from_the_file(tmp_path):
    net, buf = gray_odd()
    p = tmp_path / "g.tflite"
    p.write_bytes(buf)
    g = load_model(p)
    x = g.tensors[g.inputs[0]]
    assert x.shape == (1, 15, 11) and x.zero == -128 and abs(x.scale - 1 / 255) < 1e-9
    conv1 = g.ops[1]  # 5x5 stride 2 SAME on 8x6: TF pads 1 before, 2 after
    assert (conv1.attrs["padding"], conv1.attrs["pad_bottom"], conv1.attrs["pad_right"]) == (1, 2, 2)
    z = g.tensors[conv1.outputs[0]].zero  # RELU6 at scale 6/150: clamp to [z, z + 150]
    assert conv1.attrs["act_min"] == z > -128 and conv1.attrs["act_max"] == z + 150


def test_fixed_point_torch_equals_numpy_int64():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.integers(-2**31, 2**31, 20000), [-2**31, 2**31 - 1, 0, 1, -1]])
    m = np.concatenate([rng.uniform(1e-6, 4, 20000), rng.uniform(1e-9, 1e-6, 5)])
    q, s = quant.quantize_multiplier(m)
    want = quant.multiply_by_quantized_multiplier(x, q, s)
    got = K.mbqm(torch.from_numpy(x), torch.from_numpy(q.astype(np.int64)), torch.from_numpy(s.astype(np.int64)))
    np.testing.assert_array_equal(got.numpy(), want)
    # the fixed-point value approximates x * m within one unit plus the int32 range
    inside = np.abs(x * m) < 2**30
    assert np.all(np.abs(want[inside] - x[inside] * m[inside]) <= 1.0 + 1e-6 * np.abs(x[inside] * m[inside]))


def test_zoo_models_keep_the_float32_rule():
    assert load_model("mcunet-5fps").requant == quant.Requant.FLOAT32


def _one_op_model(kind, **opts):
    w = TFLiteWriter()
    x = w.tensor((1, 8, 8, 4), scale=0.1, zero=0)
    y = w.tensor((1, 4, 4, 4), scale=0.1, zero=0)
    w.op(kind, [x], [y], filter=(2, 2), stride=2, padding="VALID", **opts)
    return w.finish([x], [y])


@pytest.mark.parametrize("kind,opts,why", [("L2_POOL_2D", {}, "unsupported op"),
                                           ("AVERAGE_POOL_2D", {"act": "RELU6"}, "fused activation"),
                                           ("MAX_POOL_2D", {}, "does not end in a FULLY_CONNECTED")])
def test_unsupported_op_is_one_line_naming_it(tmp_path, sample_images, kind, opts, why):
    p = tmp_path / "m.tflite"
    p.write_bytes(_one_op_model(kind, **opts))
    with pytest.raises(ModelLoadError) as e:
        load_model(p)
    assert (kind in str(e.value) or kind == "MAX_POOL_2D") and why in str(e.value) and "\n" not in str(e.value)
    if kind == "MAX_POOL_2D":  # imported (a model with no head is what is refused)
        return
    r = subprocess.run([sys.executable, "-m", "microtrain", "predict", "--model", str(p), sample_images["chelsea"]],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("microtrain: error: ") and kind in r.stderr
    assert r.stderr.count("\n") == 1


def test_depth_multiplier_and_corrupt_files_are_refused(tmp_path):
    w = TFLiteWriter()
    x = w.tensor((1, 6, 6, 2), scale=0.1, zero=0)
    wt = w.tensor((1, 3, 3, 4), np.int8, scale=np.full(4, 0.01), data=np.ones((1, 3, 3, 4)), axis=3)
    y = w.tensor((1, 6, 6, 4), scale=0.1, zero=0)
    w.op("DEPTHWISE_CONV_2D", [x, wt], [y], multiplier=2)
    p = tmp_path / "dm.tflite"
    p.write_bytes(w.finish([x], [y]))
    with pytest.raises(ModelLoadError, match="depth multiplier 2"):
        load_model(p)
    _, buf = mbv1_like()
    rng = np.random.default_rng(0)
    outcomes = {"loaded": 0, "refused": 0}
    for i in range(150):  # truncations and byte flips: a graph that passes every check, or one line
        b = bytearray(buf[: rng.integers(0, len(buf))] if i % 3 == 0 else buf)
        for _ in range(rng.integers(1, 8)):
            if b:
                b[rng.integers(0, len(b))] = rng.integers(0, 256)
        q = tmp_path / f"c{i}.tflite"
        q.write_bytes(bytes(b))
        try:
            load_model(q)
            outcomes["loaded"] += 1
        except ModelLoadError as e:
            assert "\n" not in str(e) and str(q) in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 50


# ---- downstream: train, plan, compile the imported graphs (C on the host and on the Cortex-M4) ----------------------
def model_images(g, n, seed=1):
    """Real images (CIFAR-10 / scikit-image crops) in the imported model's own input shape (gray, non-square)."""
    from microtrain.data.datasets import model_resolution, resize_batch
    from microtrain.data.samples import real_images

    x, y, _ = real_images(n, 32, seed=seed, num_classes=3)
    pix = torch.from_numpy((x.astype(np.int16) + 128).astype(np.uint8))
    return resize_batch(pix, model_resolution(g), crop=1.0).numpy(), np.asarray(y) % 3


def imported(name, tmp_path):
    net, buf = FIXTURES[name]()
    p = tmp_path / f"{name}.tflite"
    p.write_bytes(buf)
    return load_model(p)


@pytest.mark.parametrize("name,scheme", [("mbv1", "full"), ("gray_odd", "last:1"), ("resnet", "bias-only"),
                                         ("mbv1", "last:3")])
def test_host_c_training_step_equals_torch_engine(name, scheme, tmp_path):
    """The generated C program of an imported graph (TFLite's fixed-point kernels, mt_tflite.c) against the torch
    engine: the first step's int8 activations bit for bit, its loss, and the predictions of the final state."""
    from microtrain.autodiff.build import build_training_graph
    from microtrain.codegen.project import toolchain
    from microtrain.compiler.memory import plan_training_graph
    from microtrain.sparse.scheme import resolve_scheme
    from test_codegen import check, run_parity

    if toolchain("host") is not None:
        pytest.skip("host C toolchain not installed")
    g = imported(name, tmp_path)
    x, y = model_images(g, 14)
    tg = build_training_graph(g, resolve_scheme(scheme, g), 3)
    sched, best = plan_training_graph(tg)
    out = tmp_path / "c"
    check(*run_parity(sched, best.plan, out, x[:10], y[:10], 0.05, x[10:]), out, sched)


def test_cortex_m4_equals_host_on_imported_graph(tmp_path):
    """mbv1-like (non-square, asymmetric padding, residual add, fused clamps): 6 steps in QEMU and on the host end
    with byte-identical state and losses; the program links into 256 KB / 1 MB."""
    from microtrain.autodiff.build import build_training_graph
    from microtrain.codegen.project import SRAM_BUDGET, measure_memory, run_host_and_device, toolchain
    from microtrain.compiler.memory import plan_training_graph
    from microtrain.sparse.scheme import resolve_scheme

    if toolchain("cortex-m4") is not None:
        pytest.skip("arm-none-eabi-gcc / qemu-system-arm not installed")
    g = imported("mbv1", tmp_path)
    x, y = model_images(g, 6)
    tg = build_training_graph(g, resolve_scheme("last:4", g), 3)
    sched, best = plan_training_graph(tg)
    res_host, res_m4 = run_host_and_device(sched, best.plan, tmp_path, x, y, np.full(len(y), 0.05, np.float32))
    assert (res_host["dir"] / "state.bin").read_bytes() == (res_m4["dir"] / "state.bin").read_bytes()
    assert np.float32(res_host["losses"]).tobytes() == np.float32(res_m4["losses"]).tobytes()
    mem = measure_memory(res_m4["dir"], res_m4, best.plan)
    assert mem["fits"] and mem["sram_total_bytes"] <= SRAM_BUDGET


def test_asymmetric_padding_backward_equals_autograd(tmp_path):
    """The torch engine's conv input and weight gradients with TF's bottom/right padding (mbv1's stride-2 convs)
    equal autograd through F.conv2d on the explicitly padded input."""
    import torch.nn.functional as F

    from microtrain.autodiff.build import build_training_graph
    from microtrain.ir.ops import conv_pads
    from microtrain.runtime.trainstep import GraphTrainStep
    from microtrain.sparse.scheme import resolve_scheme

    g = imported("mbv1", tmp_path)
    tg = build_training_graph(g, resolve_scheme("full", g), 3)
    step = GraphTrainStep(tg, precision="fp32")
    asym = [o for o in tg.ops if o.kind == "conv2d_grad_input" and "pad_bottom" in o.attrs]
    assert len(asym) == 1  # conv6 (the folded PAD); the stem's input gets no gradient
    rng = torch.Generator().manual_seed(0)
    for op in asym:
        conv = tg.op(op.attrs["conv"])
        xt = tg.tensors[conv.inputs[0]]
        t, b, left, r = conv_pads(conv.attrs)
        assert (t, left) != (b, r)
        x = torch.randn((2, *xt.shape), generator=rng, requires_grad=True)
        w = step._full_weight(conv).to(torch.float32)
        y = F.conv2d(F.pad(x, (left, r, t, b)), w, None, conv.attrs["stride"], 0, 1, conv.attrs["groups"])
        gacc = torch.randn(y.shape, generator=rng)
        (y * gacc).sum().backward()
        got = step._conv2d_grad_input(op, {op.inputs[0]: gacc}, True)[0]
        torch.testing.assert_close(got, x.grad, rtol=1e-5, atol=1e-4)
    upd = [o for o in tg.ops if o.kind == "conv2d_update" and "pad_bottom" in o.attrs
           and any(p.endswith("w_train") for p in o.attrs["params"])]
    assert upd
    for op in upd:
        conv = tg.op(op.attrs["conv"])
        xs = tg.tensors[op.inputs[1]]
        t, b, left, r = conv_pads(conv.attrs)
        xq = torch.randint(-128, 128, (2, *xs.shape), generator=rng, dtype=torch.int8)
        wname = next(p for p in op.attrs["params"] if p.endswith("w_train"))
        w = torch.zeros(tg.tensors[wname].shape, requires_grad=True)
        xf = F.pad(xq.to(torch.float32) - xs.zero, (left, r, t, b))
        groups = w.shape[0] if op.attrs["depthwise"] else 1
        y = F.conv2d(xf, w, None, op.attrs["stride"], 0, 1, groups)
        gacc = torch.randn(y.shape, generator=rng)
        (y * gacc).sum().backward()
        got = step._conv_grads(op, {op.inputs[0]: gacc, op.inputs[1]: xq})[wname]
        torch.testing.assert_close(got, w.grad, rtol=1e-5, atol=1e-3)


def test_autodiff_names_an_op_without_a_gradient_rule(tmp_path):
    """A forward op the backward reaches but has no rule for is an error naming it, never a silent stop."""
    from microtrain.autodiff.build import build_training_graph
    from microtrain.errors import MicrotrainError
    from microtrain.ir.graph import Op, Tensor
    from microtrain.sparse.scheme import resolve_scheme

    g = imported("gray_odd", tmp_path)
    fc = g.ops[-1]
    hidden = g.tensors[fc.outputs[0]]
    g.tensors["mid"] = Tensor("mid", hidden.shape, "int8", "act", hidden.scale, hidden.zero)
    w2 = np.ones((3, hidden.shape[0]), np.int8)
    g.tensors["fc2.w"] = Tensor("fc2.w", w2.shape, "int8", "weight", np.full(3, 0.01, np.float32), 0, w2)
    g.tensors["fc2.b"] = Tensor("fc2.b", (3,), "int32", "bias", None, 0, np.zeros(3, np.int32))
    g.tensors["out2"] = Tensor("out2", (3,), "int8", "act", 0.1, 0)
    fc.outputs = ["mid"]
    g.ops.append(Op("fc2", "linear", ["mid", "fc2.w", "fc2.b"], ["out2"], {}))
    g.outputs = ["out2"]
    with pytest.raises(MicrotrainError, match="fc.*op kind 'linear'"):
        build_training_graph(g, resolve_scheme("full", g), 3)


def test_predict_cli_on_an_imported_model(tmp_path, sample_images):
    import json

    from microtrain.data.datasets import resize_batch
    from microtrain.data.images import load_image

    net, buf = gray_odd()
    p = tmp_path / "g.tflite"
    p.write_bytes(buf)
    r = subprocess.run([sys.executable, "-m", "microtrain", "predict", "--model", str(p), sample_images["coffee"],
                        "--json"], capture_output=True, text=True, check=True)
    top = json.loads(r.stdout)[0]["top5"]
    g = load_model(p)
    x = resize_batch(torch.from_numpy(load_image(sample_images["coffee"], 15)[None]), [1, 15, 11], crop=1.0)
    want = int(Executor(g).logits(x).argmax())
    assert int(top[0][0]) == want


@pytest.mark.parametrize("index,grid", [(1, 2), (2, 3)])
def test_patch_stage_of_an_imported_graph(index, grid, tmp_path):
    """The frozen early stage run tile by tile (TF's asymmetric padding at the tiles' borders, the fixed-point
    kernels): the torch tiled executor equals the whole-tensor one, and the C program equals the torch engine."""
    from microtrain.autodiff.build import build_training_graph
    from microtrain.compiler.memory import frozen_forward_ops
    from microtrain.compiler.patch import candidate_stages, make_stage
    from microtrain.runtime.executor import run_stage_tiled
    from microtrain.sparse.scheme import resolve_scheme
    from test_codegen import check, forced_stage, run_parity

    g = imported("mbv1", tmp_path)
    x, y = model_images(g, 14)
    tg = build_training_graph(g, resolve_scheme("last:2", g), 3)
    ops, output = candidate_stages(tg, frozen_forward_ops(tg))[index]
    assert any("pad_bottom" in o.attrs for o in ops)  # the stem's asymmetric padding is inside every stage
    stage = make_stage(tg, ops, output, grid)
    whole = Executor(g).run(torch.from_numpy(x[:4]), keep_all=True)[output]
    assert torch.equal(run_stage_tiled(g, stage, torch.from_numpy(x[:4])), whole)
    sched, plan = forced_stage(tg, index, grid)
    out = tmp_path / "c"
    check(*run_parity(sched, plan, out, x[:10], y[:10], 0.05, x[10:]), out, sched)


def test_zoo_model_exported_to_tflite_runs_like_tflite_micro(tmp_path):
    """A real pretrained network: mcunet-5fps written as .tflite (frontends/tflite_write.py graph_to_tflite: PAD +
    VALID where TF's SAME would pad otherwise) and imported back computes TFLM's logits bit for bit on real images,
    and LiteRT's top-1."""
    tflm = pytest.importorskip("tflite_micro.python.tflite_micro.runtime")
    from microtrain.data.samples import real_images
    from microtrain.frontends.tflite_write import graph_to_tflite

    g = load_model("mcunet-5fps")
    buf = graph_to_tflite(g)
    p = tmp_path / "mcunet.tflite"
    p.write_bytes(buf)
    gi = load_model(p)
    assert gi.requant == quant.Requant.TFLITE and len(gi.ops) == len(g.ops)
    x, _, _ = real_images(8, g.tensors[g.inputs[0]].shape[1], seed=11)
    ours = Executor(gi).run(torch.from_numpy(x))[gi.outputs[0]].numpy()
    it = tflm.Interpreter.from_bytes(buf, arena_size=4 << 20)
    lite = interpreter(p)
    ref, lref = [], []
    for img in x:
        it.set_input(img.transpose(1, 2, 0)[None], 0)
        it.invoke()
        ref.append(it.get_output(0).reshape(-1))
        feed(lite, img)
        lref.append(lite.get_tensor(lite.get_output_details()[0]["index"]).reshape(-1))
    np.testing.assert_array_equal(ours, np.stack(ref))
    assert (ours.argmax(1) == np.stack(lref).argmax(1)).all()


def test_export_a_trained_run(tmp_path):
    """train an imported model, `microtrain export` it. The default float32 head (DEQUANTIZE + a float32
    FULLY_CONNECTED): the file read back is the run's trained backbone bit for bit and a `linear` with the run's
    float32 head; LiteRT (reference kernels) and TFLM give the run's logits within float summation order and its
    top-1 on every test image, and export reports 100% agreement. --int8-head writes the old int8 head: TFLM computes
    exactly the int8 logits microtrain computes for it, its top-1 following the run's on most images."""
    tflm = pytest.importorskip("tflite_micro.python.tflite_micro.runtime")
    import json

    from microtrain.commands.export import forward_graph
    from microtrain.commands.train import GRAPH
    from microtrain.data.datasets import batches, open_dataset
    from microtrain.ir.graph import Graph
    from microtrain.ir.trainmeta import head as head_params
    from microtrain.runtime.rundir import load_run_checkpoint
    from microtrain.runtime.trainstep import GraphTrainStep

    net, buf = mbv1_like()
    src = tmp_path / "mbv1.tflite"
    src.write_bytes(buf)
    run = tmp_path / "run"
    mt = [sys.executable, "-m", "microtrain"]
    subprocess.run([*mt, "train", "--model", str(src), "--data", "fashion-mnist", "--subset", "300", "--test-subset",
                    "50", "--epochs", "1", "--scheme", "last:3", "--augment", "none", "--lr", "0.05", "--out",
                    str(run)], check=True, capture_output=True)
    tg = Graph.load(run / GRAPH)
    state = load_run_checkpoint(run)
    ds = open_dataset("fashion-mnist", "test", subset=60, progress=False)
    xs = torch.cat([x for x, _ in batches(ds, 60, resolution=[3, 20, 28], eval_crop=0.875)])
    pooled = tg.meta["train"]["pooled"]
    step = GraphTrainStep(tg)
    step.load_state_dict(state)
    run_env = step.run(step.forward_ops, step._env(xs), train=False)
    with torch.no_grad():
        run_logits = step.logits(xs).numpy()
    assert torch.equal(Executor(forward_graph(tg, state)).run(xs)[pooled], run_env[pooled])

    def tflm_outputs(path):
        it = tflm.Interpreter.from_bytes(path.read_bytes(), arena_size=1 << 20)
        ref = []
        for x in xs.numpy():
            it.set_input(x.transpose(1, 2, 0)[None], 0)
            it.invoke()
            ref.append(it.get_output(0).reshape(-1))
        return np.stack(ref)

    # the default: the float32 head as the run (and the device) hold it
    out = tmp_path / "ft.tflite"
    r = subprocess.run([*mt, "export", str(run), "-o", str(out), "--calib", "60", "--json"], check=True,
                       capture_output=True, text=True)
    report = json.loads(r.stdout)
    assert report["head"] == "float32" and report["top1_agreement_with_run"] == 1.0
    assert report["max_logit_difference"] < 1e-4 and out.stat().st_size == report["bytes"]
    g = load_model(out)
    env = Executor(g).run(xs, keep_all=True)
    assert torch.equal(env[g.ops[-1].inputs[0]], run_env[pooled])  # the trained backbone, bit for bit
    hw, hb = head_params(tg)
    w, b = (g.tensors[n] for n in g.ops[-1].inputs[1:])
    assert g.ops[-1].kind == "linear" and w.dtype == b.dtype == "float32"
    np.testing.assert_array_equal(w.data, state[hw])
    np.testing.assert_array_equal(b.data, state[hb])
    lite = interpreter(out)
    lref = []
    for x in xs.numpy():
        feed(lite, x)
        lref.append(lite.get_tensor(lite.get_output_details()[0]["index"]).reshape(-1))
    for ref in (np.stack(lref), tflm_outputs(out)):
        assert ref.dtype == np.float32
        np.testing.assert_allclose(ref, run_logits, rtol=0, atol=1e-5)
        assert (ref.argmax(1) == run_logits.argmax(1)).all()

    # --int8-head: an int8 FULLY_CONNECTED, its logits calibrated on the test images
    out8 = tmp_path / "ft8.tflite"
    r = subprocess.run([*mt, "export", str(run), "-o", str(out8), "--calib", "60", "--int8-head", "--json"],
                       check=True, capture_output=True, text=True)
    report = json.loads(r.stdout)
    assert report["head"] == "int8" and report["top1_agreement_with_run"] >= 0.9
    g8 = load_model(out8)
    assert g8.tensors[g8.ops[-1].inputs[1]].dtype == "int8" and g8.tensors[g8.outputs[0]].dtype == "int8"
    env = Executor(g8).run(xs, keep_all=True)
    assert torch.equal(env[g8.ops[-1].inputs[0]], run_env[pooled])
    ours = env[g8.outputs[0]].numpy()
    np.testing.assert_array_equal(ours, tflm_outputs(out8))
    assert len(np.unique(ours)) > 10  # (the random fixture's features hardly separate classes: see the benchmark)


def test_float_head_import_is_checked(tmp_path):
    """The float head export writes (DEQUANTIZE of the int8 features, then a float32 FULLY_CONNECTED as the last op)
    imports as a float32 `linear`; a float FULLY_CONNECTED anywhere else, float weights without the DEQUANTIZE,
    NaN weights, a fused activation or an int8 bias on the float head are one-line errors naming the problem."""

    def model(w_data=None, b_dtype=np.float32, act="NONE", extra_fc=False, dequantize=True, w_dtype=np.float32):
        net = Net(3, (6, 6, 2))
        net.conv(4, 3)
        net.pool()
        wr, (c,) = net.w, net.shape
        x = net.x
        if dequantize:
            x = wr.tensor((1, c), np.float32)
            wr.op("DEQUANTIZE", [net.x], [x])
        w = np.arange(5 * c, dtype=np.float32).reshape(5, c) / 7 if w_data is None else w_data
        wi = wr.tensor(w.shape, w_dtype, data=w)
        bi = wr.tensor((5,), b_dtype, data=np.arange(5))
        y = wr.tensor((1, 5), np.float32)
        wr.op("FULLY_CONNECTED", [x, wi, bi], [y], act=act)
        if extra_fc:
            w2 = wr.tensor((3, 5), np.float32, data=np.ones((3, 5)))
            y2 = wr.tensor((1, 3), np.float32)
            wr.op("FULLY_CONNECTED", [y, w2], [y2])
            y = y2
        p = tmp_path / "m.tflite"
        p.write_bytes(wr.finish([net.inp], [y]))
        return p

    g = load_model(model())
    head = g.ops[-1]
    assert head.kind == "linear" and g.tensors[head.inputs[1]].dtype == "float32"
    assert g.tensors[head.inputs[2]].data.tolist() == [0, 1, 2, 3, 4] and g.tensors[g.outputs[0]].dtype == "float32"
    x = torch.from_numpy(np.random.default_rng(0).integers(-128, 128, (1, 2, 6, 6)).astype(np.int8))
    lite = interpreter(model())
    feed(lite, x[0].numpy())
    ref = lite.get_tensor(lite.get_output_details()[0]["index"]).reshape(-1)
    np.testing.assert_allclose(Executor(g).logits(x)[0].numpy(), ref, rtol=1e-6, atol=1e-6)
    bad_w = np.ones((5, 4), np.float32)
    bad_w[1, 2] = np.nan
    for kw, why in (({"extra_fc": True}, "unsupported op DEQUANTIZE"),
                    ({"dequantize": False}, "float32 weights"),
                    ({"w_data": bad_w}, "NaN or infinite"),
                    ({"act": "RELU"}, "fused activation"),
                    ({"b_dtype": np.int32}, "bias of a float head"),
                    ({"w_dtype": np.int8, "w_data": np.ones((5, 4))}, "float32 weights [K, 4]")):
        with pytest.raises(ModelLoadError) as e:
            load_model(model(**kw))
        assert why in str(e.value) and "\n" not in str(e.value), (kw, str(e.value))


def test_export_a_device_state(tmp_path):
    """export --state: the state.bin a C program (here `compile --run` on the host) saved, not the run's checkpoint:
    the exported conv weights are the device's trained slices joined to their frozen rest."""
    from microtrain.codegen.project import toolchain

    if toolchain("host") is not None:
        pytest.skip("host C toolchain not installed")
    import json

    from microtrain.codegen.project import load_program, read_state

    net, buf = gray_odd()
    src = tmp_path / "g.tflite"
    src.write_bytes(buf)
    run, c = tmp_path / "run", tmp_path / "c"
    mt = [sys.executable, "-m", "microtrain"]
    subprocess.run([*mt, "train", "--model", str(src), "--data", "fashion-mnist", "--subset", "100", "--test-subset",
                    "20", "--epochs", "1", "--scheme", "full", "--augment", "none", "--lr", "0.05", "--out", str(run)],
                   check=True,
                   capture_output=True)
    subprocess.run([*mt, "compile", "--from", str(run), "--target", "host", "-o", str(c), "--run", "--steps", "12",
                    "--lr", "0.5"], check=True, capture_output=True)
    out = tmp_path / "dev.tflite"
    r = subprocess.run([*mt, "export", str(run), "-o", str(out), "--state", str(c / "state.bin"), "--calib", "20",
                        "--json"], check=True, capture_output=True, text=True)
    assert json.loads(r.stdout)["top1_agreement_with_run"] >= 0.9
    dev = read_state(c / "state.bin", load_program(c))
    g = load_model(out)
    w = g.tensors[g.ops[0].inputs[1]].data
    np.testing.assert_array_equal(w, dev["conv0.w_train"])  # "full": the whole stem weight is the trained slice
    from microtrain.runtime.rundir import load_run_checkpoint

    assert not np.array_equal(w, load_run_checkpoint(run)["conv0.w_train"])  # the device trained on
