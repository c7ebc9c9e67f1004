"""Structural Regularization end to end on scikit-learn's bundled 8x8 digits.

Trains one small CNN three times from the same initialisation and batch order:
plainly, with Structural Regularization towards the paper's box structure
(:meth:`~sconv_onnx.training.StructureSpec.paper`), and with the regularizer
towards interleaved group convolutions (:data:`IGC_SPEC`).  The plain and SR
models are projected onto the paper's structure, the IGC model onto its
layouts; each is exported to ONNX and rewritten by :func:`sconv_onnx.optimize`
at its default (exact) tolerance.
The table compares test accuracy before and after, conv parameters and MACs,
and onnxruntime latency.  Needs the ``train`` extra (torch, scikit-learn);
nothing is downloaded.

    python -m sconv_onnx.models.train_digits --out DIR    # DIR/digits_table.md and the .onnx files
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from sconv_onnx import optimize
from sconv_onnx.api import bench_models
from sconv_onnx.report import Report, human
from sconv_onnx.training import (
    DEFAULT_STRENGTH,
    InterleavedRule,
    StructuralRegularizer,
    StructureSpec,
)

#: onnxruntime 1.31 refuses IR version 14 (onnx 1.23's default); the legacy exporter writes 8.
MAX_IR_VERSION = 10
OPSET = 17
INPUT = "image"
OUTPUT = "logits"


@dataclass(frozen=True)
class Config:
    """Everything that sets the outcome (seeded: the same config gives the same accuracies).

    ``seeds``: trials ``0 .. seeds-1``, each with its own train/test split and
    initialisation (shared by the three models).  ``strength``: the
    regularized models' lambda (the term is a sum of per-layer relative
    residuals, each in ``[0, 1]``), the regularizer's default.  ``width``: the first conv's output channels (the others
    are 2x and 4x).  ``test_fraction``: the share of the 1797 digits held
    out.  ``bench_batch``: the batch the latency is timed at.  ``budget``:
    the MAC fraction the plain model is compressed to with
    ``target_macs``, calibrated on the first ``calib_images`` training images.
    """

    seeds: int = 5
    width: int = 16
    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-3
    strength: float = DEFAULT_STRENGTH
    threads: int = 1
    test_fraction: float = 0.3
    bench_batch: int = 64
    bench_runs: int = 200
    budget: float = 0.5
    calib_images: int = 256
    max_steps: int | None = None  # cut training short (tests)


#: The interleaved structure of the ``igc`` model: conv2 and conv3 (16 -> 32, 32 -> 64) as
#: a 3x3 conv of 4 groups, an interleave and a 1x1 conv of 2 groups, R = O/8 (0.36 of the
#: weights).  At R = O/16 (0.18) the projected model lost 2.5 points at every strength tried.
IGC_SPEC = StructureSpec([InterleavedRule(kernel=3, in_groups=4, out_groups=2, rank_ratio=1.0)])
#: The models: name, regularizer strength (None: the config's ``strength``) and the
#: structure each is regularized towards (when the strength is above 0) and projected onto.
#: (At strength 0.5 the ``igc`` model's layers ended 0.07 from their layouts and the
#: projection cost 5 points; at 1.0, 2e-5 and nothing.)
VARIANTS = (("plain", 0.0, StructureSpec.paper()), ("sr", None, StructureSpec.paper()),
            ("igc", None, IGC_SPEC))


@dataclass
class Trial:
    """One model at one seed: trained -> projected -> rewritten."""

    name: str
    seed: int
    max_residual: float  # largest relative distance of a layer from its structure, before projection
    acc_trained: float  # test accuracy (%) of the trained model, in onnxruntime
    acc_rewritten: float  # test accuracy (%) of the projected, rewritten model, in onnxruntime
    test_size: int
    report: Report  # sconv_onnx.optimize's report on the projected model
    projected: Path
    rewritten: Path
    #: plain model only: test accuracy (%) at the MAC budget, per alpha fit ("data", "weights")
    acc_budget: dict[str, float] | None = None
    budget_macs: float | None = None  # the Conv/Gemm MACs kept, as a fraction

    @property
    def change(self) -> float:
        """Accuracy change of the projection + rewrite, in points."""
        return self.acc_rewritten - self.acc_trained


def load_digits_split(test_fraction: float, seed: int):
    """Scaled ``(N, 1, 8, 8)`` float32 images and int64 labels: a stratified, seeded split
    ``(x_train, y_train, x_test, y_test)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=seed,
        stratify=digits.target)
    return (torch.from_numpy(x_train), torch.from_numpy(y_train).long(),
            torch.from_numpy(x_test), torch.from_numpy(y_test).long())


