"""Markdown from a run's JSON: a summary of chunkconv against the best unchunked recipe, then every number.

Nothing here measures; :func:`render_page` is a pure function of the JSON documents, so
``python -m benchmarks report RUN.json... --markdown docs/benchmarks.md`` regenerates the docs page
from stored runs.

"Best unchunked" is, per workload, mode and dtype, the best of the forum recipe, the einsum recipe
and the einsum recipe under ``torch.utils.checkpoint``, taken separately for time (the fastest) and
for memory (the smallest peak). When all three ran out of memory the memory ratio is against the
smallest of their shape-based estimates and is marked "est.".
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict

from chunkconv.budget import format_bytes, parse_budget

__all__ = ["best_unchunked", "fmt_time", "render_layers_run", "render_page", "render_run", "summary_rows"]

_STATUS = {
    "oom": "out of memory",
    "skipped": "skipped",
    "timeout": "timed out",
    "crashed": "crashed",
    "error": "error",
    "not run": "not run",
}


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    ms = seconds * 1e3
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms" if ms >= 1 else f"{ms:.2f} ms"


def _fmt_bytes(n: int) -> str:
    return format_bytes(int(n))


def _groups(doc: dict) -> dict[tuple[str, str, str], list[dict]]:
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for m in doc["measurements"]:
        groups[(m["workload"]["name"], m["mode"], m["dtype"])].append(m)
    return groups


def best_unchunked(records: list[dict]) -> dict:
    """Best time, best peak (and who), and the smallest estimate among the unchunked recipes."""
    ok = [r for r in records if r["method"]["unchunked"] and r["status"] == "ok"]
    unchunked = [r for r in records if r["method"]["unchunked"]]
    best: dict = {"time": None, "time_by": None, "peak": None, "peak_by": None, "estimate": None}
    if ok:
        fastest = min(ok, key=lambda r: r["median_s"])
        smallest = min(ok, key=lambda r: r["peak_bytes"])
        best.update(time=fastest["median_s"], time_by=fastest["method"]["label"])
        best.update(peak=smallest["peak_bytes"], peak_by=smallest["method"]["label"])
    if unchunked:
        best["estimate"] = min(r["estimate_bytes"] for r in unchunked)
    return best


def _ratios(record: dict, best: dict) -> tuple[str, str]:
    if record["status"] != "ok":
        return "", ""
    t = f"{record['median_s'] / best['time']:.2f}x" if best["time"] else "-"
    if best["peak"]:
        m = f"{record['peak_bytes'] / best['peak']:.3f}x"
    elif best["estimate"]:
        m = f"{record['peak_bytes'] / best['estimate']:.3f}x est."
    else:
        m = "-"
    return t, m


def _outcome(record: dict) -> str:
    status = _STATUS.get(record["status"], record["status"])
    message = record.get("message") or ""
    if record["status"] == "skipped" and message.startswith("would need"):
        return message.split(",")[0]
    if record["status"] == "skipped" and message.startswith("not run: "):
        return f"skipped ({message[len('not run: ') :]})"
    if record["status"] == "oom":
        return f"out of memory (est. {_fmt_bytes(record['estimate_bytes'])})"
    return status


def _headline_chunkconv(records: list[dict]) -> list[dict]:
    """chunkconv's smallest fixed budget and budget "auto" (before budgets: the default chunking)."""
    chunked = [r for r in records if r["method"]["kind"] == "chunkconv"]
    auto = [r for r in chunked if r["method"]["budget"] == "auto"]
    fixed = [r for r in chunked if r["method"]["budget"] not in (None, "auto")]
    if fixed:
        smallest = min(parse_budget(r["method"]["budget"]) for r in fixed)
        fixed = [r for r in fixed if parse_budget(r["method"]["budget"]) == smallest]
    default = [r for r in chunked if r["method"]["budget"] is None and r["method"]["chunk_size"] is None]
    return (fixed + auto) or default or chunked[:1]


def summary_rows(doc: dict) -> list[dict]:
    """One row per workload, mode, dtype and headline chunkconv setting: its time and peak ratios."""
    rows = []
    for (name, mode, dtype), records in _groups(doc).items():
        best = best_unchunked(records)
        for r in _headline_chunkconv(records):
            t, m = _ratios(r, best)
            rows.append(
                {
                    "workload": name,
                    "mode": mode,
                    "dtype": dtype,
                    "record": r,
                    "best": best,
                    "time_ratio": t,
                    "peak_ratio": m,
                }
            )
    return rows


