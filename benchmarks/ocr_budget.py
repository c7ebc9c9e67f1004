"""A MAC budget on a real pretrained model: PP-OCRv6 rec small reading rendered words.

    pip install -e .[bench] && pip install --no-deps rapidocr==3.10.0
    python benchmarks/ocr_budget.py                  # writes benchmarks/BUDGET.md and budget_ocr.svg
    python benchmarks/ocr_budget.py --budgets 0.75@0 --anchor-fractions 0.4 --runs 20 --out /tmp/b.md

For each budget (``--target-macs`` R, with the default bound, another
``--min-agreement`` or none), ``sconv_onnx.optimize`` compresses the model
with 32 calibration images (:mod:`ocr_words`: DejaVu Sans, one word list);
the result is read on held-out images (other words and random codes, other
fonts, other noise), its MACs counted here from the shapes onnxruntime
reports (not from the tool's report), and it is timed side by side with the
original.  The *anchor* is what a user could do by hand: every wide 1x1 conv
(group 1, at least 64 channels in and out) replaced by two thin ones from
the truncated SVD of ``W L`` (``L L^T`` the conv's input second moment on
the same calibration images), at one rank fraction for all, ranks rounded up
to 16; no selection, no sequential fit.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
import ocr_words

import sconv_onnx
from sconv_onnx.bench import bench

COUNTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SHAPE = {"x": [1, 3, ocr_words.HEIGHT, ocr_words.WIDTH]}


def model_path() -> Path:
    import rapidocr

    return Path(rapidocr.__file__).parent / "models" / "PP-OCRv6_rec_small.onnx"


def _session(model: onnx.ModelProto, extra: list[str] = ()) -> onnxruntime.InferenceSession:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(onnx.ValueInfoProto(name=name) for name in extra)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(copy.SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])


def count_macs(model: onnx.ModelProto, image: np.ndarray) -> int:
    """Multiply-adds of every Conv/ConvTranspose/Gemm/MatMul on one image, from the
    tensor shapes onnxruntime produces (independent of sconv_onnx)."""
    constants = {init.name: tuple(init.dims) for init in model.graph.initializer}
    nodes = [node for node in model.graph.node if node.op_type in COUNTED]
    wanted = sorted({name for node in nodes for name in (*node.input[:2], node.output[0])
                     if name and name not in constants})
    sess = _session(model, [name for name in wanted
                            if name not in {i.name for i in model.graph.input}])
    names = [out.name for out in sess.get_outputs()]
    values = dict(zip(names, sess.run(names, {"x": image[None]})))
    values["x"] = image[None]
    shape = {name: tuple(values[name].shape) if name in values else constants[name]
             for node in nodes for name in (*node.input[:2], node.output[0]) if name}
    total = 0
    for node in nodes:
        out, a, w = shape[node.output[0]], shape[node.input[0]], shape[node.input[1]]
        if node.op_type == "Conv":
            total += math.prod(out) * math.prod(w[1:])
        elif node.op_type == "ConvTranspose":
            total += math.prod(a) * math.prod(w[1:])
        elif node.op_type == "Gemm":
            trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
            total += math.prod(out) * a[0 if trans_a else 1]
        else:
            total += math.prod(out) * a[-1]
    return total


#: Kernels that do the multiply-adds (onnxruntime's fused names included).
MAC_KERNELS = {"Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}


def mac_kernel_share(profile: dict[str, list[float]], index: int) -> float:
    """The share of model ``index``'s kernel time spent in MAC kernels, from a
    :func:`~sconv_onnx.bench.bench` profile (per op type, medians over runs).  A
    share within one profile, not a time: the models are profiled one after the
    other, and a slow spell of the machine scales every op of one profile alike."""
    mac = sum(times[index] for op, times in profile.items() if op in MAC_KERNELS)
    return mac / sum(times[index] for times in profile.values())


def read_accuracy(model: onnx.ModelProto, images: np.ndarray, words: list[str],
                  classes: list[str]) -> tuple[float, float]:
    sess = _session(model)
    scores = np.concatenate([sess.run(None, {"x": images[i:i + 16]})[0]
                             for i in range(0, len(images), 16)])
    return ocr_words.accuracy(ocr_words.read(scores, classes), words)


def wide_pointwise_convs(model: onnx.ModelProto) -> list:
    """The anchor's layers: 1x1 convs of one group with at least 64 channels in and out."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    return [node for node in model.graph.node if node.op_type == "Conv"
            and len(shapes.get(node.input[1], ())) == 4 and shapes[node.input[1]][2:] == (1, 1)
            and next((a.i for a in node.attribute if a.name == "group"), 1) == 1
            and min(shapes[node.input[1]][:2]) >= 64]


