"""Budgets: size strings, bytes, fractions and "auto" -> bytes; free memory; byte formatting."""

import math
import re
from fractions import Fraction
from types import SimpleNamespace

import psutil
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from chunkconv.budget import (
    AUTO_FRACTION_CPU,
    AUTO_FRACTION_CUDA,
    MAX_BUDGET,
    format_bytes,
    free_memory,
    parse_budget,
)

UNITS = {
    "B": 1,
    "kB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
INVALID = re.escape("Invalid value for `budget`; expected a size string such as '4GB', '512MiB' or '1.5 GiB'")
FREE = 10_000_000_000


@pytest.fixture
def fake_free_ram(monkeypatch):
    """Make the CPU's free memory exactly FREE bytes."""
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=FREE, total=2 * FREE))
    return FREE


# --- size strings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GB", 4 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5 GiB", 3 * 2**29),
        ("300mb", 300 * 10**6),
        ("100 B", 100),
        ("2kb", 2000),
        ("2KiB", 2048),
        ("4 gib", 4 * 2**30),
        ("1TB", 10**12),
        ("1 TiB", 2**40),
        ("  7  ", 7),
        ("7", 7),
        ("1.", 1),
        (".5KiB", 512),
        ("0.1GB", 10**8),  # exact: not 99,999,999 as float arithmetic would give
        ("1.9", 1),  # fractional bytes round down
        ("\t8 MB\n", 8 * 10**6),
        ("0001kB", 1000),
    ],
)
def test_size_strings(text, expected):
    assert parse_budget(text) == expected


@st.composite
def size_strings(draw):
    """A valid size string and the exact number it denotes (before rounding)."""
    whole = draw(st.integers(0, 10**6), label="whole")
    decimals = draw(st.text("0123456789", max_size=6), label="decimals")
    number = f"{whole}.{decimals}" if decimals or draw(st.booleans()) else str(whole)
    unit = draw(st.sampled_from(["", *UNITS]), label="unit")
    unit = "".join(c.upper() if draw(st.booleans()) else c.lower() for c in unit)  # any casing
    spaces = st.sampled_from(["", " ", "  ", "\t"])
    text = draw(spaces) + number + draw(spaces) + unit + draw(spaces)
    exact = Fraction(number) * (UNITS[next(u for u in UNITS if u.lower() == unit.lower())] if unit else 1)
    return text, exact


@given(size_strings())
def test_size_strings_round_trip(case):
    text, exact = case
    assume(exact >= 1)
    assert parse_budget(text) == math.floor(exact)


@given(x=st.decimals(min_value=1, max_value=10**4, places=3, allow_nan=False), unit=st.sampled_from(list(UNITS)))
def test_formatted_decimals_round_trip(x, unit):
    assert parse_budget(f"{x}{unit}") == math.floor(x * UNITS[unit])


@given(st.integers(1, 2**49))  # up to 512 TiB: format_bytes switches to PiB, which budgets do not accept
def test_format_bytes_parses_back_within_rounding(n):
    # format_bytes keeps 2 decimals of a number >= 1, so it is within 0.5% (exact below 1 KiB).
    back = parse_budget(format_bytes(n))
    assert abs(back - n) <= n * 0.005 + 1


def test_sub_byte_strings_are_rejected():
    expected = rf"^{INVALID}.*got budget='0\.5' \(that is 0 bytes; a budget must be at least 1 byte\)\.$"
    with pytest.raises(ValueError, match=expected):
        parse_budget("0.5")
    with pytest.raises(ValueError, match=r"got budget='0GB' \(that is 0 bytes"):
        parse_budget("0GB")


def test_max_budget():
    assert parse_budget(MAX_BUDGET) == MAX_BUDGET
    assert parse_budget("8 TiB") == 8 * 2**40
    with pytest.raises(ValueError, match=r"got budget=9223372036854775808 \(that is more than MAX_BUDGET="):
        parse_budget(MAX_BUDGET + 1)
    with pytest.raises(ValueError, match=r"got budget='99999999TB' \(that is more than MAX_BUDGET="):
        parse_budget("99999999TB")


