"""The ``sconv-onnx`` command: optimize, analyze, verify, bench, families, demo.

Exit codes: 0 ok; 1 verification failed (nothing written); 2 bad input or
usage (one line on stderr; a bare ``sconv-onnx`` prints its usage); 3
internal error (one line; set ``SCONV_ONNX_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from . import page, progress
from .api import analyze, bench_models, distances, optimize, verify_models
from .bench import default_threads, format_result
from .distance import distance_table, parse_spec
from .errors import (
    PROG,
    InputError,
    SconvError,
    Terminated,
    VerificationError,
    command_line_names,
    first_line,
    stopped,
)
from .modelio import check_output_paths, model_files, save_model, write_atomic
from .options import DEFAULT_MAX_ERROR, DEFAULT_TOL, Options, check_bound, check_timing
from .passes import registered, resolve
from .plan import SELECT_MODES
from .report import json_text, layer_table, stamped, table, tool_info


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit code 2."""

    def error(self, message):
        raise InputError(f"{message} (see {self.prog} --help)")


def _add_shape_options(parser: argparse.ArgumentParser, inputs: bool = True) -> None:
    parser.add_argument(
        "--input-shape", action="append", default=[], metavar="NAME:DIMS",
        help="concrete shape for an input with dynamic dims, e.g. x:1,3,224,224 (repeatable)",
    )
    if inputs:
        parser.add_argument(
            "--inputs", metavar="FILE.npz",
            help="real inputs for verification: arrays keyed by input name",
        )


def _add_timing_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help=f"intra-op threads (default: the cores available, {default_threads()})")
    parser.add_argument("--runs", type=int, default=100, help="timed runs per model (default 100)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")


def _add_calibration_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--calib-data", metavar="FILE.npz",
        help="a batch of real inputs (arrays keyed by input name, samples on the first axis): "
             "measures each layer's output error and the rewritten model's accuracy proxy",
    )
    parser.add_argument(
        "--target-macs", type=float, metavar="R",
        help="compression budget for unstructured weights: force layers onto approximate "
             "structures, least output error per MAC saved first, until the Conv/Gemm/MatMul "
             "MACs are at most R times the original's (needs --calib-data)",
    )
    parser.add_argument(
        "--alpha-fit", choices=("data", "weights"), default="data",
        help="fit a budget's factors on the calibration inputs (data, default) or in weight space",
    )
    parser.add_argument(
        "--min-agreement", type=float, metavar="A",
        help="a budget's bound: the compressed model keeps at least this fraction of the "
             "answers (top-1, or arg-max per position of an N x T x K output) on --calib-data; "
             "the budget stops before breaking it (default 0.99; for outputs without classes "
             "the bound is a relative output error of 0.05, or optimize's --max-error)",
    )
    parser.add_argument(
        "--sequential-fit", action=argparse.BooleanOptionalAction, default=True,
        help="fit a budget's layers again, one after the other, on the inputs they receive in "
             "the compressed model, kept where it brings the model closer to the original on "
             "--calib-data (default: on)",
    )


def _add_planning_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL,
                        help=f"bound on each layer's relative weight residual (default {DEFAULT_TOL:g})")
    parser.add_argument("--select", choices=SELECT_MODES, default="cost",
                        help="cost: rewrite where the cost model predicts a gain (default); "
                             "all: every layer within --tol; measured: time the best candidates "
                             "of each layer on its real shapes and keep only measured wins")
    parser.add_argument("--int8", action="store_true",
                        help="the output will be quantized to int8: leave out rewrites int8 "
                             "cannot hold (pools over channels or input features, and weights "
                             "rebuilt in the graph by shared generators); spatial pools stay")
    parser.add_argument("--families", metavar="A,B", default=None,
                        help="structure families to look for, comma-separated (default: all "
                             f"registered: {','.join(registered())})")


