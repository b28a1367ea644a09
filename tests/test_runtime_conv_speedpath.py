"""The conv-net speed path of lowbit.runtime: AMX int8 tiles and the flat executor. Each equals an
exact reference: integer sums by float64 convolution of small integers, the VNNI kernel bit for
bit, the module-by-module graph bit for bit, the fake-quantized model run in float64
(``reference_fp64``). No timing here."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
from torch import nn

import lowbit
import lowbit.runtime as rt
from lowbit.models import build_model
from lowbit.runtime import _amx, executor
from lowbit.runtime import kernels as K
from lowbit.runtime import kernels_int8 as k8
from lowbit.runtime.compiler import reference_fp64

RNG = np.random.default_rng(7)
needs_vnni = pytest.mark.skipif(not K.HAS_VNNI, reason="int8 kernels need AVX-512 VNNI")
needs_amx = pytest.mark.skipif(not (_amx.HAS_AMX and K.HAS_VNNI),
                               reason="AMX-INT8 not available (CPU, OS or plain path)")
ACT = {"method": "pact", "bits": 4, "alpha_init": 3.0}
WEIGHTS = {"binary": {"method": "binary", "bits": 1}, "ternary": {"method": "twn", "bits": 2},
           "4bit": {"method": "dorefa", "bits": 4}}


def test_pack_amx_weights_layout():
    O, KH, KW, C = 20, 2, 3, 24  # run of 72 bytes: 2 chunks of 36 per kernel row, 2 blocks
    w = RNG.integers(-128, 128, (O, KH, KW, C)).astype(np.int8)
    flat, kc, nck, nbt = k8.pack_amx_weights(w)
    assert (kc, nck, nbt) == (36, 2, 2)
    t = flat.reshape(KH, nck, nbt, kc // 4, 16, 4)
    for kh in range(KH):
        for j in range(nck):
            for b in range(nbt):
                for q in range(kc // 4):
                    for o in range(16):
                        for s in range(4):
                            r = j * kc + 4 * q + s
                            want = w[16 * b + o, kh, r // C, r % C] if (r < KW * C and 16 * b + o < O) else 0
                            assert t[kh, j, b, q, o, s] == want
    assert k8.amx_chunks(3, 3) == (12, 1) and k8.amx_chunks(3, 64) == (64, 3)
    assert k8.amx_chunks(5, 1) == (8, 1)
    offs = k8.amx_k_offsets(3, 2, 48, 2, 10, 32)
    assert offs.tolist() == [0, 48, 2 * 10 * 32, 2 * 10 * 32 + 48, 4 * 10 * 32, 4 * 10 * 32 + 48]


def _conv_case(N, C, H, W, O, KH, KW, s, pad):
    x = RNG.integers(0, 16, (N, C, H, W))
    w = RNG.integers(-7, 8, (O, C, KH, KW))
    D = k8.int8_conv_reference(x, w, (s, s), (pad, pad), (1, 1))
    xq = k8.int8_quantize(x.astype(np.float32).transpose(0, 2, 3, 1), (pad, pad), mode=1)
    return x, w, D, xq


@needs_amx
@pytest.mark.parametrize("case", [
    (1, 16, 32, 32, 16, 3, 3, 1, 1),   # ResNet-20 stage 1 (4 x 1 tiles)
    (2, 16, 17, 17, 32, 3, 3, 2, 1),   # stride 2, odd size (2 x 2 tiles)
    (2, 32, 8, 8, 48, 3, 3, 1, 1),     # 3 blocks (1 x 3), two K chunks of 48 per row
    (3, 64, 6, 6, 80, 3, 3, 1, 1),     # 5 blocks: a pass of 4 then 1 (weights in tmm5-7); 3 chunks of 64
    (1, 32, 16, 16, 64, 3, 3, 2, 1),   # 4 blocks with 48-byte chunks (tmm5 as a weight tile)
    (1, 16, 12, 12, 96, 3, 3, 1, 1),   # 6 blocks: 4 then 2 one-row-tile passes
    (1, 3, 32, 32, 16, 3, 3, 1, 1),    # the stem: 9-byte rows in a 12-byte chunk
    (2, 1, 28, 28, 6, 5, 5, 1, 2),     # LeNet-5 conv1
    (1, 64, 8, 8, 10, 1, 1, 1, 0),     # 1x1
])
def test_amx_conv_equals_integer_reference_and_vnni(case):
    N, C, H, W, O, KH, KW, s, pad = case
    _, w, D, xq = _conv_case(*case)
    OH, OW = D.shape[1:3]
    w_int = w.transpose(0, 2, 3, 1)
    wa, kc, nck, nbt = k8.pack_amx_weights(w_int)
    Hp, Wp = H + 2 * pad, W + 2 * pad
    geo = np.array([Hp, Wp, C, OH, OW, s, s, N, O], np.int64)
    koff = k8.amx_k_offsets(KH, nck, kc, 1, Wp, C)
    cfg = _amx.amx_tile_config(kc, nbt)
    s0, s1 = np.zeros(nbt * 16 + 64), np.zeros(nbt * 16 + 64)
    s1[:O], s0[:O] = RNG.uniform(0.01, 0.05, O), RNG.uniform(-1, 1, O)
    res = RNG.standard_normal((N, OH, OW, O)).astype(np.float32)
    cg = np.array([OH + 2, OW + 2, 1, 1], np.int64)
    hi, mult = 3.0, 5.0
    # the integer sums themselves: s1 = 1, s0 = 0, float output only
    one, zero = np.zeros_like(s1), np.zeros_like(s0)
    one[:O] = 1.0
    raw = np.empty((N, OH, OW, O), np.float32)
    k8.amx_conv(xq, geo, koff, wa, cfg, kc, nbt, zero, one, False, raw)
    assert np.array_equal(raw.astype(np.float64), D)
    # the full epilogue (residual, ReLU, float output, next layer's codes) against the VNNI kernel
    outs = []
    for kernel in ("amx", "vnni"):
        out = np.full((N, OH, OW, O), np.nan, np.float32)
        codes = np.zeros(N * (OH + 2) * (OW + 2) * O + 64, np.uint8)
        if kernel == "amx":
            k8.amx_conv(xq, geo, koff, wa, cfg, kc, nbt, s0, s1, True, out, res, codes, cg, hi, mult)
        else:
            w8, passes = k8.pack_int8_weights(w_int, 1)
            qoff = k8.int8_quad_offsets(k8.int8_geometry(KH, KW, C, 1, 1), Wp, C)
            k8.int8_conv(xq, geo, qoff, w8, passes, s0, s1, True, out, res, codes, cg, hi, mult)
        outs.append((out, codes))
    (a_out, a_codes), (v_out, v_codes) = outs
    want = np.maximum(s1[:O] * D + s0[:O] + res.astype(np.float64), 0).astype(np.float32)
    assert np.array_equal(a_out, want) and np.array_equal(a_out, v_out)
    assert np.array_equal(a_codes, v_codes)
    inner = a_codes[:-64].reshape(N, OH + 2, OW + 2, O)
    want_codes = np.rint(np.clip(want, 0, hi) * np.float32(mult)).astype(np.uint8)
    assert np.array_equal(inner[:, 1:-1, 1:-1], want_codes)
    assert not inner[:, 0].any() and not inner[:, :, 0].any()  # the border is never written


def test_shortcut_ops_equal_numpy():
    x = RNG.standard_normal((3, 9, 7, 5)).astype(np.float32)
    sub = np.full(3 * 5 * 4 * 5, np.nan, np.float32)
    executor._subsample(x.reshape(-1), 9, 7, 5, 2, 2, sub, 5, 0, 3)
    assert np.array_equal(sub.reshape(3, 5, 4, 5), x[:, ::2, ::2])
    wide = np.full(3 * 5 * 4 * 8, 7.0, np.float32)  # into channels 2..6 of 8; the rest untouched
    executor._subsample(x.reshape(-1), 9, 7, 5, 2, 2, wide, 8, 2, 3)
    wide = wide.reshape(3, 5, 4, 8)
    assert np.array_equal(wide[..., 2:7], x[:, ::2, ::2]) and (wide[..., [0, 1, 7]] == 7).all()
    pad = np.full(3 * 63 * 9, np.nan, np.float32)
    executor._channel_pad(x.reshape(-1), 63, 5, 1, 3, pad, 3)
    want = np.concatenate([np.zeros((3, 9, 7, 1)), x, np.zeros((3, 9, 7, 3))], axis=3)
    assert np.array_equal(pad.reshape(3, 9, 7, 9), want.astype(np.float32))


def _model(name: str, weight: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    m = build_model(name, **kw).eval()
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():  # batch norms with statistics, so that folding matters
        if isinstance(mod, nn.BatchNorm2d | nn.BatchNorm1d):
            mod.running_mean.copy_((torch.rand(mod.num_features, generator=g) - 0.5) * 0.2)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return lowbit.quantize(m, {"default": {"weight": WEIGHTS[weight], "activation": ACT}}).eval()


def _check_flat(model: nn.Module, packed, x: torch.Tensor) -> None:
    """Flat output == module graph output bit for bit == float64 fake-quantized model (1e-6)."""
    prog = packed.executor.program(tuple(x.shape[1:]))
    assert prog is not None
    flat = packed(x)
    ex, packed.executor = packed.executor, None
    try:
        modules = packed(x)
    finally:
        packed.executor = ex
    assert torch.equal(flat, modules)
    ref = reference_fp64(model, x)
    assert float((flat.double() - ref).abs().max() / ref.abs().max()) < 1e-6


@needs_vnni
@pytest.mark.parametrize("weight", list(WEIGHTS))
@pytest.mark.parametrize("net", ["resnet20", "lenet5"])
def test_flat_executor_equals_modules_and_fp64(net, weight):
    shape = (3, 16, 16) if net == "resnet20" else (1, 28, 28)  # 16x16: stage 3 still has 22 AMX rows
    model = _model(net, weight)
    packed = rt.compile(model, torch.rand(2, *shape))
    assert all(r.kind == "packed" for r in packed.layers)
    for batch in (1, 3):
        _check_flat(model, packed, torch.rand(batch, *shape))
    prog = packed.executor.program(shape)
    convs = prog.prog[prog.prog[:, 0] == executor.OP_CONV]
    # every convolution with >= 16 virtual rows runs on AMX where available (all but the classifier)
    n_amx = int((convs[:, 29] == 1).sum())  # (2 and 3: the lanes kernel, kernels_lanes)
    if _amx.amx_enabled():
        assert n_amx == len(convs) - (1 if net == "resnet20" else 3)
    else:
        assert n_amx == 0


@needs_vnni
def test_flat_executor_vnni_only_and_threads(monkeypatch):
    """AMX switched off (the VNNI tiles in the executor), batches split over 2 threads, chunks of
    images, an input size not seen at compile time: all equal to the module graph."""
    model = _model("resnet20", "ternary", width_mult=0.5)
    monkeypatch.setattr(_amx, "HAS_AMX", False)
    packed = rt.compile(model, torch.rand(2, 3, 8, 8))
    prog = packed.executor.program((3, 8, 8))
    assert not (prog.prog[:, 29] == 1).any()
    monkeypatch.setattr(executor, "CHUNK_BYTES", 1)  # one image per chunk
    monkeypatch.setattr(executor, "MIN_THREAD_WORK_S", 0.0)  # split these small batches too
    prev = numba.get_num_threads()
    try:
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            x = torch.rand(9, 3, 8, 8)
            _check_flat(model, rt.compile(model, x[:2]), x)
            _check_flat(model, packed, torch.rand(5, 3, 6, 10))
    finally:
        numba.set_num_threads(prev)


@needs_amx
def test_flat_executor_amx_two_threads_and_chunks(monkeypatch):
    monkeypatch.setattr(executor, "MIN_THREAD_WORK_S", 0.0)  # split this small batch too
    model = _model("resnet20", "4bit")
    x = torch.rand(6, 3, 16, 16)
    packed = rt.compile(model, x[:2])
    prev = numba.get_num_threads()
    try:
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        _check_flat(model, packed, x)
    finally:
        numba.set_num_threads(prev)


class _Gated(nn.Module):
    """A float op (sigmoid) between two quantized convolutions: not flattened."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.sigmoid(self.conv1(x)))


