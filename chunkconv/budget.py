"""Memory budgets: "4GB", "512MiB", bytes, fractions or "auto" -> bytes; free memory per device.

This module owns the one place where a user's budget is normalised to a positive ``int`` of bytes
(as opt_einsum normalises its ``memory_limit`` in one small function). Parsing is pure Python with
a strict regular expression, never ``eval``; only fractions and ``"auto"`` look at the device, via
:func:`free_memory`. :func:`format_bytes` is the inverse used by plan printing and error messages.

Accepted budgets:

* a size string: a non-negative decimal number (``"4"``, ``"1.5"``, ``".5"``; no sign, no
  exponent, no digit separators) followed by an optional unit, spaces allowed around and between.
  Units are case-insensitive: ``B``; SI ``kB MB GB TB`` (powers of 1000); IEC ``KiB MiB GiB TiB``
  (powers of 1024). A bare number string is bytes, never a fraction (``"0.5"`` is half a byte and
  is rejected, ``"0.5GB"`` is 500,000,000 bytes). Fractional bytes are rounded down.
* an ``int`` number of bytes (``bool`` is refused).
* a ``float`` in ``(0, 1]``: that fraction of the memory currently free on the device.
* ``"auto"`` or ``None``: a default fraction of free memory (:data:`AUTO_FRACTION_CPU`,
  :data:`AUTO_FRACTION_CUDA`).

The result is always between 1 and :data:`MAX_BUDGET` (``2**63 - 1``) bytes.
"""

from __future__ import annotations

import math
import numbers
import operator
import re
from fractions import Fraction

import psutil
import torch

__all__ = [
    "AUTO_FRACTION_CPU",
    "AUTO_FRACTION_CUDA",
    "MAX_BUDGET",
    "format_bytes",
    "free_memory",
    "parse_budget",
]

# On the CPU the budget shares RAM with everything else the process (the generator's parameters,
# the caller's own tensors, Python) and the other processes on the machine allocate while the op
# runs, and psutil's "available" already counts reclaimable page cache that the OS may not give
# back quickly: claim only half of it.
AUTO_FRACTION_CPU = 0.5
# On CUDA the device is normally dedicated to this process and free_memory() already counts what
# the caching allocator holds in reserve; keep 20% headroom for allocator rounding/fragmentation
# and for what other code allocates meanwhile (the planner itself counts the cuBLAS workspace of
# autograd's backward thread, as an allowance).
AUTO_FRACTION_CUDA = 0.8
# No device addresses more than an int64 byte count; larger budgets are typos.
MAX_BUDGET = 2**63 - 1

_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
# ASCII digits only ("\d" would accept other scripts' digits); fullmatch, so nothing may trail.
_SIZE_RE = re.compile(
    r"\s*(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[kmgt]i?b|b)?\s*",
    re.IGNORECASE | re.ASCII,
)
# "4G": did the user mean 4 GB or 4 GiB? Refuse to guess, but say so.
_BARE_PREFIX_RE = re.compile(r"\s*(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<prefix>[kmgt])\s*", re.IGNORECASE | re.ASCII)
_MAX_SIZE_STRING = 100
_FORMS = (
    "a size string such as '4GB', '512MiB' or '1.5 GiB' (units B, kB, MB, GB, TB, KiB, MiB, GiB, "
    "TiB, case-insensitive; a bare number is bytes), an int number of bytes >= 1, a float fraction "
    "of free memory in (0, 1], or 'auto'/None"
)
_IEC_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def _invalid(budget: object, reason: str | None = None) -> ValueError:
    suffix = f" ({reason})" if reason else ""
    return ValueError(f"Invalid value for `budget`; expected {_FORMS}, got {budget=}{suffix}.")


def _checked_bytes(budget: object, nbytes: int) -> int:
    if nbytes < 1:
        raise _invalid(budget, f"that is {nbytes} bytes; a budget must be at least 1 byte")
    if nbytes > MAX_BUDGET:
        raise _invalid(budget, f"that is more than MAX_BUDGET={MAX_BUDGET} bytes")
    return nbytes


def _resolve_device(device: torch.device | str | int | None) -> torch.device:
    """Normalise ``device``; ``None`` is torch's default device, a bare ``"cuda"`` the current one."""
    device = torch.get_default_device() if device is None else torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"Invalid value for `device`; CUDA is not available here, got {device=}.")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _parse_size_string(budget: str) -> int:
    # The length cap keeps Fraction's exact arithmetic cheap whatever the caller sends.
    if len(budget) > _MAX_SIZE_STRING:
        raise _invalid(budget, f"longer than {_MAX_SIZE_STRING} characters")
    match = _SIZE_RE.fullmatch(budget)
    if match is None:
        bare = _BARE_PREFIX_RE.fullmatch(budget)
        if bare is not None:
            prefix = bare["prefix"].upper()
            si = "kB" if prefix == "K" else f"{prefix}B"
            raise _invalid(budget, f"ambiguous unit; write {si} for SI or {prefix}iB for IEC units")
        raise _invalid(budget)
    unit = match["unit"]
    multiplier = _UNITS[unit.lower()] if unit else 1
    # Fraction is exact: "0.1GB" is 100,000,000 bytes, not 99,999,999.
    return _checked_bytes(budget, math.floor(Fraction(match["number"]) * multiplier))


