"""chunkconv.tiled: a module over a Dask array, tile by tile, equals the module in memory (float64, 1e-12)."""

import math
import subprocess
import sys
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import chunkconv
from chunkconv.gather import position_frame

da = pytest.importorskip("dask.array")
np = pytest.importorskip("numpy")
import dask  # noqa: E402

F64 = torch.float64
RTOL = 1e-12
# bounded example counts (the file runs in well under a minute), more under HYPOTHESIS_PROFILE=thorough
SCALE = max(1, settings.default.max_examples // 40)


class Gen(nn.Module):
    """A generator over every stream a layer reads: rows concatenated, one linear layer, tanh."""

    def __init__(self, width, out):
        super().__init__()
        self.lin = nn.Linear(width, out, dtype=F64)

    def forward(self, *rows):
        return torch.tanh(self.lin(torch.cat(rows, 1)))


def dynamic(ndim, cin, cout, k, *, form="full", inputs=("patches",), guide=0, features=0, **kw):
    """A chunkconv layer whose generator reads ``inputs`` (``guide`` / ``features``: their channels)."""
    K = math.prod(k)
    widths = {"patches": cin * K, "guide": guide * K, "features": features, "positions": ndim}
    outs = {"full": cout * cin * K, "modulated": K, "shared": K}
    gen = Gen(sum(widths[i] for i in inputs), outs[form])
    return chunkconv.DynamicConv(gen, cin, cout, k, kernel=form, inputs=inputs, chunk_size=13, dtype=F64, **kw)


def assert_close(got, want):
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max()) if want.size else 0.0
    assert err <= RTOL * scale, f"max |tiled - in memory| = {err:.3g} (scale {scale:.3g})"


@st.composite
def chunkings(draw, n, label):
    """A chunking of an axis of ``n``: one chunk, uneven chunks, tiny ones, a last chunk of one element."""
    how = draw(st.sampled_from(["one", "uneven", "tiny", "last-one"]), label=f"{label} chunking")
    if how == "one" or n < 3:
        return (n,)
    if how == "tiny":
        size = draw(st.integers(1, 3), label=f"{label} chunk")
        chunks = [size] * (n // size) + ([n % size] if n % size else [])
        return tuple(chunks)
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), min_size=1, max_size=4), label=f"{label} cuts"))
    if how == "last-one":
        cuts = sorted(set(cuts) | {n - 1})
    bounds = [0, *cuts, n]
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


@st.composite
def conv_layer(draw, ndim, cin, cout):
    k = draw(st.integers(1, 4), label="kernel")
    stride = draw(st.integers(1, 2), label="stride")
    dilation = draw(st.integers(1, 2), label="dilation")
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate"]), label="padding_mode")
    options = ["int", "valid"] + (["same"] if stride == 1 else [])
    how = draw(st.sampled_from(options), label="padding")
    padding = draw(st.integers(0, dilation * (k - 1)), label="pad") if how == "int" else how
    return dict(k=(k,) * ndim, stride=stride, dilation=dilation, padding=padding, padding_mode=mode)


