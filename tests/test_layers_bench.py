"""The benchmarked layers (benchmarks/layers.py): chunkconv computes each one as its authors' code does.

Each layer's chunkconv version (one ``dynamic_conv2d`` call with ``kernel=`` and ``inputs=``) must
equal its direct, unfold-based implementation in float64: the output, and the gradients of the
input, of every side input (features, guide) and of every parameter. That is also the proof
that the API expresses each layer. The direct implementations are checked on their own against
``F.conv2d`` where their kernel is made constant. Then ``python -m benchmarks layers --quick``
runs end to end (seconds).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from benchmarks.__main__ import main
from benchmarks.layers import LAYERS, LayerWorkload, build_layer, workloads

# tiny shapes, odd and non-square images (positions are row first), several chunks
_TINY = {
    "kpn": (3, (("features", 4), ("kernel_size", 3))),
    "pac": (3, (("out_channels", 4), ("guide_channels", 2), ("kernel_size", 3))),
    "psf": (2, (("kernel_size", 5),)),
    "involution": (32, (("kernel_size", 3),)),
    "dcn-mask": (3, (("out_channels", 4), ("features", 5), ("kernel_size", 3))),
}


def _tiny(layer: str, h: int = 9, w: int = 7, batch: int = 2):
    channels, params = _TINY[layer]
    wl = LayerWorkload(layer, size=h, batch=batch, channels=channels, params=params)
    torch.manual_seed(0)
    module = build_layer(wl, torch.float64)
    with torch.no_grad():  # make every parameter matter: no zero biases
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(batch, channels, h, w, dtype=torch.float64, requires_grad=True)
    side = {
        n: torch.randn(batch, c, h, w, dtype=torch.float64, requires_grad=True) for n, c in wl.side_channels.items()
    }
    return module, x, side


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_chunkconv_equals_the_direct_implementation(layer, chunk_size):
    module, x, side = _tiny(layer)
    leaves = [x, *side.values(), *module.parameters()]
    names = ["x", *side, *(n for n, _ in module.named_parameters())]
    expected = module.direct(x, **side)
    got = module.chunked(x, chunk_size=chunk_size, **side)
    torch.testing.assert_close(got, expected, msg=lambda m: f"{layer} output: {m}")
    grad_out = torch.randn_like(expected)
    want = torch.autograd.grad(expected, leaves, grad_out, allow_unused=True)
    have = torch.autograd.grad(got, leaves, grad_out, allow_unused=True)
    for name, g, w in zip(names, have, want):
        assert (g is None) == (w is None), f"{layer}: gradient of {name} is {g} vs direct {w}"
        if w is not None:
            torch.testing.assert_close(g, w, msg=lambda m, name=name: f"{layer} gradient of {name}: {m}")


def _gaussian(k: int, sigma: float) -> torch.Tensor:
    r = torch.arange(k, dtype=torch.float64) - k // 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return g / g.sum()


def _depthwise(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    c, k = x.shape[1], kernel.shape[-1]
    return F.conv2d(x, kernel.expand(c, 1, k, k), padding=k // 2, groups=c)


def test_direct_implementations_reduce_to_a_static_conv_for_a_constant_kernel():
    with torch.no_grad():
        # KPN: zero predictor weights, logits in the bias -> softmax(bias) everywhere
        kpn, x, side = _tiny("kpn")
        kpn.predictor.weight.zero_()
        expected = _depthwise(x, kpn.predictor.bias.softmax(0).view(1, 1, 3, 3))
        torch.testing.assert_close(kpn.direct(x, **side), expected)
        # PAC: a constant guide -> every Gaussian factor is 1 -> F.conv2d with the static weight
        pac, x, _ = _tiny("pac")
        guide = torch.full((2, 2, 9, 7), 0.3, dtype=torch.float64)
        torch.testing.assert_close(pac.direct(x, guide), F.conv2d(x, pac.weight, pac.bias, padding=1))
        # PSF: a1 = 0 -> the same Gaussian of width exp(a0) everywhere
        psf, x, _ = _tiny("psf")
        psf.psf.coefficients.copy_(torch.tensor([0.2, 0.0, 0.0, 0.0]))
        torch.testing.assert_close(psf.direct(x), _depthwise(x, _gaussian(5, math.exp(0.2)).view(1, 1, 5, 5)))
        # involution: zero reduce weights -> the kernel is span(relu(BN(0))), one per group of 16 channels
        inv, x, _ = _tiny("involution")
        inv.reduce.weight.zero_()
        bn = inv.norm
        hidden = F.relu(bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps))
        kernels = inv.span(hidden).view(2, 1, 3, 3).repeat_interleave(16, dim=0)
        torch.testing.assert_close(inv.direct(x), F.conv2d(x, kernels, padding=1, groups=32))
        # DCN mask: zero side-conv weights -> sigmoid(bias) per tap -> a conv with the masked weight
        dcn, x, side = _tiny("dcn-mask")
        dcn.mask.weight.zero_()
        masked = dcn.weight * torch.sigmoid(dcn.mask.bias).view(1, 1, 3, 3)
        torch.testing.assert_close(dcn.direct(x, **side), F.conv2d(x, masked, dcn.bias, padding=1))


def test_psf_is_centred_on_the_image():
    # sharp (sigma ~ 0.05 px) at the image centre, wide elsewhere; the direct PSF's positions are
    # centred there (row and column tilts a2, a3 make chunkconv's test above tell rows from columns)
    psf, _, _ = _tiny("psf", h=5, w=9, batch=1)
    x = torch.randn(1, 2, 5, 9, dtype=torch.float64)
    with torch.no_grad():
        psf.psf.coefficients.copy_(torch.tensor([-3.0, 40.0, 0.0, 0.0]))
        y = psf.direct(x)
    torch.testing.assert_close(y[0, :, 2, 4], x[0, :, 2, 4])
    assert not torch.allclose(y[0, :, 2, 3], x[0, :, 2, 3])


def test_the_benchmarked_workloads_are_stated_in_the_repository():
    full = {wl.name: wl for wl in workloads()}
    assert {wl.size for wl in full.values()} == {256, 1024, 2048}
    for layer in LAYERS:
        assert full[f"{layer}-256"].budget == "auto" and full[f"{layer}-1024"].budget == "1GB"
    inv = full["involution-256"]
    assert inv.channels == 32 and inv.kwargs["kernel_size"] == 7  # G = C / 16 = 2
    with pytest.raises(ValueError, match=r"^Invalid value for `layers`"):
        workloads(("nope",))


def test_quick_layer_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "results"
    code = main(["layers", "--quick", "--repeats", "1", "--threads", "1", "--out", str(out), "--name", "quick",
                 "--memory-limit", "512MB"])  # fmt: skip
    assert code == 0
    doc = json.loads((out / "quick.json").read_text())
    assert doc["suite"] == "layers" and doc["isolated"]
    assert {r["workload"]["layer"] for r in doc["measurements"]} == set(LAYERS)
    for r in doc["measurements"]:
        for method in ("direct", "chunkconv"):
            m = r["methods"][method]
            assert m["status"] == "ok", (r["workload"]["name"], method, m)
            assert m["median_s"] > 0 and m["peak_bytes"] > 0
    page = (out / "quick.md").read_text()
    assert "| layer |" in page and "kpn" in page and "involution" in page


def test_a_direct_implementation_over_the_cap_is_tried_once_and_reads_out_of_memory(tmp_path):
    from benchmarks.layers_cpu import LayerSettings, run_layers
    from benchmarks.report import render_layers_run

    # involution, 2 x 32 channels: 1.9 MiB at 16 px, so ~363 MiB predicted at 224 px, over a 288 MB cap.
    # chunkconv's process grows by 170-210 MiB of address space (VmSize) at 192 px with a 64 MB budget
    # (its allocator peak: 54 MiB), so a cap much nearer that is flaky (a 160 MB cap at 192 px was)
    settings = LayerSettings(layers=("involution",), quick=True, sizes=(16, 224), budget="64MB", repeats=1,
                             memory_limit=288 * 2**20, threads=1)  # fmt: skip
    doc = run_layers(settings, tmp_path / "run.json", log=lambda _: None)
    small, large = doc["measurements"]
    assert small["direct_attempt"] == "measured" and small["methods"]["direct"]["status"] == "ok"
    assert large["direct_attempt"] == "once under the cap"
    assert large["direct_predicted_bytes"] > 288 * 2**20
    assert large["methods"]["direct"]["status"] == "oom", large["methods"]["direct"]
    assert large["methods"]["chunkconv"]["status"] == "ok", large["methods"]["chunkconv"]  # 64 MB budget
    page = render_layers_run(doc)
    assert "out of memory under the 288.00 MiB cap" in page and "(extrapolated)" in page


def test_an_untracked_case_reports_the_resident_set():
    from benchmarks.layers_cpu import LayerCase

    wl = workloads(("psf",), quick=True, sizes=(16,))[0]
    result = LayerCase(wl, ("chunkconv",), repeats=1, track=False).run()
    r = result["methods"]["chunkconv"]
    assert result["status"] == "ok" and r["status"] == "ok" and r["median_s"] > 0
    assert r["peak_bytes"] is None and r["rss_peak_bytes"] is not None and r["memory_message"].startswith("not tracked")


def test_a_timed_call_that_fails_marks_its_method_failed_and_keeps_the_case(monkeypatch):
    # a later call running out of memory under the cap (the first passed) must not kill the child
    from benchmarks import layers_cpu
    from benchmarks.layers_cpu import LayerCase

    real = layers_cpu.build_layer

    def flaky_layer(wl, dtype):
        layer = real(wl, dtype)
        calls, chunked = [], layer.chunked

        def second_call_fails(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4096 bytes")
            return chunked(*args, **kwargs)

        layer.chunked = second_call_fails
        return layer

    monkeypatch.setattr(layers_cpu, "build_layer", flaky_layer)
    wl = workloads(("kpn",), quick=True, sizes=(16,))[0]
    result = LayerCase(wl, ("direct", "chunkconv"), repeats=2).run()
    assert result["methods"]["direct"]["status"] == "ok"
    failed = result["methods"]["chunkconv"]
    assert failed["status"] == "oom" and "can't allocate memory" in failed["message"]
    assert result["status"] == "oom"  # so that an isolating worker replaces its process
