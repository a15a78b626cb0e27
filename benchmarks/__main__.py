"""Command line: ``python -m benchmarks [run] ...`` measures; ``python -m benchmarks report ...`` renders;
``python -m benchmarks layers ...`` measures published layers against their direct implementations;
``python -m benchmarks tiled ...`` measures ``chunkconv.tiled`` against the model in memory.
``python -m benchmarks roofline ...`` measures the fraction of the machine's GEMM rate reached.
``python -m benchmarks deform ...`` measures ``chunkconv.ops.deform_conv2d`` against torchvision's and grid_sample's.

Examples::

    python -m benchmarks --device cpu --suite smoke                  # seconds
    python -m benchmarks --device cpu --suite all --repeats 3        # CPU-A + the 128..1024 px sweep
    python -m benchmarks --device cuda --suite all --dtype float32,bfloat16
    python -m benchmarks report results/cpu-all-*.json --markdown docs/benchmarks.md
    python -m benchmarks layers --quick                              # seconds
    python -m benchmarks layers --repeats 3 --name cpu-layers        # KPN, PAC, PSF, involution, DCN mask
    python -m benchmarks tiled                                       # tiled over Zarr vs in memory
    python -m benchmarks roofline --repeats 5                        # CPU-A and two shapes vs sgemm
    python -m benchmarks deform --threads 2                          # DCNv2 step vs torchvision, grid_sample

``run`` writes ``OUT/NAME.json`` (rewritten after every case), ``OUT/NAME.md`` and, with matplotlib,
``OUT/NAME.png``. ``report`` turns one or more run JSONs into one Markdown page, plots next to it in
``--img-dir``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import sys
from pathlib import Path

from chunkconv.budget import parse_budget

from .methods import default_methods
from .plot import have_matplotlib, save_plot
from .report import render_page
from .runner import SUITES, Settings, run
from .workloads import MODES

_DTYPES = ("float32", "float64", "bfloat16", "float16")


def _csv(choices: tuple[str, ...] | None = None, cast=str):
    def parse(text: str) -> tuple:
        items = tuple(cast(t.strip()) for t in text.split(",") if t.strip())
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        if choices is not None:
            bad = [i for i in items if i not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"expected items from {', '.join(choices)}, got {', '.join(bad)}")
        return items

    return parse


def _run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="measure a suite (the default command)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: cpu)")
    p.add_argument("--suite", default="all", choices=SUITES, help="smoke (CI, seconds), anchors, sweep or all")
    p.add_argument("--dtype", type=_csv(_DTYPES), default=("float32",), help="comma-separated dtypes")
    p.add_argument("--modes", type=_csv(MODES), default=MODES, help="fwd, fwd+bwd or both (default)")
    p.add_argument(
        "--methods",
        type=_csv(("chunkconv", "forum", "einsum", "checkpoint", "static")),
        help="keep only these method kinds",
    )
    p.add_argument("--sizes", type=_csv(cast=int), help="sweep image sides (default: 128..1024 CPU, 256..4096 CUDA)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls after the warm-up (default: 5)")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=30.0,
        help="stop repeating a case once its timed calls reach this (default: 30)",
    )
    p.add_argument(
        "--memory-limit", help="e.g. 8GB; default: min(8 GiB, half the available RAM) on CPU, the card's memory on CUDA"
    )
    p.add_argument("--no-isolate", action="store_true", help="CPU: measure in this process, without a cap")
    p.add_argument(
        "--no-estimate-skip",
        action="store_true",
        help="run cases even when their estimate exceeds the limit (the cap still applies)",
    )
    p.add_argument("--case-timeout", type=float, default=600.0, help="seconds before a CPU case is killed")
    p.add_argument("--time-limit", type=float, help="stop starting cases after this many seconds")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the measurements (default: torch's)")
    p.add_argument("--note", help="free text stored with the run and shown in the report")
    p.add_argument("--out", default=os.environ.get("OUT") or "results", help="output folder (default: $OUT or results)")
    p.add_argument("--name", help="file stem (default: DEVICE-SUITE-DATE)")
    p.add_argument("--no-plot", action="store_true")


def _report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="Markdown (and plots) from run JSONs")
    p.add_argument("runs", nargs="+", type=Path, help="run JSON files, in page order")
    p.add_argument("--markdown", type=Path, help="write the page here (default: stdout)")
    p.add_argument("--img-dir", type=Path, help="plots go here (default: img/ next to --markdown)")
    p.add_argument("--no-plot", action="store_true")


def _layers_parser(sub: argparse._SubParsersAction) -> None:
    from .layers import LAYERS

    p = sub.add_parser(
        "layers", help="published layers (benchmarks/layers.py) against their direct implementations, CPU fwd+bwd"
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes at 16 and 32 px (seconds)")
    p.add_argument("--layers", type=_csv(tuple(LAYERS)), help=f"comma-separated, from {', '.join(LAYERS)}")
    p.add_argument("--sizes", type=_csv(cast=int), help="image sides for every layer (default: each layer's)")
    p.add_argument("--budget", help="chunkconv's budget above 256 px (default: 1GB; 32MB with --quick)")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds after the warm-up (default: 3)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="stop repeating a method after this (default: 60)")
    p.add_argument("--memory-limit", help="the measuring child's address-space headroom (default: 4GB)")
    p.add_argument("--no-isolate", action="store_true", help="measure in this process, without a cap")
    p.add_argument("--case-timeout", type=float, default=600.0, help="seconds before a case is killed")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2; 0: torch's)")
    p.add_argument("--note", help="free text stored with the run")
    p.add_argument("--out", default=os.environ.get("OUT") or "results", help="output folder (default: $OUT or results)")
    p.add_argument("--name", help="file stem (default: cpu-layers-DATE)")


def _deform_parser(sub: argparse._SubParsersAction) -> None:
    from .deform import METHODS

    p = sub.add_parser(
        "deform", help="chunkconv.ops.deform_conv2d against torchvision's and a grid_sample one (training step)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: cpu)")
    p.add_argument("--quick", action="store_true", help="4 channels at 12 and 24 px (seconds)")
    p.add_argument("--sizes", type=_csv(cast=int), help="image sides (default: 128,256,1024)")
    p.add_argument("--budget", help="chunkconv's budget above 256 px (default: 1GB; 256KB with --quick)")
    p.add_argument("--methods", type=_csv(METHODS), default=METHODS, help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds after the warm-up (default: 3)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="stop repeating a method after this (default: 60)")
    p.add_argument("--memory-limit", help="CPU: the measuring child's address-space headroom (default: 4GB)")
    p.add_argument("--no-isolate", action="store_true", help="measure in this process, without a cap")
    p.add_argument("--case-timeout", type=float, default=900.0, help="seconds before a case is killed")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2; 0: torch's)")
    p.add_argument("--note", help="free text stored with the run")
    p.add_argument("--out", default=os.environ.get("OUT") or "results", help="output folder (default: $OUT or results)")
    p.add_argument("--name", help="file stem (default: DEVICE-deform-DATE)")


def _roofline_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "roofline", help="the fraction of the machine's GEMM rate each path reaches (benchmarks/roofline.py)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: cpu)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and a small GEMM (seconds)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds after the warm-up (default: 5)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default=os.environ.get("OUT") or "results", help="output folder (default: $OUT or results)")
    p.add_argument("--name", help="file stem (default: DEVICE-roofline-DATE)")


def _cmd_run(args: argparse.Namespace) -> int:
    methods = None
    if args.methods:
        methods = tuple(m for m in default_methods(args.device, sweep=args.suite == "sweep") if m.kind in args.methods)
    settings = Settings(
        device=args.device,
        suite=args.suite,
        dtypes=args.dtype,
        modes=args.modes,
        repeats=args.repeats,
        max_seconds=args.max_seconds,
        memory_limit=parse_budget(args.memory_limit) if args.memory_limit else None,
        isolate=not args.no_isolate,
        case_timeout=args.case_timeout,
        time_limit=args.time_limit,
        skip_by_estimate=not args.no_estimate_skip,
        sizes=args.sizes,
        threads=args.threads,
        note=args.note,
        methods=methods,
    )
    stem = args.name or f"{args.device.replace(':', '')}-{args.suite}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    out = Path(args.out)
    doc = run(settings, out / f"{stem}.json")
    image = None
    if not args.no_plot and have_matplotlib() and save_plot(doc, out / f"{stem}.png"):
        image = f"{stem}.png"
    command = "python -m benchmarks " + shlex.join(sys.argv[1:])
    (out / f"{stem}.md").write_text(render_page([(doc, image)], command))
    print(f"wrote {out / stem}.json, .md" + (", .png" if image else ""))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    import json

    runs = []
    target = args.markdown
    img_dir = args.img_dir or ((target.parent / "img") if target else Path("."))
    for path in args.runs:
        doc = json.loads(path.read_text())
        image = None
        if not args.no_plot and have_matplotlib():
            png = img_dir / f"{path.stem}.png"
            if save_plot(doc, png):
                image = os.path.relpath(png, target.parent) if target else str(png)
        runs.append((doc, image))
    page = render_page(runs, "python -m benchmarks " + shlex.join(sys.argv[1:]))
    if target:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(page)
        print(f"wrote {target}")
    else:
        sys.stdout.write(page)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "report", "layers", "tiled", "roofline", "deform", "-h", "--help"):
        argv.insert(0, "run")
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    _report_parser(sub)
    _layers_parser(sub)
    from .tiled import main_tiled, tiled_parser

    tiled_parser(sub)
    _roofline_parser(sub)
    from .deform import main_deform

    _deform_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "layers":
        from .layers_cpu import main_layers

        return main_layers(args)
    if args.command == "tiled":
        return main_tiled(args)
    if args.command == "roofline":
        from .roofline import main_roofline

        return main_roofline(args)
    if args.command == "deform":
        return main_deform(args)
    return _cmd_run(args) if args.command == "run" else _cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
