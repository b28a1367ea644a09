"""BCGD: blended coarse gradient descent (Yin, Zhang, Lyu, Osher, Qi, Xin; Res. Math. Sci. 2019,
arXiv 1808.05240; reference code penhunt/full-quantization-DNN, ``BCGD_cifar/util/quant.py``,
``optimization_step``).

For every quantized weight ``w`` (latent float) with quantizer ``Q``::

    w_{t+1} = (1 - rho) w_t + rho Q(w_t) - lr * grad~ f(Q(w_t))

``grad~`` is the coarse gradient: the backward pass through the quantized network (which uses
``Q(w_t)`` and straight-through estimators). The gradient is taken at the quantized point but
applied to a blend of the float weight and its projection; ``rho = 0`` is plain
straight-through training (BinaryConnect), and a small ``rho > 0`` gives the sufficient-descent
property proved in the paper. Evaluation uses ``Q(w)``.

As in the reference code, :class:`BCGD` wraps an ordinary optimizer: after ``backward()``,
``step()`` writes ``(1 - rho) w + rho Q(w)`` into each latent weight (``Q`` is the layer's
weight quantizer evaluated under ``no_grad`` on the current latent weight, *before* the
update) and then calls the inner optimizer's ``step()``, so momentum and weight decay act as
they do in the inner optimizer (weight decay sees the blended weight). Parameters that are not
quantized weights (biases, BN, learned quantizer scales, BCGD's activation resolution) get the
inner optimizer's step only.

The wrapper is a ``torch.optim.Optimizer`` whose ``param_groups``, ``state`` and ``defaults``
*are* the inner optimizer's, so learning-rate schedulers accept it and drive the inner
optimizer; ``state_dict()`` is the inner optimizer's plus ``{"bcgd": {"rho": rho}}``.
``rho`` is a plain attribute (the reference keeps it constant, ``1e-5`` in its README).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..nn import quantizable_layers, weight_quantizer

QuantPair = tuple[Tensor, Callable[[Tensor], Tensor]]
Named = tuple[str, Tensor, Callable[[Tensor], Tensor]]


def quantized_weights(model: nn.Module) -> list[Named]:
    """``(layer name, latent weight, weight quantizer)`` for every weight-quantized layer."""
    out = []
    for name, layer in quantizable_layers(model).items():
        q = weight_quantizer(layer)
        if q is not None:
            out.append((name, layer.parametrizations.weight.original, q))  # type: ignore[union-attr]
    return out


def _pairs(model_or_params: nn.Module | Iterable[QuantPair]) -> list[Named]:
    if isinstance(model_or_params, nn.Module):
        pairs = quantized_weights(model_or_params)
        if not pairs:
            raise ValueError(
                "BCGD: the model has no quantized weight (no layer whose weight is parametrized by a "
                "lowbit WeightQuantizer); call lowbit.quantize(model, recipe) before wrapping the "
                "optimizer"
            )
        return pairs
    out = []
    for i, item in enumerate(model_or_params):
        if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], Tensor)
                and callable(item[1])):
            raise TypeError(
                "BCGD: model_or_params must be an nn.Module or an iterable of (latent weight, "
                f"quantizer) pairs; item {i} is {type(item).__name__}"
            )
        out.append((f"param{i}", item[0], item[1]))
    if not out:
        raise ValueError("BCGD: no (latent weight, quantizer) pair given")
    return out


def _shared(name: str) -> Any:
    """A property that reads/writes the inner optimizer's attribute once it is attached (and a
    private slot before, while ``Optimizer.__init__`` runs)."""
    private = "_own_" + name

    def get(self: Any) -> Any:
        inner = self.__dict__.get("_inner")
        return getattr(inner, name) if inner is not None else self.__dict__[private]

    def set_(self: Any, value: Any) -> None:
        inner = self.__dict__.get("_inner")
        if inner is not None:
            setattr(inner, name, value)
        else:
            self.__dict__[private] = value

    return property(get, set_)


class BCGD(Optimizer):
    """Blend latent quantized weights toward their projection, then step the inner optimizer.

    Args:
        optimizer: the inner optimizer (SGD with momentum in the paper), built on the model's
            parameters, latent weights included.
        model_or_params: a model quantized by ``lowbit.quantize`` (its weight-quantized layers
            are found), or an iterable of ``(latent weight, Q)`` pairs with ``Q`` any callable.
        rho: the blending factor in [0, 1].

    ``step(closure)`` calls the closure (forward + backward) first, then blends, then steps.
    """

    def __init__(self, optimizer: Optimizer, model_or_params: nn.Module | Iterable[QuantPair],
                 rho: float = 1e-5) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"BCGD wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, BCGD):
            raise ValueError("BCGD: the optimizer is already wrapped by BCGD")
        if isinstance(rho, bool) or not isinstance(rho, int | float) or not 0 <= rho <= 1:
            raise ValueError(f"BCGD: rho must be a number in [0, 1], got {rho!r}")
        pairs = _pairs(model_or_params)
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [name for name, w, _ in pairs if id(w) not in owned]
        if missing:
            raise ValueError(
                f"BCGD: the latent weights of {missing[:5]} are not parameters of the wrapped optimizer; "
                "build the optimizer on model.parameters() (after lowbit.quantize)"
            )
        self._inner: Optimizer | None = None
        params = [p for g in optimizer.param_groups for p in g["params"]]
        super().__init__(params, dict(optimizer.defaults))
        self._inner = optimizer
        self.rho = float(rho)
        self._pairs = pairs

    # The inner optimizer's groups, state and defaults, shared (not copied): schedulers and
    # gradient scalers that edit ``param_groups`` edit the inner optimizer's.
    param_groups = _shared("param_groups")
    state = _shared("state")
    defaults = _shared("defaults")

    @property
    def optimizer(self) -> Optimizer:
        """The wrapped optimizer."""
        assert self._inner is not None
        return self._inner

    @torch.no_grad()
    def blend_(self) -> None:
        """``w <- (1 - rho) w + rho Q(w)`` for every quantized latent weight."""
        rho = self.rho
        if rho == 0:
            return
        for _, w, q in self._pairs:
            qw = q(w)
            w.copy_((1 - rho) * w + rho * qw)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.blend_()
        self.optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.__dict__.get("_inner") is None:  # during Optimizer.__init__
            super().add_param_group(param_group)
        else:
            self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        sd = dict(self.optimizer.state_dict())
        sd["bcgd"] = {"rho": self.rho}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        extra = sd.pop("bcgd", None)
        self.optimizer.load_state_dict(sd)
        if extra is not None:
            self.rho = float(extra["rho"])

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"BCGD(rho={self.rho}, {len(self._pairs)} quantized weights, {self.optimizer!r})"

    @classmethod
    def wrapper(cls, rho: float = 1e-5) -> Callable[[Optimizer, nn.Module], BCGD]:
        """``wrap_optimizer(opt, model) -> BCGD(opt, model, rho)`` for the Trainer."""

        def wrap(optimizer: Optimizer, model: nn.Module) -> BCGD:
            return cls(optimizer, model, rho)

        return wrap
