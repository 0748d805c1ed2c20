"""Agreement of imported int8 TFLite models with TFLite Micro and LiteRT, on real images.

For the three test fixtures of tests/test_tflite.py (a MobileNet-style net with TF's asymmetric stride-2 padding, a
folded PAD and a residual add; a grayscale odd-sized net with float input/output; a ResNet-style net with fused
RELU adds and MEAN), N real images (CIFAR-10 when on disk, else scikit-image crops) in each model's input shape run
through microtrain's torch executor, through TensorFlow Lite Micro's interpreter (`tflite-micro`; the models
ending at their logits), and through LiteRT twice: its reference kernels (OpResolverType.BUILTIN_REF) and its default
resolver (optimized kernels + XNNPACK). Reported per model and interpreter: logits exactly equal (fraction of
elements), largest difference in output quantization steps, and top-1 agreement.
Also the three zoo models written as .tflite (frontends/tflite_write.py graph_to_tflite) and imported back: a real
pretrained network under TFLite's rule, on --zoo-images CIFAR-10 images, against the same interpreters and against
the zoo graph's own float32-multiplier rule (how much the requantization rule alone changes).
And the committed fixtures of tests/fixtures/make_tflite.py (MobileNetV1-style, ResNet-style with MAX_POOL_2D and a
windowed AVERAGE_POOL_2D, a plain CNN with max pooling and two FULLY_CONNECTED layers): the same agreement on --images
real images, and the planned peak SRAM / flash of one training step under the scheme the tests use.
Writes benchmarks/results/tflite_agreement.json (`--fixtures-only` updates only its "fixtures" entry).
Run: `python benchmarks/tflite_agreement.py [--images 200] [--fixtures-only]`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from microtrain.frontends.zoo import ZOO_MODELS, load_model  # noqa: E402
from microtrain.runtime.executor import Executor  # noqa: E402


def agreement(ref: np.ndarray, ours: np.ndarray) -> dict:
    ref, ours = ref.astype(np.int32), ours.astype(np.int32)
    return {"logits_equal": float((ref == ours).mean()), "max_step_difference": int(np.abs(ref - ours).max()),
            "top1_agreement": float((ref.argmax(1) == ours.argmax(1)).mean())}


def zoo_round_trip(name: str, d: Path, n: int) -> dict:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from tflite_micro.python.tflite_micro import runtime

    from microtrain.data.samples import real_images
    from microtrain.frontends.tflite_write import graph_to_tflite

    g = load_model(name)
    buf = graph_to_tflite(g)
    path = d / f"{name}.tflite"
    path.write_bytes(buf)
    gi = load_model(path)
    x, _, source = real_images(n, g.tensors[g.inputs[0]].shape[1], seed=11)
    ours = Executor(gi).run(torch.from_numpy(x))[gi.outputs[0]].numpy()
    row = {"images": source, "zoo_float32_rule": agreement(Executor(g).run(torch.from_numpy(x))[g.outputs[0]].numpy(),
                                                           ours)}
    for label, kw in (("reference", {"experimental_op_resolver_type": OpResolverType.BUILTIN_REF}), ("default", {})):
        it = Interpreter(model_path=str(path), **kw)
        it.allocate_tensors()
        inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
        ref = []
        for img in x:
            it.set_tensor(inp, img.transpose(1, 2, 0)[None])
            it.invoke()
            ref.append(it.get_tensor(out).reshape(-1))
        row[label] = agreement(np.stack(ref), ours)
    it = runtime.Interpreter.from_bytes(buf, arena_size=4 << 20)
    ref = []
    for img in x:
        it.set_input(img.transpose(1, 2, 0)[None], 0)
        it.invoke()
        ref.append(it.get_output(0).reshape(-1))
    row["tflm"] = agreement(np.stack(ref), ours)
    return row


def committed_fixtures(n: int) -> dict:
    """Agreement with TFLM / LiteRT (reference and default kernels) on n real images, and the planned memory."""
    import importlib.util

    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from tflite_micro.python.tflite_micro import runtime

    from microtrain.compiler.memory import compile_memory
    from microtrain.data.samples import real_images

    fixtures = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
    spec = importlib.util.spec_from_file_location("make_tflite", fixtures / "make_tflite.py")
    mk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mk)
    schemes = {"mbv1": "last:3", "resnet": "last:4", "plain_cnn": "full", "cifar_cnn": "full"}  # the tests'
    out = {}
    for name in mk.FIXTURES:
        path = fixtures / f"{name}.tflite"
        g = load_model(path)
        x, _, source = real_images(n, g.tensors[g.inputs[0]].shape, seed=21)
        ours = Executor(g).run(torch.from_numpy(x))[g.outputs[0]].numpy()
        row = {"images": source, "ops": [o.kind for o in g.ops]}
        for label, kw in (("reference", {"experimental_op_resolver_type": OpResolverType.BUILTIN_REF}),
                          ("default", {})):
            it = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True, **kw)
            it.allocate_tensors()
            ref = []
            for img in x:
                it.set_tensor(it.get_input_details()[0]["index"], img.transpose(1, 2, 0)[None])
                it.invoke()
                ref.append(it.get_tensor(int(g.outputs[0][1:])).reshape(-1))
            row[label] = agreement(np.stack(ref), ours)
        it = runtime.Interpreter.from_bytes(mk.FIXTURES[name](softmax=False), arena_size=1 << 20)
        ref = []
        for img in x:
            it.set_input(img.transpose(1, 2, 0)[None], 0)
            it.invoke()
            ref.append(it.get_output(0).reshape(-1))
        row["tflm"] = agreement(np.stack(ref), ours)
        rep = compile_memory(g, schemes[name])
        row["plan"] = {"scheme": schemes[name], "peak_sram_bytes": rep.peak_sram_bytes, "flash_bytes": rep.flash_bytes}
        out[name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "ops"}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--zoo-images", type=int, default=100)
    ap.add_argument("--fixtures-only", action="store_true", help="measure only the committed fixtures")
    args = ap.parse_args()
    res_path = Path(__file__).parent / "results" / "tflite_agreement.json"
    fixtures = committed_fixtures(args.images)
    if args.fixtures_only:
        old = json.loads(res_path.read_text()) if res_path.exists() else {}
        old["fixtures"] = {"command": "python benchmarks/tflite_agreement.py " + " ".join(sys.argv[1:]),
                           "date": datetime.date.today().isoformat(), "images": args.images, "models": fixtures}
        res_path.write_text(json.dumps(old, indent=1) + "\n")
        print(f"wrote {res_path}")
        return
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from test_tflite import FIXTURES, feed, model_images

    results = {}
    with tempfile.TemporaryDirectory() as d:
        for name, make in FIXTURES.items():
            net, buf = make()
            path = Path(d) / f"{name}.tflite"
            path.write_bytes(buf)
            g = load_model(path)
            x, _ = model_images(g, args.images, seed=7)
            ours = Executor(g).run(torch.from_numpy(x))[g.outputs[0]].numpy().astype(np.int32)
            row = {}
            for label, kw in (("reference", {"experimental_op_resolver_type": OpResolverType.BUILTIN_REF}),
                              ("default", {})):
                it = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True, **kw)
                it.allocate_tensors()
                ref = []
                for img in x:
                    feed(it, img)
                    ref.append(it.get_tensor(net.logits).reshape(-1))
                ref = np.stack(ref).astype(np.int32)
                row[label] = {"logits_equal": float((ref == ours).mean()),
                              "max_step_difference": int(np.abs(ref - ours).max()),
                              "top1_agreement": float((ref.argmax(1) == ours.argmax(1)).mean())}
            from tflite_micro.python.tflite_micro import runtime

            _, logits_buf = make(logits=True)
            it = runtime.Interpreter.from_bytes(logits_buf, arena_size=1 << 20)
            ref = []
            for img in x:
                xin = img.transpose(1, 2, 0)[None]
                if it.get_input_details(0)["dtype"] == np.float32:
                    xin = ((xin.astype(np.float32) + 128) * np.float32(1 / 255)).astype(np.float32)
                it.set_input(xin, 0)
                it.invoke()
                ref.append(it.get_output(0).reshape(-1))
            ref = np.stack(ref).astype(np.int32)
            row["tflm"] = {"logits_equal": float((ref == ours).mean()),
                           "max_step_difference": int(np.abs(ref - ours).max()),
                           "top1_agreement": float((ref.argmax(1) == ours.argmax(1)).mean())}
            results[name] = {"input": list(g.tensors[g.inputs[0]].shape), **row}
            print(name, json.dumps(row))
    zoo = {}
    with tempfile.TemporaryDirectory() as d:
        for name in ZOO_MODELS:
            zoo[name] = zoo_round_trip(name, Path(d), args.zoo_images)
            print(name, json.dumps(zoo[name]))
    out = Path(__file__).parent / "results" / "tflite_agreement.json"
    out.write_text(json.dumps({"command": "python benchmarks/tflite_agreement.py " + " ".join(sys.argv[1:]),
                               "date": datetime.date.today().isoformat(), "images": args.images,
                               "models": results, "zoo_images": args.zoo_images, "zoo_round_trip": zoo,
                               "fixtures": {"images": args.images, "models": fixtures}},
                              indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
