"""BCGD's quantized ReLU with a learnable resolution (Yin, Zhang, Lyu, Osher, Qi, Xin, "Blended
coarse gradient descent for full quantization of deep neural networks", Res. Math. Sci. 2019,
arXiv 1808.05240; reference code penhunt/full-quantization-DNN, ``nets/quant_uni_type.py``).

With ``b`` bits, ``L = 2^b - 1`` and a learned resolution ``a > 0`` per module (note ``ceil``,
not round-to-nearest)::

    y = 0               x <= 0
    y = a * ceil(x/a)   0 < x <= (L-1) a
    y = L * a           x > (L-1) a

i.e. ``y = a * clip(ceil(x/a), 0, L)``: 2^b levels ``0, a, ..., L a``, encoded as codes 0..L
with scale ``a``.

Backward for ``x`` (``ste``; the reference's ``bfun``)::

    identity      ('idnty')  g
    relu          ('relu')   g * 1[x > 0]
    clipped_relu  ('inplt')  g * 1[0 < x <= L a]           (default, as in the reference config)

Backward for ``a``: ``clamp(rate_factor * sum(g * d), -1, 1)`` with ``d`` chosen by ``a_grad``
(the reference's ``gd_type``)::

    'mean' (default)  (L+1)/2 on 0 < x <= L a,        L on x > L a   (average level)
    'ae'              ceil(x/a) on 0 < x <= (L-1) a,   L on x > (L-1) a
                      (= y/a: the a.e. derivative of the forward, ceil held constant)
    'min'             1 on 0 < x <= L a,               L on x > L a
    'pact'            0 on x <= L a,                   L on x > L a   (PACT-like, clip only)

Other details, as in the reference: ``a`` is clamped to [1e-3, 5]: the forward always uses
``a.clamp(1e-3, 5)`` and, in training mode, also writes the clamp back into the parameter
before use (the reference does ``alpha.data.clamp_`` at every forward; ``clamp_()`` does it
by hand). The gradient of ``a`` is not multiplied by the clamp's derivative. With
``learn_a=False`` the resolution is not trained but reset to ``max|x| / L`` at every
training-mode forward (the reference resets it in the backward, so its forward lags one batch).

Initial ``a``, by bits: the reference's ``{1: 1.2221, 2: 0.6511, 4: 0.1946}``; other bit-widths
are derived by the rule those numbers follow: the step ``a`` of the uniform quantizer
``a * clip(round(x/a), 0, L)`` with least mean-squared error on a half-Gaussian ``|N(0, 1)|``
(:func:`half_gaussian_uniform_step`; it gives 1.2240, 0.6508, 0.1932 for 1, 2, 4 bits, within
0.8% of the reference's values, which look like numerical estimates of the same thing)::

    3: 0.3534   5: 0.1055   6: 0.05726   7: 0.03087   8: 0.01653

The reference applies this quantized ReLU as the network's non-linearity; lowbit applies it to
the input of each quantized layer. For ReLU networks the input is post-ReLU, so the forward is
the same; the one difference is that ``ste='identity'`` cannot pass gradient to negative
pre-activations here, because the model's own ReLU sits in front. (Quirk not reproduced: the
reference's CIFAR ResNet block shares one ``a`` between its two activations.)

Speed: on contiguous float32 CPU tensors the quantized ReLU runs as one fused loop forward and
one backward (``fused.py``): the same values and input gradients, the resolution's gradient
equal to float rounding. The torch formulas here define the quantizer and serve every other
case.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import fused
from .base import ActCodesSpec, ActivationQuantizer, CoarseGrad, Encoded
from .registry import register
from .ste import coarse_derivative

A_MIN, A_MAX = 1e-3, 5.0
REFERENCE_A_INIT = {1: 1.2221, 2: 0.6511, 4: 0.1946}
DERIVED_A_INIT = {3: 0.3534, 5: 0.1055, 6: 0.05726, 7: 0.03087, 8: 0.01653}
A_GRADS = ("mean", "ae", "min", "pact")
AGrad = Literal["mean", "ae", "min", "pact"]


# ---- pure functions ------------------------------------------------------------------------
def half_gaussian_uniform_mse(a: float, bits: int) -> float:
    """E[(x - a clip(round(x/a), 0, L))^2] for x ~ |N(0, 1)|, in closed form."""
    L = 2**bits - 1

    def moments(t: float) -> tuple[float, float, float]:
        # int_0^t x^k 2 phi(x) dx for k = 0, 1, 2 (t may be inf)
        if math.isinf(t):
            return 1.0, math.sqrt(2 / math.pi), 1.0
        phi = math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
        m0 = math.erf(t / math.sqrt(2))
        m1 = 2 * (1 / math.sqrt(2 * math.pi) - phi)
        m2 = m0 - 2 * t * phi
        return m0, m1, m2

    total = 0.0
    for k in range(L + 1):
        lo = 0.0 if k == 0 else (k - 0.5) * a
        hi = math.inf if k == L else (k + 0.5) * a
        h0, h1, h2 = moments(hi)
        l0, l1, l2 = moments(lo)
        c = k * a
        total += (h2 - l2) - 2 * c * (h1 - l1) + c * c * (h0 - l0)
    return total


def half_gaussian_uniform_step(bits: int, tol: float = 1e-9) -> float:
    """argmin_a of :func:`half_gaussian_uniform_mse` (golden-section search on (0, 3))."""
    lo, hi = 1e-4, 3.0
    r = (math.sqrt(5) - 1) / 2
    c, d = hi - r * (hi - lo), lo + r * (hi - lo)
    fc, fd = half_gaussian_uniform_mse(c, bits), half_gaussian_uniform_mse(d, bits)
    while hi - lo > tol:
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - r * (hi - lo)
            fc = half_gaussian_uniform_mse(c, bits)
        else:
            lo, c, fc = c, d, fd
            d = lo + r * (hi - lo)
            fd = half_gaussian_uniform_mse(d, bits)
    return (lo + hi) / 2


def default_a_init(bits: int) -> float:
    if bits in REFERENCE_A_INIT:
        return REFERENCE_A_INIT[bits]
    return DERIVED_A_INIT[bits]


def bcgd_codes(x: Tensor, a: Tensor, bits: int) -> Tensor:
    """Codes ``clip(ceil(x/a), 0, L)`` (as floats): 0 for x <= 0, L above (L-1) a."""
    return torch.clamp(torch.ceil(x / a), 0, 2**bits - 1)


def bcgd_a_derivative(x: Tensor, a: Tensor, bits: int, mode: str) -> Tensor:
    """The factor ``d`` of the resolution's gradient ``rate * sum(g * d)`` (reference gd_type)."""
    L = 2**bits - 1
    above = x > a * L
    if mode == "ae":
        top = x > a * (L - 1)
        inner = (x > 0) & ~top
        return torch.where(top, float(L), torch.where(inner, torch.ceil(x / a), 0.0)).to(x.dtype)
    if mode == "pact":
        return torch.where(above, float(L), 0.0).to(x.dtype)
    if mode in ("mean", "min"):
        inner_val = (L + 1) / 2 if mode == "mean" else 1.0
        inner = (x > 0) & ~above
        return torch.where(above, float(L), torch.where(inner, inner_val, 0.0)).to(x.dtype)
    raise ValueError(f"bcgd: unknown a_grad={mode!r}; allowed: {', '.join(A_GRADS)}")


