"""The benchmark runner's smoke configuration, end to end on the CPU (seconds): it must not rot.

Benchmarks report, they do not assert timings: these tests check that every method computes the
layer, that a run writes its JSON, Markdown and plot, and that running out of memory (a real
allocation failure under the child's address-space cap, and a case skipped by its estimate)
becomes a result instead of a crash.
"""

from __future__ import annotations

import json

import pytest
import torch

import chunkconv
from benchmarks.__main__ import main
from benchmarks.isolation import IsolatedWorker
from benchmarks.measure import Case, _layer
from benchmarks.methods import Method, default_methods
from benchmarks.runner import Settings, run
from benchmarks.workloads import ANCHORS, Workload


def test_every_method_computes_the_layer():
    wl = Workload("t", batch=2, channels=3, size=7, out_channels=4, hidden=5)
    torch.manual_seed(0)
    generator, bias = _layer(wl, torch.device("cpu"), torch.float64)
    x = torch.randn(wl.batch, wl.channels, wl.size, wl.size, dtype=torch.float64, requires_grad=True)
    expected = chunkconv.dynamic_conv_reference(
        x, generator, out_channels=wl.out_channels, kernel_size=wl.kernel, padding=wl.padding, bias=bias
    )
    (gx,) = torch.autograd.grad(expected.square().sum(), x)
    methods = [m for m in default_methods("cpu") if m.kind != "static"]
    methods += [Method("chunkconv", chunk_size=5), Method("chunkconv", budget="2MB")]
    for method in methods:
        fn, _ = method.build(wl, generator, bias)
        y = fn(x)
        torch.testing.assert_close(y, expected, msg=lambda m, method=method: f"{method.label}: {m}")
        (g,) = torch.autograd.grad(y.square().sum(), x)
        torch.testing.assert_close(g, gx, msg=lambda m, method=method: f"{method.label} input grad: {m}")
    fn, _ = Method("static").build(wl, generator, bias)
    assert fn(x).shape == expected.shape and fn(x).dtype == torch.float64


def test_anchor_workloads_keep_anchors_md_shapes():
    a, b, c, cpu = (ANCHORS[n] for n in ("A", "B", "C", "CPU-A"))
    assert (a.batch, a.channels, a.size, a.out_channels, a.hidden, a.kernel) == (8, 32, 256, 32, 64, 3)
    assert (b.batch, b.channels, b.size, b.out_channels, b.hidden, b.kernel) == (1, 16, 2048, 16, 32, 3)
    assert (c.batch, c.channels, c.size, c.out_channels, c.hidden, c.kernel) == (4, 64, 128, 64, 64, 5)
    assert (cpu.batch, cpu.channels, cpu.size, cpu.out_channels, cpu.hidden, cpu.kernel) == (2, 16, 256, 16, 32, 3)
    # The estimate reproduces the H100 peaks measured for the anchor workloads (benchmarks/workloads.py) within 10% (workload B inference: forum 76.8 GB, einsum 42.2 GB).
    assert Method("forum").estimate(b, "fwd", 4) == pytest.approx(76.8e9, rel=0.1)
    assert Method("einsum").estimate(b, "fwd", 4) == pytest.approx(42.2e9, rel=0.1)
    assert Method("einsum").estimate(a, "fwd+bwd", 4) == pytest.approx(38.8e9, rel=0.1)


def test_smoke_run_writes_json_markdown_and_report(tmp_path):
    out = tmp_path / "results"
    code = main(["--suite", "smoke", "--sizes", "8", "--repeats", "1", "--threads", "1", "--out", str(out),
                 "--name", "smoke", "--note", "test run"])  # fmt: skip
    assert code == 0
    doc = json.loads((out / "smoke.json").read_text())
    assert doc["device"] == "cpu" and doc["isolated"] and doc["machine"]["torch"] == torch.__version__
    assert doc["note"] == "test run"
    records = doc["measurements"]
    labels = {m.label for m in default_methods("cpu")}
    assert {(r["method"]["label"], r["mode"]) for r in records} == {(label, mode) for label in labels
                                                                     for mode in ("fwd", "fwd+bwd")}  # fmt: skip
    for r in records:
        assert r["status"] == "ok", r
        assert r["median_s"] > 0 and r["peak_bytes"] > 0 and len(r["times_s"]) == 1
    # the layer's output alone is 1 x 2 x 8 x 8 float32 = 512 bytes, and every method allocates it
    assert min(r["peak_bytes"] for r in records) >= 512
    page = (out / "smoke.md").read_text()
    assert "Summary: chunkconv against the best unchunked recipe" in page
    assert all(label in page for label in labels)

    target = tmp_path / "docs" / "benchmarks.md"
    assert main(["report", str(out / "smoke.json"), "--markdown", str(target)]) == 0
    assert "smoke-8" in target.read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "smoke.png").stat().st_size > 0 and (tmp_path / "docs" / "img" / "smoke.png").stat().st_size > 0
    assert "](img/smoke.png)" in target.read_text()


