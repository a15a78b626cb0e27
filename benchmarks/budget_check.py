"""Check the budget promise on one workload: plan, then measure forward and backward peaks.

Issue 3's workload by default: N=2, 16 -> 16 channels, 512x512, kernel 3, padding 1, generator
Linear(144, 32) -> ReLU -> Linear(32, 2304), budget 256MB. Prints the plan, then the peak bytes
each of forward and backward allocated (chunkconv.MemoryTracker) next to the estimate and the
budget, and the times.

    python benchmarks/budget_check.py [--size 512] [--budget 256MB] [--path auto|fast|generic]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's chunkconv
import torch  # noqa: E402
from torch import nn  # noqa: E402

import chunkconv  # noqa: E402
from chunkconv import MemoryTracker, format_bytes  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--budget", default="256MB")
    parser.add_argument("--path", default="auto", choices=["auto", "fast", "generic"])
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    c, patch = args.channels, args.channels * 9
    gen = nn.Sequential(nn.Linear(patch, args.hidden), nn.ReLU(), nn.Linear(args.hidden, c * patch))
    conv = chunkconv.DynamicConv(gen, c, c, 3, padding=1, budget=args.budget, path=args.path)
    x = torch.randn(args.batch, c, args.size, args.size, requires_grad=True)
    plan = conv.plan(x)
    print(plan)
    start = time.perf_counter()
    with MemoryTracker() as forward:
        y = conv(x)
    middle = time.perf_counter()
    upstream = torch.randn_like(y)
    with MemoryTracker() as backward:
        y.backward(upstream)
    end = time.perf_counter()
    assert plan.budget is not None and plan.forward_peak is not None and plan.backward_peak is not None
    verdict = "within" if max(forward.peak, backward.peak) <= plan.budget else "ABOVE"
    print(
        f"measured peak: forward {format_bytes(forward.peak)} (plan {format_bytes(plan.forward_peak)}), "
        f"backward {format_bytes(backward.peak)} (plan {format_bytes(plan.backward_peak)}); "
        f"budget {format_bytes(plan.budget)}: {verdict}"
    )
    print(f"time: forward {middle - start:.2f} s, backward {end - middle:.2f} s")
    return {"forward_peak": forward.peak, "backward_peak": backward.peak, "budget": plan.budget}


if __name__ == "__main__":
    main()