def _machine_lines(doc: dict) -> list[str]:
    mc = doc["machine"]
    date = dt.datetime.fromisoformat(doc["date"]).strftime("%Y-%m-%d %H:%M UTC")
    where = (
        f"{mc['gpu']} ({_fmt_bytes(mc['gpu_memory_bytes'])}, CUDA {mc.get('cuda')}, "
        f"TF32 {'on' if mc.get('tf32') else 'off'})"
        if doc["device"].startswith("cuda")
        else f"CPU: {mc['cpu']}, {mc['cpu_count']} cores, {mc['torch_threads']} torch threads"
    )
    load = mc.get("load_average")
    lines = [
        f"- **Device**: {where}; host memory {_fmt_bytes(mc['memory_total_bytes'])}.",
        f"- **Software**: torch {mc['torch']}, Python {mc['python']}, chunkconv {mc['chunkconv']}"
        f" (commit {mc.get('chunkconv_commit') or 'unknown'}), {mc['platform']}.",
        f"- **Run**: {date}; dtype {', '.join(doc['dtypes'])}; suite `{doc['suite']}`; median of up to "
        f"{doc['repeats']} timed calls after one warm-up (fewer when a case would take over "
        f"{doc['max_seconds_per_case']:g} s); memory limit {_fmt_bytes(doc['memory_limit_bytes'])}"
        + (" (address-space cap of the measuring child process)." if doc.get("isolated") else "."),
    ]
    if load:
        end = mc.get("load_average_end")
        lines.append(
            f"- **Load average** (1/5/15 min) at start {'/'.join(f'{v:.2f}' for v in load)}"
            + (f", at end {'/'.join(f'{v:.2f}' for v in end)}" if end else "")
            + (f"; {doc['note']}" if doc.get("note") else "")
            + "."
        )
    lines.append(f"- **Command**: `{doc.get('command', 'python -m benchmarks')}`")
    return lines