@st.composite
def stacks(draw, ndim, chunkconv_layers=True):
    """A random nn.Sequential of convolutions, chunkconv layers, pools and pointwise layers, and its side inputs."""
    n_layers = draw(st.integers(1, 3), label="layers")
    c = draw(st.integers(1, 2), label="in channels")
    layers, sides = [], {}
    cin = c
    for i in range(n_layers):
        kind = draw(
            st.sampled_from(
                ["conv", "dynamic", "maxpool", "avgpool", "pointwise"]
                if chunkconv_layers
                else ["conv", "maxpool", "avgpool", "pointwise"]
            ),
            label=f"layer {i}",
        )
        if kind in ("conv", "dynamic"):
            cout = draw(st.integers(1, 3), label="out channels")
            g = draw(conv_layer(ndim, cin, cout))
            if kind == "conv":
                conv_cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1]
                layers.append(
                    conv_cls(
                        cin,
                        cout,
                        g["k"],
                        g["stride"],
                        g["padding"],
                        g["dilation"],
                        padding_mode=g["padding_mode"],
                        dtype=F64,
                    )
                )
            else:
                form = draw(st.sampled_from(["full", "modulated", "shared"]), label="form")
                if form == "shared":
                    cout = cin
                inputs = ["patches"]
                extra = {}
                only_pointwise_before = all(isinstance(m, (nn.ReLU, nn.Tanh)) for m in layers)
                if only_pointwise_before and "guide" not in sides and draw(st.booleans(), label="guide"):
                    inputs.append("guide")
                    extra["guide"] = sides["guide"] = draw(st.integers(1, 2), label="guide channels")
                if i == n_layers - 1 and draw(st.booleans(), label="features"):
                    inputs.append("features")
                    extra["features"] = sides["features"] = draw(st.integers(1, 2), label="feature channels")
                if draw(st.booleans(), label="positions"):
                    inputs.append("positions")
                layers.append(
                    dynamic(
                        ndim,
                        cin,
                        cout,
                        g["k"],
                        form=form,
                        inputs=tuple(inputs),
                        stride=g["stride"],
                        padding=g["padding"],
                        dilation=g["dilation"],
                        padding_mode=g["padding_mode"],
                        **extra,
                    )
                )
            cin = cout
        elif kind in ("maxpool", "avgpool"):
            k = draw(st.integers(1, 3), label="pool kernel")
            stride = draw(st.integers(1, 2), label="pool stride")
            pad = draw(st.integers(0, k // 2), label="pool padding")
            if kind == "maxpool":
                cls = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[ndim - 1]
                layers.append(cls(k, stride, pad, dilation=draw(st.integers(1, 2), label="pool dilation")))
            else:
                cls = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[ndim - 1]
                layers.append(cls(k, stride, pad, count_include_pad=draw(st.booleans(), label="count pad")))
        else:
            layers.append(draw(st.sampled_from([nn.ReLU(), nn.Tanh()]), label="pointwise"))
    return nn.Sequential(*layers).eval(), c, sides


MAX_SIDE = {1: 40, 2: 18, 3: 9}


@st.composite
def cases(draw, chunkconv_layers=True):
    ndim = draw(st.integers(1, 3), label="ndim")
    net, c, sides = draw(stacks(ndim, chunkconv_layers))
    field = chunkconv.receptive_field(net, ndim)
    spatial = tuple(draw(st.integers(4, MAX_SIDE[ndim]), label=f"size {a}") for a in range(ndim))
    out = field.out_shape(spatial)
    if out is None:  # the stack cannot run on this input at all: grow it until it can
        spatial = tuple(max(s, r + 2) for s, r in zip(spatial, field.size))
        out = field.out_shape(spatial)
    if out is None:
        spatial = tuple(2 * r + 4 for r in field.size)
        out = field.out_shape(spatial)
    n = draw(st.integers(1, 2), label="N")
    chunks = (draw(chunkings(n, "N")), (c,), *(draw(chunkings(s, f"axis {a}")) for a, s in enumerate(spatial)))
    return net, (n, c, *spatial), chunks, sides, out


def _inputs(shape, chunks, sides, out):
    rng = np.random.default_rng(0)
    xn = rng.standard_normal(shape)
    kw_np, kw_da = {}, {}
    if "guide" in sides:
        kw_np["guide"] = rng.standard_normal((shape[0], sides["guide"], *shape[2:]))
        kw_da["guide"] = da.from_array(kw_np["guide"], chunks=(chunks[0], 1, *chunks[2:]))
    if "features" in sides:
        kw_np["features"] = rng.standard_normal((shape[0], sides["features"], *out))
        kw_da["features"] = da.from_array(kw_np["features"], chunks=(1, 1, *(max(1, o // 2) for o in out)))
    return xn, da.from_array(xn, chunks=chunks), kw_np, kw_da


def _in_memory(net, xn, kw_np):
    with torch.no_grad():
        y = torch.from_numpy(xn)
        for layer in net:
            kw = {k: torch.from_numpy(v) for k, v in kw_np.items() if k in getattr(layer, "inputs", ())}
            y = layer(y, **kw)
    return y.numpy()


@settings(max_examples=30 * SCALE)
@given(case=cases())
def test_tiled_equals_the_module_in_memory(case):
    net, shape, chunks, sides, out = case
    xn, x, kw_np, kw_da = _inputs(shape, chunks, sides, out)
    want = _in_memory(net, xn, kw_np)
    y = chunkconv.tiled(net, x, **kw_da)
    assert y.shape == want.shape and y.dtype == want.dtype
    assert_close(y.compute(scheduler="synchronous"), want)
    assert_close(y.compute(scheduler="threads", num_workers=2), want)


@settings(max_examples=15 * SCALE)
@given(case=cases(chunkconv_layers=False))
def test_the_plan_owns_every_output_once_with_the_predicted_chunks(case):
    net, shape, chunks, _, out = case
    plan = chunkconv.tile_plan(net, shape, chunks)
    assert plan.out_shape == out
    assert tuple(sum(c) for c in plan.out_chunks) == out and all(min(c) >= 1 for c in plan.out_chunks)
    for axis, tiles in enumerate(plan.axes):
        s, (before, after) = plan.field.stride[axis], plan.halo[axis]
        assert all(c % s == 0 for c in tiles.chunks[:-1])  # chunk starts at multiples of S
        assert len(tiles.chunks) == 1 or min(tiles.chunks) >= max(before, after)
    y = chunkconv.tiled(net, da.from_array(np.zeros(shape), chunks=chunks))
    assert y.chunks[2:] == plan.out_chunks and y.chunks[0] == plan.chunks[0]


def _support(net, ndim, n):
    """The inputs the middle output reads, measured with autograd on an all-positive stack."""
    x = torch.zeros((1, 1, *(n,) * ndim), dtype=F64, requires_grad=True)
    y = net(x)
    mid = tuple(s // 2 for s in y.shape[2:])
    (g,) = torch.autograd.grad(y[(0, 0, *mid)], x)
    nz = g[0, 0].nonzero()
    return mid, nz.min(0).values.tolist(), nz.max(0).values.tolist()


@settings(max_examples=25 * SCALE)
@given(data=st.data())
def test_receptive_field_matches_the_support_autograd_measures(data):
    ndim = data.draw(st.integers(1, 2), label="ndim")
    layers = []
    for _ in range(data.draw(st.integers(1, 3), label="layers")):
        k = data.draw(st.integers(1, 4), label="kernel")
        stride, dilation = data.draw(st.integers(1, 3), label="stride"), data.draw(st.integers(1, 2), label="dil")
        pad = data.draw(st.integers(0, dilation * (k - 1)), label="pad")
        conv = (nn.Conv1d, nn.Conv2d)[ndim - 1](1, 1, k, stride, pad, dilation, bias=False, dtype=F64)
        nn.init.constant_(conv.weight, 1.0)  # positive: no cancellation hides an input
        layers.append(conv)
    net = nn.Sequential(*layers)
    rf = chunkconv.receptive_field(net, ndim)
    n = 4 * rf.size[0] + 4 * rf.stride[0] + 8
    mid, lo, hi = _support(net, ndim, n)
    for a in range(ndim):
        assert lo[a] == mid[a] * rf.stride[a] - rf.padding[a]
        assert hi[a] - lo[a] + 1 == rf.size[a]


def test_receptive_field_and_plan_print_the_algebra():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, stride=2))
    rf = chunkconv.receptive_field(net, 2)
    # S = 1*1*2*2, r = 1 + 2 + 1*1 + 2*2, P = 1 + 0 + 0
    assert (rf.stride, rf.padding, rf.size) == ((4, 4), (1, 1), (8, 8))
    assert rf.halo == ((4, 3), (4, 3))
    text = str(rf)
    assert "0 (Conv2d)" in text and "2 (MaxPool2d)" in text and "total stride S=(4, 4)" in text
    plan = rf.tile_plan((1, 3, 64, 50), ((1,), (1, 2), (30, 34), (50,)))
    assert plan.chunks == ((1,), (3,), (28, 36), (50,)) and plan.rechunked
    assert plan.out_chunks == ((7, 8), (12,)) and plan.out_shape == (15, 12)
    printed = str(plan)
    assert "channel axis is one chunk" in printed and "multiples of the total stride 4" in printed
    # tiles read [0, 28 + 3) and [28 - 4, 64): (31 + 40) / 64 along H, nothing extra along W
    assert plan.overhead == pytest.approx(71 / 64)
    assert f"{71 / 64:.3f}x" in printed


def test_chunks_smaller_than_the_halo_are_merged_and_said_so():
    net = nn.Sequential(nn.Conv1d(1, 1, 9, padding=4, dtype=F64))
    plan = chunkconv.tile_plan(net, (1, 1, 20), ((1,), (1,), (3, 3, 3, 3, 3, 5)))
    assert min(plan.chunks[2][:-1]) >= 4 and "merged" in str(plan)
    xn = np.random.default_rng(1).standard_normal((1, 1, 20))
    got = chunkconv.tiled(net, da.from_array(xn, chunks=(1, 1, 3))).compute()
    assert_close(got, _in_memory(net, xn, {}))


def test_positions_are_those_of_the_whole_image_under_a_frame():
    # the public layer inside position_frame: the tile's positions are a crop of the whole image's
    conv = dynamic(2, 1, 1, (3, 3), inputs=("patches", "positions"), padding=1)
    conv.chunk_size = 1000  # one chunk per call: one record per call
    seen = []
    conv.generator.register_forward_hook(lambda module, args, out: seen.append(args[1].clone()))
    whole = torch.zeros(1, 1, 10, 12, dtype=F64)
    conv(whole)
    ref = seen[-1].view(10, 12, 2)  # the last record: the first call also checks the generator (one more run)
    seen.clear()
    with position_frame((4, 5), (3, 6), (10, 12)):
        conv(torch.zeros(1, 1, 4, 5, dtype=F64))
        conv(torch.zeros(1, 1, 6, 6, dtype=F64))  # another shape: not the frame's tile, its own positions
    tile, other = seen[0].view(4, 5, 2), seen[1].view(6, 6, 2)
    torch.testing.assert_close(tile, ref[3:7, 6:11], rtol=0, atol=1e-15)
    assert other.min() > -1 and other.max() < 1 and not torch.allclose(other[:4, :5], tile)


def test_positions_after_a_strided_layer_are_in_that_layer_s_whole_frame():
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2, padding=1, dtype=F64),
        nn.Tanh(),
        dynamic(2, 2, 2, (3, 3), inputs=("patches", "positions"), padding=1),
    ).eval()
    xn = np.random.default_rng(2).standard_normal((1, 1, 30, 22))
    got = chunkconv.tiled(net, da.from_array(xn, chunks=(1, 1, 8, 6))).compute()
    assert_close(got, _in_memory(net, xn, {}))


def test_declared_geometry_for_a_module_chunkconv_cannot_read():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 2, 3, padding=1, dtype=F64), nn.Conv2d(2, 2, 5, padding=2, dtype=F64)

        def forward(self, x):
            return x + self.b(torch.relu(self.a(x)))

    net = Residual()
    with pytest.raises(chunkconv.NotTileLocalError, match=r"Cannot tile layer 'Residual' \(Residual\): .*halo="):
        chunkconv.tiled(net, da.zeros((1, 2, 8, 8)))
    xn = np.random.default_rng(3).standard_normal((1, 2, 33, 20))
    x = da.from_array(xn, chunks=(1, 2, 10, 7))
    assert_close(chunkconv.tiled(net, x, halo=3).compute(), _in_memory(nn.Sequential(net), xn, {}))
    pool = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, dtype=F64), nn.MaxPool2d(2))
    with pytest.raises(ValueError, match=r"declared geometry .* expected \(\d+, \d+\), ceil\(size / stride\)"):
        chunkconv.tiled(pool, x, halo=2).compute()  # the true stride is 2, declared 1
    strided = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, dtype=F64), nn.Conv2d(2, 2, 3, 2, padding=1, dtype=F64))
    # output o reads [2o - 2, 2o + 3): 2 before, 1 after the stride's 2; ceil(n / 2) outputs
    got = chunkconv.tiled(strided, x, halo=((2, 1), (2, 1)), stride=2).compute()
    assert_close(got, _in_memory(strided, xn, {}))