# --- garbage ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "4 parsecs",
        "1e999GB",
        "1e3",
        "GB",
        "",
        "   ",
        "-1",
        "-4GB",
        "+4GB",
        "4 G B",
        "4GBB",
        "4 GiBs",
        "1.2.3GB",
        "1,5GB",
        "1_000",
        "4PB",
        "4 bytes",
        "nan",
        "inf",
        "0x10",
        "٣GB",  # not an ASCII digit
        "4 GB 4",
        "auto4",
        "4 MB; rm -rf /",
        "__import__('os')",
    ],
)
def test_garbage_strings_are_rejected(text):
    with pytest.raises(ValueError, match=rf"^{INVALID}.*got budget={re.escape(repr(text))}\.$"):
        parse_budget(text)


def test_error_message_lists_every_accepted_form():
    with pytest.raises(ValueError) as info:
        parse_budget("4 parsecs")
    assert str(info.value) == (
        "Invalid value for `budget`; expected a size string such as '4GB', '512MiB' or '1.5 GiB' (units B, kB, MB, "
        "GB, TB, KiB, MiB, GiB, TiB, case-insensitive; a bare number is bytes), an int number of bytes >= 1, a float "
        "fraction of free memory in (0, 1], or 'auto'/None, got budget='4 parsecs'."
    )


@pytest.mark.parametrize(("text", "hint"), [("4G", "GB for SI or GiB"), ("1.5 k", "kB for SI or KiB"), ("2t", "TB")])
def test_ambiguous_unit_names_both_spellings(text, hint):
    with pytest.raises(ValueError, match=rf"got budget={re.escape(repr(text))} \(ambiguous unit; write {hint}"):
        parse_budget(text)


def test_overlong_string_is_rejected_without_parsing():
    text = "9" * 10_000
    with pytest.raises(ValueError, match=r"\(longer than 100 characters\)\.$"):
        parse_budget(text)


@st.composite
def corrupted_size_strings(draw):
    """Valid size strings broken in a way no valid string can be."""
    number = draw(st.from_regex(r"[0-9]{1,4}(\.[0-9]{1,3})?", fullmatch=True), label="number")
    unit = draw(st.sampled_from(["", *UNITS]), label="unit")
    junk = draw(st.text("xyzqwXYZQW!@#%/=,;:()[]{}^&*~?$'\"", min_size=1, max_size=4), label="junk")
    how = draw(st.sampled_from(["sign", "suffix", "prefix", "exponent", "double_dot", "split_number"]), label="how")
    if how == "sign":
        return draw(st.sampled_from("+-")) + number + unit
    if how == "suffix":
        return number + unit + junk
    if how == "prefix":
        return junk + number + unit
    if how == "exponent":
        return number + draw(st.sampled_from(["e", "E"])) + str(draw(st.integers(0, 999))) + unit
    if how == "double_dot":
        return number.split(".")[0] + ".1.2" + unit
    whole = number.split(".")[0]
    return whole + " " + whole + unit  # whitespace inside the number


@given(corrupted_size_strings())
def test_corrupted_size_strings_are_rejected(text):
    with pytest.raises(ValueError, match=rf"^{INVALID}"):
        parse_budget(text)


@given(st.text(st.characters(exclude_characters="0123456789"), max_size=20))
def test_strings_without_digits_are_rejected(text):
    assume(text.strip().lower() != "auto")  # the one valid string without a digit
    with pytest.raises(ValueError, match=rf"^{INVALID}"):
        parse_budget(text)


# --- numbers ----------------------------------------------------------------------------------


@given(st.integers(1, MAX_BUDGET))
def test_ints_are_bytes(n):
    assert parse_budget(n) == n


@pytest.mark.parametrize("n", [0, -1, -(2**40)])
def test_non_positive_ints_are_rejected(n):
    expected = rf"^{INVALID}.*got budget={n} \(that is {n} bytes; a budget must be at least 1 byte\)\.$"
    with pytest.raises(ValueError, match=expected):
        parse_budget(n)


def test_numpy_numbers_are_accepted(fake_free_ram):
    np = pytest.importorskip("numpy")
    assert parse_budget(np.int64(4096)) == 4096
    assert parse_budget(np.float32(0.5), "cpu") == FREE // 2


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0, 1e-9, 0.123456789])
def test_fractions_of_free_memory(fake_free_ram, fraction):
    assert parse_budget(fraction, "cpu") == math.floor(fraction * FREE)
    assert parse_budget(fraction) == math.floor(fraction * FREE)  # default device is the CPU