def _verbosity_options() -> argparse.ArgumentParser:
    """``-v``/``-q``, shared by every command (:mod:`sconv_onnx.progress`)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="count", default=0,
                       help="log each phase's time on stderr (-vv: and each family's search)")
    group.add_argument("-q", "--quiet", action="store_true",
                       help="no progress bars or log lines; optimize prints its summary line "
                            "(and --bench's timings) instead of the whole report")
    return common


def _add_html_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--html", metavar="FILE.html",
                        help="also write one self-contained page with plots (per-layer MACs and "
                             "time, residual against --tol, family per layer, a budget's curve, "
                             "timings); needs matplotlib (the html extra)")


def _html_target(args, inputs: list[str]) -> None:
    """Fail early, before any work, when ``--html`` cannot be written."""
    if args.html is None:
        return
    page.require_matplotlib()
    for source in inputs:
        check_output_paths(source, args.html)


def versions() -> str:
    """This tool's version and those of the libraries it runs on, one per line."""
    info = tool_info()
    found = [(PROG, info["version"]), *info["dependencies"].items()]
    return "\n".join(f"{name} {version}" for name, version in found)


class _Versions(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the versions and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(versions())
        parser.exit()


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Rewrite layers whose constant weights have a known "
                                            "structure into cheaper nodes, verified by onnxruntime.")
    parser.add_argument("--version", action=_Versions)
    common = _verbosity_options()
    commands = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    opt = commands.add_parser("optimize", help="rewrite structured layers, verify, save",
                              parents=[common])
    opt.add_argument("input", metavar="IN", help="the ONNX model to read (never modified)")
    opt.add_argument("output", metavar="OUT",
                     help="where to write the rewritten model (written only after it verifies)")
    _add_planning_options(opt)
    _add_shape_options(opt)
    _add_calibration_options(opt)
    opt.add_argument("--max-error", type=float, default=None,
                     help=f"fail (exit 1, write nothing) above this relative output error "
                          f"(default {DEFAULT_MAX_ERROR:g} at the default --tol, else no bound)")
    opt.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    opt.add_argument("--strict-target", action="store_true",
                     help="fail (exit 1, write nothing) when the written model's MACs are above "
                          "--target-macs (the bound stopped the budget, or the target is out of "
                          "reach; default: write the model and report the ratio reached)")
    opt.add_argument("--report", metavar="FILE.json", help="write the JSON report here")
    opt.add_argument("--external-data", action=argparse.BooleanOptionalAction, default=None,
                     help="write the weights to one file beside OUT, OUT.<token>.data (a name unique "
                          "to the run, so concurrent writers never mix files; default: only when "
                          "the model is above protobuf's 2 GiB limit; --no-external-data "
                          "refuses such a model instead)")
    opt.add_argument("--bench", action="store_true",
                     help="time the original and the rewritten model side by side at the end")
    _add_timing_options(opt)
    _add_html_option(opt)

    ana = commands.add_parser("analyze", help="print the per-layer plan without rewriting",
                              parents=[common])
    ana.add_argument("input", metavar="IN", help="the ONNX model to read")
    _add_planning_options(ana)
    _add_shape_options(ana, inputs=False)
    _add_calibration_options(ana)
    ana.add_argument("--json", action="store_true", help="print the plan as JSON")
    ana.add_argument("--distance", metavar="SPEC",
                     help="instead of the plan, print each layer's relative residual to one box "
                          "structure, e.g. c=C/2,n=2 (c: an integer or C scaled, C being the "
                          "layer's input channels; n: an integer or K, per kernel axis)")
    _add_html_option(ana)

    ver = commands.add_parser("verify", help="compare two models' outputs in onnxruntime",
                              parents=[common])
    ver.add_argument("first", metavar="A", help="the reference model")
    ver.add_argument("second", metavar="B", help="the model to compare with it")
    _add_shape_options(ver)
    ver.add_argument("--max-error", type=float, default=DEFAULT_MAX_ERROR,
                     help=f"exit 1 above this relative error (default {DEFAULT_MAX_ERROR:g})")

    ben = commands.add_parser("bench", help="time one model, or two side by side (A/B)",
                              parents=[common])
    ben.add_argument("first", metavar="A", help="the model to time (the reference of a ratio)")
    ben.add_argument("second", metavar="B", nargs="?",
                     help="a second model, timed side by side with A (ratios B/A)")
    _add_shape_options(ben)
    _add_timing_options(ben)
    ben.add_argument("--profile", action="store_true",
                     help="add a per-op-type breakdown from onnxruntime's profiler")
    ben.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_html_option(ben)

    commands.add_parser("families", help="list the structure families --families can name",
                        parents=[common])

    demo = commands.add_parser("demo", help="build the bundled example CNN, optimize and verify it",
                               parents=[common])
    demo.add_argument("--out", metavar="DIR", default=None,
                      help="folder for demo_cnn.onnx and its rewrite (default: a temporary folder)")
    return parser