def anchor(model: onnx.ModelProto, calib: np.ndarray, fraction: float) -> onnx.ModelProto:
    """The hand-made anchor at one rank fraction (module doc)."""
    wide = {node.name: node for node in wide_pointwise_convs(model)}
    sess = _session(model, [node.input[0] for node in wide.values()])
    names = [out.name for out in sess.get_outputs()]
    runs = [dict(zip(names, sess.run(names, {"x": calib[i:i + 8]})))
            for i in range(0, len(calib), 8)]
    weights = {init.name: init for init in model.graph.initializer}
    rng = np.random.default_rng(0)
    new = onnx.ModelProto()
    new.CopyFrom(model)
    nodes = []
    for node in new.graph.node:
        if node.name not in wide:
            nodes.append(node)
            continue
        matrix = numpy_helper.to_array(weights[node.input[1]]).astype(np.float64)
        out_ch, in_ch = matrix.shape[:2]
        matrix = matrix.reshape(out_ch, in_ch)
        rank = 16 * math.ceil(fraction * min(out_ch, in_ch) / 16)
        if rank * (out_ch + in_ch) >= out_ch * in_ch:
            nodes.append(node)
            continue
        rows = np.concatenate([np.moveaxis(run[node.input[0]], 1, -1).reshape(-1, in_ch)
                               for run in runs]).astype(np.float64)
        if len(rows) > 4096:
            rows = rows[rng.choice(len(rows), 4096, replace=False)]
        moment = rows.T @ rows / len(rows)
        lower = np.linalg.cholesky(moment + 1e-6 * np.trace(moment) / in_ch * np.eye(in_ch))
        u, s, vt = np.linalg.svd(matrix @ lower, full_matrices=False)
        down = np.linalg.solve(lower.T, vt[:rank].T).T
        up = u[:, :rank] * s[:rank]
        base = node.name + "_anchor"
        new.graph.initializer.extend([
            numpy_helper.from_array(down.reshape(rank, in_ch, 1, 1).astype(np.float32), base + "_down"),
            numpy_helper.from_array(up.reshape(out_ch, rank, 1, 1).astype(np.float32), base + "_up")])
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        nodes.append(helper.make_node("Conv", [node.input[0], base + "_down"], [base + "_mid"],
                                      name=base, **attributes))
        second = onnx.NodeProto()
        second.CopyFrom(node)
        second.input[0], second.input[1] = base + "_mid", base + "_up"
        del second.attribute[:]  # strides and pads went to the first conv
        nodes.append(second)
    del new.graph.node[:]
    new.graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    kept = [init for init in new.graph.initializer if init.name in used]
    del new.graph.initializer[:]
    new.graph.initializer.extend(kept)
    return new


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", nargs="+",
                        default=["0.75", "0.75@0.97", "0.9@0", "0.75@0", "0.6@0", "0.5@0"],
                        help="R (--target-macs R, the default bound) or R@A (--min-agreement A; "
                             "0 forces the target)")
    parser.add_argument("--anchor-fractions", type=float, nargs="+",
                        default=[0.6, 0.5, 0.4, 0.3, 0.2])
    parser.add_argument("--calib", type=int, default=32, help="calibration images")
    parser.add_argument("--held-out", type=int, default=300, help="held-out images per set")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("BUDGET.md"))
    args = parser.parse_args(argv)

    path = model_path()
    original = onnx.load(path)
    classes = ocr_words.alphabet(original)
    calib, _ = ocr_words.calibration_set(args.calib)
    held = {kind: ocr_words.held_out_set(args.held_out, seed=1, degraded=kind == "degraded")
            for kind in ("clean", "degraded")}
    base_macs = count_macs(original, calib[0])
    base = {kind: read_accuracy(original, images, words, classes)
            for kind, (images, words) in held.items()}
    print(f"original: {base_macs} MACs, {base}", flush=True)
    base_shares: list[float] = []  # the original's MAC-kernel share, profiled beside each model
    rows, points = [], {"sconv-onnx": [], "sconv-onnx, bounded": [], "anchor": []}

    def measure(method: str, setting: str, model: onnx.ModelProto, extra: str, seconds: float):
        lost = {}
        for kind, (images, words) in held.items():
            word, char = read_accuracy(model, images, words, classes)
            lost[kind] = (base[kind][0] - word, base[kind][1] - char)
        ratio = count_macs(model, calib[0]) / base_macs
        timing = bench([original, model], {"x": calib[:1]}, names=["original", method],
                       threads=args.threads, runs=args.runs, warmup=5, profile=True)
        latency = timing.ratios[1]
        base_shares.append(mac_kernel_share(timing.profile, 0))
        floor = latency_floor(base_shares[-1], ratio)
        # MAC-kernel time against the original's: the side-by-side latency ratio split by
        # the two profiles' shares
        mac_time = latency * mac_kernel_share(timing.profile, 1) / base_shares[-1]
        points[method].append((ratio, lost, latency))
        rows.append([method, setting, f"{ratio:.3f}",
                     *(f"{lost[kind][0]:.1f} / {lost[kind][1]:.2f}" for kind in held),
                     f"{latency:.3f}", f"{latency / ratio:.2f}", f"{floor / ratio:.2f}",
                     f"{mac_time:.3f}", extra, f"{seconds:.0f}"])
        print(" | ".join(rows[-1]), flush=True)

    for fraction in args.anchor_fractions:
        started = time.perf_counter()
        model = anchor(original, calib, fraction)
        measure("anchor", f"rank fraction {fraction:g}", model, "", time.perf_counter() - started)
    for budget in args.budgets:
        target, _, agreement = budget.partition("@")
        started = time.perf_counter()
        model, report = sconv_onnx.optimize(
            str(path), calib_data={"x": calib}, target_macs=float(target), input_shapes=SHAPE,
            min_agreement=float(agreement) if agreement else None)
        setting = f"--target-macs {target}" + (f" --min-agreement {agreement}" if agreement else "")
        method = "sconv-onnx" if agreement == "0" else "sconv-onnx, bounded"
        measure(method, setting, model, _what_was_done(report), time.perf_counter() - started)
    _write(args, argv, rows, points, base_macs, base, float(np.median(base_shares)))


