"""``python -m chunkconv doctor``, run in-process: it passes here, its JSON has the documented keys,
and a failing check makes the exit code non-zero."""

import json
import re

import pytest
import torch

from chunkconv import doctor
from chunkconv.cli import main

KEYS = {"device", "versions", "devices", "environment", "backends", "checks", "kernel_fallbacks", "summary"}
SUMMARY = re.compile(r"^doctor: (\d+) passed, (\d+) failed, (\d+) skipped$", re.MULTILINE)


def test_doctor_passes_here(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    summary = SUMMARY.search(out)
    assert summary and summary[2] == "0" and int(summary[1]) >= 6, out
    assert out.rstrip().endswith(summary[0])  # the summary is the last line
    for what in ("versions", f"torch          {torch.__version__}", "devices", "what runs on", "self-check on"):
        assert what in out, (what, out)
    for name in ("generic path, float64", "fast path (PyTorch), float64", "budget honoured, training"):
        assert re.search(rf"^  PASS  {re.escape(name)}", out, re.MULTILINE), (name, out)
    # the Triton check says why it cannot run, or passes
    assert re.search(r"^  (PASS|SKIP)  fast path \(Triton kernels\), float64: ", out, re.MULTILINE), out
    if not torch.cuda.is_available():
        assert "SKIP  fast path (Triton kernels), float64: the input is on cpu" in out or doctor.interpreting()


def test_doctor_json(capsys):
    assert main(["doctor", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)  # one JSON object, nothing else on stdout
    assert set(data) == KEYS
    assert data["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert data["versions"]["torch"] == torch.__version__ and data["versions"]["chunkconv"]
    assert {"version", "importable", "error"} <= set(data["versions"]["triton"])
    assert data["devices"]["cpu"]["memory_total"] > 0
    assert [b["name"] for b in data["backends"]] == ["generic path", "fast path, PyTorch", "fast path, Triton kernels"]
    statuses = [c["status"] for c in data["checks"]]
    assert set(statuses) <= {"PASS", "SKIP"}
    assert all(set(c) == {"name", "status", "detail", "seconds"} for c in data["checks"])
    assert data["summary"] == {"passed": statuses.count("PASS"), "failed": 0, "skipped": statuses.count("SKIP")}


@pytest.fixture
def quick(monkeypatch):
    """One correctness case and one memory size: the failure tests need only the wiring."""
    monkeypatch.setattr(doctor, "CASES", doctor.CASES[:1])
    monkeypatch.setattr(doctor, "SIZES", doctor.SIZES[:1])


def test_a_wrong_path_fails_the_doctor(monkeypatch, capsys, quick):
    reference = doctor.dynamic_conv_reference

    def off_by_a_little(*args, **kwargs):
        y = reference(*args, **kwargs)
        return y + 1e-6 * y.detach()  # the paths now disagree with the "oracle" (its output, not its gradients)

    monkeypatch.setattr(doctor, "dynamic_conv_reference", off_by_a_little)
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert re.search(
        r"^  FAIL  generic path, float64: .*: the output is off by 1\.00e-06 of its scale", out, re.MULTILINE
    ), out
    summary = SUMMARY.search(out)
    assert summary and int(summary[2]) >= 2, out


def test_a_budget_overrun_fails_the_doctor(monkeypatch, capsys, quick):
    def over_budget(*args):
        raise AssertionError("measured peak forward 3.00 MiB is above the budget of 2.00 MiB (injected)")

    monkeypatch.setattr(doctor, "_measure", over_budget)
    assert main(["doctor", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    failed = [c for c in data["checks"] if c["status"] == "FAIL"]
    assert [c["name"].split(",")[1].strip() for c in failed] == ["forward", "training"]
    assert failed[0]["detail"].endswith("(injected)")
    assert data["summary"]["failed"] == 2


def test_a_crashing_check_is_a_failure_not_a_crash(monkeypatch, capsys, quick):
    def crash(*args):
        raise RuntimeError("something unexpected")

    monkeypatch.setattr(doctor, "_measure", crash)
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  budget honoured, forward, 1x8x48x48: RuntimeError: something unexpected" in out


def test_kernel_fallbacks_are_reported(monkeypatch, capsys, quick):
    from chunkconv.fast.kernels import fallback

    monkeypatch.setattr(fallback, "_failed", {("forward", None): "RuntimeError: injected"})
    main(["doctor"])
    assert "kernel fallback: forward for every configuration: RuntimeError: injected" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_no_cuda_device(capsys):
    assert main(["doctor", "--device", "cuda"]) == 2
    assert "error: --device cuda: CUDA is not available here" in capsys.readouterr().err


def test_help(capsys):
    with pytest.raises(SystemExit):
        main(["doctor", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--json print one JSON object (for bug reports)" in out
    assert "(default: cuda if available, else cpu)" in out
