"""The shapes benchmarked: the anchor workloads, the image-size sweeps, a smoke shape.

Every workload is a 2-D dynamic convolution with the generator of the anchor measurements,
``Linear(P, hidden) -> ReLU -> Linear(hidden, out_channels * P)`` with ``P = C * k * k``,
stride 1 and padding ``k // 2`` (output as large as the input). Pure Python: no tensors here.

The anchor workloads are those the project's baselines were measured on, before chunkconv
(one run each, fp32 with TF32 off; peak = ``torch.cuda.max_memory_allocated()`` above entry):

========  ==================================================  ============  ==============  ===============
workload  shape                                               mode          forum recipe    einsum (best
                                                                                            unchunked)
========  ==================================================  ============  ==============  ===============
A         N=8 C=32 256x256, out 32, hidden 64, k=3            fwd+bwd       484 ms, 56.7 GB  87 ms, 38.8 GB
B         N=1 C=16 2048x2048, out 16, hidden 32, k=3          fwd           373 ms, 76.8 GB  52 ms, 42.2 GB
C         N=4 C=64 128x128, out 64, hidden 64, k=5            fwd           135 ms, 52.0 GB  40 ms, 26.8 GB
CPU-A     N=2 C=16 256x256, out 16, hidden 32, k=3            fwd+bwd       11.5 s, 3.6 GB   3.8 s, 2.6 GB
========  ==================================================  ============  ==============  ===============

A, B, C on one NVIDIA H100 80GB (PyTorch 2.11, CUDA 13); CPU-A on this project's 2-core CPU
machines (PyTorch 2.13), peak as extra resident memory. A static ``conv2d`` does A in 4.2 ms,
B in 1.9 ms, C in 0.6 ms.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ANCHORS", "MODES", "Workload", "anchors", "smoke", "sweep"]

# "fwd": inference (forward under torch.no_grad); "fwd+bwd": training step (forward, then backward
# into the input and every parameter).
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Workload:
    """One layer shape: ``batch x channels x size x size`` in, ``out_channels`` out.

    ``anchor_mode`` is the mode the anchor baselines were measured in (comparable only there);
    ``family`` groups the points of a sweep for plotting.
    """

    name: str
    batch: int
    channels: int
    size: int
    out_channels: int
    hidden: int
    kernel: int = 3
    anchor_mode: str | None = None
    family: str | None = None

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def patch_size(self) -> int:
        """``P``: features per patch (``C * k * k``)."""
        return self.channels * self.kernel**2

    @property
    def weight_numel(self) -> int:
        """Elements of one patch's generated kernel (``out * P``)."""
        return self.out_channels * self.patch_size

    @property
    def num_patches(self) -> int:
        """``N * L``: one patch per output pixel (stride 1, 'same' padding)."""
        return self.batch * self.size * self.size

    def describe(self) -> str:
        return (
            f"N={self.batch} C={self.channels} {self.size}x{self.size}, out {self.out_channels}, "
            f"hidden {self.hidden}, k={self.kernel}"
        )

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "batch": self.batch,
            "channels": self.channels,
            "size": self.size,
            "out_channels": self.out_channels,
            "hidden": self.hidden,
            "kernel": self.kernel,
            "anchor_mode": self.anchor_mode,
            "family": self.family,
            "patches": self.num_patches,
            "patch_size": self.patch_size,
        }


ANCHORS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("A", batch=8, channels=32, size=256, out_channels=32, hidden=64, anchor_mode="fwd+bwd"),
        Workload("B", batch=1, channels=16, size=2048, out_channels=16, hidden=32, anchor_mode="fwd"),
        Workload("C", batch=4, channels=64, size=128, out_channels=64, hidden=64, kernel=5, anchor_mode="fwd"),
        Workload("CPU-A", batch=2, channels=16, size=256, out_channels=16, hidden=32, anchor_mode="fwd+bwd"),
    )
}

# The sweep grows workload B's layer (1 image, 16 -> 16 channels) from small to large images.
_SWEEP_SIZES = {"cpu": (128, 256, 512, 1024), "cuda": (256, 512, 1024, 2048, 4096)}


def anchors(device: str) -> list[Workload]:
    """The anchor workloads for a device: A, B, C on CUDA, CPU-A on the CPU."""
    names = ("CPU-A",) if device == "cpu" else ("A", "B", "C")
    return [ANCHORS[n] for n in names]


def sweep(device: str, sizes: tuple[int, ...] | None = None) -> list[Workload]:
    """The image-size sweep (128..1024 px on CPU, 256..4096 px on CUDA unless ``sizes`` is given)."""
    sizes = sizes or _SWEEP_SIZES["cpu" if device == "cpu" else "cuda"]
    return [
        Workload(f"sweep-{s}", batch=1, channels=16, size=s, out_channels=16, hidden=32, family="sweep") for s in sizes
    ]


def smoke(sizes: tuple[int, ...] | None = None) -> list[Workload]:
    """Tiny shapes (8 and 16 px unless ``sizes`` is given) that run in milliseconds: the CI configuration."""
    return [
        Workload(f"smoke-{s}", batch=1, channels=2, size=s, out_channels=2, hidden=4, family="smoke")
        for s in sizes or (8, 16)
    ]
