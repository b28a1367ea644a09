"""Grid membership, encode/decode identity and straight-through gradients of every quantizer."""

from __future__ import annotations

import math

import pytest
import torch

import lowbit.quant  # registers every quantizer
from lowbit.quant import registry
from lowbit.quant.base import Encoded
from lowbit.quant.binary import BinaryWeight
from lowbit.quant.dorefa import DoReFaActivation, DoReFaWeight, dorefa_weight_normalize
from lowbit.quant.pact import PACTActivation
from lowbit.quant.ste import coarse_derivative
from lowbit.quant.twn import TWNWeight


def _all(kind: str) -> list[tuple[str, int]]:
    return [(n, b) for n in registry.names(kind) for b in registry.get(kind, n).bits_allowed]


def _grid_check(y: torch.Tensor, enc: Encoded) -> None:
    # Forward is exactly the decoded encoding; values come from at most 2^bits levels per branch.
    assert torch.equal(y, enc.decode())
    for e in (enc, *enc.branches):
        assert e.num_levels <= 2**e.bits
        assert int(e.codes.min()) >= 0 and int(e.codes.max()) < e.num_levels
    if not enc.branches and enc.scale.dim() == 0:
        assert y.unique().numel() <= 2**enc.bits


def _weight_cases() -> list[tuple[str, int, bool]]:
    """Every weight quantizer and bit-width, per-channel too where the quantizer has the option."""
    return [(n, b, pc) for n, b in _all("weight") for pc in (False, True)
            if not pc or "per_channel" in registry.options(registry.get("weight", n))]


