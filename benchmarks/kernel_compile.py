"""Compile the fast path's Triton kernels for NVIDIA GPUs on a machine without one, and report.

The interpreter (``TRITON_INTERPRET=1``) checks the kernels' arithmetic on the CPU, but it is not
the GPU compiler: layouts, ``tl.dot`` operand shapes, register allocation and shared memory are
only met when Triton lowers a kernel to PTX and ``ptxas`` assembles it. Triton can do both ahead
of time, with no GPU and no driver (it ships ``ptxas``). This compiles every kernel, for every
dtype and every tile config the autotuner would try on the anchor workloads (benchmarks/workloads.py), for the chosen
architectures (default sm_90 = H100 and sm_80 = A100), and prints one line per compile:
registers, bytes spilled to local memory, shared memory, and which tensor-core instruction the
dots became (``wgmma``: Hopper's warpgroup MMA, which needs 64-row tiles; ``mma``: ``mma.sync``,
the Ampere instruction, slower on Hopper; ``none``: plain FMAs). Then a summary per kernel, dtype and
architecture: how many configs compile without spilling and fit in shared memory ("clean"), and
how many of those use ``wgmma``. The exit status is 1 if any config fails to compile, if bf16,
fp16 or TF32 dots miss the tensor cores, or if some kernel has no clean config for a workload.
Configs that need more shared memory than the card has are listed; the autotuner skips them.

    python benchmarks/kernel_compile.py                  # everything (a few minutes on 2 cores)
    python benchmarks/kernel_compile.py --arch 90 --workload B --dtype bfloat16

``tests/test_triton_compile.py`` compiles one config of each kernel this way in CI.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default

KERNELS = ("fwd", "bwd_h", "bwd_x", "bwd_w")
# (patch features per group Pg, outputs per group Og, hidden H) of the anchor workloads A, B, C
WORKLOADS = {"A": (288, 32, 64), "B": (144, 16, 32), "C": (1600, 64, 64)}
# kernel dtype name -> (Triton pointer type, dot input precision)
DTYPES = {
    "float32": ("fp32", "ieee"),
    "tf32": ("fp32", "tf32"),
    "float16": ("fp16", "ieee"),
    "bfloat16": ("bf16", "ieee"),
}
# the most shared memory one block may use, per architecture (CUDA's documented opt-in maxima)
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass(frozen=True)
class Job:
    kernel: str
    dtype: str
    workload: str
    arch: int
    config: dict
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Result:
    job: Job
    seconds: float
    error: str | None = None
    registers: int = 0
    local_bytes: int = 0
    shared_bytes: int = 0
    tensor_op: str = "none"  # "wgmma", "mma" (mma.sync) or "none"

    @property
    def problems(self) -> list[str]:
        out = []
        if self.error:
            out.append(f"compile error: {self.error}")
        if self.shared_bytes > SHARED_LIMIT.get(self.job.arch, 101376):
            limit = SHARED_LIMIT[self.job.arch]
            out.append(f"{self.shared_bytes} B of shared memory, above sm_{self.job.arch}'s {limit}")
        if not self.error and self.tensor_op == "none" and self.job.dtype != "float32":  # IEEE fp32: FMAs
            out.append("the dots compiled to FMAs, not tensor-core instructions")
        return out


def jobs_for(archs, workloads, dtypes, kernels=KERNELS, every_config=True) -> list[Job]:
    """The configs the autotuner would try (``contract._prune``) for each kernel, dtype, workload, arch."""
    import triton

    from chunkconv.fast.kernels import contract

    out = []
    for wl in workloads:
        _, og, hidden = WORKLOADS[wl]
        hp = triton.next_power_of_2(hidden)
        configs = contract._prune(contract._configs(), {"HP": hp, "Og": og})
        if not every_config:
            configs = configs[:1]
        for arch in archs:
            for dtype in dtypes:
                if dtype == "bfloat16" and arch < 80:
                    continue
                for kernel in kernels:
                    for c in configs:
                        out.append(Job(kernel, dtype, wl, arch, dict(c.kwargs), c.num_warps, c.num_stages))
    return out


def compile_job(job: Job):
    """Compile one job to a cubin (Triton's compiler and ptxas; no GPU); returns the compiled kernel."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from chunkconv.fast.kernels import contract

    fn = getattr(contract, f"_{job.kernel}_kernel")
    _, _, hidden = WORKLOADS[job.workload]
    ptr, precision = DTYPES[job.dtype]
    consts = {"HP": triton.next_power_of_2(hidden), "ACC": tl.float32, "PRECISION": precision, **job.config}
    names = list(inspect.signature(fn.fn).parameters)
    if "HAS_INIT" in names:
        consts["HAS_INIT"] = True
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in consts:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            # partial sums (bwd_w) and gh (bwd_h) are float32 whatever the inputs are
            out32 = name in ("gw_ptr", "gh_ptr")
            signature[name] = "*fp32" if out32 else f"*{ptr}"
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch's allocations are 16-byte aligned
        else:
            signature[name] = "i32"
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    target = GPUTarget("cuda", job.arch, 32)
    return triton.compile(src, target=target, options={"num_warps": job.num_warps, "num_stages": job.num_stages})


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, local-memory bytes) of a cubin, from ``cuobjdump -res-usage``."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    spilled = (int(local.group(1)) if local else 0) + (int(stack.group(1)) if stack else 0)
    return (int(regs.group(1)) if regs else -1), spilled


