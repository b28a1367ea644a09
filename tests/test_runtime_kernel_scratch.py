"""The flat executor's kernels work in a scratch the caller hands them (the end of the code arena)
instead of allocating their buffers per call: what the scratch held before does not change a result,
a scratch too short for a layer falls back to an allocation, and each kernel equals its reference
either way. The packed models give the same bits with the scratch dirtied, on AMX, and with AMX
forced off (VNNI), and the plain path (no AVX-512 kernels) stays within float32 rounding of them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lowbit
import lowbit.runtime as rt
from lowbit.models import build_model
from lowbit.runtime import _amx, _jit, executor
from lowbit.runtime import kernels as K
from lowbit.runtime import kernels_int8 as k8
from lowbit.runtime import kernels_pool as kp
from lowbit.runtime._jit import EPI_FLOAT, EPI_RELU

RNG = np.random.default_rng(11)
needs_vnni = pytest.mark.skipif(not K.HAS_VNNI, reason="int8 kernels need AVX-512 VNNI")
FLAGS = EPI_RELU | EPI_FLOAT  # float output with ReLU: compared with the exact sums' formula
needs_amx = pytest.mark.skipif(not _amx.amx_enabled(), reason="AMX-INT8 unavailable (CPU, OS or plain path)")


def _dirty(n: int) -> np.ndarray:
    """``n`` scratch bytes on a line, full of bytes no kernel writes there (0xff: NaN as floats)."""
    s = k8.aligned_u8(n)
    s[:] = 0xFF
    return s


@pytest.mark.parametrize("chw", [0, 1])
def test_maxpool_scratch_equals_reference(chw):
    N, C, H, W, ph, pw = 2, 6, 12, 10, 1, 1
    Hp, Wp = H + 2 * ph, W + 2 * pw
    xq = RNG.integers(0, 16, N * Hp * Wp * C + 64).astype(np.uint8)
    OH, OW = (H - 2) // 2 + 1, (W - 3) // 2 + 1  # 2x3 windows, stride 2
    Hc, Wc, phc, pwc = (1, 1, 0, 0) if chw else (OH + 2, OW + 2, 1, 1)
    g = np.array([C, Hp, Wp, ph, pw, 2, 3, 2, 2, OH, OW, Hc, Wc, phc, pwc, chw], np.int64)
    yq = np.zeros(N * max(C * OH * OW, Hc * Wc * C) + 64, np.uint8)
    want = kp.code_maxpool_reference(xq, N, g, yq)
    for scratch in (np.zeros(0, np.uint8), _dirty(4096), _dirty(8)):  # allocated, scratch, too short
        got = yq.copy()
        kp._code_maxpool_range(xq, g, got, scratch, 0, N)
        assert np.array_equal(got, want)


def test_avgpool_scratch_equals_reference():
    x = RNG.standard_normal((3, 5, 7, 40)).astype(np.float32)
    want = kp.global_avgpool_reference(x)
    for scratch in (np.zeros(0, np.uint8), _dirty(4096), _dirty(8 * 40 - 1)):
        got = np.full((3, 40), np.nan, np.float32)
        kp._global_avgpool_range(x, got, scratch, 0, 3)
        assert np.array_equal(got, want)


def _conv_case(N, C, H, W, O, pad):
    codes = RNG.integers(0, 16, (N, C, H, W))
    w_int = RNG.integers(-3, 4, (O, 3 if pad else 1, 3 if pad else 1, C))
    KH = w_int.shape[1]
    xq = k8.int8_quantize(codes.transpose(0, 2, 3, 1).astype(np.float32), (pad, pad), mode=1)
    Hp, Wp = H + 2 * pad, W + 2 * pad
    OH, OW = Hp - KH + 1, Wp - KH + 1
    s0 = np.zeros(-(-O // 16) * 16)
    s1 = np.zeros_like(s0)
    s0[:O] = RNG.standard_normal(O)
    s1[:O] = RNG.uniform(0.01, 0.1, O)
    D = k8.int8_conv_reference(codes, w_int.transpose(0, 3, 1, 2), (1, 1), (pad, pad), (1, 1))
    want = np.maximum(s1[:O] * D + s0[:O], 0.0).astype(np.float32)  # the epilogue: s1*D + s0, ReLU
    geo = np.array([Hp, Wp, C, OH, OW, 1, 1, N, O], np.int64)
    return xq, w_int, geo, s0, s1, want


@needs_vnni
@pytest.mark.parametrize("N, C, H, W, O, pad", [(2, 8, 6, 6, 40, 1), (2, 40, 1, 1, 20, 0)],
                         ids=["conv", "row"])
def test_int8_conv_scratch_equals_reference(N, C, H, W, O, pad):
    xq, w_int, geo, s0, s1, want = _conv_case(N, C, H, W, O, pad)
    w, passes = k8.pack_int8_weights(w_int, 1)
    qoff = k8.int8_quad_offsets(k8.int8_geometry(w_int.shape[1], w_int.shape[2], C, 1, 1), int(geo[1]), C)
    M = N * int(geo[3] * geo[4])
    big = np.full(k8.INT8_ROWS_SCRATCH + 5, 1 << 40, np.int64)
    for scratch in (np.zeros(0, np.int64), big, big[:3]):
        out = np.full(M * O, np.nan, np.float32)
        k8._int8_conv_range(xq, geo, qoff, w, passes, s0, s1, np.zeros(3 * s0.size), FLAGS, out, out[:0],
                            xq[:0], np.zeros(4, np.int64), 0.0, 0.0, scratch, 0, M)
        assert np.array_equal(out.reshape(want.shape), want)


@needs_amx
def test_amx_conv_dirty_scratch_equals_reference():
    N, C, O = 2, 16, 24
    xq, w_int, geo, s0, s1, want = _conv_case(N, C, 10, 10, O, 1)
    w, kc, nck, nbt = k8.pack_amx_weights(w_int)
    cfg = _amx.amx_tile_config(kc, nbt).view(np.int8)
    koff = k8.amx_k_offsets(3, nck, kc, 1, int(geo[1]), C)
    for scratch in (_dirty(k8.AMX_SCRATCH), k8.amx_scratch()):
        out = np.full(want.size, np.nan, np.float32)
        k8._amx_conv_range(xq, geo, koff, w, cfg, kc, nbt, s0, s1, np.zeros(3 * s0.size), FLAGS, out, out[:0],
                           xq[:0], np.zeros(4, np.int64), 0.0, 0.0, 0, N, scratch)
        assert np.array_equal(out.reshape(want.shape), want)


def _packed(name: str, shape: tuple[int, ...], weights: dict):
    torch.manual_seed(0)
    m = build_model(name).eval()
    act = {"method": "pact", "bits": 4, "alpha_init": 3.0}
    q = lowbit.quantize(m, {"default": {"weight": weights, "activation": act}}).eval()
    return rt.compile(q, torch.rand(2, *shape))


def _flat(prog: executor.Program, x: np.ndarray, dirty: bool) -> np.ndarray:
    fa, ca = prog.arenas()
    if dirty:
        ca[ca.size - k8.AMX_SCRATCH :] = 0xFF
    out = np.full(x.shape[0] * prog.out_numel, np.nan, np.float32)
    executor._run(prog.prog, prog.aux, prog.w8, prog.sc, x, out, prog.oinfo, fa, ca, x.shape[0], prog.chunk)
    return out


@needs_vnni
@pytest.mark.parametrize("name, shape, weights", [
    ("lenet5", (1, 28, 28), {"method": "binary", "bits": 1}),
    ("resnet20", (3, 16, 16), {"method": "dorefa", "bits": 4}),
])
def test_flat_outputs_equal_across_paths(name, shape, weights, monkeypatch):
    x = 3 * torch.rand(3, *shape, generator=torch.Generator().manual_seed(1))
    packed = _packed(name, shape, weights)
    prog = packed.executor.program(shape)
    want = _flat(prog, x.numpy(), dirty=False)
    assert not np.isnan(want).any()
    assert np.array_equal(_flat(prog, x.numpy(), dirty=True), want)
    assert np.array_equal(packed(x).numpy().reshape(-1), want)
    for i in range(3):  # the one-image call (general path first, then the cached context)
        for _ in range(2):
            assert np.array_equal(packed(x[i : i + 1]).numpy().reshape(-1), want.reshape(3, -1)[i])
    convs = prog.prog[prog.prog[:, 0] == executor.OP_CONV]
    assert (convs[:, 29] == 1).any() == _amx.amx_enabled()  # AMX rows where the CPU has AMX
    # AMX forced off: VNNI convolutions, the same bits
    monkeypatch.setattr(_amx, "HAS_AMX", False)
    vprog = _packed(name, shape, weights).executor.program(shape)
    assert not (vprog.prog[vprog.prog[:, 0] == executor.OP_CONV, 29] == 1).any()
    assert np.array_equal(_flat(vprog, x.numpy(), dirty=True), want)
    # the plain path (no AVX-512 kernels, not flattened): within float32 rounding
    _jit.set_plain(True)
    try:
        plain = _packed(name, shape, weights)
        with torch.inference_mode():
            got = plain(x).numpy().reshape(-1)
    finally:
        _jit.set_plain(False)
    assert plain.executor is None or plain.executor.program(shape) is None
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
