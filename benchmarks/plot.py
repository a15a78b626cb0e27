"""PNG of time and peak memory against image size, one line per method, failed points marked.

Needs matplotlib (the ``plot`` extra); :func:`have_matplotlib` says whether it is there. One row of
panels per dtype and metric, one column per mode; sizes on a log-2 axis. A method that did not
run (out of memory, skipped by its estimate, timed out; not cases the run's time limit left out)
is marked with an ``x``: on the memory panel at its shape-based estimate of what it would need,
on the time panel along the top edge. The dashed line on memory panels is the run's memory limit.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["have_matplotlib", "save_plot"]


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def save_plot(doc: dict, path: Path, family: str | None = None) -> bool:
    """Plot ``doc``'s sweep (the first family, or ``family``) to ``path``; ``False`` if there is none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    families = [f for f in dict.fromkeys(m["workload"].get("family") for m in doc["measurements"]) if f]
    if not families:
        return False
    family = family or families[0]
    records = [m for m in doc["measurements"] if m["workload"].get("family") == family]
    modes = [m for m in doc["modes"] if any(r["mode"] == m for r in records)]
    dtypes = [d for d in doc["dtypes"] if any(r["dtype"] == d for r in records)]
    labels = list(dict.fromkeys(r["method"]["label"] for r in records))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    rows = [(dtype, metric) for dtype in dtypes for metric in ("time", "memory")]
    fig, axes = plt.subplots(len(rows), len(modes), figsize=(6 * len(modes), 3.6 * len(rows)), squeeze=False)
    device = doc["machine"].get("gpu") or f"CPU ({doc['machine']['cpu']})"
    wl = records[0]["workload"]
    fig.suptitle(
        f"{device}, {doc['date'][:10]}: N={wl['batch']} C={wl['channels']} out={wl['out_channels']} "
        f"hidden={wl['hidden']} k={wl['kernel']}, torch {doc['machine']['torch']}",
        fontsize=10,
    )
    for (dtype, metric), axrow in zip(rows, axes):
        for mode, ax in zip(modes, axrow):
            top = blended_transform_factory(ax.transData, ax.transAxes)
            for label in labels:
                pts = sorted(
                    (r for r in records if r["method"]["label"] == label and r["mode"] == mode and r["dtype"] == dtype),
                    key=lambda r: r["workload"]["size"],
                )
                ok = [r for r in pts if r["status"] == "ok"]
                bad = [r for r in pts if r["status"] not in ("ok", "not run")]
                if metric == "time":
                    xs, ys = [r["workload"]["size"] for r in ok], [r["median_s"] for r in ok]
                else:
                    xs, ys = [r["workload"]["size"] for r in ok], [r["peak_bytes"] / 2**30 for r in ok]
                ax.plot(xs, ys, "o-", color=colors[label], label=label, markersize=4)
                for r in bad:
                    if metric == "time":
                        ax.plot(
                            r["workload"]["size"],
                            0.97,
                            "x",
                            color=colors[label],
                            transform=top,
                            markersize=8,
                            clip_on=False,
                        )
                    else:
                        ax.plot(
                            r["workload"]["size"], r["estimate_bytes"] / 2**30, "x", color=colors[label], markersize=8
                        )
            if metric == "memory":
                ax.axhline(doc["memory_limit_bytes"] / 2**30, color="grey", linestyle="--", linewidth=1)
            ax.set_xscale("log", base=2)
            sizes = sorted({r["workload"]["size"] for r in records})
            ax.set_xticks(sizes, [str(v) for v in sizes])
            ax.set_yscale("log")
            ax.set_xlabel("image side (pixels)")
            ax.set_ylabel("median time (s)" if metric == "time" else "peak above start (GiB)")
            ax.set_title(f"{mode}, {dtype}: {'time' if metric == 'time' else 'peak memory'}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(4, len(names)), fontsize=8, bbox_to_anchor=(0.5, 0.02))
    fig.text(
        0.5,
        0.005,
        "x: did not run (out of memory, or would need more than the limit: plotted at its "
        "estimate; on time panels along the top edge). Dashed: the run's memory limit.",
        fontsize=8,
        ha="center",
    )
    legend_rows = -(-len(names) // 4)
    fig.tight_layout(rect=(0, 0.03 + 0.12 * legend_rows / len(rows), 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