class BCGDReLUFunction(torch.autograd.Function):
    """y = a_c clip(ceil(x/a_c), 0, L), a_c = clamp(a, 1e-3, 5); BCGD's custom backward.

    CPU float32 contiguous inputs run on the fused kernels (``fused.py``: one pass each way, the
    same values and gradients); the torch formulas below are the definition.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, a: Tensor, bits: int, ste: str, a_grad: str, rate_factor: float, learn_a: bool
    ) -> Tensor:
        a_c = a.detach().clamp(A_MIN, A_MAX)
        ctx.save_for_backward(x, a_c)
        ctx.conf = (bits, ste, a_grad, rate_factor, learn_a, a.shape, a.dtype)
        ctx.fused = fused.supported(x)
        if ctx.fused:
            return fused.bcgd_forward(x, a_c, 2**bits - 1)
        return bcgd_codes(x, a_c, bits) * a_c

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, a_c = ctx.saved_tensors
        bits, ste, a_grad, rate_factor, learn_a, a_shape, a_dtype = ctx.conf
        want_a = learn_a and ctx.needs_input_grad[1]
        if ctx.fused:
            grad_x, total = fused.bcgd_backward(x, g, a_c, 2**bits - 1, ste, a_grad)
            grad_x = grad_x if ctx.needs_input_grad[0] else None
            sum_gd = torch.tensor(total, dtype=g.dtype) if want_a else None
        else:
            top = a_c * (2**bits - 1)
            grad_x = g * coarse_derivative(x, ste, top) if ctx.needs_input_grad[0] else None  # type: ignore[arg-type]
            sum_gd = (g * bcgd_a_derivative(x, a_c, bits, a_grad)).sum() if want_a else None
        grad_a = None
        if sum_gd is not None:
            grad_a = torch.clamp(rate_factor * sum_gd, -1, 1).to(a_dtype).reshape(a_shape)
        return grad_x, grad_a, None, None, None, None, None


# ---- module --------------------------------------------------------------------------------
@register
class BCGDActivation(ActivationQuantizer):
    name = "bcgd"
    bits_allowed = tuple(range(1, 9))
    default_ste = "clipped_relu"

    def __init__(
        self,
        bits: int,
        ste: CoarseGrad | None = None,
        a_init: float | None = None,
        a_grad: AGrad = "mean",
        rate_factor: float = 0.01,
        learn_a: bool = True,
    ) -> None:
        super().__init__(bits, ste)
        if a_grad not in A_GRADS:
            raise ValueError(f"bcgd: unknown a_grad={a_grad!r}; allowed: {', '.join(A_GRADS)}")
        if a_init is None:
            a_init = default_a_init(bits)
        if isinstance(a_init, bool) or not isinstance(a_init, int | float) or not A_MIN <= a_init <= A_MAX:
            raise ValueError(f"bcgd: a_init must be a number in [{A_MIN}, {A_MAX}], got {a_init!r}")
        if isinstance(rate_factor, bool) or not isinstance(rate_factor, int | float) or rate_factor < 0:
            raise ValueError(f"bcgd: rate_factor must be a number >= 0, got {rate_factor!r}")
        if not isinstance(learn_a, bool):
            raise ValueError(f"bcgd: learn_a must be true or false, got {learn_a!r}")
        self.a_grad = a_grad
        self.rate_factor = float(rate_factor)
        self.learn_a = learn_a
        self.levels = 2**bits - 1
        self.a = nn.Parameter(torch.tensor(float(a_init)), requires_grad=learn_a)

    def resolution(self) -> Tensor:
        """The resolution in use, ``a.clamp(1e-3, 5)`` (detached)."""
        return self.a.detach().clamp(A_MIN, A_MAX)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp the parameter itself to [1e-3, 5] (what the reference does at every forward)."""
        self.a.clamp_(A_MIN, A_MAX)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.check_sign(x)
            if not self.learn_a:
                with torch.no_grad():
                    self.a.fill_(x.detach().abs().max() / self.levels)
            self.clamp_()
        return BCGDReLUFunction.apply(
            x, self.a, self.bits, self.ste, self.a_grad, self.rate_factor, self.learn_a
        )

    def encode(self, x: Tensor) -> Encoded:
        x = x.detach()
        a = self.resolution()
        return Encoded(
            codes=bcgd_codes(x, a, self.bits).to(torch.uint8),
            levels=torch.arange(self.levels + 1, dtype=x.dtype, device=x.device),
            scale=a,
            bits=self.bits,
        )

    def runtime_codes_spec(self) -> ActCodesSpec | None:
        """None: the codes round up (``ceil(x / a)``, code 1 from the smallest positive ``x``), which
        no round-to-nearest ``rint(clip(x, 0, hi) * mult)`` reproduces; the runtime calls
        :meth:`encode` (exact, uniform levels ``code * a``)."""
        return None

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, ste={self.ste}, a={float(self.a.detach()):.4g}, a_grad={self.a_grad}, "
            f"rate_factor={self.rate_factor}, learn_a={self.learn_a}"
        )