class Odd(nn.Module):
    def forward(self, x):
        return x


REFUSALS = [
    (nn.BatchNorm2d(1), r"'BatchNorm2d' \(BatchNorm2d\): in training mode .* call \.eval\(\) first"),
    (
        nn.Sequential(nn.Conv2d(1, 1, 3), nn.InstanceNorm2d(1)),
        r"'1' \(InstanceNorm2d\): it normalises by statistics over the spatial axes",
    ),
    (nn.GroupNorm(1, 1), r"GroupNorm.*statistics over the spatial axes"),
    (nn.LayerNorm(8), r"LayerNorm.*statistics over the spatial axes"),
    (nn.AdaptiveAvgPool2d(4), r"adaptive pooling's windows are fractions of the whole input"),
    (nn.AdaptiveMaxPool2d(4), r"adaptive pooling"),
    (
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
        r"align_corners=True places its samples by the whole input's size",
    ),
    (nn.Upsample(scale_factor=2), r"fractional stride"),
    (nn.ConvTranspose2d(1, 1, 2, 2), r"transposed convolutions have a fractional stride"),
    (nn.MaxPool2d(2, ceil_mode=True), r"ceil_mode=True adds a last window"),
    (nn.AvgPool2d(2, ceil_mode=True), r"ceil_mode=True"),
    (nn.MaxPool2d(2, return_indices=True), r"return_indices=True"),
    (nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular"), r"padding_mode='circular' wraps each border"),
    (nn.Dropout(0.1), r"in training mode Dropout draws random masks"),
    (nn.Softmax(dim=2), r"dim=2 normalises across positions"),
    (nn.Conv1d(1, 1, 3), r"it runs over 1 spatial axes, but the input has 2"),
    (nn.Sequential(nn.ReLU(), Odd()), r"'1' \(Odd\): chunkconv cannot see which inputs each of its outputs reads"),
    (nn.Flatten(), r"Flatten.*chunkconv cannot see"),
]


@pytest.mark.parametrize(
    "module, message", REFUSALS, ids=[type(m).__name__ + str(i) for i, (m, _) in enumerate(REFUSALS)]
)
def test_every_refusal_names_the_layer_and_says_why(module, message):
    x = da.zeros((1, 1, 8, 8))
    with pytest.raises(chunkconv.NotTileLocalError, match=message):
        chunkconv.tiled(module, x)
    with pytest.raises(chunkconv.NotTileLocalError, match=message):
        chunkconv.receptive_field(module, 2)  # refused from the module alone, before any array


def test_attention_and_batch_coupled_generators_are_refused():
    with pytest.raises(chunkconv.NotTileLocalError, match=r"attention mixes every position with every other"):
        chunkconv.receptive_field(nn.MultiheadAttention(4, 1), 2)
    conv = dynamic(2, 1, 1, (3, 3), padding=1)
    conv.allow_batch_coupled = True
    with pytest.raises(chunkconv.NotTileLocalError, match=r"allow_batch_coupled=True: its generator's rows interact"):
        chunkconv.receptive_field(conv, 2)


def test_side_inputs_are_refused_where_their_frame_is_not_the_module_s():
    late_guide = nn.Sequential(
        nn.Conv2d(1, 1, 3, dtype=F64), dynamic(2, 1, 1, (3, 3), inputs=("patches", "guide"), guide=1)
    )
    with pytest.raises(
        chunkconv.NotTileLocalError, match=r"'1' \(DynamicConv\): a guide is windowed like the layer's input"
    ):
        chunkconv.receptive_field(late_guide, 2)
    early_features = nn.Sequential(
        dynamic(2, 1, 1, (3, 3), inputs=("patches", "features"), features=1), nn.MaxPool2d(2)
    )
    with pytest.raises(chunkconv.NotTileLocalError, match=r"features are given at the layer's output resolution"):
        chunkconv.receptive_field(early_features, 2)
    inner = dynamic(2, 1, 1, (3, 3), inputs=("patches", "positions"))
    with pytest.raises(chunkconv.NotTileLocalError, match=r"inside a module of declared geometry"):
        chunkconv.receptive_field(nn.Sequential(inner), 2, halo=1)


def test_argument_errors_come_before_any_work():
    net = dynamic(2, 1, 1, (3, 3), inputs=("patches", "guide"), guide=1, padding=1)
    x = da.zeros((1, 1, 8, 8), dtype="f8")
    with pytest.raises(
        ValueError, match=r"^Layer 'DynamicConv' reads 'guide' \(its `inputs`\), so tiled\(\) needs guide="
    ):
        chunkconv.tiled(net, x)
    with pytest.raises(ValueError, match=r"^Got features=, but no layer of the module names 'features'"):
        chunkconv.tiled(net, x, guide=da.zeros((1, 1, 8, 8)), features=da.zeros((1, 1, 8, 8)))
    with pytest.raises(ValueError, match=r"^Expected a guide \(N, G, \*spatial\) with the input's N and spatial size"):
        chunkconv.tiled(net, x, guide=da.zeros((1, 1, 8, 9)))
    with pytest.raises(TypeError, match=r"^Invalid type for `x`; expected a dask.array.Array"):
        chunkconv.tiled(net, np.zeros((1, 1, 8, 8)))
    with pytest.raises(TypeError, match=r"^Invalid type for `guide`; expected a dask.array.Array"):
        chunkconv.tiled(net, x, guide=np.zeros((1, 1, 8, 8)))
    with pytest.raises(TypeError, match=r"^Expected a floating-point input, got dtype uint8"):
        chunkconv.tiled(net, x.astype("u1"))
    with pytest.raises(ValueError, match=r"^Expected `x` of 3, 4 or 5 dims"):
        chunkconv.tiled(net, da.zeros((8, 8)))
    with pytest.raises(ValueError, match=r"^Expected input with 1 channels"):  # the probe, before the graph
        chunkconv.tiled(net, da.zeros((1, 2, 8, 8)), guide=da.zeros((1, 1, 8, 8)))
    with pytest.raises(ValueError, match=r"^Invalid value for `halo`"):
        chunkconv.tiled(nn.Identity(), x, halo=((1, 2, 3), (1, 1)))


def test_the_module_travels_once_as_one_delayed_key():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, dtype=F64), nn.ReLU())
    y = chunkconv.tiled(net, da.zeros((1, 1, 40, 40), chunks=(1, 1, 10, 10)))
    graph = dict(y.__dask_graph__())
    holders = [
        k for k, v in graph.items() if isinstance(getattr(v, "value", None), nn.Module) or isinstance(v, nn.Module)
    ]
    assert len(holders) == 1 and y.numblocks == (1, 1, 4, 4)
    tasks = [k for k in graph if isinstance(k, tuple) and k[0] == y.name]
    assert len(tasks) == 16
    for key in tasks:
        assert holders[0] in graph[key].dependencies  # each task reads the one module key
        assert net not in getattr(graph[key], "args", ())


