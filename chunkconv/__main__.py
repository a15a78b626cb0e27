r"""Command line: ``python -m chunkconv plan ...`` prints a plan without allocating the input.

Example::

    python -m chunkconv plan --input 1x16x2048x2048 --out-channels 16 --kernel-size 3 \\
        --padding 1 --hidden 32 --budget 4GB
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from torch import nn

from .errors import BudgetTooSmallError
from .functional import plan


def _ints(text: str) -> int | tuple[int, ...]:
    parts = tuple(int(p) for p in text.lower().replace(",", "x").split("x"))
    return parts[0] if len(parts) == 1 else parts


def _padding(text: str) -> int | tuple[int, ...] | str:
    return text if text in ("same", "valid") else _ints(text)


def _budget(text: str) -> str | float | int:
    try:
        value = float(text)
    except ValueError:
        return text
    return value if 0 < value <= 1 and "." in text else int(value) if value.is_integer() else text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chunkconv", description="chunkconv tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="print the plan for an MLP generator, without allocating the input")
    p.add_argument("--input", required=True, type=_ints, help="input shape, e.g. 1x16x2048x2048")
    p.add_argument("--out-channels", required=True, type=int)
    p.add_argument("--kernel-size", required=True, type=_ints, help="e.g. 3 or 3x3 (spatial dims = input dims - 2)")
    p.add_argument("--stride", type=_ints, default=1)
    p.add_argument("--padding", type=_padding, default=0, help="int, AxB, 'same' or 'valid'")
    p.add_argument("--dilation", type=_ints, default=1)
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--padding-mode", default="zeros")
    p.add_argument("--hidden", type=int, default=32, help="hidden width of Linear-ReLU-Linear generator")
    p.add_argument("--budget", type=_budget, default="auto", help="'4GB', '512MiB', bytes, a fraction, or 'auto'")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--inference", action="store_true", help="plan forward only (default: training)")
    args = parser.parse_args(argv)

    shape = args.input if isinstance(args.input, tuple) else (args.input,)
    ndim = len(shape) - 2
    if ndim not in (1, 2, 3):
        parser.error(f"--input must be N x C x (1 to 3 spatial sizes), got {args.input}")
    kernel = args.kernel_size if isinstance(args.kernel_size, tuple) else (args.kernel_size,) * ndim
    channels = shape[1]
    patch = channels * math.prod(kernel)
    weight = args.out_channels * channels // max(args.groups, 1) * math.prod(kernel)
    dtype = getattr(torch, args.dtype)
    generator = nn.Sequential(nn.Linear(patch, args.hidden), nn.ReLU(), nn.Linear(args.hidden, weight))
    generator.to(device=args.device, dtype=dtype)
    try:
        result = plan(
            shape,
            generator,
            args.out_channels,
            kernel,
            stride=args.stride,
            padding=args.padding,
            dilation=args.dilation,
            groups=args.groups,
            padding_mode=args.padding_mode,
            budget=args.budget,
            training=not args.inference,
        )
    except (BudgetTooSmallError, ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"generator: {generator}".replace("\n", "\n           "))
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
