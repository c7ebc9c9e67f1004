"""int8 after the rewrite: quantize the original and the rewritten models alike, compare.

    python benchmarks/int8.py                   # writes benchmarks/INT8.md
    python benchmarks/int8.py --out /tmp/i.md

The recommended order is simplify (onnxslim), sconv-onnx, quantize.  This
measures what the middle step costs the last one.  For each model, the
original and its rewrites (``select="cost"``, the default, and
``select="all"``) are quantized the same way with onnxruntime's quantizers:

* static, QDQ, per-channel int8 weights, uint8 activations calibrated
  (MinMax) on ``CALIB`` inputs;
* dynamic (int8 weights, activations quantized at run time).

Each quantized model is compared with the *float original* on ``TEST``
held-out inputs: the relative output error ``||y_q - y||_F / ||y||_F`` and
the top-1 agreement (and, for the digits model, test accuracy).  The goal
(issue 15): a rewritten model's quantized error within 1.2x of the
original's.

Models: the digits CNN trained with Structural Regularization (seed 0, as
the digits demo trains it, projected; real images) and three benchmark
models (structured random weights; random inputs, batch 1):
:data:`MODELS`.  Each rewrite is made with and without ``--int8``; for the
models of :data:`FAMILY_SPLIT`, ``--select all --int8`` also one family at a
time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from pages import write_page

import sconv_onnx

CALIB = 128
TEST = 400
#: The goal: a rewritten model's quantized error at most this multiple of the original's.
GOAL = 1.2
#: The generated models run at batch 1 on random inputs: fewer of them.
GENERATED_CALIB = 32
GENERATED_TEST = 32
#: Benchmark models (full size): spatial pools only (A), channel pools as 0/1 convs (B),
#: 1-D convs with CumSum channel sums (audio).
MODELS = ("struct_resnet18_a", "struct_resnet18_b", "struct_audio1d")
#: Models whose ``--select all --int8`` rewrite is also made one family at a time: which
#: family's rewrites the quantized error comes from.
FAMILY_SPLIT = {"struct_resnet18_b": ("box", "igc")}


class _Reader(CalibrationDataReader):
    def __init__(self, name: str, inputs: np.ndarray, batch: int):
        self.batches = iter([{name: inputs[i:i + batch]} for i in range(0, len(inputs), batch)])

    def get_next(self):
        return next(self.batches, None)


def _run(path: Path, name: str, inputs: np.ndarray, batch: int) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {name: inputs[i:i + batch]})[0]
                           for i in range(0, len(inputs), batch)])


def digits_model(folder: Path):
    """The SR digits model (seed 0, projected), its input name, calibration and test images,
    test labels and the batch it runs at."""
    import torch
    from sconv_onnx.models import train_digits as digits

    from sconv_onnx.training import StructuralRegularizer, StructureSpec

    config = digits.Config()
    data = digits.load_digits_split(config.test_fraction, 0)
    with digits.deterministic_torch(config.threads):
        torch.manual_seed(0)
        model = digits.build_cnn(config.width)
        regularizer = StructuralRegularizer(model, StructureSpec.paper(), config.strength)
        digits.train(model, data, config, 0, regularizer)
        regularizer.project()
    path = folder / "digits_sr.onnx"
    digits.export(model, path)
    x_train, _, x_test, y_test = (np.asarray(t) for t in data)
    return path, digits.INPUT, x_train[:CALIB], x_test[:TEST], y_test[:TEST], 64


def generated(name: str):
    """A benchmark model (structured random weights, full size) and random inputs."""
    return lambda folder: _built(name, folder)


def _built(name: str, folder: Path):
    from sconv_onnx.models import build

    model = build.build(name)
    path = folder / f"{name}.onnx"
    onnx.save(model, str(path))
    name = model.graph.input[0].name
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((GENERATED_CALIB + GENERATED_TEST, *dims[1:])).astype(np.float32)
    return path, name, inputs[:GENERATED_CALIB], inputs[GENERATED_CALIB:], None, dims[0]


def _quantized(source: Path, name: str, calib: np.ndarray, batch: int, kind: str) -> Path:
    target = source.with_name(f"{source.stem}_{kind}.onnx")
    if kind == "static":
        quantize_static(str(source), str(target), _Reader(name, calib, batch),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    else:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    return target


def measure(label: str, make, folder: Path) -> list[list[str]]:
    path, name, calib, test, labels, batch = make(folder)
    reference = _run(path, name, test, batch)
    variants = {"original": path}
    settings = [("cost", False, None), ("all", False, None), ("cost", True, None),
                ("all", True, None), *(("all", True, family) for family in FAMILY_SPLIT.get(label, ()))]
    for select, int8, families in settings:
        new, report = sconv_onnx.optimize(str(path), select=select, int8=int8, families=families)
        flag = (" --int8" if int8 else "") + (f" --families {families}" if families else "")
        target = folder / f"{path.stem}_{select}{'_int8' if int8 else ''}_{families}.onnx"
        onnx.save(new, str(target))
        variants[f"--select {select}{flag} ({len(report.plan.rewritten)} layers)"] = target
    rows, base = [], {}  # base: the quantized original's error, per quantizer
    for variant, source in variants.items():
        for kind in ("static", "dynamic"):
            try:
                outputs = _run(_quantized(source, name, calib, batch, kind), name, test, batch)
            except Exception as exc:  # noqa: BLE001 - a quantizer failing is a result too
                why = str(exc).splitlines()[0][:70] if str(exc) else type(exc).__name__
                rows.append([label, variant, kind, f"quantizer failed: {why}", "", "", ""])
                continue
            error = float(np.linalg.norm(outputs - reference) / np.linalg.norm(reference))
            if variant == "original":
                base[kind] = error
            agree = float(np.mean(outputs.argmax(-1) == reference.argmax(-1)))
            accuracy = ("" if labels is None
                        else f"{100 * np.mean(outputs.argmax(-1) == labels):.2f}")
            ratio = f"{error / base[kind]:.2f}" if kind in base else ""
            rows.append([label, variant, kind, f"{error:.2e}", ratio, f"{agree:.3f}", accuracy])
            print(" | ".join(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("INT8.md"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, make in (("digits SR", digits_model),
                            *((name, generated(name)) for name in MODELS)):
            rows += measure(label, make, Path(folder))
    int8_ratios = [float(row[4]) for row in rows if "--int8" in row[1] and row[4]]
    above = [ratio for ratio in int8_ratios if ratio > GOAL]
    verdict = (f"With `--int8`, {len(int8_ratios) - len(above)} of {len(int8_ratios)} quantized "
               f"rewrites are within {GOAL}x" + (f"; the others reach {max(above):.2f}x" if above
                                                 else "") + ".")
    header = ["model", "before quantizing", "quantizer", "rel. error vs float original",
              "x original's", "top-1 agreement", "test accuracy (%)"]
    write_page(
        args.out, "int8 after the rewrite",
        " ".join(["python benchmarks/int8.py", *(argv or sys.argv[1:])]),
        f"{time.perf_counter() - started:.0f} s",
        ("Each model as given, and rewritten by sconv-onnx (`--select cost`, the default, and "
         "`--select all`, each with and without `--int8`; ResNet-18-B's `--select all --int8` "
         "also with one family at a time), quantized the same way by "
         "onnxruntime: static (QDQ, per-channel int8 "
         f"weights, uint8 activations, MinMax on {CALIB} calibration inputs, {GENERATED_CALIB} "
         f"for the generated models) and dynamic (int8 weights). Errors against the float "
         f"original's outputs on {TEST} held-out inputs (digits: real test images; the "
         f"generated models: {GENERATED_TEST} random inputs); `x original's`: the error over "
         f"the quantized original's. The goal is at most {GOAL}. " + verdict), header, rows)


if __name__ == "__main__":
    main()
