"""Benchmark runner: chunkconv against the forum recipe, einsum, checkpointing and a static conv.

``python -m benchmarks --help``. Modules: ``workloads`` (shapes), ``methods`` (what runs, and its
shape-based memory estimate), ``measure`` (time and peak memory of one case), ``isolation`` (CPU
cases in an address-space-capped child process), ``runner`` (suites -> JSON), ``report``
(JSON -> Markdown), ``plot`` (JSON -> PNG). See docs/benchmarks.md.
"""
