"""Video frame alignment with a deformable convolution: a small network predicts where to sample.

Video restoration networks (TDAN, Tian et al., CVPR 2020; EDVR, Wang et al., CVPRW 2019;
BasicVSR++, Chan et al., CVPR 2022) bring a neighbouring frame into register with the reference
frame before they fuse them: a small CNN looks at the pair (reference and neighbour,
concatenated) and predicts, for every pixel, the offsets of a 3x3 deformable convolution's nine
taps and a mask (through a sigmoid: DCNv2's modulation); the deformable convolution then reads
the *neighbour* at those positions. With chunkconv that is ``chunkconv.ops.DeformConv2d``
(torchvision's layer on chunkconv's engine) called with the predicted ``offset`` and ``mask``.
As in BasicVSR++'s flow-guided deformable alignment, the offsets are a flow plus a learned
residual per tap; the flow comes from a parameter-free block matching (a cost volume over
integer shifts and its soft argmin, the correlation layer of PWC-Net and RAFT), so a few hundred
CPU steps suffice (learned from zero, the offsets need far more).

The task. Alignment pays where the neighbour has something the reference lacks. Here, as in
video deblurring (a sharp frame of a hand-held video restores its blurred neighbours), the
reference is blurred (Gaussian, sigma 1.5 px) and the neighbour is sharp but moved; the target
is the sharp reference. Had the networks seen the sharp reference, any of them could copy it.
Both frames carry a little noise (sigma 0.01 on [0, 1] intensities). The script makes the
scenes itself, fresh at every step: a smooth colour background with soft-edged discs, squares
and sinusoidal textures, rendered from a continuous formula, the reference at ``p + u(p)`` for a
smooth random flow ``u`` (a global shift of up to 2.5 px plus a smooth local part of 0.7 px), so
the neighbour read at ``p + u(p)`` is exactly the sharp reference and ``u`` is the true flow.

The script compares, on held-out pairs, by PSNR against the sharp reference:

* the blurred reference and the unaligned neighbour, as they come;
* the neighbour warped by the block-matching flow (the deformable model untrained);
* a plain CNN: the same network (layers, widths, parameters) on the same input (the pair, the
  block-matching flow and its cost), its 27 output channels turned into a correction of the
  blurred reference by a 1x1 convolution that has exactly as many parameters (84) as the 3x3
  deformable convolution; trained the same way, on the same pairs;
* the deformable alignment: offsets (flow + residuals) and mask from the network, the 3x3
  deformable convolution of the neighbour.

It prints the end-point error against the true flow of the block matching and of the trained
layer (its centre tap; the centroid of its taps weighted by mask and weight). PNGs go to
``--out`` if matplotlib is installed: the two frames, both results and their errors, the true
and the learned flow (colour-coded); and where the deformable layer samples: for three pixels,
the nine taps and the plain 3x3 grid over the neighbour, with the point that matches the
reference pixel.

    python examples/frame_alignment.py                  # the full run (it prints how long each part took)
    python examples/frame_alignment.py --smoke          # seconds: a smoke test (--quick is the same)
    python examples/frame_alignment.py --out docs/img   # where the PNGs go (default: results/frame_alignment)
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chunkconv.ops import DeformConv2d

BLUR = 1.5  # the reference's blur (Gaussian sigma, pixels)
NOISE = 0.01  # both frames' noise (sigma on [0, 1] intensities)
SHIFT = 2.5  # the largest global shift (pixels, per axis)
WARP = 0.7  # the smooth local part of the flow (pixels, standard deviation per axis)
FREQ = 0.15  # the textures' highest frequency (cycles per pixel, per axis)
TAPS = 9  # 3x3
RADIUS = 4  # block matching tries shifts up to this many pixels per axis

# ---------------------------------------------------------------------------------------------
# Data: scenes rendered from a formula, so that moving them is exact


class Scene:
    """A random colour image defined at every real point ``(y, x)`` (pixels), values in [0, 1]."""

    def __init__(self, size: int, generator: torch.Generator) -> None:
        def rand(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=generator)

        self.size = size
        self.corners = rand(3, 3) * 0.6 + 0.2  # background colour at (0, 0), along y, along x
        self.shapes = []  # (kind, centre y, centre x, radius, colour, texture frequency y, x, phase)
        for _ in range(int(size * size / 300) + 3):
            freq = (rand(2) * 2 - 1) * FREQ
            self.shapes.append((rand(1).item() < 0.5, *(rand(2) * size).tolist(), 3 + 9 * rand(1).item(),
                                rand(3), *freq.tolist(), 2 * math.pi * rand(1).item()))  # fmt: skip
        self.waves = [((rand(2) * 2 - 1) * FREQ, 2 * math.pi * rand(1).item(), 0.04 * rand(3)) for _ in range(8)]

    def __call__(self, y: Tensor, x: Tensor) -> Tensor:
        """The image at points ``y``, ``x`` (same shape S): ``(3, *S)``."""
        u, v = y / self.size, x / self.size
        a, b, c = self.corners
        img = a[:, None, None] + (b - a)[:, None, None] * u + (c - a)[:, None, None] * v
        for freq, phase, amp in self.waves:  # faint texture everywhere
            img = img + amp[:, None, None] * torch.sin(2 * math.pi * (freq[0] * y + freq[1] * x) + phase)
        for square, cy, cx, r, colour, fy, fx, phase in self.shapes:
            if square:
                dist = torch.maximum((y - cy).abs(), (x - cx).abs())
            else:
                dist = ((y - cy) ** 2 + (x - cx) ** 2).sqrt()
            inside = torch.sigmoid((r - dist) / 0.4)  # a soft edge, about a pixel wide
            texture = 0.25 * torch.sin(2 * math.pi * (fy * y + fx * x) + phase)
            img = img + inside * ((colour[:, None, None] + texture) - img)
        return img.clamp(0, 1)


def smooth_flow(height: int, width: int, generator: torch.Generator, cell: int = 16) -> Tensor:
    """A random flow (2, H, W) in pixels, ``(dy, dx)``: a global shift plus a smooth local part."""
    shift = (torch.rand(2, 1, 1, generator=generator) * 2 - 1) * SHIFT
    coarse = torch.randn(1, 2, height // cell + 2, width // cell + 2, generator=generator) * WARP
    local = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)[0]
    return shift + local


def gaussian_blur(img: Tensor, sigma: float) -> Tensor:
    """``img`` (N, C, H, W) blurred by a Gaussian; the result is smaller by ``2 * ceil(3 sigma)`` per axis."""
    r = math.ceil(3 * sigma)
    g = torch.exp(-((torch.arange(-r, r + 1.0) / sigma) ** 2) / 2)
    g = (g / g.sum()).to(img.dtype)
    c = img.shape[1]
    img = F.conv2d(img, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(img, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def frame_pairs(batch: int, size: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Pairs of frames, each (batch, 3, size, size): ``blurred`` (the reference as seen),
    ``neighbour``, ``sharp`` (the target) and the true ``flow`` (batch, 2, size, size).

    ``sharp(p) = neighbour(p + flow(p))`` before the noise: the neighbour read at ``p + flow(p)``
    is the reference.
    """
    r = math.ceil(3 * BLUR)
    ys, xs = torch.meshgrid(torch.arange(-r, size + r + 0.0), torch.arange(-r, size + r + 0.0), indexing="ij")
    out: dict[str, list[Tensor]] = {"blurred": [], "neighbour": [], "sharp": [], "flow": []}
    for _ in range(batch):
        scene = Scene(size, generator)
        flow = smooth_flow(size + 2 * r, size + 2 * r, generator)
        sharp = scene(ys + flow[0], xs + flow[1])
        out["sharp"].append(sharp[:, r:-r, r:-r])
        out["blurred"].append(gaussian_blur(sharp[None], BLUR)[0])
        out["neighbour"].append(scene(ys, xs)[:, r:-r, r:-r])
        out["flow"].append(flow[:, r:-r, r:-r])
    pairs = {k: torch.stack(v) for k, v in out.items()}
    for k in ("blurred", "neighbour"):
        pairs[k] = pairs[k] + NOISE * torch.randn(pairs[k].shape, generator=generator)
    return pairs