def _summary_line(report, out: str) -> str:
    plan, before, after = report.plan, report.before, report.after
    macs = f", MACs x{after.macs / before.macs:.3f}" if before.macs and after.macs is not None else ""
    if report.errors is None:
        verdict = ", NOT verified (--no-verify)"
    elif report.status == "UNBOUNDED":
        verdict = f", UNBOUNDED: max rel error {report.max_rel_error:.2g} (no --max-error)"
    else:
        verdict = f", {report.status}: max rel error {report.max_rel_error:.2g}"
    measured = (f", whole model measured {plan.model_ratio:.3f}x" if plan.model_ratio is not None
                else "")
    return (f"wrote {out}: {len(plan.rewritten)}/{len(plan.layers)} layers rewritten, "
            f"params x{after.params / max(1, before.params):.3f}{macs}{measured}{verdict}")


def _optimize(args) -> int:
    if not Path(args.input).exists():
        raise InputError(f"{args.input}: no such file")
    input_files = model_files(args.input)  # never overwritten, nor removed as an old output's
    check_output_paths(args.input, args.output, args.report, args.html, input_files=input_files)
    _html_target(args, [])
    try:
        model, report = optimize(
            args.input, tol=args.tol, select=args.select, families=args.families,
            input_shapes=args.input_shape,
            inputs=args.inputs, verify=not args.no_verify, max_error=args.max_error,
            threads=args.threads, calib_data=args.calib_data, target_macs=args.target_macs,
            alpha_fit=args.alpha_fit, min_agreement=args.min_agreement,
            strict_target=args.strict_target, sequential_fit=args.sequential_fit, int8=args.int8,
        )
    except VerificationError as exc:
        if exc.report is not None and not args.quiet:
            print(exc.report.format())
        raise
    data = save_model(model, args.output, external_data=args.external_data,
                      keep=input_files)
    del model  # --bench reads both models from their files
    if args.report:  # written now, and again with the timings: a failed bench loses nothing
        write_atomic(args.report, json_text(report.to_dict()).encode())
    if not args.quiet:
        print(report.format())
    written = args.output if data is None else f"{args.output} (weights in {data.name})"
    print(_summary_line(report, written))
    if args.bench:
        result = bench_models(
            [args.input, args.output], names=["original", "rewritten"], input_shapes=args.input_shape,
            inputs=args.inputs, threads=args.threads, runs=args.runs, warmup=args.warmup,
        )
        report.bench = result.to_dict()
        print(format_result(result))
        if args.report:
            write_atomic(args.report, json_text(report.to_dict()).encode())
    if args.html:
        write_atomic(args.html, page.optimize_page(report.to_dict(), args.input,
                                                   args.output).encode())
    return 0


def _bench(args) -> int:
    paths = [args.first] + ([args.second] if args.second else [])
    _html_target(args, paths)
    result = bench_models(
        paths, names=["A", "B"][: len(paths)], input_shapes=args.input_shape, inputs=args.inputs,
        threads=args.threads, runs=args.runs, warmup=args.warmup, profile=args.profile,
    )
    if args.json:
        print(json_text(stamped(result.to_dict())), end="")
    else:
        for name, path in zip(("A", "B"), paths):
            print(f"{name}: {path}")
        print(format_result(result))
    if args.html:
        write_atomic(args.html, page.bench_page(stamped(result.to_dict()), paths).encode())
    return 0


#: analyze's options that --distance does not read, with their defaults.
_NOT_FOR_DISTANCE = {"select": "cost", "families": None, "int8": False, "calib_data": None,
                     "target_macs": None, "min_agreement": None, "html": None}


