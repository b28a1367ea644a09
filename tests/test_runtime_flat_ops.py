"""The flat executor's data movers against NumPy: the model input's codes (NCHW read row by row) and
the option-A shortcut's subsampling (whole blocks of 16 channels as vectors, the rest one by one)."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.runtime import executor
from lowbit.runtime import kernels_int8 as k8

RNG = np.random.default_rng(5)


@pytest.mark.parametrize("scratch", [0, 64], ids=["allocated", "scratch"])
@pytest.mark.parametrize("C, H, W, ph, pw", [(3, 32, 32, 1, 1), (3, 5, 7, 2, 0), (1, 28, 28, 0, 0),
                                              (5, 7, 9, 2, 1), (64, 1, 1, 0, 0), (1, 28, 28, 2, 2),
                                              (1, 3, 16, 1, 1), (1, 4, 17, 0, 3), (1, 5, 15, 1, 0)])
def test_quantize_nchw_equals_reference_and_general_kernel(C, H, W, ph, pw, scratch):
    N, hi, mult = 4, np.float32(3.0), np.float32(5.0)
    x = RNG.uniform(-1, 4, (N, C, H, W)).astype(np.float32)
    # ties of rint (to even) and a negative zero, at both ends of a quantized image (one channel:
    # in the first and the last 16-value block of a row)
    x[1].flat[:3] = x[3].flat[-3:] = (1.5 / 5.0, 2.5 / 5.0, -0.0)
    Hp, Wp = H + 2 * ph, W + 2 * pw
    size = Hp * Wp * C
    got = np.full(3 * size + 16, 9, np.uint8)
    # the row buffer from the caller's scratch (stale bytes in it), or allocated when that is too short
    buf = np.full(scratch, 200, np.uint8)
    k8._int8_quantize_nchw(x, hi, mult, ph, pw, got, 1, 4, buf)  # images 1..3 into slots 0..2
    want = np.rint(np.clip(x, 0, hi) * mult).astype(np.uint8).transpose(0, 2, 3, 1)
    img = got[: 3 * size].reshape(3, Hp, Wp, C)
    assert np.array_equal(img[:, ph : ph + H, pw : pw + W], want[1:])
    border = np.ones((Hp, Wp), bool)
    border[ph : ph + H, pw : pw + W] = False
    assert not img[:, border].any() and (got[3 * size :] == 9).all()
    ref = np.zeros(3 * size + 16, np.uint8)
    k8._int8_quantize_range(x[1:].transpose(0, 2, 3, 1), 0, hi, mult, 0, ph, pw, Hp, Wp, True, ref, 0, 3)
    assert np.array_equal(got[: 3 * size], ref[: 3 * size])


@pytest.mark.parametrize("C, Co, cl", [(16, 32, 8), (32, 64, 16), (20, 24, 2), (48, 48, 0)])
def test_subsample_vector_blocks_equal_numpy(C, Co, cl):
    x = RNG.standard_normal((2, 9, 11, C)).astype(np.float32)
    dst = np.full(2 * 5 * 6 * Co, 7.0, np.float32)
    executor._subsample(x.reshape(-1), 9, 11, C, 2, 2, dst, Co, cl, 2)
    dst = dst.reshape(2, 5, 6, Co)
    assert np.array_equal(dst[..., cl : cl + C], x[:, ::2, ::2])
    rest = np.ones(Co, bool)
    rest[cl : cl + C] = False
    assert (dst[..., rest] == 7.0).all()


def test_arena_reuse_same_output_smaller_arenas():
    """Dead tensors' regions given to later ones: the same bits as one region per tensor (chunks of
    1 and 2 images, an odd batch), in smaller arenas."""
    import torch

    import lowbit
    import lowbit.runtime as rt
    from lowbit.models import build_model
    from lowbit.runtime import kernels as K

    if not K.HAS_VNNI:
        pytest.skip("int8 kernels need AVX-512 VNNI")
    torch.manual_seed(0)
    m = build_model("resnet20", width_mult=0.5).eval()
    act = {"method": "pact", "bits": 4, "alpha_init": 3.0}
    q = lowbit.quantize(m, {"default": {"weight": {"method": "twn", "bits": 2}, "activation": act}}).eval()
    shape = (3, 12, 12)
    gm = rt.compile(q, torch.rand(2, *shape)).executor.gm
    x = (3 * torch.rand(5, *shape)).numpy()
    for chunk in (1, 2):
        outs, sizes = [], []
        for reuse in (True, False):
            prev, executor.REUSE = executor.REUSE, reuse
            try:
                prog = executor.plan(gm, shape, chunk)
            finally:
                executor.REUSE = prev
            fa, ca = prog.arenas()
            out = np.full(5 * prog.out_numel, np.nan, np.float32)
            executor._run(prog.prog, prog.aux, prog.w8, prog.sc, x, out, prog.oinfo, fa, ca, 5, prog.chunk)
            outs.append(out)
            sizes.append((prog.fa_size, prog.ca_size))
        assert np.array_equal(outs[0], outs[1]) and not np.isnan(outs[0]).any()
        assert sizes[0][0] < sizes[1][0] and sizes[0][1] < sizes[1][1]