def psnr(estimate: Tensor, target: Tensor) -> float:
    mse = (estimate.clamp(0, 1) - target).square().mean().item()
    return 10 * math.log10(1 / mse)


# ---------------------------------------------------------------------------------------------
# The models


def block_matching(reference: Tensor, neighbour: Tensor, radius: int = RADIUS) -> tuple[Tensor, Tensor]:
    """A parameter-free motion estimate: a cost volume over integer shifts and its soft argmin.

    The cost of shift ``d`` at pixel ``p`` is the squared difference of the reference and the
    neighbour read at ``p + d`` (the neighbour blurred like the reference), averaged over a 5x5
    window; a softmax over the ``(2 * radius + 1)^2`` shifts turns the costs into weights and
    the flow is the weighted mean shift (as the correlation layers of PWC-Net and RAFT feed
    flow networks). Returns the flow (N, 2, H, W), ``(dy, dx)``, and the cost at the best shift
    relative to the mean cost (N, 1, H, W): near 0 where the match is clear.
    """
    r = math.ceil(3 * BLUR)
    blurred = gaussian_blur(F.pad(neighbour, [r] * 4, mode="replicate"), BLUR)
    padded = F.pad(blurred, [radius] * 4, mode="replicate")
    h, w = reference.shape[-2:]
    shifts = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    costs = torch.stack([
        (reference - padded[..., radius + dy : radius + dy + h, radius + dx : radius + dx + w]).square().sum(1)
        for dy, dx in shifts
    ], dim=1)  # fmt: skip
    costs = F.avg_pool2d(costs, 5, stride=1, padding=2, count_include_pad=False)
    relative = costs / (costs.mean(1, keepdim=True) + 1e-6)
    weights = torch.softmax(-relative / 0.05, dim=1)
    grid = torch.tensor(shifts, dtype=reference.dtype)  # (S, 2)
    flow = torch.einsum("nshw,sc->nchw", weights, grid)
    return flow, relative.amin(1, keepdim=True)