def parse_budget(budget: str | float | None, device: torch.device | str | int | None = None) -> int:
    """Normalise a memory budget to a positive number of bytes.

    Args:
        budget: A size string (``"4GB"``, ``"512MiB"``, ``"1.5 GiB"``, ``"300mb"``, ``"100 B"``; SI
            units are powers of 1000, IEC units powers of 1024, case-insensitive, a bare number is
            bytes), an ``int`` number of bytes, a ``float`` in ``(0, 1]`` meaning that fraction of
            the memory free on ``device``, or ``"auto"``/``None`` meaning
            ``AUTO_FRACTION_CPU`` or ``AUTO_FRACTION_CUDA`` of it. Default: ``None``.
        device: The device whose free memory a fraction refers to (ignored for sizes).
            Default: ``None`` (torch's default device, normally the CPU).

    Returns:
        The budget in bytes, between 1 and ``MAX_BUDGET``; fractional bytes are rounded down.

    Raises:
        TypeError: If ``budget`` is not a ``str``, an integer, a real number or ``None`` (a
            ``bool`` is refused).
        ValueError: If ``budget`` is malformed, not positive, not finite, a float above 1, rounds
            down to 0 bytes or exceeds ``MAX_BUDGET``; or if a fraction refers to a device
            other than CPU or CUDA.

    Examples:
        >>> parse_budget("4GB"), parse_budget("512MiB"), parse_budget("1.5 GiB")
        (4000000000, 536870912, 1610612736)
        >>> parse_budget(1000)
        1000
        >>> 0 < parse_budget(0.25, "cpu") <= parse_budget(0.5, "cpu")
        True

    """
    if budget is None or (isinstance(budget, str) and budget.strip().lower() == "auto"):
        device = _resolve_device(device)
        fraction = AUTO_FRACTION_CUDA if device.type == "cuda" else AUTO_FRACTION_CPU
        return _checked_bytes(budget, math.floor(fraction * free_memory(device)))
    if isinstance(budget, str):
        return _parse_size_string(budget)
    if isinstance(budget, bool):
        raise TypeError(f"Invalid type for `budget`; expected str, int, float or None, got bool: {budget=}.")
    if isinstance(budget, numbers.Integral):  # int, numpy integers
        return _checked_bytes(budget, int(budget))
    if isinstance(budget, numbers.Real):  # float, numpy floats
        if not 0.0 < budget <= 1.0:  # also false for NaN
            reason = "a float is a fraction of free memory; pass an int for a number of bytes"
            raise _invalid(budget, reason)
        return _checked_bytes(budget, math.floor(float(budget) * free_memory(device)))
    raise TypeError(
        f"Invalid type for `budget`; expected str, int, float or None, got {type(budget).__name__}: {budget=}."
    )


def free_memory(device: torch.device | str | int | None = None) -> int:
    """Bytes that new tensors on ``device`` could use right now.

    On CUDA this is the driver's free memory (``torch.cuda.mem_get_info``) plus what PyTorch's
    caching allocator holds reserved but unallocated (it reuses those blocks before asking the
    driver). On the CPU it is ``psutil.virtual_memory().available``.

    Args:
        device: A CPU or CUDA device. Default: ``None`` (torch's default device, normally the CPU).

    Returns:
        Free memory in bytes.

    Raises:
        ValueError: If ``device`` is neither a CPU nor a CUDA device, or CUDA is not available.

    Examples:
        >>> free_memory("cpu") > 0
        True

    """
    device = _resolve_device(device)
    if device.type == "cpu":
        return int(psutil.virtual_memory().available)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    raise ValueError(
        f"Invalid value for `device`; free memory is known for 'cpu' and 'cuda' devices only, got {device=}."
    )


def format_bytes(n: int) -> str:
    """Format a byte count for humans with IEC units.

    Args:
        n: A number of bytes (may be negative, e.g. a net change in memory).

    Returns:
        ``"512 B"`` below 1 KiB, otherwise two decimals in the largest unit that keeps the
        number at least 1, e.g. ``"3.50 GiB"``.

    Raises:
        TypeError: If ``n`` is not an integer.

    Examples:
        >>> format_bytes(512), format_bytes(7 * 2**29), format_bytes(-1536)
        ('512 B', '3.50 GiB', '-1.50 KiB')

    """
    n = operator.index(n)
    sign, magnitude = ("-" if n < 0 else ""), abs(n)
    if magnitude < 1024:
        return f"{sign}{magnitude} B"
    exponent = 1
    # Move up while the rounded value would print as 1024.00 or more ("1.00 MiB", not "1024.00 KiB").
    while exponent < len(_IEC_UNITS) - 1 and round(magnitude / 1024**exponent, 2) >= 1024:
        exponent += 1
    return f"{sign}{magnitude / 1024**exponent:.2f} {_IEC_UNITS[exponent]}"