def _summary_table(doc: dict) -> list[str]:
    lines = [
        "| workload | mode | dtype | chunkconv | time | x best unchunked time | peak | x best unchunked peak "
        "| best unchunked time / peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary_rows(doc):
        r, best = row["record"], row["best"]
        ok = r["status"] == "ok"
        bt = f"{fmt_time(best['time'])} ({best['time_by']})" if best["time"] else "none ran"
        bp = (
            f"{_fmt_bytes(best['peak'])} ({best['peak_by']})"
            if best["peak"]
            else (f"would need ~{_fmt_bytes(best['estimate'])}" if best["estimate"] else "-")
        )
        lines.append(
            f"| {row['workload']} | {row['mode']} | {row['dtype']} | {r['method']['label']} "
            f"| {fmt_time(r['median_s']) if ok else _outcome(r)} | {row['time_ratio']} "
            f"| {_fmt_bytes(r['peak_bytes']) if ok else ''} | {row['peak_ratio']} | {bt} / {bp} |"
        )
    return lines


def _detail_table(records: list[dict]) -> list[str]:
    best = best_unchunked(records)
    lines = [
        "| method | time (median) | x best unchunked | peak above start | x best unchunked | runs | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        t, m = _ratios(r, best)
        if r["status"] == "ok":
            runs = f"{len(r['times_s'])}" + ("" if r.get("warm") else " (cold)")
            note = r.get("info", {}).get("plan_summary", "") or ""
            lines.append(
                f"| {r['method']['label']} | {fmt_time(r['median_s'])} | {t} | {_fmt_bytes(r['peak_bytes'])} | {m} "
                f"| {runs} | {note} |"
            )
        else:
            lines.append(f"| {r['method']['label']} | {_outcome(r)} | | | | | {r.get('message') or ''} |")
    return lines


def _sweep_tables(doc: dict, family: str) -> list[str]:
    records = [m for m in doc["measurements"] if m["workload"].get("family") == family]
    if not records:
        return []
    wl = records[0]["workload"]
    lines = [
        f"Image size sweep: N={wl['batch']} C={wl['channels']}, out {wl['out_channels']}, hidden {wl['hidden']}, "
        f"k={wl['kernel']}. Each cell: median time / peak above start.",
        "",
    ]
    labels = list(dict.fromkeys(m["method"]["label"] for m in records))
    for mode in doc["modes"]:
        for dtype in doc["dtypes"]:
            rows = [m for m in records if m["mode"] == mode and m["dtype"] == dtype]
            if not rows:
                continue
            lines += [
                f"**{mode}, {dtype}**",
                "",
                "| size | " + " | ".join(labels) + " |",
                "|---|" + "---|" * len(labels),
            ]
            for size in sorted({m["workload"]["size"] for m in rows}):
                cells = []
                for label in labels:
                    hit = [m for m in rows if m["workload"]["size"] == size and m["method"]["label"] == label]
                    if not hit:
                        cells.append("")
                    elif hit[0]["status"] == "ok":
                        cells.append(f"{fmt_time(hit[0]['median_s'])} / {_fmt_bytes(hit[0]['peak_bytes'])}")
                    else:
                        cells.append(_outcome(hit[0]))
                lines.append(f"| {size} | " + " | ".join(cells) + " |")
            lines.append("")
    return lines


def render_run(doc: dict, image: str | None = None, *, level: int = 2) -> str:
    """One run as Markdown: machine facts, the chunkconv/best-unchunked summary, the detail tables."""
    h = "#" * level
    device = doc["machine"].get("gpu") if doc["device"].startswith("cuda") else "CPU"
    date = doc["date"][:10]
    out = [f"{h} {device}, {', '.join(doc['dtypes'])}, {date}", "", *_machine_lines(doc), ""]
    out += [f"{h}# Summary: chunkconv against the best unchunked recipe", "", *_summary_table(doc), ""]
    out += [
        "Ratios below 1 mean chunkconv is faster / smaller. chunkconv here is "
        + (
            'its smallest budget and `budget="auto"` on the generic and the fast path (on the CPU "auto" '
            "allows half the available RAM, but the planner caps chunks at 32 MiB of per-chunk "
            "allocations there, which is faster in a CPU's caches)."
            if doc["machine"].get("chunkconv_budget")
            else "the planner's default chunking (this chunkconv had no `budget=` yet)."
        )
        + " The best unchunked recipe is taken separately for time and for memory.",
        "",
    ]
    if image:
        out += [f"![time and peak memory against image size]({image})", ""]
    groups = _groups(doc)
    families = [f for f in dict.fromkeys(m["workload"].get("family") for m in doc["measurements"]) if f]
    for (name, mode, dtype), records in groups.items():
        wl = records[0]["workload"]
        if wl.get("family"):
            continue
        anchor = " (the mode the anchor measurements used)" if wl.get("anchor_mode") == mode else ""
        out += [
            f"{h}# Workload {name}: {mode}, {dtype}{anchor}",
            "",
            f"N={wl['batch']} C={wl['channels']} {wl['size']}x{wl['size']}, out {wl['out_channels']}, "
            f"hidden {wl['hidden']}, k={wl['kernel']}: {wl['patches']:,} patches of {wl['patch_size']} features.",
            "",
            *_detail_table(records),
            "",
        ]
    for family in families:
        out += [f"{h}# Sweep ({family})", "", *_sweep_tables(doc, family)]
    return "\n".join(out).rstrip() + "\n"


def _layer_cells(r: dict, limit: int, predicted: int | None) -> tuple[str, str]:
    """Time and peak cells of one method of a layer record."""
    if r["status"] == "ok":
        if r["peak_bytes"] is not None:
            peak = _fmt_bytes(r["peak_bytes"])
        elif r.get("rss_peak_bytes") is not None:
            peak = f"{_fmt_bytes(r['rss_peak_bytes'])} (resident set)"
        else:
            failure = "ran out of memory" if str(r.get("memory_message")).startswith("oom") else "failed"
            peak = f"not measured (the tracker {failure})"
        return f"{fmt_time(r['median_s'])}" + ("" if r.get("warm") else " (1 cold call)"), peak
    need = f"needs ~{_fmt_bytes(predicted)} (extrapolated)" if predicted else ""
    if r["status"] == "oom":
        return f"out of memory under the {_fmt_bytes(limit)} cap", need
    return _STATUS.get(r["status"], r["status"]), need


_LAYERS_INTRO = """\
Five published layers, each written twice in `benchmarks/layers.py` on the same parameters (and
checked to agree, output and every gradient, in float64 by `tests/test_layers_bench.py`): the
**direct** implementation is the authors' unfold-based code with plain autograd; **chunkconv** is
one `chunkconv.dynamic_conv2d` call with `kernel=` and `inputs=`.

- **kpn**: kernel prediction: a softmax-normalised k x k kernel per pixel from a 1x1 conv of
  per-pixel features, shared by all channels (`kernel="shared"`, `inputs=("features",)`).
- **pac**: pixel-adaptive convolution: static weight x Gaussian of guide differences to the
  centre tap (`kernel="modulated"`, `inputs=("guide",)`; direct: PAC's `native_impl`).
- **psf**: spatially varying blur: a normalised Gaussian per pixel whose width grows with the
  distance from the image centre (`kernel="shared"`, `inputs=("positions",)`).
- **involution**: the official `involution_naive.py`: 1x1-conv bottleneck (BN on running
  statistics) on each pixel's channels, G = C/16 kernel groups (`kernel="shared"`,
  `kernel_groups=G`, `inputs=("features",)` with the input as features).
- **dcn-mask**: DCNv2's sigmoid mask with zero offsets from a 1x1 conv of side features, then
  mmcv's masked im2col and one GEMM (`kernel="modulated"`, `inputs=("features",)`).

Each row is one training step, forward then backward into the input, the side inputs and every
parameter, float32, in a child process capped at the memory limit. Both implementations run in
the same process, alternating (direct, chunkconv, direct, ...) after one warm-up call each, so
load on the machine hits both alike; the times are medians. Peaks are `chunkconv.MemoryTracker`'s
(bytes allocated above the start; the output and all gradients count). chunkconv runs with
`budget="auto"` at 256 px and a fixed budget above.
"""


def render_layers_run(doc: dict, *, level: int = 2, intro: bool = True) -> str:
    """A ``python -m benchmarks layers`` run as Markdown: what is measured, machine facts, a row per layer and size."""
    h = "#" * level
    limit = doc["memory_limit_bytes"]
    threads = doc["machine"].get("torch_threads")
    out = [
        f"{h} Layers against their direct implementations: CPU, float32, fwd+bwd, {threads} thread"
        f"{'s' if threads != 1 else ''}, {doc['date'][:10]} {doc['date'][11:16]} UTC",
        "",
        *([_LAYERS_INTRO] if intro else []),
        *_machine_lines(doc),
        "- **Environment**: "
        + (
            ", ".join(f"`{k}={v}`" for k, v in doc["environment"].items())
            if doc.get("environment")
            else "no OpenMP or allocator variables set (OpenMP threads spin-wait between parallel regions; "
            "glibc's allocator returns large blocks to the kernel: the defaults)"
        )
        + ".",
        "",
        "| layer | image | shape | direct time | direct peak | chunkconv time | chunkconv peak | time ratio "
        "| peak ratio | chunkconv budget: plan |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in doc["measurements"]:
        wl, methods, predicted = rec["workload"], rec["methods"], rec.get("direct_predicted_bytes")
        direct, chunked = methods["direct"], methods["chunkconv"]
        dt_, dp = _layer_cells(direct, limit, predicted)
        ct, cp = _layer_cells(chunked, limit, None)
        time_ratio = peak_ratio = "-"
        chunk_peak = chunked["peak_bytes"] or chunked.get("rss_peak_bytes") if chunked["status"] == "ok" else None
        if chunked["status"] == "ok" and direct["status"] == "ok":
            fastest = min(chunked["times_s"]) / min(direct["times_s"])
            time_ratio = f"{chunked['median_s'] / direct['median_s']:.2f}x ({fastest:.2f}x)"
            if chunk_peak is not None and direct["peak_bytes"] is not None:
                peak_ratio = f"{chunk_peak / direct['peak_bytes']:.3f}x"
        elif chunk_peak is not None and predicted:
            peak_ratio = f"{chunk_peak / predicted:.3f}x est."
        plan = chunked.get("info", {}).get("plan_summary", "") if chunked["status"] == "ok" else chunked.get("message")
        size = f"{wl['size']}x{wl['size']}"
        shape = wl["describe"].replace(f" {size}", "")
        out.append(
            f"| {wl['layer']} | {size} | {shape} | {dt_} | {dp} | {ct} | {cp} | {time_ratio} | {peak_ratio} "
            f"| {wl['budget']}: {plan} |"
        )
    if intro:
        out += [
            "",
            "Ratios are chunkconv / direct (below 1: chunkconv is faster / smaller); times are medians of "
            "calls alternating between the two in one process, and the time ratio in parentheses is that of "
            "the fastest calls (the least disturbed by other load). Where the direct implementation did not "
            "fit, its need is the peak measured at the smaller size scaled by the number of pixels, and "
            'the peak ratio is against that ("est."). Beyond 1024 x 1024 pixels chunkconv\'s peak is the measuring '
            "process's peak resident set above the call's start (MemoryTracker's profiler would itself need GBs "
            "for that many ops), which also counts the C allocator's overhead.",
        ]
    return "\n".join(out).rstrip() + "\n"


_PREAMBLE = """\
# Benchmarks

<!-- Generated by `{command}`; edit benchmarks/report.py, not this file. -->

How much memory chunkconv saves and what it costs in time, against what a user would otherwise
write. Every method computes the same layer: a 2-D dynamic convolution whose kernel at each
pixel is made by `Linear(P, hidden) -> ReLU -> Linear(hidden, out * P)` from that pixel's
`P = C * k * k` patch (stride 1, padding k // 2), the generator of the workloads in `benchmarks/workloads.py`.

- **chunkconv ...**: `chunkconv.DynamicConv` with a `budget=` (before budgets existed: a
  `chunk_size=`; "default" is the planner's own choice).
- **forum**: the forum recipe: unfold everything, run the generator on all patches, expand,
  multiply, sum (`chunkconv.dynamic_conv_reference(method="forum")`).
- **einsum**: the same recipe contracting with one batched matmul (`method="einsum"`), the best
  unchunked recipe.
- **einsum+checkpoint**: the einsum recipe under `torch.utils.checkpoint` (what a user tries
  next; without gradients it is the einsum recipe).
- **static conv**: `nn.Conv2d` of the same shape with a fixed kernel: the floor.

The sections "Layers against their direct implementations" measure something else: five published
layers (kernel prediction, pixel-adaptive convolution, a lens PSF, involution, DCNv2's mask)
through chunkconv's `kernel=` and `inputs=`, against their authors' own unfold-based code
(`python -m benchmarks layers`; layers and shapes in `benchmarks/layers.py`).

How it is measured (`python -m benchmarks`, code in `benchmarks/`):

- **Modes**: `fwd` is inference (forward under `torch.no_grad`); `fwd+bwd` is a training step
  (forward, then backward into the input, the generator and the bias). Gradients are cleared
  before every call, so their allocation is part of the cost.
- **Time**: one warm-up call, then up to N timed calls without any memory tracker; the median is
  reported ("cold" when a case was so slow that only the warm-up call was timed).
- **Memory**: a separate call inside `chunkconv.memory.MemoryTracker`: the peak bytes allocated
  above the allocation at its start (on CUDA the caching allocator's statistics; on the CPU every
  allocation and free of torch's allocator, recorded by the profiler). The input, the layer's
  parameters and the output gradient exist before the call and are not counted; the output and
  all gradients are. On the CPU the JSON also records the measuring process's peak resident set
  above its start (`VmHWM`, reset per call); it sees memory outside torch's allocator but is
  distorted by memory the C allocator keeps from earlier cases, so the tables show the tracker.
- **Isolation**: on the CPU every case runs in a child process whose address space may grow by
  at most the run's memory limit during the case (`RLIMIT_AS`); a case whose shape-based
  estimate exceeds the limit is not run and reads "would need ~X"; an allocation failure reads
  "out of memory". On CUDA an out-of-memory error
  is caught and reported. No case can take the machine down.
- **Ratios**: "x best unchunked" divides by the best of forum, einsum and einsum+checkpoint for
  that workload, mode and dtype, separately for time and memory.

Regenerate this page from stored runs with
`python -m benchmarks report RUN.json [RUN.json ...] --markdown docs/benchmarks.md`.
"""


_NO_GPU = """\
## CUDA GPU: not run yet

No CUDA device was available for these runs. On a machine with one, `bash benchmarks/gpu.sh`
measures workloads A, B and C (`benchmarks/workloads.py`) and the 256..4096 px sweep in float32
(TF32 off) and bfloat16 (about 5-8 minutes on an H100) and writes `cuda-all.json/.md/.png` into
`$OUT` or `results/`; then regenerate this page with both runs:
`python -m benchmarks report results/cpu-all.json results/cuda-all.json --markdown docs/benchmarks.md`.

What was checked without a GPU: `python benchmarks/kernel_compile.py` compiles every Triton kernel
config the autotuner can pick, for H100 (sm_90) and A100 (sm_80), with Triton's own compiler and
`ptxas`, and reports registers, spills, shared memory and tensor-core use; see
[fast-path.md](fast-path.md#compiled-for-the-gpu-without-one).
"""


def render_page(runs: list[tuple[dict, str | None]], command: str) -> str:
    """The docs page: how it is measured, then each run (``(doc, image path or None)``)."""
    parts = [_PREAMBLE.format(command=command)]
    intro = True  # the layers' description once, before the first layers run
    for doc, image in runs:
        if doc.get("suite") == "layers":
            parts.append(render_layers_run(doc, intro=intro))
            intro = False
        elif doc.get("suite") == "roofline":
            from .roofline import render_roofline_run

            parts.append(render_roofline_run(doc))
        elif doc.get("suite") == "deform":
            from .deform import render_deform_run

            parts.append(render_deform_run(doc))
        else:
            parts.append(render_run(doc, image))
    if not any(doc["device"].startswith("cuda") for doc, _ in runs):
        parts.append(_NO_GPU)
    return "\n".join(parts)
