"""Progress over the chunks of long calls: opt-in per layer or globally.

A call shows progress when its layer says so (``DynamicConv(..., progress=True)``, or
``progress=`` of the functional forms), or, with the layer's ``progress=None`` (the default),
when the process-wide setting does: :func:`set_progress` (``False`` by default; ``True``; or
``"auto"``, which shows it only for calls whose plan estimates at least
:data:`AUTO_SECONDS` seconds). The bar is tqdm's when tqdm is installed
(``pip install "chunkconv[progress]"``), else a line on stderr about once a second; where stderr is
not a terminal (a log file, a pipe) it is whole lines instead, one per tenth of the chunks.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["AUTO_SECONDS", "get_progress", "progress_bar", "set_progress", "wants_progress"]

# "auto" shows progress for calls estimated to take at least this long (forward plus backward).
AUTO_SECONDS = 5.0

_setting: bool | str = os.environ.get("CHUNKCONV_PROGRESS", "0").lower() in ("1", "true") or (
    "auto" if os.environ.get("CHUNKCONV_PROGRESS", "").lower() == "auto" else False
)


def set_progress(mode: bool | str) -> None:
    """Show progress for every call (``True``), none (``False``), or long ones (``"auto"``).

    Applies to layers and calls whose own ``progress`` is ``None``. The environment variable
    ``CHUNKCONV_PROGRESS`` (``1``, ``0`` or ``auto``) sets the initial value.
    """
    global _setting
    if mode not in (True, False, "auto"):
        raise ValueError(f"Invalid value for `mode`; expected True, False or 'auto', got {mode=}.")
    _setting = mode


def get_progress() -> bool | str:
    """The process-wide setting (see :func:`set_progress`)."""
    return _setting


def wants_progress(layer_setting: bool | None, estimated_seconds: float | None) -> bool:
    """Whether a call shows progress, from its own setting, the global one and its estimate."""
    mode = _setting if layer_setting is None else layer_setting
    if mode == "auto":
        return estimated_seconds is not None and estimated_seconds >= AUTO_SECONDS
    return bool(mode)


@contextmanager
def progress_bar(show: bool, total: int, description: str) -> Iterator[Callable[[int], None] | None]:
    """Yield a callback taking the patches just done (``None`` when not shown); closes the bar on exit."""
    if not show or total <= 0:
        yield None
        return
    if not _is_terminal(sys.stderr):  # a log: whole lines (a bar's carriage returns would run together)
        yield _line_per_step(total, description)
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, desc=description, unit="patch", unit_scale=True, leave=False)
        try:
            yield bar.update
        finally:
            bar.close()
        return
    start, last, done = time.monotonic(), [0.0], [0]

    def tick(n: int) -> None:
        done[0] += n
        now = time.monotonic()
        if now - last[0] >= 1.0 or done[0] >= total:
            last[0] = now
            print(
                f"\r{description}: {100 * done[0] / total:5.1f}% of {total:,} patches, {now - start:.1f} s",
                end="" if done[0] < total else "\n",
                file=sys.stderr,
                flush=True,
            )

    yield tick


def _is_terminal(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def _line_per_step(total: int, description: str) -> Callable[[int], None]:
    """A callback printing one whole line on stderr per tenth of the work (and at the end)."""
    start, done, shown = time.monotonic(), [0], [0]

    def tick(n: int) -> None:
        done[0] += n
        step = 10 * done[0] // total
        if step > shown[0] or done[0] >= total:
            shown[0] = step
            print(
                f"{description}: {100 * done[0] / total:5.1f}% of {total:,} patches, {time.monotonic() - start:.1f} s",
                file=sys.stderr,
                flush=True,
            )

    return tick