def test_unsupported_graph_and_plain_path_run_module_by_module():
    x = torch.rand(2, 3, 8, 8)
    gated = lowbit.quantize(_Gated(), {"default": {"weight": WEIGHTS["binary"], "activation": ACT}}).eval()
    packed = rt.compile(gated, x)
    assert packed.executor is None or packed.executor.program((3, 8, 8)) is None
    ref = reference_fp64(gated, x)
    assert float((packed(x).double() - ref).abs().max() / ref.abs().max()) < 1e-6
    # the forced plain path (bit-serial kernels): no int8 layer, nothing flattened, still exact
    model = _model("lenet5", "ternary")
    was = rt.plain()
    rt.set_plain(True)
    try:
        packed = rt.compile(model, torch.rand(2, 1, 28, 28))
    finally:
        rt.set_plain(was)
    assert all(m.i8 is None for m in packed.packed_layers().values())
    assert packed.executor is None or packed.executor.program((1, 28, 28)) is None
    for batch in (1, 3):
        xb = torch.rand(batch, 1, 28, 28)
        ref = reference_fp64(model, xb)
        assert float((packed(xb).double() - ref).abs().max() / ref.abs().max()) < 1e-6


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("chw", [0, 1])
@pytest.mark.parametrize("C,k,s", [(6, 2, 2), (16, 3, 2), (5, 3, 1), (16, 2, 2), (48, 2, 2)])
def test_code_maxpool_equals_reference(threads, chw, C, k, s, monkeypatch):
    """Max pooling on codes (LeNet-5's 6 channels among them; 2x2 windows on whole vectors of 16
    channels take the vector path) equals its NumPy reference, the bytes around the written outputs
    untouched, on one thread and split over two."""
    from lowbit.runtime import kernels_pool

    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip("numba has one thread here")
    monkeypatch.setattr(kernels_pool._i8, "INT8_MIN_PARALLEL_MACS", 0)
    N, H, W, ph, pw = 3, 12, 11, 1, 0
    Hp, Wp = H + 2 * ph, W + 2 * pw
    xq = RNG.integers(0, 256, N * Hp * Wp * C + 64).astype(np.uint8)
    OH, OW = (H - k) // s + 1, (W - k) // s + 1
    phc, pwc = (0, 0) if chw else (1, 2)
    Hc, Wc = (1, 1) if chw else (OH + 2, OW + 4)
    yq = RNG.integers(0, 256, (N * C * OH * OW if chw else N * Hc * Wc * C) + 64).astype(np.uint8)
    g = np.array([C, Hp, Wp, ph, pw, k, k, s, s, OH, OW, Hc, Wc, phc, pwc, chw], np.int64)
    want = kernels_pool.code_maxpool_reference(xq, N, g, yq)
    prev = numba.get_num_threads()
    try:
        numba.set_num_threads(threads)
        kernels_pool.code_maxpool(xq, N, g, yq)
    finally:
        numba.set_num_threads(prev)
    assert np.array_equal(yq, want)
