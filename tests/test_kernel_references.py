"""Every numba loop next to its reference: the runtime's packing, selection and pooling kernels
against their NumPy references, the fused training loops against their torch references (serial
and parallel variants, one and two threads), and an inventory that fails when a kernel of these
files has no reference."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
from numba.core.registry import CPUDispatcher

from lowbit.quant import fused
from lowbit.runtime import kernels_pack, kernels_pool, kernels_select, kernels_threads

RNG = np.random.default_rng(7)

#: each numba kernel of the runtime files checked here -> the reference the tests compare it with
RUNTIME_REFERENCES = {
    kernels_pack: {
        "_qcode": "quantize_codes_reference",
        "_quantize_range": "quantize_codes_reference",
        "_pack_rows_range": "pack_rows_reference",
        "_pixel_pack_range": "conv_pack_reference",
        "_im2col_range": "conv_pack_reference",
        "_conv_pack_range": "conv_pack_reference",
    },
    kernels_select: {"_select_sum_range": "select_sum_reference"},
    kernels_pool: {
        "_code_maxpool_range": "code_maxpool_reference",
        "_global_avgpool_range": "global_avgpool_reference",
    },
}


@pytest.mark.parametrize("mod", list(RUNTIME_REFERENCES), ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_runtime_kernel_has_a_reference(mod):
    kernels = {n for n, v in vars(mod).items() if isinstance(v, CPUDispatcher)}
    assert kernels == set(RUNTIME_REFERENCES[mod]), "a numba kernel without a listed reference"
    for ref in RUNTIME_REFERENCES[mod].values():
        assert callable(getattr(mod, ref))


def test_every_fused_loop_has_a_reference():
    loops = set(fused._FORWARD + fused._BACKWARD + fused._SERIAL_ONLY)
    defined = {n for n, v in vars(fused).items() if callable(v) and n.startswith("_") and
               (n.endswith("_fwd") or n.endswith("_bwd"))}
    assert defined == loops  # no loop defined but left out of the compiled set
    assert set(fused.REFERENCES) == loops


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, monkeypatch):
    """Runtime kernels on one thread, or split over two (parallel threshold 0)."""
    was = numba.get_num_threads()
    if request.param > numba.config.NUMBA_NUM_THREADS:
        pytest.skip("numba has one thread here")
    numba.set_num_threads(request.param)
    if request.param > 1:
        monkeypatch.setattr(kernels_threads, "PARALLEL_MIN_WORK", 0)
    yield request.param
    numba.set_num_threads(was)


def _acts(shape, mode, bits):
    if mode == 1:
        return RNG.integers(0, 2**bits, shape).astype(np.float32)
    x = (RNG.standard_normal(shape) * 2).astype(np.float32)
    x.reshape(-1)[:4] = [0.0, -0.0, 1e9, -1e9]
    return x


# ---- runtime ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("ka,K", [(1, 64), (2, 130), (4, 75), (8, 300)])
def test_pack_rows(threads, mode, ka, K):
    x = _acts((37, K), mode, ka)
    hi, mult = 1.7, (2**ka - 1) / 1.7
    X, A = kernels_pack.pack_rows(x, ka, hi, mult, mode)
    Xr, Ar = kernels_pack.pack_rows_reference(x, ka, hi, mult, mode)
    assert np.array_equal(X, Xr) and np.array_equal(A, Ar)


def test_quantize_codes(threads):
    x = _acts((5000,), 0, 4)
    got = kernels_pack.quantize_codes(x, 2.5, np.float32(15 / 2.5))
    assert np.array_equal(got, kernels_pack.quantize_codes_reference(x, 2.5, np.float32(15 / 2.5)))


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize(
    "C,ks,stride,pad,dil,groups,ma",
    [(3, (3, 3), (1, 1), (1, 1), (1, 1), 1, 0), (16, (3, 3), (2, 2), (1, 1), (1, 1), 2, 3),
     (70, (2, 3), (1, 2), (0, 2), (2, 1), 1, 1), (8, (5, 1), (1, 1), (2, 0), (1, 1), 4, 0)],
)
def test_conv_pack(threads, mode, C, ks, stride, pad, dil, groups, ma):
    ka = 3
    x = _acts((2, C, 9, 8), mode, ka)
    hi, mult = 2.0, 7 / 2.0
    X, A, osz = kernels_pack.conv_pack(x, ka, ks, stride, pad, dil, groups, hi, mult, mode, ma)
    Xr, Ar, oszr = kernels_pack.conv_pack_reference(x, ka, ks, stride, pad, dil, groups, hi, mult, mode, ma)
    assert osz == oszr
    assert np.array_equal(X, Xr) and np.array_equal(A, Ar)


def test_select_sum(threads):
    O, K = 40, 150
    W = kernels_pack.pack_bits(RNG.integers(0, 2, (O, 2, K)).astype(bool))
    wshift, wneg = np.array([0, 1], np.int64), np.array([False, True])
    x = RNG.standard_normal((3, K)).astype(np.float32)
    s0, s1, s2 = RNG.standard_normal((3, O))
    got = kernels_select.select_sum(x, W, wshift, wneg, s0, s1, s2, True)
    want = kernels_select.select_sum_reference(x, W, wshift, wneg, s0, s1, s2, True)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chw", [0, 1])
@pytest.mark.parametrize("k,s", [((2, 2), (2, 2)), ((3, 3), (2, 2)), ((3, 2), (1, 2))])
def test_code_maxpool(threads, monkeypatch, chw, k, s):
    if threads > 1:
        monkeypatch.setattr(kernels_pool._i8, "INT8_MIN_PARALLEL_MACS", 0)
    N, H, W, C, ph, pw = 3, 9, 8, 5, 1, 2
    Hp, Wp = H + 2 * ph, W + 2 * pw
    xq = RNG.integers(0, 256, N * Hp * Wp * C + 64).astype(np.uint8)
    (KH, KW), (SH, SW) = k, s
    OH, OW = (H - KH) // SH + 1, (W - KW) // SW + 1
    phc, pwc = (0, 0) if chw else (1, 1)
    Hc, Wc = (1, 1) if chw else (OH + 2, OW + 2)
    size = N * C * OH * OW if chw else N * Hc * Wc * C
    yq = RNG.integers(0, 256, size + 64).astype(np.uint8)  # the kernel leaves the rest untouched
    g = np.array([C, Hp, Wp, ph, pw, KH, KW, SH, SW, OH, OW, Hc, Wc, phc, pwc, chw], np.int64)
    want = kernels_pool.code_maxpool_reference(xq, N, g, yq)
    kernels_pool.code_maxpool(xq, N, g, yq)
    assert np.array_equal(yq, want)


def test_global_avgpool(threads, monkeypatch):
    if threads > 1:
        monkeypatch.setattr(kernels_pool._i8, "INT8_MIN_PARALLEL_MACS", 0)
    x = RNG.standard_normal((4, 16, 7, 7)).astype(np.float32).transpose(0, 2, 3, 1)  # strided NHWC
    assert np.array_equal(kernels_pool.global_avgpool(x), kernels_pool.global_avgpool_reference(x))


# ---- fused training loops -----------------------------------------------------------------------
pytestmark_fused = pytest.mark.skipif(not fused.available(), reason="fused kernels need numba")


def _x(n=40_000):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, generator=g) * 2
    x[:6] = torch.tensor([0.0, -0.0, 1.0, 2.5, float("nan"), 1e9])
    return x


def _f(v):
    return np.float32(v)


def _t(v):
    return torch.tensor(np.float32(v))


def _loop(name, parallel):
    k = fused._load()
    return (k.parallel if parallel else k.serial)[name]


def _same(a, b):
    assert torch.equal(torch.nan_to_num(a, 7.0), torch.nan_to_num(b, 7.0))


FORWARD_CASES = {
    "_pact_fwd": (2.5, 15 / 2.5, 2.5 / 15),
    "_dorefa_fwd": (15.0,),
    "_uniform_fwd": (0.37, 7.0),
    "_lsq_fwd": (0.21, -8.0, 7.0),
    "_bcgd_fwd": (0.3, 15.0),
}


@pytestmark_fused
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("name", fused._FORWARD)
def test_fused_forward_loops(name, parallel):
    x = _x()
    out = torch.empty_like(x)
    args = FORWARD_CASES[name]
    _loop(name, parallel)(x.numpy(), out.numpy(), *map(_f, args))
    _same(out, fused.REFERENCES[name](x, *map(_t, args)))


BACKWARD_CASES = {
    "_coarse_bwd": [(1, 3.0), (2, 1.5)],
    "_pact_bwd": [(2.5,)],
    "_lsq_bwd": [(0.21, -8.0, 7.0), (0.3, 0.0, 15.0)],
    "_bcgd_bwd": [(m % 3, 0.3 * 15, 0.3, 15.0, m, 8.0 if m == 0 else 1.0) for m in (0, 1, 2, 3)],
}


@pytestmark_fused
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("name", fused._BACKWARD)
def test_fused_backward_loops(name, parallel):
    x = _x()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    ints = {"_coarse_bwd": (0,), "_bcgd_bwd": (0, 6)}.get(name, ())  # integer arguments (kind, mode)
    for args in BACKWARD_CASES[name]:
        nargs = [np.int64(a) if i in ints else _f(a) for i, a in enumerate(args)]
        targs = [int(a) if i in ints else _t(a) for i, a in enumerate(args)]
        gx = torch.empty_like(x)
        acc = _loop(name, parallel)(x.numpy(), g.numpy(), gx.numpy(), *nargs)
        ref = fused.REFERENCES[name](x, g, *targs)
        if name == "_coarse_bwd":
            _same(gx, ref)
            continue
        _same(gx, ref[0])
        fin = torch.isfinite(x)  # NaN inputs: NaN sums on both sides
        assert np.isnan(acc) == np.isnan(ref[1]) or not bool(fin.all())
        if not np.isnan(ref[1]):
            assert acc == pytest.approx(ref[1], rel=1e-9, abs=1e-9)


@pytestmark_fused
def test_fused_dorefa_weight_loops():
    t = torch.tanh(torch.randn(4000, generator=torch.Generator().manual_seed(5)))
    t[7] = -t.abs().max()  # the max twice (shared gradient), once negative
    out = torch.empty_like(t)
    m, d = _loop("_dorefa_weight_fwd", False)(t.numpy(), out.numpy(), _f(15.0))
    want, mr, dr = fused.REFERENCES["_dorefa_weight_fwd"](t, _t(15.0))
    _same(out, want)
    assert m == float(mr) and d == float(dr)
    g = torch.randn(4000, generator=torch.Generator().manual_seed(6))
    gt = torch.empty_like(t)
    _loop("_dorefa_weight_bwd", False)(t.numpy(), g.numpy(), gt.numpy(), m, d)
    want = fused.REFERENCES["_dorefa_weight_bwd"](t, g, _t(m), _t(d))
    torch.testing.assert_close(gt, want, rtol=1e-6, atol=1e-7)  # the shared sum: float rounding
    assert torch.equal(gt[t.abs() != m], want[t.abs() != m])
