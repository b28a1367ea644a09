"""Signed activation grids in the packed runtime: the signed code spec of PACT / LSQ / uniform
(``rint(clip(x, -hi, hi) * mult) + Q``) equals the quantizer's own ``encode`` and ``forward``, its
kernel equals its NumPy reference, and packed layers and a bert-like model with signed inputs
equal the float64 fake-quantized reference (``reference_fp64``), on the VNNI and plain paths, on
1 and 2 threads."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit import runtime as rt
from lowbit.quant.lsq import LSQActivation
from lowbit.quant.pact import PACTActivation
from lowbit.quant.uniform import UniformActivation
from lowbit.runtime import _jit, kernels_int8, kernels_threads
from lowbit.runtime.compiler import reference_fp64
from lowbit.runtime.kernels_codes import clip_codes, clip_codes_reference
from lowbit.runtime.layers import PackedLinear


def _signed_inputs(n: int, scale: float, seed: int = 0) -> torch.Tensor:
    """Normal values plus every rounding boundary of the grid and its float32 neighbours."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * scale


def _boundaries(step: float, q: int) -> torch.Tensor:
    mid = (np.arange(-q - 1, q + 1, dtype=np.float64) + 0.5) * step
    pts = mid.astype(np.float32)
    pts = np.concatenate([pts, np.nextafter(pts, np.float32(np.inf)), np.nextafter(pts, np.float32(-np.inf)),
                          np.array([0.0, -0.0, np.inf, -np.inf, 1e30, -1e30], np.float32)])
    return torch.from_numpy(pts)


def _spec_codes_np(spec, x: torch.Tensor) -> np.ndarray:
    t = np.minimum(np.maximum(x.numpy(), np.float32(spec.lo)), np.float32(spec.hi))
    return np.rint(t * np.float32(spec.mult)).astype(np.int64) + spec.offset


def _trained(q: nn.Module, x: torch.Tensor) -> nn.Module:
    q.train()
    q(x)
    return q.eval()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("alpha", [0.37, 1.0, 2.5, 6.1])
def test_signed_pact_spec_equals_encode_and_forward(bits, alpha):
    q = PACTActivation(bits, alpha, signed=True).eval()
    spec = q.runtime_codes_spec()
    assert spec is not None and spec.signed
    Q = 2 ** (bits - 1) - 1
    assert (spec.offset, spec.zero, spec.lo) == (Q, float(Q), -spec.hi)
    x = torch.cat([_signed_inputs(50000, alpha), _boundaries(alpha / Q, Q)])
    got = _spec_codes_np(spec, x)
    enc = q.encode(x)
    assert np.array_equal(got, enc.codes.long().numpy())
    assert got.min() == 0 and got.max() == 2 * Q
    with torch.no_grad():
        fwd = q(x).numpy()
    assert np.array_equal((spec.step * (got - spec.zero)).astype(np.float32), fwd)


@pytest.mark.parametrize("cls", [LSQActivation, UniformActivation])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_signed_lsq_uniform_spec(cls, bits):
    """A power-of-two step has a multiplier: the spec exists and equals encode exactly."""
    Q = 2 ** (bits - 1) - 1
    step = 2.0**-3
    if cls is LSQActivation:
        q = _trained(cls(bits, signed=True), torch.randn(1000))
        with torch.no_grad():
            q.s.fill_(step)
    else:
        q = cls(bits, signed=True, clip=step * Q)
    spec = q.runtime_codes_spec()
    assert spec is not None and spec.signed and spec.offset == Q
    x = torch.cat([_signed_inputs(20000, step * Q), _boundaries(step, Q)])
    got = _spec_codes_np(spec, x)
    assert np.array_equal(got, q.encode(x).codes.long().numpy())
    with torch.no_grad():
        fwd = q(x).numpy()
    assert np.array_equal((spec.step * (got - spec.zero)).astype(np.float32), fwd)


def test_signed_spec_refused_when_no_multiplier():
    """LSQ step 0.3 at 8 bits: no float32 multiplier reproduces x / 0.3 at every boundary."""
    q = _trained(LSQActivation(8, signed=True), torch.randn(1000))
    with torch.no_grad():
        q.s.fill_(0.3)
    assert q.runtime_codes_spec() is None