def test_out_of_memory_in_the_capped_child_is_a_result():
    # The forum recipe needs ~300 MB here (151 MB of weights, a product as large); the child may add 64 MB.
    wl = Workload("oom", batch=1, channels=16, size=128, out_channels=16, hidden=32)
    with IsolatedWorker(limit_bytes=64 * 2**20, threads=1) as worker:
        failed = worker.run(Case(wl, Method("forum"), "fwd", "float32", "cpu", repeats=1))
        assert failed["status"] == "oom", failed
        assert "memory" in failed["message"]
        # the child that failed is replaced by a fresh one, and chunkconv fits in its cap
        ok = worker.run(Case(wl, Method("chunkconv", budget="16MB"), "fwd", "float32", "cpu", repeats=1))
        assert ok["status"] == "ok", ok
        assert ok["peak_bytes"] < 64 * 2**20
        assert ok["retained_bytes"] < 64 * 2**20


def test_a_case_over_the_limit_is_skipped_with_its_estimate(tmp_path):
    settings = Settings(suite="smoke", sizes=(16, 32), repeats=1, isolate=False, memory_limit=100_000,
                        modes=("fwd",), methods=(Method("forum"), Method("static")))  # fmt: skip
    doc = run(settings, tmp_path / "run.json", log=lambda _: None)
    status = {(r["workload"]["size"], r["method"]["label"]): r for r in doc["measurements"]}
    assert status[(16, "static conv")]["status"] == "ok"
    forum = status[(16, "forum")]
    assert forum["status"] == "skipped" and forum["message"].startswith("would need ~")
    assert forum["estimate_bytes"] > 100_000
    assert json.loads((tmp_path / "run.json").read_text())["measurements"][0]["status"] == "skipped"
    from benchmarks.report import render_run

    assert "would need ~" in render_run(doc)


def test_cuda_without_a_device_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match=r"--device cuda was asked for"):
        run(Settings(device="cuda"), tmp_path / "run.json", log=lambda _: None)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_smoke_run_on_cuda(tmp_path):
    settings = Settings(device="cuda", suite="smoke", sizes=(8,), repeats=1, dtypes=("float32", "bfloat16"))
    doc = run(settings, tmp_path / "run.json", log=lambda _: None)
    assert doc["machine"]["gpu"] and not doc["isolated"]
    assert all(r["status"] == "ok" and r["peak_bytes"] > 0 for r in doc["measurements"]), doc["measurements"]


def test_roofline_quick_run_writes_fractions_of_the_gemm_rate(tmp_path, capsys):
    from benchmarks.roofline import QUICK_WORKLOADS, forward_flops

    out = tmp_path / "rl"
    assert main(["roofline", "--quick", "--repeats", "1", "--threads", "1", "--out", str(out), "--name", "rl"]) == 0
    doc = json.loads((out / "rl.json").read_text())
    assert doc["suite"] == "roofline" and len(doc["records"]) == len(QUICK_WORKLOADS) * 2 * 2
    for r in doc["records"]:
        assert r["forward_flops"] == forward_flops(
            Workload(
                **{
                    k: r["workload"][k]
                    for k in ("name", "batch", "channels", "size", "out_channels", "hidden", "kernel")
                }
            )
        )
        assert r["seconds"] > 0 and 0 < r["useful_fraction"] <= r["executed_fraction"]
    fc = doc["first_call"]
    assert fc["depth"] == 4 and fc["first"] > 0 and fc["warm"] > 0 and fc["ratio"] == fc["first"] / fc["warm"]
    text = (out / "rl.md").read_text()
    assert "| workload | GFLOP / fwd |" in text and "First call: a fresh 4-layer model" in text


def test_forward_flops_is_the_body_plus_the_bilinear_contraction():
    from benchmarks.roofline import forward_flops

    cpu_a = ANCHORS["CPU-A"]  # the count: 20.5 GFLOP
    assert forward_flops(cpu_a) == 2 * 65536 * (2 * 144 * 32 + 2 * 144 * 16 * 32)
    assert round(forward_flops(cpu_a) / 1e9, 1) == 20.5