def build_cnn(width: int) -> nn.Sequential:
    """8x8 -> three 3x3 convs (a 2x2 max-pool after the second), global average
    pool, a linear head.  Channels ``width, 2w, 4w``."""
    w1, w2, w3 = width, 2 * width, 4 * width
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, w1, 3, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(w1, w2, 3, padding=1)), ("relu2", nn.ReLU()),
        ("pool", nn.MaxPool2d(2)),
        ("conv3", nn.Conv2d(w2, w3, 3, padding=1)), ("relu3", nn.ReLU()),
        ("gap", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
        ("head", nn.Linear(w3, 10)),
    ]))


def train(model: nn.Module, data, config: Config, seed: int,
          regularizer: StructuralRegularizer | None) -> int:
    """Adam on cross-entropy (+ the SR term when ``regularizer``), seeded batch order,
    learning rate annealed to 0 on a cosine over the run.

    Returns the number of steps taken.
    """
    x_train, y_train = data[0], data[1]
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    order = torch.Generator().manual_seed(seed)
    batches = math.ceil(len(x_train) / config.batch_size)
    total = min(config.epochs * batches, config.max_steps or math.inf)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    criterion = nn.CrossEntropyLoss()
    steps = 0
    model.train()
    for _ in range(config.epochs):
        for batch in torch.randperm(len(x_train), generator=order).split(config.batch_size):
            loss = criterion(model(x_train[batch]), y_train[batch])
            if regularizer is not None:
                loss = loss + regularizer()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            steps += 1
            if steps == config.max_steps:
                return steps
    return steps


def export(model: nn.Module, path: Path) -> onnx.ModelProto:
    """ONNX opset 17 (legacy TorchScript exporter: no onnxscript needed), dynamic batch,
    IR version at most :data:`MAX_IR_VERSION`."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), opset_version=OPSET,
                          dynamo=False, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    proto = onnx.load(str(path))
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
        onnx.save(proto, str(path))
    return proto


def onnx_accuracy(model: onnx.ModelProto | Path, images: torch.Tensor, labels: torch.Tensor,
                  threads: int) -> float:
    """Test accuracy in percent, run by onnxruntime on the CPU."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    logits = session.run(None, {INPUT: images.numpy()})[0]
    return 100.0 * float(np.mean(logits.argmax(1) == labels.numpy()))


def conv_totals(report: Report) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(params before, after), (MACs before, after)`` summed over the plan's ``Conv`` layers."""
    convs = [layer for layer in report.plan.layers if layer.op == "Conv"]
    params = (sum(layer.params_before for layer in convs),
              sum(layer.params_after if layer.rewritten else layer.params_before
                  for layer in convs))
    macs = (sum(layer.macs_before for layer in convs),
            sum(layer.macs_after if layer.rewritten else layer.macs_before for layer in convs))
    return params, macs