class OffsetNet(nn.Module):
    """The pair and the block-matching estimate (N, 9, H, W) -> 27 channels per pixel: a small CNN.

    Its input: the reference and the neighbour (3 channels each, concatenated), the estimated
    flow (2) and its matching cost (1). Two 3x3 convolutions at full resolution, three at half
    resolution, then two more at full resolution on both.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.full = nn.Sequential(nn.Conv2d(9, width, 3, padding=1), nn.LeakyReLU(0.1),
                                  nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.1))  # fmt: skip
        self.coarse = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.LeakyReLU(0.1),
                                    nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.1),
                                    nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.1))  # fmt: skip
        self.head = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.LeakyReLU(0.1),
                                  nn.Conv2d(width, 3 * TAPS, 3, padding=1))  # fmt: skip

    def forward(self, reference: Tensor, neighbour: Tensor, flow: Tensor, cost: Tensor) -> Tensor:
        pair = torch.cat([reference - 0.5, neighbour - 0.5, flow / RADIUS, cost - 0.5], dim=1)
        full = self.full(pair)
        coarse = F.interpolate(self.coarse(full), size=full.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(torch.cat([full, coarse], dim=1))


class DeformableAlign(nn.Module):
    """Flow-guided deformable alignment (BasicVSR++'s): each tap's offset is the block-matching
    flow plus a learned residual; the residuals (18 channels, ``(dy, dx)`` per tap) and a mask
    (9, sigmoid) come from :class:`OffsetNet`; a 3x3 ``DeformConv2d`` reads the neighbour there.

    Untrained, it is the neighbour warped by the block-matching flow: zero residuals, a mask of
    0.5 and a weight of 2 at the centre tap.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.offsets = OffsetNet(width)
        self.deform = DeformConv2d(3, 3, 3, padding=1)
        last = self.offsets.head[-1]
        with torch.no_grad():
            last.weight.zero_(), last.bias.zero_()
            self.deform.weight.zero_(), self.deform.bias.zero_()
            self.deform.weight[:, :, 1, 1] = 2 * torch.eye(3)

    def sampling(self, reference: Tensor, neighbour: Tensor) -> tuple[Tensor, Tensor]:
        """The offsets (N, 18, H, W) and the mask (N, 9, H, W) for the pair."""
        flow, cost = block_matching(reference, neighbour)
        out = self.offsets(reference, neighbour, flow, cost)
        return flow.repeat(1, TAPS, 1, 1) + out[:, : 2 * TAPS], torch.sigmoid(out[:, 2 * TAPS :])

    def forward(self, reference: Tensor, neighbour: Tensor) -> Tensor:
        offset, mask = self.sampling(reference, neighbour)
        return self.deform(neighbour, offset, mask)


class PlainCNN(nn.Module):
    """The same network on the same input, its 27 channels -> a correction of the reference.

    The 1x1 convolution (27 -> 3: 81 weights and 3 biases) has as many parameters as the 3x3
    deformable convolution (3 -> 3); it starts as the blurred reference (a zero correction).
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.features = OffsetNet(width)
        self.out = nn.Conv2d(3 * TAPS, 3, 1)
        nn.init.zeros_(self.out.weight), nn.init.zeros_(self.out.bias)

    def forward(self, reference: Tensor, neighbour: Tensor) -> Tensor:
        features = self.features(reference, neighbour, *block_matching(reference, neighbour))
        return reference + self.out(F.leaky_relu(features, 0.1))


def train(model: nn.Module, args: argparse.Namespace, name: str) -> float:
    """Adam with a cosine schedule on fresh synthetic pairs (the same stream for every model)."""
    data = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    start, recent = time.perf_counter(), []
    report_every = max(1, args.steps // 4)
    for step in range(1, args.steps + 1):
        pairs = frame_pairs(args.batch, args.size, data)
        loss = F.mse_loss(model(pairs["blurred"], pairs["neighbour"]), pairs["sharp"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        recent.append(loss.item())
        if step % report_every == 0 or step == 1:
            mse = sum(recent) / len(recent)
            print(f"  {name:20s} step {step:4d}  PSNR {10 * math.log10(1 / mse):5.2f} dB  "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
            recent = []
    return time.perf_counter() - start


def sampling_centroid(model: DeformableAlign, offset: Tensor, mask: Tensor) -> Tensor:
    """Where the layer reads, on average: the taps' positions (grid + offset) weighted by the mask
    times the tap's weight (the mean of its 3x3 channel matrix's diagonal), relative to the output
    pixel: (N, 2, H, W), ``(dy, dx)``, comparable with the true flow.
    """
    grid = torch.tensor([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)], dtype=offset.dtype)  # unfold's order
    positions = offset.unflatten(1, (TAPS, 2)) + grid[None, :, :, None, None]  # (N, 9, 2, H, W)
    tap_weight = model.deform.weight.detach().diagonal(dim1=0, dim2=1).mean(-1).flatten()  # (9,)
    weights = mask * tap_weight[None, :, None, None]  # (N, 9, H, W)
    total = weights.sum(1, keepdim=True)
    total = torch.where(total.abs() < 1e-3, torch.full_like(total, 1e-3), total)
    return (positions * weights[:, :, None]).sum(1) / total


def end_point_error(flow: Tensor, truth: Tensor) -> float:
    return (flow - truth).square().sum(1).sqrt().mean().item()


# ---------------------------------------------------------------------------------------------
# Pictures


def flow_to_rgb(flow: Tensor, scale: float) -> Tensor:
    """A flow (2, H, W) as colours (3, H, W): the hue is the direction, the saturation the length
    (``scale`` pixels: fully saturated); white is no motion.
    """
    dy, dx = flow
    hue = (torch.atan2(dy, dx) / (2 * math.pi)) % 1.0
    sat = ((dy**2 + dx**2).sqrt() / scale).clamp(0, 1)
    k = (hue[None] * 6 + torch.tensor([5.0, 3.0, 1.0])[:, None, None]) % 6
    pure = 1 - (torch.minimum(k, 4 - k).clamp(0, 1))  # hsv_to_rgb at value 1, saturation 1
    return 1 - sat[None] * (1 - pure)


def _show(img: Tensor):
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


def _save(fig, axes, path: Path, dpi: int) -> Path:
    """Axes without ticks; the figure written to ``path`` and closed."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def colour_wheel(size: int = 41) -> Tensor:
    r = torch.linspace(-1, 1, size)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    wheel = flow_to_rgb(torch.stack([dy, dx]), 1.0)
    return torch.where((dy**2 + dx**2 <= 1)[None], wheel, torch.ones(()))