def _recording(seen):
    class Record(nn.Module):
        def forward(self, x):
            seen.append((threading.current_thread().name, torch.get_num_threads()))
            return x

    return Record()


def test_threads_per_task():
    seen = []
    x = da.zeros((1, 1, 8, 8), chunks=(1, 1, 4, 4))
    before = torch.get_num_threads()
    chunkconv.tiled(_recording(seen), x, halo=0, threads=1).compute(scheduler="threads", num_workers=2)
    assert len(seen) == 4 + 1 and {t for _, t in seen[1:]} == {1}  # the probe, then four tasks
    seen.clear()
    with dask.config.set(scheduler="threads", num_workers=2):  # the pool's size, which "auto" reads
        chunkconv.tiled(_recording(seen), x, halo=0).compute()
    cores = len(__import__("os").sched_getaffinity(0))
    assert {t for _, t in seen[1:]} == {max(1, min(before, cores // 2))}
    seen.clear()
    chunkconv.tiled(_recording(seen), x, halo=0, threads=None).compute(scheduler="synchronous")
    assert {t for _, t in seen} == {before} and torch.get_num_threads() == before


def test_device_runs_a_copy_and_returns_host_blocks():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, dtype=F64))
    xn = np.random.default_rng(4).standard_normal((1, 1, 12, 12))
    got = chunkconv.tiled(net, da.from_array(xn, chunks=6), device="cpu").compute()
    assert isinstance(got, np.ndarray)
    assert_close(got, _in_memory(net, xn, {}))


@pytest.mark.cuda
def test_device_cuda():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, dtype=F64), dynamic(2, 2, 2, (3, 3), padding=1))
    xn = np.random.default_rng(5).standard_normal((1, 1, 24, 24))
    got = chunkconv.tiled(net, da.from_array(xn, chunks=8), device="cuda").compute()
    assert isinstance(got, np.ndarray) and next(net.parameters()).device.type == "cpu"
    assert_close(got, _in_memory(net, xn, {}))