@pytest.mark.parametrize(("name", "bits", "per_channel"), _weight_cases())
@pytest.mark.parametrize("shape", [(7, 5), (6, 3, 3, 3), (4, 1, 3, 3)])
def test_weight_quantizer_on_grid(name: str, bits: int, per_channel: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(bits)
    try:
        q = registry.create("weight", name, bits, **({"per_channel": True} if per_channel else {}))
    except ValueError as e:  # methods that document per-channel as unsupported
        assert "per_channel" in str(e) or "per-channel" in str(e)
        return
    w = torch.randn(shape) * 0.1
    q.initialize(w)
    if name == "mixed":  # its training forward is a relaxation by design (test_mixed_bits); eval is hard
        q.eval()
    y = q(w)
    assert y.shape == w.shape and y.dtype == w.dtype
    _grid_check(y, q.encode(w))
    if per_channel:  # one scale per output channel (in every branch), each channel on its own grid
        enc = q.encode(w)
        for e in (enc, *enc.branches):
            assert e.scale.numel() == shape[0], (name, tuple(e.scale.shape))


@pytest.mark.parametrize(("name", "bits"), _all("activation"))
def test_activation_quantizer_on_grid(name: str, bits: int) -> None:
    torch.manual_seed(bits)
    q = registry.create("activation", name, bits)
    q.train()
    x = torch.randn(4, 3, 5, 5) * 2
    y = q(x)  # first call may initialise data-dependent state
    y = q(x)
    assert y.shape == x.shape
    _grid_check(y, q.encode(x))
    assert y.unique().numel() <= 2**bits


def test_binary_closed_form_and_ste() -> None:
    w = torch.tensor([[0.5, -0.25, 0.0, 1.5], [-2.0, 0.1, 0.3, -0.1]], requires_grad=True)
    q = BinaryWeight()
    y = q(w)
    alpha = w.detach().abs().mean()
    expected = torch.where(w.detach() >= 0, alpha, -alpha)
    assert torch.equal(y, expected)
    g = torch.randn_like(w)
    (y * g).sum().backward()
    assert torch.equal(w.grad, g)  # identity STE
    # Per channel: the least-squares scale of each row is its mean magnitude.
    qc = BinaryWeight(per_channel=True)
    yc = qc(w.detach())
    assert torch.allclose(yc.abs()[:, 0], w.detach().abs().mean(1))
    # With clip, the gradient is cancelled where |w| > clip.
    w2 = w.detach().clone().requires_grad_(True)
    (BinaryWeight(clip=1.0)(w2) * g).sum().backward()
    assert torch.equal(w2.grad, g * (w2.detach().abs() <= 1.0))


def test_twn_closed_form() -> None:
    w = torch.tensor([0.9, -0.8, 0.05, -0.02, 0.4, -0.6])
    delta = 0.7 * w.abs().mean()
    keep = w.abs() > delta
    alpha = w.abs()[keep].mean()
    expected = torch.sign(w) * keep * alpha
    assert torch.allclose(TWNWeight()(w), expected)
    e = TWNWeight().encode(w)
    assert e.codes.tolist() == [2 if v > delta else 0 if v < -delta else 1 for v in w.tolist()]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dorefa_weight_formula_and_gradient(bits: int) -> None:
    torch.manual_seed(0)
    w = (torch.randn(5, 7) * 0.5).requires_grad_(True)
    y = DoReFaWeight(bits)(w)
    n = 2**bits - 1
    t = torch.tanh(w.detach())
    r = t / (2 * t.abs().max()) + 0.5
    assert torch.allclose(y, 2 * torch.round(r * n) / n - 1, atol=1e-7)
    g = torch.randn_like(w)
    (y * g).sum().backward()
    # STE through round only: the gradient is that of 2*r(w) - 1.
    w2 = w.detach().clone().requires_grad_(True)
    ((2 * dorefa_weight_normalize(w2) - 1) * g).sum().backward()
    assert torch.allclose(w.grad, w2.grad)


def test_dorefa_one_bit_is_mean_magnitude_binary() -> None:
    w = torch.randn(4, 9)
    assert torch.equal(DoReFaWeight(1)(w), BinaryWeight()(w))


@pytest.mark.parametrize("ste", ["identity", "relu", "clipped_relu"])
def test_dorefa_activation_coarse_gradients(ste: str) -> None:
    x = torch.linspace(-1.5, 1.5, 301, dtype=torch.float32).requires_grad_(True)
    y = DoReFaActivation(2, ste=ste)(x)
    assert torch.equal(y, torch.round(x.detach().clamp(0, 1) * 3) / 3)
    y.sum().backward()
    assert torch.equal(x.grad, coarse_derivative(x.detach(), ste, 1.0))


def test_pact_gradients() -> None:
    torch.manual_seed(0)
    q = PACTActivation(3, alpha_init=2.0)
    x = (torch.randn(1000) * 2).requires_grad_(True)
    y = q(x)
    step = 2.0 / 7
    assert torch.allclose(y, torch.round(x.detach().clamp(0, 2.0) / step) * step, atol=1e-6)
    y.sum().backward()
    xd = x.detach()
    assert torch.equal(x.grad, ((xd > 0) & (xd < 2.0)).float())
    assert q.alpha.grad.item() == pytest.approx(float((xd >= 2.0).sum()))


def test_straight_through_is_exact() -> None:
    # q.detach() + (s - s.detach()) is bit-exact in the forward pass even where q - s + s is not.
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1000, generator=g).requires_grad_(True)
    q = torch.round(torch.randn(1000, generator=g) * 7) / 7
    out = lowbit.quant.straight_through(q, s)
    assert torch.equal(out, q)
    assert not torch.equal(s.detach() + (q - s.detach()), q)  # the naive form is not exact
    out.sum().backward()
    assert torch.equal(s.grad, torch.ones_like(s))


def test_bad_bits_and_options_raise() -> None:
    with pytest.raises(ValueError, match="allowed"):
        BinaryWeight(bits=2)
    with pytest.raises(ValueError, match="ste"):
        DoReFaActivation(2, ste="tanh")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="allowed"):
        registry.get("weight", "nope")
    with pytest.raises(ValueError, match="alpha_init"):
        PACTActivation(4, alpha_init=-1)


def test_levels_count_small_bits() -> None:
    # 1-bit activations still use at most two levels; k-bit DoReFa uses exactly 2^k levels.
    x = torch.linspace(-1, 2, 10001)
    for k in range(1, 9):
        assert DoReFaActivation(k)(x).unique().numel() == 2**k
    assert math.isclose(float(DoReFaActivation(1)(torch.tensor([0.6]))), 1.0)


def test_dorefa_refuses_per_channel_above_one_bit() -> None:
    """DoReFa's k >= 2 levels are fixed (no scale to take per channel): per_channel is refused with
    the reason, not accepted and ignored; the 1-bit case (mean-magnitude binary) takes it."""
    with pytest.raises(ValueError, match="per_channel=True is not supported at 2 bits"):
        registry.create("weight", "dorefa", 2, per_channel=True)
    q = registry.create("weight", "dorefa", 1, per_channel=True)
    assert q.encode(torch.randn(5, 7)).scale.numel() == 5