def save_figure(path: Path, pair: dict[str, Tensor], results: dict[str, Tensor], learned: Tensor) -> Path:
    """The frames, the results, their errors, and the true and learned flows (needs matplotlib).

    ``pair`` is one pair (unbatched), ``results`` the models' outputs for it, ``learned`` (2, H, W)
    the deformable model's mean tap offset.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sharp = pair["sharp"]
    scale = max(pair["flow"].square().sum(0).sqrt().max().item(), 1e-6)
    fig, axes = plt.subplots(2, 5, figsize=(12, 5.5), layout="constrained")
    top = {"reference (blurred)": pair["blurred"], "neighbour (sharp, moved)": pair["neighbour"], **results}
    for ax, (title, img) in zip(axes[0], top.items()):
        ax.imshow(_show(img), interpolation="nearest")
        ax.set_title(f"{title}\n{psnr(img, sharp):.1f} dB", fontsize=9)
    axes[0, 4].imshow(_show(sharp), interpolation="nearest")
    axes[0, 4].set_title("target: the sharp reference\n", fontsize=9)
    errors = {"unaligned neighbour": pair["neighbour"], **results}
    for ax, (title, img) in zip(axes[1], errors.items()):
        ax.imshow((img - sharp).abs().mean(0).numpy(), cmap="magma", vmin=0, vmax=0.2, interpolation="nearest")
        ax.set_title(f"|error|, {title}\n(black 0, white 0.2)", fontsize=9)
    flows = {f"true flow (white: still,\nfull colour: {scale:.1f} px)": pair["flow"],
             "learned: the taps' weighted\ncentroid (same colours)": learned}  # fmt: skip
    for ax, (title, flow) in zip(axes[1, 3:], flows.items()):
        ax.imshow(_show(flow_to_rgb(flow, scale)), interpolation="nearest")
        ax.set_title(title, fontsize=9)
    inset = axes[1, 4].inset_axes((0.74, 0.74, 0.25, 0.25))
    inset.imshow(_show(colour_wheel()), interpolation="bilinear")
    inset.set_axis_off()
    return _save(fig, axes.flat, path, dpi=72)


def pick_pixels(pair: dict[str, Tensor], count: int = 3) -> list[tuple[int, int]]:
    """``count`` pixels on strong edges of the sharp reference, far from the border and from each other."""
    sharp = pair["sharp"]
    edge = (sharp[:, 1:, 1:] - sharp[:, :-1, 1:]).abs().sum(0) + (sharp[:, 1:, 1:] - sharp[:, 1:, :-1]).abs().sum(0)
    margin = math.ceil(SHIFT + 3 * WARP) + 3
    h, w = edge.shape
    chosen: list[tuple[int, int]] = []
    inner = edge[margin : h - margin, margin : w - margin]
    for idx in inner.flatten().argsort(descending=True).tolist():
        y, x = divmod(idx, inner.shape[1])
        y, x = y + margin + 1, x + margin + 1
        if all(abs(y - cy) + abs(x - cx) > h // 3 for cy, cx in chosen):
            chosen.append((y, x))
        if len(chosen) == count:
            break
    return chosen


def save_sampling_figure(
    path: Path, pair: dict[str, Tensor], offset: Tensor, mask: Tensor, centroid: Tensor, pixels
) -> Path:
    """Where the trained deformable layer samples the neighbour for a few output pixels (needs matplotlib).

    ``offset`` (18, H, W), ``mask`` (9, H, W) and ``centroid`` (2, H, W) are the model's for
    ``pair`` (one pair, unbatched).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    neighbour, flow = pair["neighbour"], pair["flow"]
    r = math.ceil(SHIFT + 3 * WARP) + 2  # half the side of each crop
    taps = torch.tensor([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)], dtype=torch.float32)  # unfold's order
    fig, axes = plt.subplots(1, len(pixels) + 1, figsize=(2.7 * (len(pixels) + 1), 3.6), layout="constrained")
    axes[0].imshow(_show(neighbour), interpolation="nearest")
    axes[0].set_title("the neighbour, with the\nregions shown on the right", fontsize=9)
    for n, (y, x) in enumerate(pixels, start=1):
        axes[0].add_patch(plt.Rectangle((x - r - 0.5, y - r - 0.5), 2 * r + 1, 2 * r + 1, fill=False, ec="w", lw=1.2))
        axes[0].text(x - r, y - r - 1, str(n), color="w", fontsize=9, ha="left", va="bottom")
        ax = axes[n]
        ax.imshow(_show(neighbour), interpolation="nearest")
        grid = taps + torch.tensor([y, x])
        points = grid + offset[:, y, x].view(TAPS, 2)
        ax.plot(grid[:, 1], grid[:, 0], "s", ms=6, mfc="none", mec="w", mew=1.2, label="plain 3x3 grid")
        ax.scatter(points[:, 1], points[:, 0], s=12 + 50 * mask[:, y, x], c="#00e5ff", edgecolors="k", linewidths=0.6,
                   zorder=3, label="deformable taps (size: mask)")  # fmt: skip
        ty, tx = y + flow[0, y, x].item(), x + flow[1, y, x].item()
        ax.plot(tx, ty, "+", ms=14, mew=2.2, color="#ff2d55", zorder=4, label="where the reference pixel is")
        cy, cx = y + centroid[0, y, x].item(), x + centroid[1, y, x].item()
        ax.plot(cx, cy, "x", ms=8, mew=2, color="#ffd60a", zorder=5, label="the taps' weighted centroid")
        ax.set_xlim(x - r - 0.5, x + r + 0.5)
        ax.set_ylim(y + r + 0.5, y - r - 0.5)
        error = math.hypot(cy - ty, cx - tx)
        ax.set_title(f"{n}: output pixel ({y}, {x})\ncentroid {error:.2f} px from the match", fontsize=9)
    fig.legend(*axes[1].get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    return _save(fig, axes, path, dpi=80)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="training steps of each trained model")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--size", type=int, default=40, help="training frame side in pixels")
    parser.add_argument("--test-size", type=int, default=96, help="held-out frame side in pixels")
    parser.add_argument("--width", type=int, default=16, help="channels of the offset network")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", type=Path, default=Path("results/frame_alignment"), help="folder for the PNGs")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNGs")
    parser.add_argument("--smoke", "--quick", action="store_true", help="a few steps on small frames (smoke test)")
    if parser.parse_known_args(argv)[0].smoke:  # new defaults; flags given explicitly still win
        parser.set_defaults(steps=40, batch=2, size=32, test_size=48, width=8)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    torch.manual_seed(0)
    untrained = DeformableAlign(args.width)
    models = {"plain CNN": PlainCNN(args.width), "deformable alignment": DeformableAlign(args.width)}
    print(f"Aligning a sharp neighbour frame to a blurred reference (sigma {BLUR} px), {args.size}x{args.size} "
          f"synthetic pairs, flows: a shift of up to {SHIFT} px plus a smooth {WARP} px; "
          f"each model trains {args.steps} steps of {args.batch} pairs.")  # fmt: skip
    for name, model in models.items():
        print(f"  {name}: {sum(p.numel() for p in model.parameters()):,} parameters")
    seconds = {name: train(model, args, name) for name, model in models.items()}

    pairs = frame_pairs(8, args.test_size, torch.Generator().manual_seed(1234))
    with torch.no_grad():
        offset, mask = models["deformable alignment"].sampling(pairs["blurred"], pairs["neighbour"])
        outputs = {
            "blurred reference (as input)": pairs["blurred"],
            "unaligned neighbour": pairs["neighbour"],
            "block-matching warp (deformable, untrained)": untrained(pairs["blurred"], pairs["neighbour"]),
            **{name: model(pairs["blurred"], pairs["neighbour"]) for name, model in models.items()},
        }
    learned = sampling_centroid(models["deformable alignment"], offset, mask)
    start_flow = block_matching(pairs["blurred"], pairs["neighbour"])[0]
    keys = ("blurred", "unaligned", "untrained", "plain", "deformable")
    results = {f"psnr_{key}": psnr(img, pairs["sharp"]) for key, img in zip(keys, outputs.values())}
    results["epe_zero"] = end_point_error(torch.zeros_like(learned), pairs["flow"])
    results["epe_block_matching"] = end_point_error(start_flow, pairs["flow"])
    results["epe_centre_tap"] = end_point_error(offset[:, 2 * (TAPS // 2) : 2 * (TAPS // 2) + 2], pairs["flow"])
    results["epe_centroid"] = end_point_error(learned, pairs["flow"])
    print(f"\nHeld-out pairs (8 of {args.test_size}x{args.test_size}), PSNR against the sharp reference "
          "(higher is better):")  # fmt: skip
    for name, key in zip(outputs, keys):
        took = f"  (trained in {seconds[name]:.0f} s)" if name in seconds else ""
        print(f"  {name:44s} {results[f'psnr_{key}']:6.2f} dB{took}")
    print("Flow end-point error against the true flow, mean over the pixels (lower is better):")
    for name, key in (("no motion", "zero"), ("block matching (the offsets' starting point)", "block_matching"),
                      ("the trained layer's centre tap", "centre_tap"),
                      ("the trained layer's sampling centroid", "centroid")):  # fmt: skip
        print(f"  {name:46s} {results[f'epe_{key}']:5.2f} px")

    if args.no_plots:
        print(f"done in {time.perf_counter() - started:.0f} s")
        return results
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed (pip install 'chunkconv[plot]'); skipping the PNGs.")
        return results
    first = {k: v[0] for k, v in pairs.items()}
    shown = {"plain CNN": outputs["plain CNN"][0], "deformable alignment": outputs["deformable alignment"][0]}
    print(f"wrote {save_figure(args.out / 'frame_alignment.png', first, shown, learned[0])}")
    pixels = pick_pixels(first)
    path = save_sampling_figure(
        args.out / "frame_alignment_sampling.png", first, offset[0], mask[0], learned[0], pixels
    )
    print(f"wrote {path}")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return results


if __name__ == "__main__":
    main()
