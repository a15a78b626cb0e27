"""Layers pickled by chunkconv 0.1.0 still load, compute what they computed, and keep their options.

``tests/fixtures/layers-0.1.0.pkl`` was written by ``tests/fixtures/make_layers_pickle.py`` run on
0.1.0's code (main at 8604231), before the options became one object on the layer.
"""

import pickle
from pathlib import Path

import torch

import chunkconv

FIXTURE = Path(__file__).parent / "fixtures" / "layers-0.1.0.pkl"


def _load() -> dict:
    with FIXTURE.open("rb") as f:
        return pickle.load(f)


def test_fixture_was_written_by_the_previous_release():
    assert _load()["version"] == "0.1.0"


def test_layers_from_0_1_compute_what_they_computed():
    blob = _load()
    layers, x, want = blob["layers"], blob["inputs"], blob["outputs"]
    with torch.no_grad():
        got = {
            "full": layers["full"](x["x2"]),
            "modulated": layers["modulated"](x["x2"]),
            "shared": layers["shared"](x["x1"]),
            "features": layers["features"](x["x1"], features=x["f1"]),
        }
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)


def test_layers_from_0_1_keep_their_options():
    layers = _load()["layers"]
    full, modulated, shared, features = (layers[k] for k in ("full", "modulated", "shared", "features"))
    assert (full.budget, full.chunk_size, full.path) == ("64MB", 50, "generic")
    assert (modulated.kernel, modulated.progress, modulated.budget) == ("modulated", False, "auto")
    assert (shared.kernel, shared.kernel_groups, shared.allow_batch_coupled) == ("shared", 2, True)
    assert features.inputs == ("patches", "features")
    assert isinstance(full, chunkconv.DynamicConv2d) and full.kernel_size == (3, 3)
    full.chunk_size = 7
    assert full.plan((2, 3, 6, 6), training=False).chunk_size == 7
    assert "chunk_size=7" in repr(full)


def test_the_0_1_option_types_stay_importable():
    from chunkconv.call import CallOptions
    from chunkconv.geometry import ConvSpec

    assert isinstance(_load()["layers"]["full"].spec, ConvSpec)
    assert CallOptions(budget="1GB").budget == "1GB"