def run_trial(name: str, strength: float, spec: StructureSpec, seed: int, data, config: Config,
              out: Path) -> Trial:
    """Train (regularized towards ``spec`` when ``strength > 0``), project onto ``spec``,
    export, rewrite with :func:`sconv_onnx.optimize` (default tol, ``select="all"``)."""
    torch.manual_seed(seed)
    model = build_cnn(config.width)
    regularizer = StructuralRegularizer(model, spec, strength)
    train(model, data, config, seed, regularizer if strength > 0 else None)
    stem = out / f"{name}_seed{seed}"
    trained = export(model, stem.with_suffix(".onnx"))
    max_residual = max(regularizer.project().values())
    projected = stem.with_name(stem.name + "_projected.onnx")
    export(model, projected)
    rewritten, report = optimize(projected, select="all")
    rewritten_path = stem.with_name(stem.name + "_sconv.onnx")
    onnx.save(rewritten, str(rewritten_path))
    x_test, y_test = data[2], data[3]
    trial = Trial(name, seed, max_residual,
                  acc_trained=onnx_accuracy(trained, x_test, y_test, config.threads),
                  acc_rewritten=onnx_accuracy(rewritten, x_test, y_test, config.threads),
                  test_size=len(y_test), report=report, projected=projected,
                  rewritten=rewritten_path)
    if name == "plain":
        trial.acc_budget, trial.budget_macs = compress_to_budget(stem.with_suffix(".onnx"), data,
                                                                 config)
    return trial


def compress_to_budget(trained: Path, data, config: Config) -> tuple[dict[str, float], float]:
    """The trained (not projected) model compressed to ``config.budget`` of its MACs by
    ``optimize(target_macs=..., calib_data=..., min_agreement=0)`` (forced to the budget,
    no bound), once per alpha fit: test accuracies
    and the MAC fraction reached."""
    calib = {INPUT: data[0][: config.calib_images].numpy()}
    accuracies, reached = {}, 1.0
    for fit in ("data", "weights"):
        model, report = optimize(trained, calib_data=calib, target_macs=config.budget,
                                 alpha_fit=fit, min_agreement=0)  # forced: both fits compared
        accuracies[fit] = onnx_accuracy(model, data[2], data[3], config.threads)
        totals = report.plan.totals()
        reached = totals["macs_after"] / totals["macs_before"]
    return accuracies, reached


def time_rewrite(trial: Trial, config: Config):
    """onnxruntime latency of the projected model and its rewrite, side by side."""
    return bench_models([trial.projected, trial.rewritten], names=["projected", "rewritten"],
                        input_shapes={INPUT: (config.bench_batch, 1, 8, 8)},
                        threads=config.threads, runs=config.bench_runs, warmup=20)


def mean_sd(values: list[float], sign: str = "") -> str:
    """``mean ± sd`` (sample sd; just the value for one); ``sign="+"`` shows the mean's sign."""
    mean = f"{np.mean(values):{sign}.2f}"
    return mean if len(values) == 1 else f"{mean} ± {np.std(values, ddof=1):.2f}"


def summary_row(trials: list[Trial], timing) -> list[str]:
    """One table row: accuracies over seeds, conv cost and latency of the first seed."""
    (params_before, params_after), (macs_before, macs_after) = conv_totals(trials[0].report)
    return [
        trials[0].name,
        f"{max(trial.max_residual for trial in trials):.2g}",
        mean_sd([trial.acc_trained for trial in trials]),
        mean_sd([trial.acc_rewritten for trial in trials]),
        mean_sd([trial.change for trial in trials], sign="+"),
        (f"{human(params_before)} -> {human(params_after)} "
         f"({params_before / params_after:.2f}x fewer)"),
        f"{human(macs_before)} -> {human(macs_after)}",
        f"{timing.timings[0].median_ms:.3f} -> {timing.timings[1].median_ms:.3f}",
        f"{timing.ratios[1]:.2f}",
    ]


