"""Fused Triton kernels for the fast path's contraction, forward and backward (imports Triton).

With ``x`` the patch rows ``(B, P)``, ``h`` the body's output ``(B, H)``, ``W`` the last Linear's
weight ``(O * Pg, H)`` (rows ``(o, p')``, viewed ``(G, Og, Pg, H)``) and ``c`` its bias ``(O * Pg,)``:

    y[b, g, og]  = sum_j h[b, j] * T[b, g, og, j]  +  sum_p' c[g, og, p'] x[b, g, p']
    T[b, g, og, j] = sum_p' x[b, g, p'] W[g, og, p', j]

Each program of the forward kernel takes a tile of ``BB`` patches and ``BO`` outputs of one group,
accumulates ``T``'s tile ``(BB, BO * HP)`` in registers over ``Pg`` (one ``tl.dot`` per ``BP``
slice), multiplies it by the tile's ``h`` and reduces over ``j``: it reads ``x``, ``h`` and ``W``
and writes only ``y``. ``HP`` is ``H`` rounded up to a power of two (masked). The backward
kernels are the same tile arithmetic turned around, with ``gT = gy (x) h`` formed in registers:

* ``_bwd_h``: ``gh[b, j] = sum_{g, og} gy[b, g, og] T[b, g, og, j]`` (recomputes ``T`` per tile);
* ``_bwd_x``: ``gx[b, g, p'] = sum_{og, j} gT[b, g, og, j] W[g, og, p', j]``;
* ``_bwd_w``: ``gW[g, og, p', j] = sum_b x[b, g, p'] gT[b, g, og, j]``, split over ``S`` slices of
  the patches (partial sums reduced by PyTorch).

The bias terms (``x . c`` and its gradients, ``O * Pg`` FLOPs per patch against the main
``O * Pg * H``) run as PyTorch einsums; the forward and ``gx`` kernels add them in their epilogue
(``INIT``), so nothing is read-modify-written and autotuning may rerun a kernel safely.
Tile sizes are autotuned on CUDA, keyed on ``Pg, H, Og``, dtypes, TF32 and the chunk length's power
of two (:func:`rows_bucket`), timed by :func:`time_config` (no extra memory) and cached on disk by
Triton; the interpreter runs one small config. Offsets are 32-bit: chunks longer than that allows
are launched in blocks of rows (:data:`MAX_LAUNCH_ELEMENTS`). A kernel that fails to compile,
launch or autotune falls back to PyTorch for its configuration (:mod:`.fallback`).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...geometry import ConvGeometry
from . import MAX_HIDDEN, fallback, interpreting, tf32_allowed

__all__ = ["TritonContract", "contract_backward", "contract_forward"]


def _configs() -> list[triton.Config]:
    return [
        triton.Config({"BB": bb, "BP": bp, "BN": bn}, num_warps=w, num_stages=3)
        for bb in (32, 64, 128)
        for bp in (32, 64)
        for bn in (64, 128, 256)
        for w in (4, 8)
        if bb * bn <= 16384
    ]


_SMALLEST_BB = min(c.kwargs["BB"] for c in _configs())


def _prune(configs, named_args, **kwargs):
    # BN is the width of the T tile, BO * HP: keep the widths that fit HP and are not wider than needed
    # (HP <= MAX_HIDDEN is checked before launching); one or two widths, autotuned
    hp = kwargs.get("HP", named_args.get("HP"))
    want = min(max(16, hp * triton.next_power_of_2(named_args["Og"])), MAX_HIDDEN)
    widths = {want, max(want // 2, hp, 16)}
    return [c for c in configs if c.kwargs["BN"] in widths] or [configs[0]]


def rows_bucket(rows: int) -> int:
    """The autotuner's key for a chunk's length: log2 of the rows, capped at 2**17.

    2**17 rows are enough patch tiles to fill any GPU. The planner's probes of a few rows tune for
    themselves, not for the million-row chunks that follow.
    """
    return min(max(rows - 1, 1).bit_length(), 17)


def time_config(kernel_call, quantiles=None):
    """The autotuner's benchmark: one warm-up, then three timed runs on the call's own tensors.

    Triton's default (``triton.testing.do_bench``) allocates a 256 MB buffer to flush L2 between
    runs and runs each config for about 125 ms: memory outside the budget the user gave the call,
    and seconds of tuning per chunk length. Chunks are large enough that L2 is no concern.
    """
    kernel_call()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        kernel_call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    if quantiles is None:
        return times[1]
    return [times[round(q * (len(times) - 1))] for q in quantiles]


def _tuned(fn):
    if interpreting():
        return fn
    return triton.autotune(
        configs=_configs(),
        key=["Pg", "H", "Og", "rows_bucket", "PRECISION"],  # and the tensors' dtypes, which Triton adds
        prune_configs_by={"early_config_prune": _prune},
        do_bench=time_config,
        cache_results=True,  # tuned once per machine (Triton's cache, keyed on the GPU's architecture)
    )(fn)


@triton.jit
def _t_tile(x_rows, b_ok, w_cols, n_ok, Pg, H, acc, BP: tl.constexpr, PRECISION: tl.constexpr):
    """Add x[rows, :Pg] @ W[:Pg, cols] to acc (BB, BN), one BP slice of the patch features at a time."""
    for p0 in range(0, Pg, BP):
        rp = p0 + tl.arange(0, BP)
        p_ok = rp < Pg
        xt = tl.load(x_rows[:, None] + rp[None, :], mask=b_ok[:, None] & p_ok[None, :], other=0.0)
        wt = tl.load(w_cols[None, :] + rp[:, None] * H, mask=p_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=["rows_bucket"])
def _fwd_kernel(
    x_ptr, h_ptr, w_ptr, init_ptr, y_ptr, B, Pg, H, Og, sx, sh, sy, rows_bucket,
    HP: tl.constexpr, HAS_INIT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BB: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    BO: tl.constexpr = BN // HP
    n_ob = tl.cdiv(Og, BO)
    g = tl.program_id(1) // n_ob
    o0 = (tl.program_id(1) % n_ob) * BO
    rb = tl.program_id(0) * BB + tl.arange(0, BB)
    b_ok = rb < B
    rn = tl.arange(0, BN)
    og = o0 + rn // HP
    j = rn % HP
    n_ok = (og < Og) & (j < H)
    acc = tl.zeros((BB, BN), dtype=ACC)
    acc = _t_tile(x_ptr + rb * sx + g * Pg, b_ok, w_ptr + (g * Og + og) * (Pg * H) + j, n_ok, Pg, H, acc, BP, PRECISION)
    rj = tl.arange(0, HP)
    ht = tl.load(h_ptr + rb[:, None] * sh + rj[None, :], mask=b_ok[:, None] & (rj[None, :] < H), other=0.0).to(ACC)
    out = tl.sum(tl.reshape(acc, (BB, BO, HP)) * ht[:, None, :], axis=2)
    ro = o0 + tl.arange(0, BO)
    mask = b_ok[:, None] & (ro[None, :] < Og)
    offs = rb[:, None] * sy + g * Og + ro[None, :]
    if HAS_INIT:
        out += tl.load(init_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["rows_bucket"])
def _bwd_h_kernel(
    x_ptr, gy_ptr, w_ptr, gh_ptr, B, Pg, H, Og, G, sx, sgy, sgh, rows_bucket,
    HP: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BB: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    BO: tl.constexpr = BN // HP
    rb = tl.program_id(0) * BB + tl.arange(0, BB)
    b_ok = rb < B
    rn = tl.arange(0, BN)
    gh = tl.zeros((BB, HP), dtype=ACC)
    n_ob = tl.cdiv(Og, BO)
    for go in range(0, G * n_ob):
        g = go // n_ob
        o0 = (go % n_ob) * BO
        og = o0 + rn // HP
        j = rn % HP
        n_ok = (og < Og) & (j < H)
        acc = tl.zeros((BB, BN), dtype=ACC)
        acc = _t_tile(
            x_ptr + rb * sx + g * Pg, b_ok, w_ptr + (g * Og + og) * (Pg * H) + j, n_ok, Pg, H, acc, BP, PRECISION
        )
        ro = o0 + tl.arange(0, BO)
        gy_mask = b_ok[:, None] & (ro[None, :] < Og)
        gyt = tl.load(gy_ptr + rb[:, None] * sgy + g * Og + ro[None, :], mask=gy_mask, other=0.0)
        gh += tl.sum(tl.reshape(acc, (BB, BO, HP)) * gyt.to(ACC)[:, :, None], axis=1)
    rj = tl.arange(0, HP)
    mask = b_ok[:, None] & (rj[None, :] < H)
    tl.store(gh_ptr + rb[:, None] * sgh + rj[None, :], gh.to(gh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gt_tile(
    gy_ptr, h_ptr, rb, b_ok, g, o0, Og, H, sgy, sh,
    ACC: tl.constexpr, BB: tl.constexpr, BO: tl.constexpr, HP: tl.constexpr,
):  # fmt: skip
    """Form gT (BB, BO * HP) = gy[rows, g, o0:o0+BO] (x) h[rows, :HP] in registers."""
    ro = o0 + tl.arange(0, BO)
    gyt = tl.load(gy_ptr + rb[:, None] * sgy + g * Og + ro[None, :], mask=b_ok[:, None] & (ro[None, :] < Og), other=0.0)
    rj = tl.arange(0, HP)
    ht = tl.load(h_ptr + rb[:, None] * sh + rj[None, :], mask=b_ok[:, None] & (rj[None, :] < H), other=0.0)
    return tl.reshape(gyt.to(ACC)[:, :, None] * ht.to(ACC)[:, None, :], (BB, BO * HP))


@triton.jit(do_not_specialize=["rows_bucket"])
def _bwd_x_kernel(
    gy_ptr, h_ptr, w_ptr, init_ptr, gx_ptr, B, Pg, H, Og, sgy, sh, sgx, rows_bucket,
    HP: tl.constexpr, HAS_INIT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BB: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    BO: tl.constexpr = BN // HP
    n_pb = tl.cdiv(Pg, BP)
    g = tl.program_id(1) // n_pb
    rp = (tl.program_id(1) % n_pb) * BP + tl.arange(0, BP)
    p_ok = rp < Pg
    rb = tl.program_id(0) * BB + tl.arange(0, BB)
    b_ok = rb < B
    rn = tl.arange(0, BN)
    acc = tl.zeros((BB, BP), dtype=ACC)
    for o0 in range(0, Og, BO):
        gt = _gt_tile(gy_ptr, h_ptr, rb, b_ok, g, o0, Og, H, sgy, sh, ACC, BB, BO, HP).to(w_ptr.dtype.element_ty)
        og = o0 + rn // HP
        j = rn % HP
        n_ok = (og < Og) & (j < H)
        w_rows = w_ptr + (g * Og + og) * (Pg * H) + j
        wt = tl.load(w_rows[:, None] + rp[None, :] * H, mask=n_ok[:, None] & p_ok[None, :], other=0.0)
        acc = tl.dot(gt, wt, acc, input_precision=PRECISION)
    mask = b_ok[:, None] & p_ok[None, :]
    offs = rb[:, None] * sgx + g * Pg + rp[None, :]
    if HAS_INIT:
        acc += tl.load(init_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(gx_ptr + offs, acc.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["rows_bucket"])
def _bwd_w_kernel(
    x_ptr, gy_ptr, h_ptr, gw_ptr, B, Pg, H, Og, sx, sgy, sh, slice_stride, rows_bucket,
    HP: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BB: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    BO: tl.constexpr = BN // HP
    n_pb = tl.cdiv(Pg, BP)
    g = tl.program_id(0) // n_pb
    rp = (tl.program_id(0) % n_pb) * BP + tl.arange(0, BP)
    p_ok = rp < Pg
    o0 = tl.program_id(1) * BO
    rn = tl.arange(0, BN)
    og = o0 + rn // HP
    j = rn % HP
    n_ok = (og < Og) & (j < H)
    s = tl.program_id(2)
    acc = tl.zeros((BP, BN), dtype=ACC)
    for bt in range(s, tl.cdiv(B, BB), tl.num_programs(2)):
        rb = bt * BB + tl.arange(0, BB)
        b_ok = rb < B
        xt = tl.load(x_ptr + rb[None, :] * sx + g * Pg + rp[:, None], mask=p_ok[:, None] & b_ok[None, :], other=0.0)
        gt = _gt_tile(gy_ptr, h_ptr, rb, b_ok, g, o0, Og, H, sgy, sh, ACC, BB, BO, HP).to(x_ptr.dtype.element_ty)
        acc = tl.dot(xt, gt, acc, input_precision=PRECISION)
    offs = s * slice_stride + ((g * Og + og) * (Pg * H) + j)[None, :] + rp[:, None] * H
    tl.store(gw_ptr + offs, acc.to(gw_ptr.dtype.element_ty), mask=p_ok[:, None] & n_ok[None, :])


_fwd = _tuned(_fwd_kernel)
_bwd_h = _tuned(_bwd_h_kernel)
_bwd_x = _tuned(_bwd_x_kernel)
_bwd_w = _tuned(_bwd_w_kernel)


def _common(x: Tensor, weight: Tensor, geom: ConvGeometry) -> dict:
    h_features = weight.shape[1]
    hp = triton.next_power_of_2(max(h_features, 1))
    interp = interpreting()
    precision = "tf32" if (x.dtype == torch.float32 and x.is_cuda and tf32_allowed()) else "ieee"
    meta = {"HP": hp, "ACC": tl.float64 if x.dtype == torch.float64 else tl.float32, "PRECISION": precision}
    if interp:  # one small config; the interpreter has no autotuner benchmark
        meta.update(BB=16, BP=16, BN=max(16, hp))
    return meta


# The kernels compute offsets in 32 bits: one launch covers at most this many elements of any of
# its row-major (rows, width) operands, and longer chunks are launched in blocks of rows.
MAX_LAUNCH_ELEMENTS = 2**31 - 1


def _row_blocks(*operands: Tensor) -> list[slice]:
    """Slices of the rows, each small enough that ``row * stride`` fits 32 bits in every operand."""
    rows = operands[0].shape[0]
    step = max(1, MAX_LAUNCH_ELEMENTS // max(max(t.stride(0), t.shape[1]) for t in operands))
    return [slice(start, min(rows, start + step)) for start in range(0, rows, step)]


def _grid(*dims):
    return lambda meta: tuple(d(meta) if callable(d) else d for d in dims)


def _bias_dims(geom: ConvGeometry) -> tuple[int, int, int]:
    g = geom.groups
    return g, geom.out_channels // g, geom.patch_size // g


def _on_the_tensors_device(fn):
    """Run a host wrapper with its first tensor's CUDA device current.

    Triton launches on the current device and its stream, which for a model on ``cuda:1`` need
    not be the tensors' device.
    """

    @functools.wraps(fn)
    def wrapper(first: Tensor, *args, **kwargs):
        with torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext():
            return fn(first, *args, **kwargs)

    return wrapper


@_on_the_tensors_device
def contract_forward(x: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, geom: ConvGeometry) -> Tensor:
    """``y (B, O)`` from contiguous ``x (B, P)``, ``h (B, H)``, ``W (O * Pg, H)``, ``c (O * Pg,)``."""
    rows = x.shape[0]
    g, og, pg = _bias_dims(geom)
    y = torch.empty(rows, geom.out_channels, dtype=x.dtype, device=x.device)
    if rows == 0:
        return y
    init = None
    if bias is not None:
        # contiguous: the kernel reads init with y's row stride, and einsum may return another layout
        init = torch.einsum("bgp,gop->bgo", x.view(rows, g, pg), bias.view(g, og, pg)).reshape(rows, -1).contiguous()
    meta = _common(x, weight, geom)
    for r in _row_blocks(x, h, y):
        n = r.stop - r.start
        grid = _grid(lambda m, n=n: triton.cdiv(n, m["BB"]), lambda m: g * triton.cdiv(og, m["BN"] // m["HP"]))
        _fwd[grid](
            x[r], h[r], weight, init[r] if init is not None else y[r], y[r], n, pg, weight.shape[1], og,
            x.stride(0), h.stride(0), y.stride(0), rows_bucket(n), HAS_INIT=init is not None, **meta,
        )  # fmt: skip
    return y


@_on_the_tensors_device
def contract_backward(
    gy: Tensor, x: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, geom: ConvGeometry, needs: tuple[bool, ...]
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``x``, ``h``, ``W`` and ``c`` (those ``needs`` asks for) given ``gy (B, O)``."""
    rows, hidden = x.shape[0], weight.shape[1]
    g, og, pg = _bias_dims(geom)
    meta = _common(x, weight, geom)
    gx = gh = gw = gc = None
    if rows == 0:
        z = [torch.zeros_like(t) if n and t is not None else None for t, n in zip((x, h, weight, bias), needs)]
        return z[0], z[1], z[2], z[3]
    blocks = _row_blocks(x, h, gy)
    if needs[0]:
        gx = torch.empty_like(x)
        init = None
        if bias is not None:
            init = torch.einsum("bgo,gop->bgp", gy.view(rows, g, og), bias.view(g, og, pg)).reshape(rows, -1)
            init = init.contiguous()  # read with gx's row stride
        for r in blocks:
            n = r.stop - r.start
            grid = _grid(lambda m, n=n: triton.cdiv(n, m["BB"]), lambda m: g * triton.cdiv(pg, m["BP"]))
            _bwd_x[grid](
                gy[r], h[r], weight, init[r] if init is not None else gx[r], gx[r], n, pg, hidden, og,
                gy.stride(0), h.stride(0), gx.stride(0), rows_bucket(n), HAS_INIT=init is not None, **meta,
            )  # fmt: skip
    if needs[1]:
        gh = torch.empty(rows, hidden, dtype=torch.promote_types(h.dtype, torch.float32), device=x.device)
        for r in blocks:
            n = r.stop - r.start
            grid = _grid(lambda m, n=n: triton.cdiv(n, m["BB"]))
            _bwd_h[grid](
                x[r], gy[r], weight, gh[r], n, pg, hidden, og, g, x.stride(0), gy.stride(0), gh.stride(0),
                rows_bucket(n), **meta,
            )  # fmt: skip
        gh = gh.to(h.dtype)
    if needs[2]:
        most = 2 if interpreting() else max(1, min(32, (64 << 20) // (weight.numel() * 4)))
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        gw_acc = None
        for r in blocks:
            n = r.stop - r.start
            # The number of slices must not depend on the config: every slice program stores its
            # partial sum (zeros when it has no row tiles), so nothing stale from an earlier launch,
            # or from a config the autotuner tried first, is ever summed.
            slices = min(most, triton.cdiv(n, _SMALLEST_BB))
            partial = torch.empty(slices, *weight.shape, dtype=acc, device=x.device)
            grid = _grid(lambda m: g * triton.cdiv(pg, m["BP"]), lambda m: triton.cdiv(og, m["BN"] // m["HP"]), slices)
            _bwd_w[grid](
                x[r], gy[r], h[r], partial, n, pg, hidden, og, x.stride(0), gy.stride(0), h.stride(0), weight.numel(),
                rows_bucket(n), **meta,
            )  # fmt: skip
            gw_acc = partial.sum(0) if gw_acc is None else gw_acc.add_(partial.sum(0))
        assert gw_acc is not None
        gw = gw_acc.to(weight.dtype)
    if needs[3] and bias is not None:
        gc = torch.einsum("bgo,bgp->gop", gy.view(rows, g, og), x.view(rows, g, pg)).reshape(-1).to(bias.dtype)
    return gx, gh, gw, gc


class TritonContract(torch.autograd.Function):
    """``apply(x, h, W, c, geom) -> y``: the fused contraction with its fused backward."""

    @staticmethod
    def forward(ctx, x: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, geom: ConvGeometry) -> Tensor:
        """Run the fused forward kernel on one chunk; save what backward needs."""
        x, h, weight = x.contiguous(), h.contiguous(), weight.contiguous()
        ctx.geom = geom
        ctx.save_for_backward(x, h, weight, bias)
        return contract_forward(x, h, weight, bias, geom)

    @staticmethod
    def backward(ctx, gy: Tensor):
        """The fused backward kernels: the gradients of the patches, ``h``, ``W`` and ``c``."""
        x, h, weight, bias = ctx.saved_tensors
        gy, geom, needs = gy.contiguous().to(x.dtype), ctx.geom, ctx.needs_input_grad[:4]
        grads = fallback.guarded(
            "backward",
            fallback.config_key(x, h, weight, bias, geom),
            lambda: contract_backward(gy, x, h, weight, bias, geom, needs),
            lambda: fallback.torch_contract_backward(gy, x, h, weight, bias, geom, needs),
        )
        return (*grads, None)