def _threads(n: int, monkeypatch) -> None:
    if n > 1:
        if n > numba.config.NUMBA_NUM_THREADS:
            pytest.skip("numba has fewer threads")
        monkeypatch.setattr(kernels_threads, "PARALLEL_MIN_WORK", 0)
        monkeypatch.setattr(kernels_int8, "INT8_MIN_PARALLEL_MACS", 0)


@pytest.fixture(params=["default", "plain"])
def path(request):
    """The CPU's kernels (VNNI where present) or the forced plain path (``set_plain``)."""
    if request.param == "plain":
        _jit.set_plain(True)
    yield request.param
    if request.param == "plain":
        _jit.set_plain(False)


@pytest.mark.parametrize("threads", [1, 2])
def test_clip_codes_kernel_equals_reference(threads, path, monkeypatch):
    """The codes kernel equals its NumPy reference (one loop for every CPU: the plain path too)."""
    _threads(threads, monkeypatch)
    x = np.concatenate([np.random.default_rng(0).normal(0, 3, 70001).astype(np.float32),
                        _boundaries(2.5 / 127, 127).numpy()])
    x = x[: len(x) // 7 * 7]
    prev = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        for lo, hi, mult, off in [(-2.5, 2.5, 127 / 2.5, 127), (-1.0, 1.0, 7.0, 7), (0.0, 3.0, 255 / 3.0, 0)]:
            got = clip_codes(x.reshape(-1, 7), lo, hi, mult, off)
            want = clip_codes_reference(x.reshape(-1, 7), lo, hi, mult, off)
            assert got.shape == (len(x) // 7, 7) and np.array_equal(got, want)
    finally:
        numba.set_num_threads(prev)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("wbits", [1, 2])
@pytest.mark.parametrize("abits", [4, 8])
def test_packed_linear_signed_exact(wbits, abits, threads, path, monkeypatch, one_thread):
    """Every row count (GEMV, table lookup, int8, bit-serial) of a Linear with signed PACT input
    equals the float64 reference up to the float32 rounding of the output."""
    _threads(threads, monkeypatch)
    torch.manual_seed(0)
    w = {"method": "binary", "bits": 1} if wbits == 1 else {"method": "twn", "bits": 2}
    a = {"method": "pact", "bits": abits, "alpha_init": 2.0, "signed": True}
    model = lowbit.quantize(nn.Sequential(nn.Linear(192, 80)), {"default": {"weight": w, "activation": a}})
    model.eval()
    packed = rt.compile(model, torch.randn(4, 192))
    layer = packed.packed_layers()["0"]
    assert isinstance(layer, PackedLinear) and layer.act.mode == 2
    prev = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        for rows in (1, 3, 9, 64):
            x = torch.randn(rows, 192) * 1.5
            assert _rel(packed(x), reference_fp64(model, x)) < 1e-6, rows
    finally:
        numba.set_num_threads(prev)


class _Block(nn.Module):
    """A bert-like encoder layer: attention (q, k, v, out), LayerNorm, GELU MLP, residuals."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape

        def split(t):
            return t.view(B, S, self.h, D // self.h).transpose(1, 2)

        att = torch.softmax(split(self.q(x)) @ split(self.k(x)).transpose(-1, -2) / (D // self.h) ** 0.5, -1)
        x = self.n1(x + self.o((att @ split(self.v(x))).transpose(1, 2).reshape(B, S, D)))
        return self.n2(x + self.down(nn.functional.gelu(self.up(x))))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("wmethod", ["binary", "twn"])
def test_bert_like_signed_equals_fp64(wmethod, threads, path, monkeypatch, one_thread):
    _threads(threads, monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(_Block(64, 2), _Block(64, 2))
    recipe = {"default": {"weight": {"method": wmethod, "bits": 1 if wmethod == "binary" else 2},
                          "activation": {"method": "pact", "bits": 8, "alpha_init": 4.0, "signed": True}}}
    model = lowbit.quantize(model, recipe).eval()
    packed = rt.compile(model, torch.randn(1, 16, 64))
    layers = packed.packed_layers()
    assert len(layers) == 12 and all(m.act.mode == 2 for m in layers.values())
    prev = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        for batch in (1, 2):
            x = torch.randn(batch, 16, 64)
            assert _rel(packed(x), reference_fp64(model, x)) < 1e-5
    finally:
        numba.set_num_threads(prev)


_SEEN: list[tuple[int, int]] = []


def _probe_threads(x: torch.Tensor) -> torch.Tensor:
    """Records PyTorch's and the runtime kernels' thread counts while the model runs."""
    _SEEN.append((torch.get_num_threads(), kernels_threads.num_threads()))
    return x


torch.fx.wrap("_probe_threads")  # a call in the traced graph, not inlined at tracing


class _Probe(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _probe_threads(x)


def test_one_small_sample_runs_on_one_thread():
    """The thread policy of small calls (compiler.SERIAL_MAX_NUMEL): one sample of few values runs
    PyTorch ops and kernels on the calling thread; a batch of 2 keeps both thread counts; the
    counts are restored after the call."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has fewer threads")
    torch.manual_seed(0)
    a = {"method": "pact", "bits": 8, "alpha_init": 2.0, "signed": True}
    model = lowbit.quantize(nn.Sequential(nn.Linear(32, 32), _Probe(), nn.Linear(32, 8)),
                            {"default": {"weight": {"method": "binary", "bits": 1}, "activation": a}})
    packed = rt.compile(model.eval(), torch.randn(2, 32))
    t0, n0 = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(2)
    numba.set_num_threads(2)
    try:
        _SEEN.clear()
        for x in (torch.randn(1, 32), torch.randn(2, 32), torch.randn(1, 32).numpy()):
            packed(x)
        assert _SEEN == [(1, 1), (2, 2), (1, 1)]
        assert (torch.get_num_threads(), kernels_threads.num_threads()) == (2, 2)
        packed.serial_numel = 0  # policy off
        _SEEN.clear()
        packed(torch.randn(1, 32))
        assert _SEEN == [(2, 2)]
    finally:
        torch.set_num_threads(t0)
        numba.set_num_threads(n0)


@pytest.mark.parametrize("threads", [1, 2])
def test_transformers_bert_signed_equals_fp64(threads, monkeypatch, one_thread):
    """A ``transformers.BertModel`` (1 layer, hidden 64; torch.fx cannot trace it: packed layer by
    layer) with signed 8-bit PACT inputs: every Linear packed with the signed formula, the output
    equal to the float64 reference."""
    transformers = pytest.importorskip("transformers")
    _threads(threads, monkeypatch)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=2, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=256, max_position_embeddings=16,
                                  attn_implementation="eager")

    class Enc(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = transformers.BertModel(cfg, add_pooling_layer=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bert(inputs_embeds=x).last_hidden_state

    recipe = {"default": {"weight": {"method": "twn", "bits": 2},
                          "activation": {"method": "pact", "bits": 8, "alpha_init": 4.0, "signed": True}}}
    model = lowbit.quantize(Enc(), recipe).eval()
    packed = rt.compile(model, torch.randn(1, 16, 64))
    layers = packed.packed_layers()
    assert len(layers) == 6 and all(m.act.mode == 2 for m in layers.values())
    prev = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        for batch in (1, 3):
            x = torch.randn(batch, 16, 64)
            assert _rel(packed(x), reference_fp64(model, x)) < 1e-5
    finally:
        numba.set_num_threads(prev)


@pytest.mark.parametrize("threads", [1, 2])
def test_conv_net_signed_equals_fp64(threads, path, monkeypatch, one_thread):
    """Convolutions with signed inputs (zero padding = code Q) and a Linear head."""
    _threads(threads, monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, stride=2),
                          nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    recipe = {"default": {"weight": {"method": "twn", "bits": 2},
                          "activation": {"method": "pact", "bits": 4, "alpha_init": 1.5, "signed": True}}}
    model = lowbit.quantize(model, recipe).eval()
    packed = rt.compile(model, torch.randn(2, 3, 8, 8))
    layers = packed.packed_layers()
    assert len(layers) == 3 and all(m.act.mode == 2 for m in layers.values())
    prev = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        for batch in (1, 5):
            x = torch.randn(batch, 3, 8, 8)
            assert _rel(packed(x), reference_fp64(model, x)) < 1e-6
    finally:
        numba.set_num_threads(prev)
