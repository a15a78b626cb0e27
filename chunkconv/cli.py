r"""The command line, run as ``python -m chunkconv``: ``plan ...`` prints a plan without allocating
the input; ``doctor`` says what runs here and checks it (see :mod:`chunkconv.doctor`).

The ``plan`` command means what the Python API means: an int ``--kernel-size`` is a 2-D kernel
(``--ndim`` says otherwise), a kernel of several sizes fixes the number of spatial dims, and an
``--input`` with one dim fewer than ``N x C x spatial`` is one unbatched image (``C x spatial``).

Example::

    python -m chunkconv plan --input 1x16x2048x2048 --out-channels 16 --kernel-size 3 \\
        --padding 1 --hidden 32 --budget 4GB
    python -m chunkconv plan --input 16x4096x4096 --kernel-size 3     # one unbatched 2-D image
    python -m chunkconv plan --input 1x16x4096 --kernel-size 3 --ndim 1
    python -m chunkconv doctor --json
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from .progress import set_progress

__all__ = ["main"]

_PLAN_EXAMPLES = """\
examples:
  python -m chunkconv plan --input 1x16x2048x2048 --kernel-size 3 --padding 1 --budget 4GB
  python -m chunkconv plan --input 16x4096x4096 --kernel-size 3          (one unbatched 2-D image)
  python -m chunkconv plan --input 2x8x4096 --kernel-size 5 --ndim 1     (1-D)
  python -m chunkconv plan --input 1x4x32x64x64 --kernel-size 3x3x3      (3-D: the kernel says so)
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: ...)`` after every option that has one (not after required ones or flags)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        default = action.default
        if action.required or default is None or default is False or default == argparse.SUPPRESS:
            return action.help or ""
        if "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action) or ""