@given(st.floats(min_value=1e-9, max_value=1.0))
def test_fraction_is_monotone_and_within_free_memory(fraction):
    # Patch by hand: hypothesis does not reset function-scoped fixtures between examples.
    original = psutil.virtual_memory
    psutil.virtual_memory = lambda: SimpleNamespace(available=FREE)
    try:
        nbytes = parse_budget(fraction, "cpu")
        assert 1 <= nbytes <= FREE
        assert nbytes <= parse_budget(min(1.0, fraction * 2), "cpu")
    finally:
        psutil.virtual_memory = original


@pytest.mark.parametrize("budget", [None, "auto", "AUTO", " Auto "])
def test_auto_is_a_fraction_of_free_cpu_memory(fake_free_ram, budget):
    assert parse_budget(budget, "cpu") == math.floor(AUTO_FRACTION_CPU * FREE)


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.0000001, 1.5, 4e9, math.nan, math.inf, -math.inf])
def test_floats_outside_unit_interval_are_rejected(fraction):
    reason = r"\(a float is a fraction of free memory; pass an int for a number of bytes\)"
    expected = rf"^{INVALID}.*got budget={re.escape(repr(fraction))} {reason}\.$"
    with pytest.raises(ValueError, match=expected):
        parse_budget(fraction)


def test_fraction_that_rounds_to_zero_bytes_is_rejected(monkeypatch):
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=1))
    with pytest.raises(ValueError, match=r"got budget=0\.5 \(that is 0 bytes; a budget must be at least 1 byte\)\.$"):
        parse_budget(0.5, "cpu")


@pytest.mark.parametrize("budget", [True, False, [1], (4, "GB"), b"4GB", {"GB": 4}, object(), torch.tensor(4096)])
def test_wrong_types_raise_type_error(budget):
    with pytest.raises(TypeError, match=r"^Invalid type for `budget`; expected str, int, float or None, got "):
        parse_budget(budget)


def test_sizes_do_not_look_at_the_device(monkeypatch):
    def boom():
        raise AssertionError("free memory queried for a fixed size")

    monkeypatch.setattr(psutil, "virtual_memory", boom)
    assert parse_budget("4GB", "meta") == 4 * 10**9
    assert parse_budget(123, "meta") == 123


# --- free memory ------------------------------------------------------------------------------


def test_free_memory_on_cpu_is_psutil_available(fake_free_ram):
    assert free_memory("cpu") == FREE
    assert free_memory(torch.device("cpu")) == FREE
    assert free_memory() == FREE


def test_free_memory_real_cpu():
    free = free_memory("cpu")
    assert isinstance(free, int)
    assert 0 < free <= psutil.virtual_memory().total


def test_free_memory_rejects_other_devices():
    expected = (
        r"^Invalid value for `device`; free memory is known for 'cpu' and 'cuda' devices only, "
        r"got device=device\(type='meta'\)\.$"
    )
    with pytest.raises(ValueError, match=expected):
        free_memory("meta")
    with pytest.raises(ValueError, match=r"^Invalid value for `device`"):
        parse_budget(0.5, "meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    expected = r"^Invalid value for `device`; CUDA is not available here, got device=device\(type='cuda'\)\.$"
    with pytest.raises(ValueError, match=expected):
        free_memory("cuda")


@pytest.mark.cuda
def test_free_memory_cuda_counts_the_allocator_cache():
    device = torch.device("cuda", torch.cuda.current_device())
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
    del block  # now reserved by the caching allocator but not allocated
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    assert cached >= 64 * 2**20
    assert abs(free_memory("cuda") - (free + cached)) < 64 * 2**20  # the driver's count may move a little
    assert parse_budget("auto", "cuda") <= math.floor(AUTO_FRACTION_CUDA * free_memory(device)) + 64 * 2**20


# --- formatting -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (2**20 - 1, "1.00 MiB"),  # never "1024.00 KiB"
        (7 * 2**29, "3.50 GiB"),
        (5 * 10**9, "4.66 GiB"),
        (2**40, "1.00 TiB"),
        (-1536, "-1.50 KiB"),
        (MAX_BUDGET, "8.00 EiB"),
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@given(st.integers(-(2**70), 2**70))
def test_format_bytes_number_is_below_1024(n):
    number, unit = format_bytes(n).lstrip("-").split(" ")
    assert unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    assert float(number) < 1024 or unit == "EiB"


@pytest.mark.parametrize("n", [1.5, "4GB", None])
def test_format_bytes_rejects_non_integers(n):
    with pytest.raises(TypeError):
        format_bytes(n)