def latency_floor(mac_share: float, ratio: float) -> float:
    """The latency ratio if the MAC kernels' time fell exactly with the MACs (to
    ``ratio``) and every other kernel's stayed: ``f + (1 - f) ratio``, ``f`` the
    original's share of kernel time outside the MAC kernels (``1 - mac_share``)."""
    return 1 - mac_share + mac_share * ratio


def _what_was_done(report) -> str:
    """The budget's layers by family, its calibration agreement and whether it stopped."""
    check = report.plan.budget_check or {}
    counts: dict[str, int] = {}
    for layer in report.plan.rewritten:
        counts[layer.family] = counts.get(layer.family, 0) + 1
    agreement = check.get("calibration", {}).get("position_agreement")
    text = ", ".join(f"{count} {family}" for family, count in sorted(counts.items()))
    errors = [layer.chosen.output_error for layer in report.plan.rewritten
              if layer.chosen.output_error is not None]
    text += f" (median layer output error {np.median(errors):.3f})" if errors else ""
    text += f"; agreement {agreement:.4f}" if agreement is not None else ""
    if check.get("sequential_fit"):
        text += ", sequential fit"
    if check.get("moves_taken", 0) < check.get("moves_to_target", 0):
        text += f", stopped at the bound ({check['moves_taken']}/{check['moves_to_target']} moves)"
    return text


def _write(args, argv, rows, points, base_macs, base, mac_share: float) -> None:
    header = ["method", "setting", "MACs reached", "clean: words / chars lost (pt)",
              "degraded: words / chars lost (pt)", "latency ratio", "latency / MACs",
              "floor / MACs", "MAC-kernel time ratio", "layers moved; calibration agreement",
              "optimize s"]
    lines = ["| " + " | ".join(row) + " |" for row in [header] + rows]
    lines.insert(1, "|" + "---|" * len(header))
    plot = args.out.with_name("budget_ocr.svg")
    _plot(points, plot)
    command = " ".join(["python benchmarks/ocr_budget.py", *(argv if argv is not None else sys.argv[1:])])
    accuracy = "; ".join(f"{kind}: {words:.1f} % of words, {chars:.2f} % of characters"
                         for kind, (words, chars) in base.items())
    text = "\n".join([
        "# MAC budget on a real pretrained model: PP-OCRv6 rec small", "",
        (f"Made by `{command}` on {datetime.date.today()}; {platform.processor() or platform.machine()}, "
         f"onnxruntime {onnxruntime.__version__}, {args.threads} threads, {args.runs} timed runs "
         f"per model, side by side with the original."), "",
        (f"{args.calib} calibration images, two held-out sets of {args.held_out} (other words and "
         f"random codes, other fonts; `benchmarks/ocr_words.py`). The original reads {accuracy}, "
         f"at {base_macs / 1e9:.3f} GMACs per 48x320 line (counted here from onnxruntime's shapes, "
         f"as are the MACs reached). Losses are in points against the original."), "",
        (f"Latency: the original spends {100 * mac_share:.0f} % of its kernel time in "
         f"Conv/MatMul/Gemm kernels (onnxruntime's profiler, {args.threads} threads, the median "
         f"over the rows); the rest (GELU, Softmax, layout reorders, adds, norms) does not "
         f"shrink with the MACs. *floor / MACs* is the latency ratio over the MAC ratio if the "
         f"MAC kernels' time fell exactly with the MACs; *MAC-kernel time ratio* is the time "
         f"those kernels really take against the original's (the side-by-side latency ratio "
         f"split by each profile's MAC-kernel share)."), "",
        *lines, "", f"![accuracy lost against MACs reached]({plot.name})", "",
        *_gap(points, mac_share), "",
    ])
    args.out.write_text(text)
    print(text)


