"""A training loop with a DynamicConv that picks its own chunking from a memory budget.

A small image-restoration network (a static 3x3 conv to features, a DynamicConv whose generator
is an MLP on each 3x3 feature patch, a 1x1 conv back to the image, and a residual connection) is
trained for a few steps to denoise synthetic images. The DynamicConv is created with
``budget="auto"``: before the first step the script prints the plan chunkconv makes for the
layer's input, ``print(conv.plan(x))``, which says how the patches are split into chunks, the peak
memory it expects and what the unchunked recipe would need instead. It then prints the plan for a
tight fixed budget (more, smaller chunks: the same result) and shows the error a budget too small
for even one patch gives.

    python examples/training_budget.py               # ~30 s on 2 CPU cores
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
from chunkconv.planner import make_plan


class Restorer(nn.Module):
    """image -> features -> dynamic conv -> image, plus the input (the network learns a correction)."""

    def __init__(self, channels: int, hidden: int, chunk_size: int | None = None) -> None:
        super().__init__()
        patch = channels * 3 * 3
        generator = nn.Sequential(
            nn.Linear(patch, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, channels * patch)
        )
        nn.init.normal_(generator[-1].weight, std=0.02 / hidden**0.5)  # start near a zero kernel
        self.embed = nn.Conv2d(1, channels, 3, padding=1)
        # TODO(lead): once the planner lands on main, this becomes
        #     chunkconv.DynamicConv(generator, channels, channels, 3, padding=1, budget=budget)
        # with budget="auto" by default, and `chunk_size` goes away.
        self.dynamic = chunkconv.DynamicConv(generator, channels, channels, 3, padding=1, chunk_size=chunk_size)
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


def show_plan(conv: chunkconv.DynamicConv, x: Tensor) -> chunkconv.Plan:
    # TODO(lead): once the planner lands on main, this is simply `return conv.plan(x)`.
    plan = make_plan(conv.spec.geometry(x.shape), dtype=x.dtype, chunk_size=conv.chunk_size)
    print(plan)
    return plan


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="a few steps on tiny images (smoke test)")
    if parser.parse_known_args(argv)[0].quick:  # new defaults; flags given explicitly still win
        parser.set_defaults(steps=8, batch=2, size=24, hidden=16)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    data = torch.Generator().manual_seed(0)
    model = Restorer(args.channels, args.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    clean = smooth_images(args.batch, args.size, data)
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=data)
    print(f"The DynamicConv's input for a batch of {args.batch} {args.size}x{args.size} images:")
    show_plan(model.dynamic, model.features(noisy))

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

    # The chunking changes memory, never the result: the same step in small chunks.
    # TODO(lead): once the planner lands, use budget= here: print(conv.plan(x)) for a tight budget
    # such as "2MB", and show the BudgetTooSmallError that a budget like "1kB" raises.
    x = model.features(noisy).detach()
    small = args.batch * args.size * args.size // 7 + 1
    tight = chunkconv.DynamicConv(model.dynamic.generator, args.channels, args.channels, 3, padding=1,
                                  chunk_size=small)
    tight.bias = model.dynamic.bias
    print("\nThe same layer in smaller chunks:")
    show_plan(tight, x)
    with torch.no_grad():
        difference = (tight(x) - model.dynamic(x)).abs().max().item()
    print(f"largest difference between the two chunkings: {difference:.1e} (floating-point rounding)")
    return {"loss_first": losses[0], "loss_last": losses[-1], "chunking_difference": difference}


if __name__ == "__main__":
    main()