def format_report(trials: dict[str, list[Trial]], timings: dict, config: Config) -> str:
    """The markdown summary, the per-seed accuracies, the per-layer structures, the settings."""
    header = ["model", "max residual before projection", "test acc trained (%)",
              "test acc projected + rewritten (%)", "change (points)", "conv params",
              "conv MACs/image", f"latency ms, batch {config.bench_batch}", "ratio"]
    summary = [header] + [summary_row(trials[name], timings[name]) for name in trials]
    per_seed = [["seed", "test images"] + [f"{name} {stage}" for name in trials
                                           for stage in ("trained", "rewritten")]]
    for seed_trials in zip(*trials.values()):
        per_seed.append([str(seed_trials[0].seed), str(seed_trials[0].test_size)] + [
            f"{acc:.2f}" for trial in seed_trials
            for acc in (trial.acc_trained, trial.acc_rewritten)])
    layers = [["model", "layer", "weight", "structure", "params", "MACs/image"]] + [
        [name, layer.node, "x".join(map(str, layer.weight_shape)), layer.chosen.label,
         f"{layer.params_before} -> {layer.params_after}",
         f"{human(layer.macs_before)} -> {human(layer.macs_after)}"]
        for name in ("sr", "igc") for layer in trials[name][0].report.plan.layers
        if layer.rewritten]
    gaps = {name: [trial.acc_rewritten - plain.acc_trained
                   for trial, plain in zip(trials[name], trials["plain"])] for name in ("sr", "igc")}
    return "\n".join([
        markdown(summary), "",
        (f"SR, projected and rewritten, against plain as trained: "
         f"{mean_sd(gaps['sr'], sign='+')} points; IGC: {mean_sd(gaps['igc'], sign='+')} points "
         "(per seed, then mean ± sd)."), "",
        budget_section(trials["plain"], config), "",
        ("Accuracies: mean ± sd over the seeds (per seed below). Conv cost and latency: seed 0; "
         "latency is onnxruntime's median, ratio the median of per-pair ratios "
         f"({config.threads} thread(s))."), "",
        markdown(per_seed), "",
        ("Structures (StructureSpec.paper() for plain and sr, IGC_SPEC for igc), as "
         "sconv_onnx.optimize found them at its default tol in the projected model and rewrote "
         "them (select='all'); the params after include the sum-pools' constants and the "
         "interleaves' indices:"), "",
        markdown(layers), "",
        "Settings: " + ", ".join(f"{key}={value}" for key, value in asdict(config).items()
                                 if value is not None),
    ])


def budget_section(plain: list[Trial], config: Config) -> str:
    """The plain model at a fixed MAC budget: data-aware against weight-space alphas."""
    rows = [["alpha fit", "test acc at the budget (%)", "change from trained (points)"]]
    for fit in ("data", "weights"):
        rows.append([fit, mean_sd([t.acc_budget[fit] for t in plain]),
                     mean_sd([t.acc_budget[fit] - t.acc_trained for t in plain], sign="+")])
    gain = [t.acc_budget["data"] - t.acc_budget["weights"] for t in plain]
    return "\n".join([
        (f"Plain model (no SR) at a MAC budget: `optimize(trained, target_macs={config.budget}, "
         f"calib_data=<first {config.calib_images} training images>, alpha_fit=..., "
         f"min_agreement=0)` (forced to the budget); "
         f"Conv/Gemm MACs kept: {plain[0].budget_macs:.3f} (seed 0)."), "",
        markdown(rows), "",
        f"Data-aware against weight-space alphas: {mean_sd(gain, sign='+')} points.",
    ])


def markdown(rows: list[list[str]]) -> str:
    """A markdown table; ``rows[0]`` is the header."""
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines)


@contextlib.contextmanager
def deterministic_torch(threads: int):
    """Fixed intra-op threads and deterministic kernels; the previous settings restored after."""
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])


def run(out: Path, config: Config) -> tuple[dict[str, list[Trial]], str]:
    """The whole demo; writes ``out/digits_table.md`` and the ONNX files."""
    out.mkdir(parents=True, exist_ok=True)
    trials: dict[str, list[Trial]] = {name: [] for name, _, _ in VARIANTS}
    with deterministic_torch(config.threads):
        for seed in range(config.seeds):
            data = load_digits_split(config.test_fraction, seed)
            for name, strength, spec in VARIANTS:
                strength = config.strength if strength is None else strength
                trials[name].append(run_trial(name, strength, spec, seed, data, config, out))
    timings = {name: time_rewrite(trials[name][0], config) for name in trials}
    text = format_report(trials, timings, config)
    (out / "digits_table.md").write_text(text + "\n")
    return trials, text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the table and models")
    for key, value in asdict(Config()).items():
        if value is not None:
            parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    started = time.perf_counter()
    _, text = run(out, Config(**args))
    print(text)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
