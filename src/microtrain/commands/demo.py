"""`microtrain demo`: the whole product on built-in defaults — plan, fine-tune, compile, run on the host and in QEMU."""

from __future__ import annotations

import argparse
import json

from microtrain.autodiff.build import TrainConfig, build_training_graph
from microtrain.cli import main as cli_main
from microtrain.codegen.project import toolchain
from microtrain.commands.train import DEFAULT_BATCH, GRAPH
from microtrain.compiler.memory import FLASH_BUDGET, SRAM_BUDGET, compile_memory
from microtrain.data.datasets import model_resolution, open_dataset
from microtrain.errors import MicrotrainError
from microtrain.frontends.zoo import load_model
from microtrain.outputs import check_output_dir
from microtrain.runtime.lr_select import AUTO, base_grid, parse_lr, select_lr
from microtrain.runtime.prefix_cache import PrefixCache
from microtrain.runtime.trainer import evaluate, fit
from microtrain.runtime.trainstep import GraphTrainStep
from microtrain.sparse.scheme import PAPER_SCHEMES, resolve_scheme


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="run the main pipeline on built-in defaults",
        description="Pick a zoo model and a sparse update scheme that fits 256 KB of SRAM, plan its training step, "
                    "fine-tune it on a small real dataset that needs no download (CIFAR-10 from ../shared, else "
                    "scikit-image's face / non-face crops), generate the C training program from that run, run it on "
                    "the host (and in QEMU on an emulated Cortex-M4 when installed), and report memory against the "
                    "256 KB / 1 MB budget and accuracy before / after.")
    p.add_argument("--model", default="mcunet-5fps")
    p.add_argument("--scheme", help="preset or scheme file (default: paper-99kb for the zoo models that have it, "
                                    "else last:3, or full for a model with fewer convs)")
    p.add_argument("--subset", type=int, default=1000, help="training images (default 1000)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", default=AUTO, help="learning rate, or 'auto' (default): chosen as `train --lr auto` does, "
                                               "on a validation slice of the training images")
    p.add_argument("--steps", type=int, default=20, help="images the C program trains on (host; QEMU gets 5)")
    p.add_argument("--int8-grads", action="store_true", help="per-channel int8 activation gradients (less SRAM)")
    p.add_argument("--stream-input", action="store_true",
                   help="read each patch's input region from the image source (no whole image in SRAM; patch "
                        "recompute capped at 3x)")
    p.add_argument("--out", default="microtrain-demo",
                   help="where everything goes (default ./microtrain-demo): plan.png, run/ (metrics, checkpoint, "
                        "training graph), host/ and m4/ (the C projects, state.bin, memory.json), report.json")
    p.set_defaults(run=run)


def _kb(n: int) -> str:
    return f"{n / 1024:.1f} KB"


def _datasets(subset: int):
    """(train, test, the name that opens them): the run records the name, so that `compile --from` trains the C
    program on the same images."""
    try:
        return open_dataset("cifar10", "train", subset=subset, progress=False), \
            open_dataset("cifar10", "test", subset=500, progress=False), "cifar10"
    except MicrotrainError:  # no ../shared: a real task that ships with scikit-image
        return open_dataset("lfw", "train", progress=False), open_dataset("lfw", "test", progress=False), "lfw"


def default_scheme(model) -> str:
    """The paper's 99 KB scheme for the zoo models that have one; an imported model (a .tflite, an `import`ed
    .json) has no paper scheme: its last three convs (all of them when it has fewer)."""
    if "99kb" in PAPER_SCHEMES.get(model.name, {}):
        return "paper-99kb"
    return "last:3" if len(model.convs()) >= 3 else "full"


