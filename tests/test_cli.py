"""``python -m chunkconv plan``: it means what the Python API means, shows its defaults and gives
advice in command-line terms. Run in-process through ``main(argv)``."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chunkconv import parse_budget
from chunkconv.cli import _budget_at_least, main


def run(capsys, *argv):
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", *argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_int_kernel_means_2d_and_one_dim_fewer_is_unbatched(capsys):
    # issue 12, defect 9: this planned a 1-D convolution of a batch of 16
    code, out, _ = run(capsys, "--input", "16x4096x4096", "--kernel-size", "3")
    assert code == 0
    assert "convolution: 2-D, kernel 3x3, one unbatched input of 16 channels -> 16 channels" in out
    assert "input    (16, 4096, 4096) float32 on cpu -> output (16, 4094, 4094)" in out  # as the call returns it
    assert "add --ndim 1" in out  # the other reading is one flag away


def test_ndim_says_otherwise(capsys):
    code, out, _ = run(capsys, "--input", "16x4x4096", "--kernel-size", "3", "--ndim", "1", "--out-channels", "8")
    assert code == 0
    assert "convolution: 1-D, kernel 3, a batch of 16 of 4 channels -> 8 channels" in out
    assert "input    (16, 4, 4096) float32" in out


def test_kernel_tuple_fixes_ndim(capsys):
    code, out, _ = run(capsys, "--input", "1x2x6x8x8", "--kernel-size", "3x3x3")
    assert code == 0 and "convolution: 3-D, kernel 3x3x3, a batch of 1" in out


def test_batched_2d(capsys):
    code, out, _ = run(capsys, "--input", "2x3x32x32", "--kernel-size", "3", "--padding", "1", "--inference")
    assert code == 0 and "convolution: 2-D, kernel 3x3, a batch of 2 of 3 channels -> 3 channels" in out
    assert "chunkconv plan: inference" in out or "chunkconv plan: forward" in out


def test_kernel_and_ndim_disagree(capsys):
    err = usage_error(capsys, "--input", "1x2x8x8", "--kernel-size", "3x3", "--ndim", "1")
    assert "--kernel-size 3x3 is a 2-D kernel but --ndim is 1" in err


def test_input_of_the_wrong_rank_names_the_flags(capsys):
    err = usage_error(capsys, "--input", "1x2x4x8x8", "--kernel-size", "3")
    assert "--input 1x2x4x8x8 has 5 dims, but a 2-D convolution" in err
    assert "NxCxHxW (4 dims) or one unbatched input CxHxW (3 dims)" in err
    assert "add --ndim 3" in err
    err = usage_error(capsys, "--input", "16x4096x4096", "--kernel-size", "3x3x3")
    assert "a 3-D convolution (--kernel-size 3x3x3 is 3-D)" in err


def test_bad_ints_are_usage_errors(capsys):
    err = usage_error(capsys, "--input", "1x2xeight", "--kernel-size", "3")
    assert "expected an int or ints joined by 'x'" in err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag, default in [
        ("--budget", "auto"),
        ("--hidden", "32"),
        ("--stride", "1"),
        ("--padding", "0"),
        ("--dtype", "float32"),
        ("--device", "cpu"),
        ("--padding-mode", "zeros"),
    ]:
        assert re.search(rf"{flag} \S+ [^(]*\(default: {default}\)", out), (flag, out)
    assert "(default: None)" not in out
    assert "--ndim {1,2,3} spatial dims of the convolution (default: the kernel's length; 2 for an int kernel" in out


def test_budget_too_small_advice_names_the_flag(capsys):
    argv = ["--input", "1x4x64x64", "--kernel-size", "3", "--padding", "1"]
    code, _, err = run(capsys, *argv, "--budget", "10kB")
    assert code == 2
    advice = re.search(r"Rerun with --budget (\S+) or more, or plan forward only with --inference\.", err)
    assert advice, err
    assert err.startswith("error: --budget 10kB (9.77 KiB) is too small for this convolution, training")
    assert "plan(" not in err  # no Python advice on the command line
    code, out, _ = run(capsys, *argv, "--budget", advice[1])  # the advice works
    assert code == 0 and "chunkconv plan: training" in out


@given(st.integers(1, 2**50))
def test_suggested_budget_is_enough_and_short(nbytes):
    text = _budget_at_least(nbytes)
    assert parse_budget(text) >= nbytes
    assert len(re.sub(r"[^0-9]", "", text)) <= 4
    assert parse_budget(text) <= nbytes * 1.011 + 1


def test_plan_takes_kernel_forms_and_side_inputs(capsys):
    from chunkconv.cli import main

    code = main(["plan", "--input", "1x8x64x64", "--kernel-size", "5", "--padding", "same", "--kernel", "shared",
                 "--kernel-groups", "2", "--inputs", "features", "--features", "12", "--budget", "64MB"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "25-entry depthwise kernels" not in out and "50-entry depthwise kernels" in out
    assert "the generator receives features" in out and "features gradient" in out
    code = main(["plan", "--input", "1x3x32x32", "--kernel-size", "3", "--padding", "1", "--out-channels", "6",
                 "--kernel", "modulated", "--inputs", "guide,patches", "--guide", "1", "--budget", "64MB"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "9 scalars each, scaling a static weight of 162 entries" in out
    assert "the generator receives guide, patches" in out


def test_plan_side_input_flags_go_together():
    from chunkconv.cli import main

    with pytest.raises(SystemExit):
        main(["plan", "--input", "1x3x32x32", "--kernel-size", "3", "--inputs", "features"])
