"""Progress over chunks: opt-in per layer or globally, tqdm when installed, stderr lines otherwise."""

import builtins

import pytest
import torch
from torch import nn

import chunkconv
from chunkconv import progress


@pytest.fixture(autouse=True)
def _restore_setting():
    before = progress.get_progress()
    yield
    chunkconv.set_progress(before)


def _layer(**kw):
    p = 2 * 9
    gen = nn.Sequential(nn.Linear(p, 4), nn.Tanh(), nn.Linear(4, 2 * p))
    return chunkconv.DynamicConv2d(gen, 2, 2, 3, padding=1, chunk_size=20, **kw)


def _without_tqdm(monkeypatch):
    real_import = builtins.__import__

    def fake(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError("no tqdm here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


def test_layer_progress_prints_forward_and_backward_without_tqdm(monkeypatch, capsys):
    _without_tqdm(monkeypatch)
    conv = _layer(progress=True)
    conv(torch.randn(1, 2, 10, 10, requires_grad=True)).sum().backward()
    err = capsys.readouterr().err
    assert "chunkconv forward: 100.0% of 100 patches" in err
    assert "chunkconv backward (recomputing each chunk): 100.0% of 100 patches" in err


def test_no_progress_by_default_and_globally_switchable(capsys):
    conv = _layer()
    conv(torch.randn(1, 2, 10, 10))
    assert capsys.readouterr().err == ""
    chunkconv.set_progress(True)
    with torch.no_grad():
        conv(torch.randn(1, 2, 10, 10))
    assert "chunkconv forward" in capsys.readouterr().err
    conv.progress = False  # the layer's own setting wins
    conv(torch.randn(1, 2, 10, 10))
    assert capsys.readouterr().err == ""


def test_auto_shows_only_calls_estimated_to_be_long(monkeypatch, capsys):
    chunkconv.set_progress("auto")
    assert progress.wants_progress(None, 60.0) and not progress.wants_progress(None, 0.01)
    assert not progress.wants_progress(None, None)  # not measured: no estimate
    assert progress.wants_progress(True, None) and not progress.wants_progress(False, 60.0)
    monkeypatch.setattr(progress, "AUTO_SECONDS", 0.0)
    conv = _layer()
    conv.chunk_size = None  # planned, so the plan has an estimate
    conv(torch.randn(1, 2, 10, 10))
    assert "chunkconv forward" in capsys.readouterr().err


def test_plan_states_an_estimated_time():
    conv = _layer()
    conv.chunk_size = None
    plan = conv.plan((1, 2, 32, 32))
    forward, backward = plan.estimated_seconds
    assert forward > 0 and backward > 0
    assert "  time     forward ~" in str(plan)


def test_bad_progress_values_are_refused():
    with pytest.raises(ValueError, match="Invalid value for `mode`"):
        chunkconv.set_progress("sometimes")
    with pytest.raises(ValueError, match="Invalid value for `progress`"):
        _layer(progress="yes")


def test_progress_into_a_log_is_whole_lines(capsys):
    # issue 21: bars written with carriage returns ran together in logs (stderr is not a terminal here)
    conv = _layer(progress=True)
    conv.chunk_size = 5
    conv(torch.randn(1, 2, 10, 10, requires_grad=True)).sum().backward()
    err = capsys.readouterr().err
    assert "\r" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("chunkconv forward:")]
    assert 2 <= len(lines) <= 11 and lines[-1].startswith("chunkconv forward: 100.0% of 100 patches"), err
