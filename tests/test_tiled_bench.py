"""``python -m benchmarks tiled`` end to end at a tiny size, its children run in this process (seconds)."""

import json
from pathlib import Path

import pytest

pytest.importorskip("dask.array")
pytest.importorskip("zarr")

import benchmarks.tiled as bench  # noqa: E402
from benchmarks.__main__ import main  # noqa: E402


def test_tiled_benchmark_writes_its_table(tmp_path, monkeypatch):
    monkeypatch.setattr(
        bench,
        "_measure",
        lambda store, chunk, repeats, tmp: bench._child(store, f"{tmp}/out-{chunk}.zarr", chunk, repeats),
    )
    assert main(["tiled", "--size", "96", "--chunks", "32,48", "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "tiled.json").read_text())["rows"]
    assert [r["chunk"] for r in rows] == [0, 32, 48] and [r["tiles"] for r in rows] == [1, 9, 4]
    assert rows[1]["overhead"] > rows[2]["overhead"] > 1.0  # smaller chunks read more halo
    assert all(r["max_abs_diff"] < 1e-5 for r in rows[1:])  # float32: the same numbers up to rounding
    table = (tmp_path / "tiled.md").read_text()
    assert "| tiled, chunks 32 px | 9 |" in table and "| in-memory | 1 | 1.000x |" in table


def test_dask_extra_pins_dask_and_distributed_to_one_release():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    pins = {r.split("==")[0]: r.split("==")[1] for r in extras["dask"]}
    assert set(pins) == {"dask[array]", "distributed"} and len(set(pins.values())) == 1
    assert {"dask[array]==" + pins["distributed"], "distributed==" + pins["distributed"], "zarr>=3"} <= set(
        extras["test"]
    )