def run_job(job: Job) -> Result:
    start = time.perf_counter()
    try:
        compiled = compile_job(job)
        regs, local = _resources(compiled.asm["cubin"])
        ptx = compiled.asm["ptx"]
        op = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "none"
        return Result(job, time.perf_counter() - start, None, regs, local, compiled.metadata.shared, op)
    except Exception as exc:  # a config that does not compile is the finding, not a crash
        first = str(exc).strip().splitlines()
        return Result(job, time.perf_counter() - start, f"{type(exc).__name__}: {first[0] if first else ''}"[:300])


def compiler_available() -> str | None:
    """Why kernels cannot be compiled here (``None`` when they can)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: triton.jit gives interpreted functions, which do not compile"
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        return "this Triton has no NVIDIA backend (ptxas)"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (90 = H100)")
    ap.add_argument("--workload", nargs="+", default=sorted(WORKLOADS), choices=sorted(WORKLOADS))
    ap.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    ap.add_argument("--first-config", action="store_true", help="only the first config each (quick)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    why = compiler_available()
    if why:
        print(f"cannot compile: {why}", file=sys.stderr)
        return 2
    import triton

    jobs = jobs_for(args.arch, args.workload, args.dtype, args.kernel, every_config=not args.first_config)
    archs = ", ".join(f"sm_{a}" for a in args.arch)
    print(f"triton {triton.__version__}: compiling {len(jobs)} kernel configs for {archs}")
    print(f"{'kernel':6} {'dtype':8} wl {'sm':>3} {'BB':>4} {'BP':>3} {'BN':>4} {'w':>2} "
          f"{'regs':>4} {'spill B':>7} {'smem KiB':>8} {'TC':>5} {'s':>5}")  # fmt: skip
    start = time.perf_counter()
    results = []
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for r in pool.map(run_job, jobs):
            results.append(r)
            j, c = r.job, r.job.config
            kib = r.shared_bytes / 1024
            status = "FAIL" if r.error else f"{r.registers:>4} {r.local_bytes:>7} {kib:>8.1f} {r.tensor_op:>5}"
            print(f"{j.kernel:6} {j.dtype:8} {j.workload:2} {j.arch:>3} {c['BB']:>4} {c['BP']:>3} {c['BN']:>4} "
                  f"{j.num_warps:>2} {status} {r.seconds:>5.1f}", flush=True)  # fmt: skip
    spilled = [r for r in results if r.local_bytes]
    print(f"\n{len(results)} compiled in {time.perf_counter() - start:.0f} s; "
          f"{len(spilled)} spill registers to local memory")  # fmt: skip
    print(summary(results))
    over = [(r, p) for r in results for p in r.problems if "shared memory" in p]
    if over:  # the autotuner skips these (OutOfResources at launch); listed for the record
        print(f"{len(over)} configs need more shared memory than the card has (the autotuner skips them):")
        for r, p in over:
            j = r.job
            print(f"  {j.kernel} {j.dtype} workload {j.workload} sm_{j.arch} {j.config} warps={j.num_warps}: {p}")
    bad = [(r, p) for r in results for p in r.problems if "shared memory" not in p]
    for r, p in bad:
        j = r.job
        print(f"PROBLEM {j.kernel} {j.dtype} workload {j.workload} sm_{j.arch} {j.config} warps={j.num_warps}: {p}")
    return 1 if bad or unusable(results) else 0


def _clean(r: Result) -> bool:
    return not r.error and not r.local_bytes and r.shared_bytes <= SHARED_LIMIT.get(r.job.arch, 101376)


def unusable(results: list[Result]) -> list[tuple]:
    """(kernel, dtype, workload, arch) groups where the autotuner has no config that compiles
    without spilling and fits in shared memory."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.job.kernel, r.job.dtype, r.job.workload, r.job.arch), []).append(r)
    return [key for key, rs in groups.items() if not any(_clean(r) for r in rs)]


def summary(results: list[Result]) -> str:
    """Per kernel, dtype and architecture: configs without spills that fit, and how many use wgmma."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.job.kernel, r.job.dtype, r.job.arch), []).append(r)
    lines = ["kernel dtype    sm  configs  clean (no spill, fits)  clean with wgmma  workloads with no clean config"]
    for (kernel, dtype, arch), rs in sorted(groups.items()):
        clean = [r for r in rs if _clean(r)]
        wgmma = sum(r.tensor_op == "wgmma" for r in clean)
        missing = sorted({r.job.workload for r in rs} - {r.job.workload for r in clean}) or "-"
        lines.append(f"{kernel:6} {dtype:8} {arch:>3} {len(rs):>7}  {len(clean):>22}  {wgmma:>16}  {missing}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
