"""A training loop with a DynamicConv that picks its own chunking from a memory budget.

A small image-restoration network (a static 3x3 conv to features, a DynamicConv whose generator
is an MLP on each 3x3 feature patch, a 1x1 conv back to the image, and a residual connection) is
trained for a few steps to denoise synthetic images. The DynamicConv is created with
``budget="auto"``: before the first step the script prints the plan chunkconv makes for the
layer's input, ``print(conv.plan(x))``, which says how the patches are split into chunks, the peak
memory it expects and what the unchunked recipe would need instead. After training it runs the
same layer under a tight budget (a quarter of what the unchunked recipe would need: more, smaller
chunks, the same result up to rounding) and shows the ``BudgetTooSmallError`` that a budget too
small for even one patch raises, with the smallest budget that would fit.

    python examples/training_budget.py               # the full run (it prints its own timings)
    python examples/training_budget.py --quick       # seconds: a smoke test
    python examples/training_budget.py --budget 64MB --size 256
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import chunkconv


class Restorer(nn.Module):
    """image -> features -> dynamic conv -> image, plus the input (the network learns a correction)."""

    def __init__(self, channels: int, hidden: int, budget: str | int | float = "auto") -> None:
        super().__init__()
        patch = channels * 3 * 3
        generator = nn.Sequential(
            nn.Linear(patch, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, channels * patch)
        )
        nn.init.normal_(generator[-1].weight, std=0.02 / hidden**0.5)  # start near a zero kernel
        self.embed = nn.Conv2d(1, channels, 3, padding=1)
        # The layer picks its chunking from the budget: "auto" is half the available RAM on the CPU
        # (80% of the free memory on a GPU); "64MB", "1GiB", a number of bytes or a fraction work too.
        self.dynamic = chunkconv.DynamicConv(generator, channels, channels, 3, padding=1, budget=budget)
        self.head = nn.Conv2d(channels, 1, 1)

    def features(self, image: Tensor) -> Tensor:
        """The input of the DynamicConv (what its plan is made for)."""
        return F.gelu(self.embed(image))

    def forward(self, image: Tensor) -> Tensor:
        return image + self.head(F.gelu(self.dynamic(self.features(image))))


def smooth_images(batch: int, size: int, generator: torch.Generator) -> Tensor:
    """Random smooth grey images with a few sharp steps, in [0, 1]."""
    coarse = torch.rand(batch, 1, 6, 6, generator=generator)
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    steps = (torch.rand(batch, 1, 3, 3, generator=generator) > 0.5).float()
    blocks = F.interpolate(steps, size=(size, size), mode="nearest")
    return (0.6 * smooth + 0.4 * blocks).clamp(0, 1)


def measured_step(layer: chunkconv.DynamicConv, x: Tensor) -> tuple[Tensor, Tensor, int, int]:
    """Output, input gradient, and the peak bytes forward and backward allocated, as measured."""
    x.grad = None
    with chunkconv.MemoryTracker("cpu") as forward:
        y = layer(x)
    with chunkconv.MemoryTracker("cpu") as backward:
        y.square().mean().backward()
    return y.detach(), x.grad, forward.peak, backward.peak


def main(argv: list[str] | None = None) -> dict[str, float | int | None]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--budget", default="auto", help='memory budget of the DynamicConv, e.g. "auto", "64MB"')
    parser.add_argument("--quick", action="store_true", help="a few steps on tiny images (smoke test)")
    if parser.parse_known_args(argv)[0].quick:  # new defaults; flags given explicitly still win
        parser.set_defaults(steps=8, batch=2, size=24, hidden=16)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    data = torch.Generator().manual_seed(0)
    model = Restorer(args.channels, args.hidden, budget=args.budget)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    clean = smooth_images(args.batch, args.size, data)
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=data)
    print(f"The DynamicConv's plan for a batch of {args.batch} {args.size}x{args.size} images:")
    plan = model.dynamic.plan(model.features(noisy))  # planning runs nothing of this size
    print(plan)

    start, losses = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        clean = smooth_images(args.batch, args.size, data)
        noisy = clean + 0.1 * torch.randn(clean.shape, generator=data)
        loss = F.mse_loss(model(noisy), clean)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step == 1 or step % max(1, args.steps // 5) == 0:
            print(f"step {step:3d}  loss {loss.item():.5f}  ({time.perf_counter() - start:.1f} s)")

    # The chunking changes memory, never the result: one training step of the layer under a tight
    # budget, a quarter of what the unchunked recipe would need, measured against the budget.
    x = model.features(noisy).detach().requires_grad_()
    quarter = max(plan.unchunked_training // 4, 2 * plan.minimum_budget)  # bytes
    tight_budget = f"{quarter // 2**20 + 1}MiB"
    tight = chunkconv.DynamicConv(
        model.dynamic.generator, args.channels, args.channels, 3, padding=1, budget=tight_budget
    )
    tight.bias = model.dynamic.bias
    tight_plan = tight.plan(x)
    print(f"\nThe same layer with budget={tight_budget!r}:")
    print(tight_plan)
    (y, grad, _, _), (y_tight, grad_tight, forward_peak, backward_peak) = (
        measured_step(model.dynamic, x),
        measured_step(tight, x),
    )
    print(
        f"measured peak: forward {chunkconv.format_bytes(forward_peak)}, backward "
        f"{chunkconv.format_bytes(backward_peak)} (budget {chunkconv.format_bytes(tight_plan.budget)})"
    )
    difference = max((y - y_tight).abs().max().item(), (grad - grad_tight).abs().max().item())
    print(
        f"largest difference from the {plan.num_chunks}-chunk layer, output and input gradient: "
        f"{difference:.1e} (floating-point rounding at most)"
    )
    model.zero_grad()

    # A budget too small for even one patch per chunk is refused before any work.
    tight.budget, minimum = "1kB", None
    try:
        tight(x)
    except chunkconv.BudgetTooSmallError as error:
        print(f"\nbudget='1kB': {type(error).__name__}: {error}")
        minimum = error.minimum
    return {
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "chunking_difference": difference,
        "chunks": plan.num_chunks,
        "tight_budget": tight_plan.budget,
        "tight_chunks": tight_plan.num_chunks,
        "tight_peak": max(forward_peak, backward_peak),
        "minimum_budget": minimum,
        "planned_minimum_budget": tight_plan.minimum_budget,
    }


if __name__ == "__main__":
    main()