def test_inference_only():
    net = nn.Sequential(nn.Conv2d(1, 1, 3, dtype=F64))
    got = chunkconv.tiled(net, da.ones((1, 1, 6, 6))).compute()
    assert isinstance(got, np.ndarray)  # blocks are computed under inference_mode: nothing to backpropagate


def test_import_chunkconv_without_dask():
    code = (
        "import sys; sys.modules['dask'] = None; sys.modules['dask.array'] = None\n"
        "import chunkconv, torch\n"
        "print(chunkconv.receptive_field(torch.nn.Conv2d(1, 1, 3), 2).halo)\n"
        "try:\n    chunkconv.tiled(torch.nn.Identity(), None)\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "((0, 2), (0, 2))" in out and 'pip install "chunkconv[dask]"' in out


def test_zarr_v3_round_trip(tmp_path):
    zarr = pytest.importorskip("zarr")
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect", dtype=F64),
        nn.ReLU(),
        dynamic(2, 4, 4, (3, 3), form="shared", padding=1),
    ).eval()
    xn = np.random.default_rng(6).standard_normal((1, 3, 40, 48))
    src = zarr.create_array(str(tmp_path / "in.zarr"), shape=xn.shape, chunks=(1, 3, 16, 16), dtype="f8")
    src[...] = xn
    assert src.metadata.zarr_format == 3
    x = da.from_zarr(str(tmp_path / "in.zarr"))
    plan = chunkconv.tile_plan(net, x)
    assert not plan.rechunked  # chunks of 16 px are already multiples of the stride and over the halo
    chunkconv.tiled(net, x).to_zarr(str(tmp_path / "out.zarr"))
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")
    assert out.metadata.zarr_format == 3 and out.chunks == (1, 4, 16, 16)  # the output chunks, not rechunked
    assert_close(out[...], _in_memory(net, xn, {}))


def test_local_cluster_of_two_worker_processes():
    distributed = pytest.importorskip("distributed")
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1, dtype=F64),
        nn.GELU(),
        dynamic(2, 3, 3, (3, 3), form="modulated", inputs=("patches", "positions"), padding=1),
    )
    xn = np.random.default_rng(7).standard_normal((2, 2, 36, 28))
    x = da.from_array(xn, chunks=(1, 2, 12, 10))
    want = _in_memory(net, xn, {})
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            got = chunkconv.tiled(net, x).compute()
            assert len(client.scheduler_info()["workers"]) == 2
    assert_close(got, want)


def test_dask_is_lazy_until_computed():
    calls = []

    class Count(nn.Module):
        def forward(self, x):
            calls.append(x.shape)
            return x

    y = chunkconv.tiled(Count(), da.zeros((1, 1, 8, 8), chunks=4), halo=0)
    assert len(calls) == 1  # the probe on a small tile, nothing else
    y.compute(scheduler="synchronous")
    assert len(calls) == 5
    with dask.config.set(scheduler="synchronous"):
        assert chunkconv.tiled(nn.Identity(), da.ones((1, 1, 5), chunks=2)).sum().compute() == 5
