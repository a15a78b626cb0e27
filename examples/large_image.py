"""chunkconv's main job: a dynamic convolution on an image too large for the forum recipe.

The forum recipe (chunkconv.dynamic_conv_reference(method="forum")) materialises a weight for
every patch at once. The demo first prints what that would need to train on the image, from
chunkconv's plan, beside the memory this machine has available, and tries the recipe only where it
genuinely cannot fit: in a child process whose address space is capped at the memory available
(it then fails cleanly for lack of memory). Where the machine could hold it, the demo says so
and skips it; --recipe-limit-gb N runs it anyway under a cap of N GiB beyond what torch maps
itself, standing for a GPU with that much free memory (where this layer would normally run).

chunkconv runs the same layer, forward and backward, with a memory budget (--budget, default
1GB): it first prints the plan it makes from the budget (the chunking, the peaks it expects, and
what the unchunked computation would need), then streams the patches in chunks, printing its
progress, and reports the memory it measured:

* the allocator peaks (chunkconv.MemoryTracker): the most bytes PyTorch's allocator held at once
  during forward, and during backward, above what it held when each began. The budget bounds
  these. Also the peak over the whole step, which counts the output and the gradients kept
  between the passes.
* the process's peak resident memory (RSS, the operating system's figure) above its start: it
  also counts memory outside PyTorch's allocator and freed blocks the C allocator keeps for
  reuse; no budget bounds it.

Finally it checks chunkconv's output against the unchunked reference on a crop of the image
small enough for the reference (the largest difference is printed).

    python examples/large_image.py               # 1 x 16 x 1024 x 1024
    python examples/large_image.py --size 256    # quicker
    python examples/large_image.py --budget 300MB
    python examples/large_image.py --recipe-limit-gb 6   # the recipe under a 6 GiB cap

Every figure it prints is computed or measured by the run itself: the plan's chunk count and
estimates, the times and the memory. Run it to see them for your machine.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import re
import resource
import time
import warnings

# torch warns "Failed to initialize NumPy: No module named 'numpy'" when it is imported without
# NumPy installed (torch's wheels do not depend on it, and neither does chunkconv): harmless here,
# this demo uses no NumPy. The filter must come before `import torch`; the recipe's child process
# imports this module again, so it applies there too.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

import psutil  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import chunkconv  # noqa: E402
from chunkconv.budget import format_bytes  # noqa: E402
from chunkconv.memory import MemoryTracker  # noqa: E402


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
    # Start torch's thread pool before the cap: its threads' stacks are address space the recipe's
    # need should not be charged with (a thread that cannot be created aborts the process).
    torch.ones(2**20).matmul(torch.ones(2**20))
    torch.ones(2**20).sum()
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


class Progress:
    """Prints what the demo is doing and how long it has run.

    Within each pass, chunkconv itself shows progress over the chunks (``set_progress("auto")``
    below: calls estimated to take a few seconds or more; a tqdm bar when tqdm is installed, a
    line on stderr otherwise).
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f} s] {text}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument(
        "--budget", default="1GB", help='memory budget of the chunkconv layer: "1GB", "512MiB", bytes or "auto"'
    )
    parser.add_argument(
        "--recipe-limit-gb",
        type=float,
        default=None,
        help="run the recipe under this cap (GiB beyond torch's own), standing for a GPU's free memory; by "
        "default it runs only where it cannot fit in the RAM available",
    )
    args = parser.parse_args(argv)

    progress = Progress()
    chunkconv.set_progress("auto")  # progress over the chunks of long calls
    size, channels = args.size, args.channels
    patches = size * size
    weights = patches * channels * channels * 9 * 4
    print(
        f"Image 1 x {channels} x {size} x {size}: {patches:,} patches, "
        f"each with its own {channels}x{channels}x3x3 kernel"
    )
    progress.say(f"chunkconv: planning for budget={args.budget!r} (measures the generator on small probe batches)")
    torch.manual_seed(0)
    generator, layer = make_layer(channels, args.hidden, args.budget)
    x = built_in_image(size, channels).requires_grad_()
    plan = layer.plan(x)  # runs nothing of this size
    progress.say("chunkconv: planned (the plan is printed below)")
    print(
        f"The forum recipe materialises every weight ({format_bytes(weights)}) and a product as large, "
        f"and autograd keeps both: about {format_bytes(plan.unchunked_training)} to train, by chunkconv's estimate."
    )
    available = psutil.virtual_memory().available
    need = plan.unchunked_training or 0
    print(f"This machine has {format_bytes(available)} of RAM available (psutil's figure, now).")
    if args.recipe_limit_gb is not None:
        cap = int(args.recipe_limit_gb * 2**30)
        why = (
            f"capped at {format_bytes(cap)} beyond what torch itself maps, standing for a GPU with that much free "
            "memory (--recipe-limit-gb)"
        )
        label = f"capped at {args.recipe_limit_gb:g} GiB of extra address space"
    elif need > available:
        cap = available
        why = f"capped at the {format_bytes(available)} this machine has available: it cannot fit"
        label = f"capped at the {format_bytes(available)} available"
    else:
        cap = None
        print(
            f"The recipe would fit in this machine's RAM ({format_bytes(need)} of {format_bytes(available)}), so the "
            "demo does not run it; a GPU with less free memory could not. Pass --recipe-limit-gb N to run it under "
            "a cap of N GiB standing for such a GPU's free memory."
        )
    if cap is not None:
        queue = mp.get_context("spawn").Queue()
        child = mp.get_context("spawn").Process(target=_forum_recipe, args=(size, channels, args.hidden, cap, queue))
        progress.say(f"forum recipe: starting its child process, {why}")
        start = time.perf_counter()
        child.start()
        child.join()
        outcome = queue.get() if not queue.empty() else f"killed (exit code {child.exitcode})"
        progress.say(f"forum recipe, {label}: {outcome} after {time.perf_counter() - start:.1f} s")

    print(f"\nchunkconv.DynamicConv with budget={args.budget!r}:")
    print(plan)

    rss_before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    progress.say(f"chunkconv forward, {plan.num_chunks} chunks of {plan.chunk_size:,} patches: started")
    with MemoryTracker("cpu") as forward:  # every allocation torch makes inside the block
        y = layer(x)
    progress.say("chunkconv forward: done; backward (recomputes each chunk): started")
    with MemoryTracker("cpu") as backward:
        y.square().mean().backward()
    progress.say("chunkconv backward: done")
    elapsed = time.perf_counter() - start
    # the whole step's allocator peak: what forward still held at its end (the output, what autograd
    # saved), plus backward's peak above that
    step_peak = max(forward.peak, forward.current + backward.peak)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    within = "within" if max(forward.peak, backward.peak) <= plan.budget else "ABOVE"
    chunks = f"{plan.num_chunks} chunk{'s' if plan.num_chunks != 1 else ''} of {plan.chunk_size:,} patches"
    print(f"\nchunkconv.DynamicConv forward+backward: {elapsed:.1f} s, output {tuple(y.shape)}, {chunks}")
    print(
        f"budget={args.budget!r} is {format_bytes(plan.budget)}. Memory measured "
        f"(input {format_bytes(x.numel() * x.element_size())}, output as large):"
    )
    print(
        f"  allocator peak, forward   {format_bytes(forward.peak):>11}  the most bytes PyTorch's allocator held at "
        "once in forward, above what it held when forward began (chunkconv.MemoryTracker)"
    )
    print(f"  allocator peak, backward  {format_bytes(backward.peak):>11}  the same for backward")
    print(f"  -> {within} the budget of {format_bytes(plan.budget)}: the budget bounds these two, each pass on its own")
    print(
        f"  allocator peak, whole step {format_bytes(step_peak):>10}  forward and backward together: also counts "
        "the output and gradients kept from one pass to the next"
    )
    print(
        f"  process resident memory  ~{format_bytes(max(rss_peak, 0)):>10}  the OS's peak figure for the whole "
        "process above its start: also counts memory outside PyTorch's allocator and freed blocks the C "
        "allocator keeps for reuse; no budget bounds it"
    )
    crop = min(size, 64)
    with torch.no_grad():
        reference = chunkconv.dynamic_conv_reference(
            x[..., :crop, :crop], generator, out_channels=channels, kernel_size=3, padding=1, bias=layer.bias
        )
        inner = slice(0, crop - 1)  # the crop's last row and column see its zero padding, not the image
        difference = (y[..., inner, inner] - reference[..., inner, inner]).abs().max().item()
    print(
        f"check: on the top-left {crop}x{crop} crop, chunkconv's output and the unchunked reference's differ by at "
        f"most {difference:.2e} (float32 rounding; the reference materialises the crop's {crop * crop:,} weights)"
    )
    graded = all(p.grad is not None for p in layer.generator.parameters()) and x.grad is not None
    print(f"backward gave the input and all {len(list(layer.generator.parameters()))} generator parameters a "
          f"gradient: {graded}")  # fmt: skip


if __name__ == "__main__":
    main()
