"""Agreement of imported int8 TFLite models with TFLite Micro and LiteRT, on real images.

For the three test fixtures of tests/test_tflite.py (a MobileNet-style net with TF's asymmetric stride-2 padding, a
folded PAD and a residual add; a grayscale odd-sized net with float input/output; a ResNet-style net with fused
RELU adds and MEAN), N real images (CIFAR-10 when on disk, else scikit-image crops) in each model's input shape run
through microtrain's torch executor, through TensorFlow Lite Micro's interpreter (`tflite-micro`; the models
ending at their logits), and through LiteRT twice: its reference kernels (OpResolverType.BUILTIN_REF) and its default
resolver (optimized kernels + XNNPACK). Reported per model and interpreter: logits exactly equal (fraction of
elements), largest difference in output quantization steps, and top-1 agreement.
Writes benchmarks/results/tflite_agreement.json.
Run: `python benchmarks/tflite_agreement.py [--images 200]`.
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

from microtrain.frontends.zoo import load_model  # noqa: E402
from microtrain.runtime.executor import Executor  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    args = ap.parse_args()
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
    out = Path(__file__).parent / "results" / "tflite_agreement.json"
    out.write_text(json.dumps({"command": "python benchmarks/tflite_agreement.py " + " ".join(sys.argv[1:]),
                               "date": datetime.date.today().isoformat(), "images": args.images,
                               "models": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