def run(args: argparse.Namespace) -> int:
    for flag, v in (("--subset", args.subset), ("--epochs", args.epochs), ("--steps", args.steps)):
        if v < 1:  # before the dataset fallback below could read a bad value as "no CIFAR-10 here"
            raise MicrotrainError(f"{flag} must be >= 1, got {v}")
    lr = parse_lr(str(args.lr))
    model = load_model(args.model)
    scheme = resolve_scheme(args.scheme or default_scheme(model), model)
    train_ds, test_ds, data = _datasets(args.subset)
    print(f"== 1. plan: {model.name}, scheme {scheme.name}, {train_ds.num_classes} classes")
    cfg = TrainConfig(int8_grads=args.int8_grads)
    stream = {"stream_input": True, "max_recompute": 3.0} if args.stream_input else {}
    stream_args = ["--stream-input", "--max-recompute", "3"] if args.stream_input else []
    mem = compile_memory(model, scheme, num_classes=train_ds.num_classes, cfg=cfg, **stream)
    fits = mem.peak_sram_bytes <= SRAM_BUDGET and mem.flash_bytes <= FLASH_BUDGET
    print(f"   peak SRAM {_kb(mem.peak_sram_bytes)} (arena {_kb(mem.arena_bytes)} + state {_kb(mem.state_bytes)}) of "
          f"{_kb(SRAM_BUDGET)}, flash {_kb(mem.flash_bytes)} of {_kb(FLASH_BUDGET)}: {'fits' if fits else 'too big'}")
    root = check_output_dir(args.out, "--out")
    report: dict = {"model": model.name, "scheme": scheme.name, "dataset": train_ds.name,
                    "planned_peak_sram_bytes": mem.peak_sram_bytes, "planned_flash_bytes": mem.flash_bytes}
    mem.plot(root / "plan.png")
    print(f"   plot: {root / 'plan.png'}")
    run_dir = root / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    graph = build_training_graph(model, scheme, train_ds.num_classes, cfg)
    graph.save(run_dir / GRAPH)
    entries: dict = {}  # the frozen prefix per image, shared by the rate's candidates and the run
    step = PrefixCache(GraphTrainStep(graph), entries=entries)
    res = model_resolution(model)
    before = evaluate(step, test_ds, resolution=res, eval_crop=1.0)
    print(f"== 2. fine-tune on {len(train_ds)} {train_ds.name} images ({args.epochs} epochs, int8 graph, QAS)")
    batch, warmup = DEFAULT_BATCH, 0.5
    extra = {"model": model.name, "scheme": scheme.to_dict(), "precision": "int8", "int8_grads": args.int8_grads,
             "data": data, "classes": list(train_ds.classes)}
    if lr == AUTO:
        grid, ratio = base_grid("int8", True, "sgd", batch)
        sel = select_lr(lambda: PrefixCache(GraphTrainStep(graph), entries=entries), train_ds, grid=grid,
                        ratio=ratio, epochs=args.epochs, batch_size=batch, warmup_epochs=warmup, augment="flip",
                        resolution=res, progress=False)
        lr = sel["lr"]
        extra["lr_selection"] = sel
        print(f"   lr auto: {lr:g} from " + ", ".join(
            f"{c['lr']:g} ({c['val_accuracy']:.1%})" if c["status"] == "completed" else f"{c['lr']:g} (diverged)"
            for c in sel["candidates"]) + f" on {sel['validation_images']} validation images carved from the "
            f"training images, {sel['seconds']:.1f}s")
    m = fit(step, train_ds, test_ds, epochs=args.epochs, lr=lr, batch_size=batch, warmup_epochs=warmup,
            augment="flip", resolution=res, out_dir=run_dir, progress=True, extra=extra)
    print(f"   test accuracy {before:.1%} (new zero head) -> {m['test_accuracy']:.1%} on {len(test_ds)} images")
    report.update(accuracy_before=before, accuracy_after=m["test_accuracy"], run=str(run_dir), lr=lr)
    print("== 3. compile the trained step to C and train on the host")
    rc = cli_main(["compile", "--from", str(run_dir), "--target", "host", "-o", str(root / "host"), "--run",
                   "--steps", str(args.steps), "--lr", str(lr / 10), *stream_args])
    if rc:
        return rc
    if toolchain("cortex-m4") is None:
        print("== 4. the same program on an emulated Cortex-M4 (256 KB SRAM / 1 MB flash linker script, QEMU)")
        rc = cli_main(["compile", "--from", str(run_dir), "--target", "cortex-m4", "-o", str(root / "m4"),
                       "--run", "--steps", "5", "--lr", str(lr / 10), *stream_args])
    else:
        print(f"== 4. skipped: {toolchain('cortex-m4')} is not installed (make install brings it)")
    for target in ("host", "m4"):
        f = root / target / "memory.json"
        if f.is_file():
            report[target] = json.loads(f.read_text())
    (root / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"== everything is in {root}: plan.png, run/, host/" + (", m4/" if (root / "m4").is_dir() else "")
          + ", report.json")
    return rc
