"""The deformable oracle's own semantics, checked against torch's convolutions and hand-built cases.

What the streamed sampler is compared with must itself be right: zero offsets give ``F.conv*d``
(1-3 D, groups, asymmetric stride/padding/dilation); DCNv3/DCNv4's tap order, ``(x, y)`` order,
``offset_scale`` and ``remove_center`` read as their CUDA kernels do; bad arguments are refused.
The gradient rules at the border are in tests/test_sampling.py's border table (both the oracle
and the stream).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chunkconv.deform_reference import (
    GRADIENT_RULES,
    check_rule,
    dcnv3_core_reference,
    dcnv4_core_reference,
    deform_conv_reference,
    deform_sample_reference,
    sample_reference,
)

F64 = torch.float64
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_zero_offsets_equal_the_convolution(d, masked):
    x = torch.randn(2, 6, *(7, 6, 5)[:d], dtype=F64)
    ks, stride, pad, dil = (3, 2, 2)[:d], (2, 1, 2)[:d], (1, 2, 0)[:d], (1, 2, 1)[:d]
    w = torch.randn(4, 3, *ks, dtype=F64)  # groups=2
    b = torch.randn(4, dtype=F64)
    want = CONV[d](x, w, b, stride, pad, dil, groups=2)
    k = w[0, 0].numel()
    offset = torch.zeros(2, 3 * k * d, *want.shape[2:], dtype=F64)  # 3 offset groups
    mask = torch.full((2, 3 * k, *want.shape[2:]), 0.5, dtype=F64) if masked else None
    got = deform_conv_reference(x, offset, w, b, stride, pad, dil, mask)
    torch.testing.assert_close(got, (want - b.view(1, -1, *[1] * d)) * (0.5 if masked else 1) + b.view(1, -1, *[1] * d))


def test_sampled_patches_are_unfolds_columns_for_zero_offsets():
    x = torch.randn(2, 4, 6, 7, dtype=F64)
    offsets = torch.zeros(2, 2, 6, 2, 3, 7, dtype=F64)
    got = deform_sample_reference(x, offsets, kernel_size=(3, 2), stride=(2, 1), padding=(1, 1), dilation=(1, 2))
    want = F.unfold(x, (3, 2), dilation=(1, 2), padding=(1, 1), stride=(2, 1))
    torch.testing.assert_close(got.reshape(want.shape), want, rtol=0, atol=0)


def test_offset_groups_cover_channel_ranges_and_dy_comes_first():
    # group 1 (channels 2, 3) moved down one row, group 0 left alone
    x = torch.randn(1, 4, 5, 5, dtype=F64)
    offsets = torch.zeros(1, 2, 1, 2, 5, 5, dtype=F64)
    offsets[:, 1, :, 0] = 1.0
    got = deform_sample_reference(x, offsets, kernel_size=1).reshape(1, 4, 5, 5)
    torch.testing.assert_close(got[:, :2], x[:, :2])
    torch.testing.assert_close(got[:, 2:, :4], x[:, 2:, 1:])
    assert not got[:, 2:, 4].any()


def test_multilinear_interpolation_in_three_dims():
    x = torch.randn(1, 1, 2, 2, 2, dtype=F64)
    pos = torch.tensor([[[[0.25, 0.5, 0.75]]]], dtype=F64)  # (N=1, G=1, M=1, d=3)
    got = sample_reference(x, pos)[0, 0, 0, 0]
    v = x[0, 0]
    wz, wy, wx = (torch.tensor([1 - p, p], dtype=F64) for p in (0.25, 0.5, 0.75))
    want = torch.einsum("i,j,k,ijk->", wz, wy, wx, v)
    torch.testing.assert_close(got, want)


def _dcn_args(**kw):
    args = dict(
        kernel_h=3,
        kernel_w=3,
        stride_h=1,
        stride_w=1,
        pad_h=1,
        pad_w=1,
        dilation_h=1,
        dilation_w=1,
        group=1,
        group_channels=2,
        offset_scale=1.0,
        remove_center=False,
    )
    args.update(kw)
    return args


def test_dcnv3_taps_are_x_major_and_offsets_x_then_y():
    x_cl = torch.randn(1, 5, 6, 2, dtype=F64)
    x = x_cl.permute(0, 3, 1, 2)
    x_pad = F.pad(x, (1, 1, 1, 1))
    for t in range(9):
        i, j = divmod(t, 3)  # x-major: t = i * kh + j
        mask = torch.zeros(1, 5, 6, 9, dtype=F64)
        mask[..., t] = 1.0
        offset = torch.zeros(1, 5, 6, 18, dtype=F64)
        got = dcnv3_core_reference(x_cl, offset, mask, **_dcn_args())
        want = x_pad[:, :, j : j + 5, i : i + 6].permute(0, 2, 3, 1)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"tap {t}")
        offset[..., 2 * t] = 1.0  # x of this tap: one pixel right
        got = dcnv3_core_reference(x_cl, offset, mask, **_dcn_args())
        want = F.pad(x, (1, 2, 1, 1))[:, :, j : j + 5, i + 1 : i + 7].permute(0, 2, 3, 1)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"tap {t}, x offset")


def test_dcnv3_offset_scale_scales_around_the_window_centre():
    # zero offsets, scale 2: a 3x3 window of dilation 2 about the same centre
    x_cl = torch.randn(2, 7, 8, 4, dtype=F64)
    mask = torch.rand(2, 7, 8, 2 * 9, dtype=F64)
    args = _dcn_args(group=2, offset_scale=2.0, pad_h=1, pad_w=1)
    got = dcnv3_core_reference(x_cl, torch.zeros(2, 7, 8, 36, dtype=F64), mask, **args)
    cols = F.unfold(x_cl.permute(0, 3, 1, 2), 3, dilation=2, padding=2).reshape(2, 2, 2, 3, 3, 7, 8)
    m = mask.reshape(2, 7, 8, 2, 3, 3).permute(0, 3, 5, 4, 1, 2)  # (x, y) taps -> (y, x)
    want = (cols * m[:, :, None]).sum((3, 4)).reshape(2, 4, 7, 8).permute(0, 2, 3, 1)
    torch.testing.assert_close(got, want)


def test_dcnv3_remove_center_skips_the_centre_tap_and_pads_asymmetrically():
    x_cl = torch.randn(1, 6, 9, 3, dtype=F64)
    args = _dcn_args(group=1, group_channels=3, pad_h=2, pad_w=1, kernel_h=3, kernel_w=5, stride_h=2)
    ho, wo = (6 + 4 - 2 - 1) // 2 + 1, (9 + 2 - 4 - 1) + 1
    full = dcnv3_core_reference(
        x_cl, torch.zeros(1, ho, wo, 30, dtype=F64), torch.ones(1, ho, wo, 15, dtype=F64), **args
    )
    args["remove_center"] = True
    less = dcnv3_core_reference(
        x_cl, torch.zeros(1, ho, wo, 28, dtype=F64), torch.ones(1, ho, wo, 14, dtype=F64), **args
    )
    cols = F.unfold(x_cl.permute(0, 3, 1, 2), (3, 5), padding=(2, 1), stride=(2, 1)).reshape(1, 3, 15, ho, wo)
    torch.testing.assert_close(full, cols.sum(2).permute(0, 2, 3, 1))
    torch.testing.assert_close(less, (cols.sum(2) - cols[:, :, 7]).permute(0, 2, 3, 1))


def test_dcnv4_unpacks_per_group_offsets_then_mask_and_ignores_the_padding():
    n, ho, wo, group, kk = 1, 4, 5, 3, 9
    x_cl = torch.randn(n, 4, 5, group * 2, dtype=F64)
    offset = torch.randn(n, ho, wo, group * kk * 2, dtype=F64)
    mask = torch.randn(n, ho, wo, group * kk, dtype=F64)
    packed = torch.cat([offset.reshape(n, ho, wo, group, 2 * kk), mask.reshape(n, ho, wo, group, kk)], dim=-1)
    packed = torch.cat([packed.reshape(n, ho, wo, -1), torch.full((n, ho, wo, 7), 1e6, dtype=F64)], dim=-1)
    assert packed.shape[-1] == 88 and packed.shape[-1] % 8 == 0
    args = _dcn_args(group=group, offset_scale=0.5)
    want = dcnv3_core_reference(x_cl, offset, mask, **args)
    torch.testing.assert_close(dcnv4_core_reference(x_cl, packed, **args), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(N, Ho, Wo, 88\) \(G \* 3K' = 81 padded"):
        dcnv4_core_reference(x_cl, packed[..., :-7], **args)


def test_gradient_rules_and_errors():
    assert GRADIENT_RULES == ("torchvision", "strict") and check_rule("strict") == "strict"
    with pytest.raises(ValueError, match=r"^Invalid value for `rule`; expected one of"):
        check_rule("mmcv")
    x = torch.randn(1, 4, 5, 5, dtype=F64)
    with pytest.raises(ValueError, match=r"^Expected offsets of shape \(N=1, G, K=9, d=2, \*out=\(5, 5\)\)"):
        deform_sample_reference(x, torch.zeros(1, 1, 9, 2, 4, 5, dtype=F64), kernel_size=3, padding=1)
    with pytest.raises(ValueError, match=r"^Expected a number of groups that divides the 4 channels, got G=3"):
        sample_reference(x, torch.zeros(1, 3, 2, 2, dtype=F64))
    with pytest.raises(ValueError, match=r"^Expected a weight \(O, C // groups, \*kernel_size\)"):
        deform_conv_reference(x, torch.zeros(1, 18, 5, 5, dtype=F64), torch.zeros(2, 3, 3, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"remove_center needs an odd kernel"):
        dcnv3_core_reference(
            torch.zeros(1, 4, 4, 2, dtype=F64),
            torch.zeros(1, 5, 5, 6, dtype=F64),
            torch.zeros(1, 5, 5, 3, dtype=F64),
            **_dcn_args(kernel_h=2, kernel_w=2, remove_center=True),
        )