def _gap(points: dict, mac_share: float) -> list[str]:
    """Why issue 12's targets are out of reach here, from the rows measured above."""
    anchor = sorted(points["anchor"], key=lambda point: point[0])
    lines = ["## Against the targets", "",
             ("Issue 12 asked, on held-out words: at `--target-macs 0.6` at most 1 point of "
              "characters and 5 of words lost, at 0.75 at most 0.2 and 2, better than the anchor "
              "at every ratio, and latency within 1.15x of the MAC ratio. Measured here (clean "
              "set):"), ""]
    for ratio, lost, latency in sorted(points["sconv-onnx"], key=lambda point: -point[0]):
        words, chars = lost["clean"]
        beside = ""
        if anchor and anchor[0][0] <= ratio <= anchor[-1][0]:
            anchor_chars = float(np.interp(ratio, [p[0] for p in anchor],
                                           [p[1]["clean"][1] for p in anchor]))
            beside = (f"; the anchor, interpolated to the same MACs, loses {anchor_chars:.1f} "
                      "points of characters")
        lines.append(f"- {ratio:.3f} of the MACs: {chars:.2f} points of characters and "
                     f"{words:.1f} of words lost{beside}; latency {latency / ratio:.2f}x the MAC "
                     f"ratio, of which {latency_floor(mac_share, ratio) / ratio:.2f}x is the floor "
                     f"left by the kernels that do not shrink")
    # below this MAC ratio, even MAC kernels that sped up exactly with their MACs would
    # leave the latency above 1.15x the MAC ratio: (1 - m) / r + m = 1.15
    reachable = (1 - mac_share) / (1.15 - mac_share)
    lines += ["", (
        "The accuracy targets are out of reach without fine-tuning on this data: the layers "
        "moved lose a large share of their output each (the *median layer output error* "
        "above: these pretrained 1x1 convs and MatMuls are not low rank, and no box structure "
        "fits them either), and the errors add up over the many layers a ratio of 0.75-0.5 "
        "needs; the hand-made anchor, whose per-layer fits are the same SVDs without "
        "selection or sequential fitting, loses more at the same MACs. The latency target is "
        f"out of reach below {reachable:.2f} of the MACs: {100 * (1 - mac_share):.0f} % of "
        "the original's kernel time is GELU, Softmax, layout reorders, adds and norms, which "
        "no MAC budget shrinks, so even MAC kernels that sped up exactly with their MACs "
        "would leave the latency above 1.15x the MAC ratio there (*floor / MACs*); the thin "
        "convs add the rest (*MAC-kernel time ratio* above the MAC ratio).")]
    return lines


def _plot(points: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    for method, style in (("sconv-onnx", "o-"), ("sconv-onnx, bounded", "D"), ("anchor", "s--")):
        data = sorted(points[method], key=lambda point: point[0])
        if not data:
            continue
        ratios = [point[0] for point in data]
        for ax, kind in zip(axes, ("clean", "degraded")):
            ax.plot(ratios, [point[1][kind][1] for point in data], style, label=f"{method}: characters")
            ax.plot(ratios, [point[1][kind][0] for point in data], style, alpha=0.4,
                    label=f"{method}: words")
        axes[2].plot(ratios, [point[2] for point in data], style, label=method)
    for ax, kind in zip(axes, ("clean", "degraded")):
        ax.set(xlabel="MACs reached (fraction of the original)", ylabel="accuracy lost (points)",
               title=f"held-out words, {kind}")
    axes[2].plot([0.4, 1], [0.4, 1], ":", color="gray", label="latency = MACs")
    axes[2].set(xlabel="MACs reached", ylabel="latency ratio", title="onnxruntime CPU, 2 threads")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="svg", metadata={"Date": None})


if __name__ == "__main__":
    main()