def _analyze(args) -> int:
    if args.distance is not None:
        given = [name for name, default in _NOT_FOR_DISTANCE.items()
                 if getattr(args, name) != default]
        if given:
            raise InputError(f"--distance reads only --tol, --input-shape and --json, not "
                             f"--{given[0].replace('_', '-')}")
        Options(tol=args.tol).check()
        spec = parse_spec(args.distance)
        found = distances(args.input, spec, input_shapes=args.input_shape)
        print(json_text(stamped({"distance": spec.text, "layers": [d.to_dict() for d in found]}))
              if args.json else distance_table(found, spec, args.tol), end="" if args.json else "\n")
        return 0
    _html_target(args, [args.input])
    plan = analyze(args.input, tol=args.tol, select=args.select, families=args.families,
                   input_shapes=args.input_shape,
                   calib_data=args.calib_data, target_macs=args.target_macs,
                   alpha_fit=args.alpha_fit, min_agreement=args.min_agreement,
                   sequential_fit=args.sequential_fit, int8=args.int8)
    data = stamped(plan.to_dict())
    print(json_text(data) if args.json else layer_table(plan) + "\n", end="")
    if args.html:
        write_atomic(args.html, page.analyze_page(data, args.input).encode())
    return 0


def _verify(args) -> int:
    check_bound(args.max_error)
    errors, shapes = verify_models(
        args.first, args.second, input_shapes=args.input_shape, inputs=args.inputs
    )
    worst = max((e.max_rel for e in errors), default=0.0)
    used = ", ".join(f"{k}:{','.join(map(str, v))}" for k, v in shapes.shapes.items())
    print(f"inputs {used}")
    for note in shapes.notes:
        print(f"note: {note}")
    for err in errors:
        problem = f" ({err.problem})" if err.problem else ""
        print(f"  {err.name}: max abs {err.max_abs:.3g}, max rel {err.max_rel:.3g}{problem}")
    broken = next((err for err in errors if err.problem), None)
    if broken is not None:
        raise VerificationError(f"outputs differ: {broken.name!r}: {broken.problem}")
    if worst > args.max_error:
        raise VerificationError(f"outputs differ: max relative error {worst:.3g} > {args.max_error:g}")
    print(f"PASS: max relative error {worst:.3g} <= {args.max_error:g}")
    return 0


def _demo(args) -> int:
    from .models import demo_cnn

    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError(f"{args.out}: is a file; --out takes a folder")
    temporary = args.out is None
    folder = Path(tempfile.mkdtemp(prefix="sconv-demo-")) if temporary else Path(args.out)
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{folder}: cannot make the folder ({exc.strerror or exc})") from None
        source, target = folder / "demo_cnn.onnx", folder / "demo_cnn.sconv.onnx"
        check_output_paths(None, source, target)
        save_model(demo_cnn.build(), source)
        kept = "removed at the end; --out DIR keeps them" if temporary else "kept"
        print(f"built {source} (a small CNN whose 3x3 and 1x1 conv weights are structured; "
              f"the files are {kept})")
        print(f"$ {PROG} optimize {source} {target}\n")
        verbosity = ["-q"] if args.quiet else ["-v"] * args.verbose
        return _optimize(_build_parser().parse_args(
            ["optimize", str(source), str(target), "--bench", "--runs", "50", *verbosity]))
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)


def _families(args) -> int:
    rows = [[family.name, family.description] for family in resolve()]
    print(table(["family", "rewrites"], rows))
    return 0


_COMMANDS = {
    "optimize": _optimize, "analyze": _analyze, "verify": _verify, "bench": _bench, "demo": _demo,
    "families": _families,
}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module doc).

    Interrupts end with one line: SIGINT 130, SIGTERM 143 (where
    :mod:`sconv_onnx.entry` installed the handler); temporary files are
    removed on the way out.  A closed stdout (``| head``) ends quietly, 141.
    """
    try:
        with command_line_names():
            parser = _build_parser()
            args = parser.parse_args(argv)
            if args.command is None:
                parser.print_help(sys.stderr)
                return 2
            progress.configure(-1 if args.quiet else args.verbose)
            check_timing(vars(args))
            code = _COMMANDS[args.command](args)
            sys.stdout.flush()  # a closed pipe fails here, not in the interpreter's exit
            return code
    except SconvError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (KeyboardInterrupt, Terminated) as exc:
        return stopped(exc)
    except BrokenPipeError:
        _drop_stdout()
        return 141
    except Exception as exc:  # one line, not a traceback; the env var shows it
        if os.environ.get("SCONV_ONNX_DEBUG"):
            raise
        print(f"{PROG}: internal error: {type(exc).__name__}: {first_line(exc)} "
              f"(set SCONV_ONNX_DEBUG=1 for the traceback)", file=sys.stderr)
        return 3


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    from .entry import main as entry_main  # with the signal handlers

    sys.exit(entry_main())