def _ints(text: str) -> int | tuple[int, ...]:
    try:
        parts = tuple(int(p) for p in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or ints joined by 'x' (3 or 3x3), got {text!r}") from None
    return parts[0] if len(parts) == 1 else parts


def _padding(text: str) -> int | tuple[int, ...] | str:
    return text if text in ("same", "valid") else _ints(text)


def _budget(text: str) -> str | float | int:
    try:
        value = float(text)
    except ValueError:
        return text
    return value if 0 < value <= 1 and "." in text else int(value) if value.is_integer() else text


def _budget_at_least(nbytes: int) -> str:
    """A ``--budget`` of three significant digits, at least ``nbytes`` (e.g. ``"214MiB"``, ``"1.11GiB"``)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            scale = 10 ** max(0, 2 - int(math.log10(nbytes / size)))
            return f"{math.ceil(nbytes * scale / size) / scale:g}{unit}"
    return f"{nbytes}B"


def _build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog="python -m chunkconv", description="chunkconv tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "plan",
        help="print the plan for an MLP generator, without allocating the input",
        description="Print what chunkconv would do for a convolution whose generator is "
        "Linear-ReLU-Linear, without allocating the input.",
        epilog=_PLAN_EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--input",
        required=True,
        type=_ints,
        help="input shape: N x C x spatial (batched) or C x spatial (one unbatched input), e.g. 1x16x2048x2048",
    )
    p.add_argument(
        "--kernel-size",
        required=True,
        type=_ints,
        help="an int (a kernel of --ndim spatial dims, 2-D unless told) or one size per spatial dim, e.g. 3x3x3",
    )
    p.add_argument(
        "--ndim",
        type=int,
        choices=(1, 2, 3),
        help="spatial dims of the convolution (default: the kernel's length; 2 for an int kernel, as in Python)",
    )
    p.add_argument("--out-channels", type=int, help="output channels (default: the input's channels)")
    p.add_argument("--stride", type=_ints, default=1, help="int or one per spatial dim, e.g. 2 or 2x1")
    p.add_argument("--padding", type=_padding, default=0, help="int, AxB, 'same' or 'valid'")
    p.add_argument("--dilation", type=_ints, default=1, help="int or one per spatial dim")
    p.add_argument("--groups", type=int, default=1, help="channel groups, as in torch.nn.Conv2d")
    p.add_argument(
        "--padding-mode", default="zeros", choices=("zeros", "reflect", "replicate", "circular"), help="as in torch"
    )
    p.add_argument("--hidden", type=int, default=32, help="hidden width of the Linear-ReLU-Linear generator")
    p.add_argument(
        "--kernel",
        default="full",
        choices=("full", "modulated", "shared"),
        help="what the generator returns per location: a full weight, per-tap scalars scaling a static weight, "
        "or one depthwise kernel per channel group",
    )
    p.add_argument("--kernel-groups", type=int, help="channel groups of --kernel shared (default: 1)")
    p.add_argument(
        "--inputs",
        default="patches",
        help="what the generator receives, comma-separated, in order: patches, features, guide, positions",
    )
    p.add_argument("--features", type=int, help="channels of the per-location features (with --inputs features)")
    p.add_argument("--guide", type=int, help="channels of the guide (with --inputs guide)")
    p.add_argument("--budget", type=_budget, default="auto", help="'4GB', '512MiB', bytes, a fraction, or 'auto'")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"], help="the input's dtype"
    )
    p.add_argument("--device", default="cpu", help="where the convolution would run: cpu, cuda, cuda:1, ...")
    p.add_argument("--inference", action="store_true", help="plan forward only (default: training)")

    d = sub.add_parser(
        "doctor",
        help="print versions, devices and what runs here, then check every path on this device",
        description="Print versions, devices and which paths and backends can run here (and why "
        "not), then check each path against the float64 reference and the measured memory against "
        "the budget. Exits non-zero when a check fails.",
        formatter_class=_HelpFormatter,
    )
    d.add_argument("--json", action="store_true", help="print one JSON object (for bug reports)")
    d.add_argument("--device", help="the device to check (default: cuda if available, else cpu)")
    return parser, p


def _spatial_dims(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[int, tuple[int, ...], bool]:
    """The number of spatial dims, the kernel as a tuple and whether the input is unbatched."""
    shape = args.input if isinstance(args.input, tuple) else (args.input,)
    if isinstance(args.kernel_size, tuple):
        ndim = len(args.kernel_size)
        if ndim not in (1, 2, 3):
            parser.error(f"--kernel-size {_x(args.kernel_size)} has {ndim} sizes; a kernel has 1, 2 or 3 spatial dims")
        if args.ndim is not None and args.ndim != ndim:
            parser.error(
                f"--kernel-size {_x(args.kernel_size)} is a {ndim}-D kernel but --ndim is {args.ndim}: "
                f"give one size per spatial dim, or an int kernel size with --ndim"
            )
        kernel = args.kernel_size
        said = f"--kernel-size {_x(kernel)} is {ndim}-D"
    else:
        ndim = args.ndim if args.ndim is not None else 2
        kernel = (args.kernel_size,) * ndim
        said = f"--ndim {ndim}" if args.ndim is not None else "an int --kernel-size means 2-D unless --ndim says so"
    if any(k < 1 for k in kernel):  # before any layer is built (torch warns about zero-element weights)
        parser.error(f"--kernel-size {_x(args.kernel_size)}: each kernel size must be >= 1")
    if len(shape) not in (ndim + 1, ndim + 2):
        names = {1: "L", 2: "HxW", 3: "DxHxW"}[ndim]
        hint = ""
        if args.ndim is None and not isinstance(args.kernel_size, tuple) and len(shape) - 2 in (1, 3):
            hint = f"; for a {len(shape) - 2}-D convolution of a batched input, add --ndim {len(shape) - 2}"
        parser.error(
            f"--input {_x(shape)} has {len(shape)} dims, but a {ndim}-D convolution ({said}) takes "
            f"NxCx{names} ({ndim + 2} dims) or one unbatched input Cx{names} ({ndim + 1} dims){hint}"
        )
    return ndim, kernel, len(shape) == ndim + 1


def _output_spatial(args: argparse.Namespace, shape: tuple[int, ...], kernel: tuple[int, ...]) -> tuple[int, ...]:
    from .geometry import conv_spec

    ndim = len(kernel)
    spec = conv_spec(
        ndim,
        in_channels=shape[-ndim - 1],
        out_channels=shape[-ndim - 1],
        kernel_size=kernel,
        stride=args.stride,
        padding=args.padding,
        dilation=args.dilation,
    )
    return spec.geometry((1, shape[-ndim - 1], *shape[-ndim:])).out_spatial


def _static_weight(
    kernel: str, out: int, channels: int, groups: int, size: tuple[int, ...], dtype: Any, device: Any
) -> Any:
    """The modulated form's static weight, on ``meta``-free zeros: planning only reads its shape."""
    if kernel != "modulated":
        return None
    import torch

    return torch.zeros((out, channels // max(groups, 1), *size), dtype=dtype, device=device)


def _concat_mlp(width: int, hidden: int, out: int) -> Any:  # torch is imported lazily here
    """The CLI's generator for several inputs (or a structured form): rows concatenated, then Linear-ReLU-Linear."""
    import torch
    from torch import nn

    class ConcatMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, out))

        def forward(self, *rows: torch.Tensor) -> torch.Tensor:
            return self.mlp(torch.cat(rows, dim=1))

    return ConcatMLP()


def _x(sizes: tuple[int, ...] | int) -> str:
    return "x".join(map(str, sizes)) if isinstance(sizes, tuple) else str(sizes)


def _plan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    from .budget import format_bytes
    from .errors import BudgetTooSmallError
    from .functional import plan

    shape = args.input if isinstance(args.input, tuple) else (args.input,)
    ndim, kernel, unbatched = _spatial_dims(parser, args)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    channels = shape[0] if unbatched else shape[1]
    out_channels = args.out_channels if args.out_channels is not None else channels
    taps = math.prod(kernel)
    inputs = tuple(k.strip() for k in args.inputs.split(",") if k.strip())
    side: dict[str, tuple[int, ...]] = {}
    widths = {"patches": channels * taps, "positions": ndim}
    lead = shape[:0] if unbatched else shape[:1]
    for name in ("features", "guide"):
        count = getattr(args, name)
        if (count is None) == (name in inputs):
            parser.error(f"--{name} (its channels) and 'inputs {name}' go together: give both or neither")
        if count is not None:
            # the features lie on the output's grid: a shape the plan checks, so stride 1 and 'same'
            # padding are the common case; the guide on the input's
            side[name] = (*lead, count, *(shape[-ndim:] if name == "guide" else _output_spatial(args, shape, kernel)))
            widths[name] = count * (taps if name == "guide" else 1)
    made = {
        "full": out_channels * (channels // max(args.groups, 1)) * taps,
        "modulated": taps,
        "shared": (args.kernel_groups or 1) * taps,
    }[args.kernel]
    dtype = getattr(torch, args.dtype)
    width = sum(widths.get(k, 0) for k in inputs)
    generator: nn.Module
    if args.kernel == "full" and len(inputs) == 1:
        generator = nn.Sequential(nn.Linear(width, args.hidden), nn.ReLU(), nn.Linear(args.hidden, made))
    else:
        generator = _concat_mlp(width, args.hidden, made)
    try:
        generator.to(device=args.device, dtype=dtype)
        result = plan(
            shape,
            generator,
            out_channels,
            kernel,
            stride=args.stride,
            padding=args.padding,
            dilation=args.dilation,
            groups=args.groups,
            padding_mode=args.padding_mode,
            budget=args.budget,
            training=not args.inference,
            kernel=args.kernel,
            weight=_static_weight(args.kernel, out_channels, channels, args.groups, kernel, dtype, args.device),
            kernel_groups=args.kernel_groups,
            inputs=inputs,
            features=side.get("features"),
            guide=side.get("guide"),
        )
    except BudgetTooSmallError as error:
        mode = "forward only (--inference)" if args.inference else "training (forward and backward)"
        print(
            f"error: --budget {args.budget} ({format_bytes(error.budget)}) is too small for this convolution, "
            f"{mode}: even one patch per chunk needs {format_bytes(error.minimum)}. "
            f"Rerun with --budget {_budget_at_least(error.minimum)} or more"
            + ("" if args.inference else ", or plan forward only with --inference")
            + ".",
            file=sys.stderr,
        )
        return 2
    except (ValueError, TypeError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    what = "one unbatched input" if unbatched else f"a batch of {shape[0]}"
    print(f"convolution: {ndim}-D, kernel {_x(kernel)}, {what} of {channels} channels -> {out_channels} channels")
    if unbatched and args.ndim is None and not isinstance(args.kernel_size, tuple) and ndim > 1:
        other = ndim - 1
        print(f"             (an int --kernel-size means {ndim}-D; for a batched {other}-D input, add --ndim {other})")
    print(f"generator: {generator}".replace("\n", "\n           "))
    print(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m chunkconv`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser, plan_parser = _build_parser()
    args = parser.parse_args(argv)
    if "CHUNKCONV_PROGRESS" not in os.environ:
        set_progress("auto")  # the CLI shows progress for long calls unless told otherwise
    if args.command == "doctor":
        from .doctor import run

        return run(device=args.device, as_json=args.json)
    return _plan(plan_parser, args)