def test_grid_sample_baseline_is_a_deformable_convolution():
    # the user-written baseline of `benchmarks deform` against chunkconv's float64 oracle, with and without a mask
    from benchmarks.deform import check_agreement, grid_sample_deform_conv2d
    from chunkconv.deform_reference import deform_conv_reference

    torch.manual_seed(3)
    f64 = torch.float64
    x = torch.randn(1, 6, 5, 7, dtype=f64, requires_grad=True)
    offset = (torch.randn(1, 3 * 4 * 2, 5, 3, dtype=f64) * 3).requires_grad_()  # 3 offset groups, 2x2 taps
    weight = torch.randn(4, 3, 2, 2, dtype=f64, requires_grad=True)  # 2 conv groups
    geometry = {"stride": (1, 2), "padding": (1, 0), "dilation": (2, 1)}
    for mask in (None, torch.rand(1, 3 * 4, 5, 3, dtype=f64, requires_grad=True)):
        leaves = [x, offset, weight] + ([] if mask is None else [mask])
        expected = deform_conv_reference(x, offset, weight, None, mask=mask, **geometry)
        got = grid_sample_deform_conv2d(x, offset, weight, None, mask=mask, **geometry)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        grad = torch.randn_like(expected)
        for g, e in zip(torch.autograd.grad(got, leaves, grad), torch.autograd.grad(expected, leaves, grad)):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-12)
    errors = check_agreement("cpu", ("chunkconv", "grid_sample"))
    assert set(errors) == {"chunkconv", "grid_sample"} and max(errors.values()) < 1e-12, errors


def test_deform_quick_run_writes_its_table(tmp_path):
    from benchmarks.deform import method_unavailable

    out = tmp_path / "results"
    code = main(["deform", "--quick", "--repeats", "1", "--threads", "1", "--out", str(out), "--name", "quick",
                 "--memory-limit", "512MB"])  # fmt: skip
    assert code == 0
    doc = json.loads((out / "quick.json").read_text())
    sizes = [r["workload"]["size"] for r in doc["measurements"]]
    assert doc["suite"] == "deform" and doc["isolated"] and sizes == [12, 24]
    assert doc["measurements"][1]["workload"]["budget"] == "256KB"
    missing = method_unavailable("torchvision")
    ran = ("chunkconv", "grid_sample") if missing else ("chunkconv", "grid_sample", "torchvision")
    assert set(doc["agreement"]) == set(ran) and max(doc["agreement"].values()) < 1e-10
    for r in doc["measurements"]:
        for method in ran:
            m = r["methods"][method]
            assert m["status"] == "ok", (r["workload"]["name"], method, m)
            assert m["median_s"] > 0 and m["peak_bytes"] > 0
        if missing:  # skipped with the reason, never an error
            assert r["methods"]["torchvision"]["status"] == "skipped" and doc["skipped"]["torchvision"] == missing
    chunked = doc["measurements"][1]["methods"]["chunkconv"]
    assert chunked["peak_bytes"] <= 256_000 and "chunks of" in chunked["info"]["plan_summary"]
    page = (out / "quick.md").read_text()
    assert "| image | method | time | peak | time / torchvision |" in page and "| 24x24 | grid_sample |" in page
    target = tmp_path / "bench.md"
    assert main(["report", str(out / "quick.json"), "--markdown", str(target), "--no-plot"]) == 0
    assert "Deformable convolution on cpu" in target.read_text()


def test_deform_method_over_the_cap_is_tried_once_and_reads_out_of_memory(tmp_path):
    # grid_sample with 4 channels: ~0.7 KB per pixel at 16 px, so ~290 MB predicted at 640 px, over a 128 MB cap;
    # at 1024 px the inputs alone do not fit (the child died making them, now and then at 640 px)
    for size in (640, 1024):
        _check_over_the_cap(tmp_path, size)


def _check_over_the_cap(tmp_path, size):
    from benchmarks.deform import DeformSettings, render_deform_run, run_deform

    settings = DeformSettings(quick=True, sizes=(16, size), methods=("grid_sample",), repeats=1, threads=1,
                              memory_limit=128 * 2**20)  # fmt: skip
    doc = run_deform(settings, tmp_path / f"cap{size}.json", log=lambda _: None)
    small, large = doc["measurements"]
    assert small["methods"]["grid_sample"]["status"] == "ok"
    assert large["attempt"]["grid_sample"] == "once under the cap"
    assert large["predicted_bytes"]["grid_sample"] > 128 * 2**20
    assert large["methods"]["grid_sample"]["status"] == "oom", large["methods"]["grid_sample"]
    assert "out of memory under the 128.00 MiB cap" in render_deform_run(doc)


def test_deform_on_cuda_without_a_device_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from benchmarks.deform import DeformSettings, run_deform

    with pytest.raises(RuntimeError, match=r"--device cuda was asked for"):
        run_deform(DeformSettings(device="cuda", quick=True), tmp_path / "run.json", log=lambda _: None)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_deform_quick_run_on_cuda(tmp_path):
    from benchmarks.deform import DeformSettings, run_deform

    doc = run_deform(DeformSettings(device="cuda", quick=True, repeats=1), tmp_path / "run.json", log=lambda _: None)
    assert doc["machine"]["gpu"] and not doc["isolated"] and max(doc["agreement"].values()) < 1e-10
    for r in doc["measurements"]:
        for method in ("chunkconv", "grid_sample"):
            assert r["methods"][method]["status"] == "ok" and r["methods"][method]["peak_bytes"] > 0, r
