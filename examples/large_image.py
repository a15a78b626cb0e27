"""chunkconv's main job: a dynamic convolution on an image too large for the forum recipe.

The forum recipe (chunkconv.dynamic_conv_reference(method="forum")) materialises
a weight for every patch at once. Here it runs in a child process whose address
space is capped (at --recipe-limit-gb above what the child has mapped once torch
is imported), and fails cleanly. chunkconv runs the same layer, forward and
backward, with a memory budget (--budget, default 1GB): it first prints the plan
it makes from the budget (the chunking, the peaks it expects, and what the
unchunked computation would need), then streams the patches in chunks and prints
the peak memory it measured, forward and backward, next to the budget.

    python examples/large_image.py               # 1 x 16 x 1024 x 1024: see below for how long
    python examples/large_image.py --size 256    # quicker
    python examples/large_image.py --budget 300MB

The default run takes about 12 s on 2 idle CPU cores (chunkconv's forward and backward, 89
chunks on the fast path, take about 7 s; the recipe's failure takes seconds). It needs about
1.5 GiB of free RAM.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import re
import resource
import time

import psutil
import torch
from torch import nn

import chunkconv
from chunkconv.budget import format_bytes
from chunkconv.memory import MemoryTracker


def make_layer(channels: int, hidden: int, budget: str = "auto") -> tuple[nn.Module, chunkconv.DynamicConv]:
    patch = channels * 3 * 3
    generator = nn.Sequential(nn.Linear(patch, hidden), nn.ReLU(), nn.Linear(hidden, channels * patch))
    return generator, chunkconv.DynamicConv(generator, channels, channels, kernel_size=3, padding=1, budget=budget)


def built_in_image(size: int, channels: int) -> torch.Tensor:
    """A deterministic synthetic image: smooth gradients, rings and noise."""
    g = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    r = (xs**2 + ys**2).sqrt()
    base = torch.stack([torch.sin(6.28 * (c + 1) * r + c) * xs + ys * (c % 3) for c in range(channels)])
    return (base + 0.1 * torch.randn(base.shape, generator=g)).unsqueeze(0)


def _forum_recipe(size: int, channels: int, hidden: int, extra: int, queue) -> None:
    # The cap counts address space, not resident memory: what torch itself maps differs between
    # builds and platforms, so cap the recipe at `extra` bytes above what this process maps now.
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (psutil.Process().memory_info().vms + extra, hard))
    try:
        torch.manual_seed(0)
        generator, layer = make_layer(channels, hidden)
        x = built_in_image(size, channels).requires_grad_()
        y = chunkconv.dynamic_conv_reference(
            x, generator, out_channels=channels, kernel_size=3, padding=1, bias=layer.bias, method="forum"
        )
        y.square().mean().backward()
        outcome = "finished"
    except (RuntimeError, MemoryError) as error:
        wanted = re.search(r"tried to allocate (\d+) bytes", str(error))
        detail = f"could not allocate {int(wanted[1]) / 2**30:.2f} GiB more" if wanted else str(error)[:90]
        outcome = f"out of memory: {detail}"
    finally:
        # Lift the cap before reporting: sending on the queue starts a thread, which needs address space.
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    queue.put(outcome)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument(
        "--budget", default="1GB", help='memory budget of the chunkconv layer: "1GB", "512MiB", bytes or "auto"'
    )
    parser.add_argument(
        "--recipe-limit-gb", type=float, default=6.0, help="address space the recipe may map beyond torch's own"
    )
    args = parser.parse_args(argv)

    size, channels = args.size, args.channels
    patches = size * size
    weights = patches * channels * channels * 9 * 4
    print(f"Image 1 x {channels} x {size} x {size}: {patches:,} patches, "
          f"each with its own {channels}x{channels}x3x3 kernel")
    print(f"The forum recipe materialises every weight ({format_bytes(weights)}) and a product as large, "
          "and autograd keeps both.")

    queue = mp.get_context("spawn").Queue()
    child = mp.get_context("spawn").Process(
        target=_forum_recipe, args=(size, channels, args.hidden, int(args.recipe_limit_gb * 2**30), queue)
    )
    start = time.perf_counter()
    child.start()
    child.join()
    outcome = queue.get() if not queue.empty() else f"killed (exit code {child.exitcode})"
    print(f"forum recipe, capped at {args.recipe_limit_gb:g} GiB of extra address space: {outcome} "
          f"after {time.perf_counter() - start:.1f} s")

    torch.manual_seed(0)
    _, layer = make_layer(channels, args.hidden, args.budget)
    x = built_in_image(size, channels).requires_grad_()
    print(f"\nchunkconv.DynamicConv with budget={args.budget!r}:")
    plan = layer.plan(x)  # measures the generator on two small probe batches; runs nothing of this size
    print(plan)

    rss_before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    with MemoryTracker("cpu") as forward:  # every allocation torch makes inside the block
        y = layer(x)
    with MemoryTracker("cpu") as backward:
        y.square().mean().backward()
    elapsed = time.perf_counter() - start
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    within = "within" if max(forward.peak, backward.peak) <= plan.budget else "ABOVE"
    chunks = f"{plan.num_chunks} chunk{'s' if plan.num_chunks != 1 else ''} of {plan.chunk_size:,} patches"
    print(f"chunkconv.DynamicConv forward+backward: {elapsed:.1f} s, output {tuple(y.shape)}, {chunks}")
    print(f"measured peak allocated: forward {format_bytes(forward.peak)}, backward {format_bytes(backward.peak)}, "
          f"{within} the budget of {format_bytes(plan.budget)} (input {format_bytes(x.numel() * x.element_size())})")
    # Resident memory also counts what the budget does not: the output kept for backward, memory
    # outside PyTorch's allocator, and freed blocks the C allocator has not returned to the system.
    print(f"process peak resident memory above the start: ~{format_bytes(max(rss_peak, 0))}")
    print(f"input gradient norm {x.grad.norm():.4f}; generator gradient norm "
          f"{sum(p.grad.norm() ** 2 for p in layer.generator.parameters()) ** 0.5:.4f}")

if __name__ == "__main__":
    main()
