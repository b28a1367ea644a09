"""Training methods named in a recipe's ``methods`` list, turned into Trainer hooks.

    methods:
      - {name: bcgd, rho: 1.0e-5}                  # blended coarse gradient descent
      - {name: binary_relax, growth: 1.02, hard_epoch: 8}
      - {name: pact_l2, weight: 2.0e-4}            # PACT's L2 penalty on the clip levels
      - {name: sinreq, weight: 1.0, grid: quantizer}   # sinusoidal pull onto the weight grid
      - {name: waveq, weight: 1.0, beta_weight: 1.0e-3, grid: max, beta_lr: 1.0e-2}  # ... learned bits
      - {name: kd, teacher: runs/fp, alpha: 0.9, temperature: 4}    # distillation from a float run
      - {name: dcq, teacher: runs/fp, dcq_epochs: 8}                 # divide-and-conquer quantization
      - {name: rvsm, lam: 1.0e-4, beta: 1.0, penalty: tl1}           # sparse weights by splitting
      - {name: wpc, lam: 1.0e-4, group: pe, pe_in: 4}                # structured group lasso + WPC
      - {name: bits_penalty, weight: 1.0e-2}         # charge the expected bits of 'mixed' layers

``teacher`` is a module here; ``lowbit train`` (lowbit.experiment) loads a run directory or
checkpoint path into one first.

Each entry becomes a ``wrap_optimizer``, a callback, a regularizer or a loss for
:class:`lowbit.train.Trainer`; options are the keyword arguments of the method's constructor.
The names, option keys and option types are also listed in :data:`lowbit.recipe.TRAINING_OPTIONS`,
which checks a recipe when it is loaded (recipe.py does not import training); this module refuses to
import if the two disagree.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..quant.mixed import expected_bits
from ..quant.pact import PACTActivation
from ..recipe import TRAINING_METHODS, TRAINING_OPTIONS
from .bcgd import BCGD
from .binary_relax import BinaryRelax, apply_binary_relax
from .dcq import DCQ
from .distill import KnowledgeDistillation
from .rvsm import RVSM
from .sinreq import SinReQ, WaveQ
from .wpc import GroupLassoWPC


@dataclass
class MethodHooks:
    wrap_optimizer: Callable[[Any, nn.Module], Any] | None = None
    callbacks: list[Any] = field(default_factory=list)
    regularizers: list[Callable[[nn.Module], torch.Tensor]] = field(default_factory=list)
    loss_fn: Callable[..., Any] | None = None


class PACTL2:
    """``weight * sum_l alpha_l^2`` over the model's PACT quantizers (Choi et al. 2018)."""

    name = "pact_l2"

    def __init__(self, weight: float = 2e-4) -> None:
        if weight < 0:
            raise ValueError(f"pact_l2: weight must be >= 0, got {weight}")
        self.weight = float(weight)

    def __call__(self, model: nn.Module) -> torch.Tensor:
        alphas = [m.alpha for m in model.modules() if isinstance(m, PACTActivation)]
        if not alphas:
            return torch.zeros(())
        return self.weight * torch.stack([a**2 for a in alphas]).sum()


class BitsPenalty:
    """``weight * E[bits]``: the weight-count-weighted expected bit-width of the ``mixed`` layers."""

    name = "bits"

    def __init__(self, weight: float = 1e-2) -> None:
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise ValueError(f"bits_penalty: weight must be a number >= 0, got {weight!r}")
        self.weight = float(weight)

    def __call__(self, model: nn.Module) -> torch.Tensor:
        return self.weight * expected_bits(model)


def _bits_penalty(model: nn.Module, hooks: MethodHooks, weight: float = 1e-2) -> None:
    expected_bits(model)  # fails now if no layer is quantized with method 'mixed'
    hooks.regularizers.append(BitsPenalty(weight))


def _bcgd(model: nn.Module, hooks: MethodHooks, rho: float = 1e-5) -> None:
    if not 0 <= rho <= 1:
        raise ValueError(f"bcgd: rho must be in [0, 1], got {rho}")
    hooks.wrap_optimizer = BCGD.wrapper(rho)


def _binary_relax(model: nn.Module, hooks: MethodHooks, **kw: Any) -> None:
    hooks.callbacks.append(BinaryRelax(model, **kw))


def _pact_l2(model: nn.Module, hooks: MethodHooks, weight: float = 2e-4) -> None:
    hooks.regularizers.append(PACTL2(weight))


def _sinreq(model: nn.Module, hooks: MethodHooks, **kw: Any) -> None:
    hooks.regularizers.append(SinReQ(model, **kw))


def _waveq(model: nn.Module, hooks: MethodHooks, **kw: Any) -> None:
    wq = WaveQ(model, **kw)
    hooks.regularizers.append(wq)  # its beta parameters join the optimizer
    hooks.callbacks.append(wq)  # clamps beta, logs the bits, checkpoints beta


def _set_loss(hooks: MethodHooks, loss_fn: Any, name: str) -> None:
    if hooks.loss_fn is not None:
        raise ValueError(f"recipe methods: {name} and {hooks.loss_fn.name} both set the training loss; "
                         "keep one")
    hooks.loss_fn = loss_fn


def _kd(model: nn.Module, hooks: MethodHooks, teacher: nn.Module, **kw: Any) -> None:
    _set_loss(hooks, KnowledgeDistillation(teacher, **kw), "kd")


def _dcq(model: nn.Module, hooks: MethodHooks, teacher: nn.Module, **kw: Any) -> None:
    dcq = DCQ(model, teacher, **kw)
    _set_loss(hooks, dcq, "dcq")
    hooks.callbacks.append(dcq)  # it follows the epoch (sectioned, then whole-model)


def _rvsm(model: nn.Module, hooks: MethodHooks, **kw: Any) -> None:
    r = RVSM(model, **kw)
    hooks.regularizers.append(r)
    hooks.callbacks.append(r)  # sparsity per epoch, w <- prox(w) at the end


def _wpc(model: nn.Module, hooks: MethodHooks, **kw: Any) -> None:
    r = GroupLassoWPC(model, **kw)
    hooks.regularizers.append(r)
    hooks.callbacks.append(r)  # logs the fraction of small groups


METHODS: dict[str, Callable[..., None]] = {
    "bcgd": _bcgd,
    "binary_relax": _binary_relax,
    "pact_l2": _pact_l2,
    "sinreq": _sinreq,
    "waveq": _waveq,
    "kd": _kd,
    "dcq": _dcq,
    "rvsm": _rvsm,
    "wpc": _wpc,
    "bits_penalty": _bits_penalty,
}
_CONSTRUCTORS = {"binary_relax": BinaryRelax.__init__, "sinreq": SinReQ.__init__, "waveq": WaveQ.__init__,
                 "kd": KnowledgeDistillation.__init__, "dcq": DCQ.__init__, "rvsm": RVSM.__init__,
                 "wpc": GroupLassoWPC.__init__}


def _options(name: str) -> list[str]:
    fn = _CONSTRUCTORS.get(name, METHODS[name])
    return [p for p in inspect.signature(fn).parameters if p not in ("self", "model", "hooks")]


def _option_types(name: str) -> dict[str, Any]:
    hints = typing.get_type_hints(_CONSTRUCTORS.get(name, METHODS[name]))
    return {p: hints.get(p, Any) for p in _options(name)}


def _check_registry() -> None:
    """The recipe validator's table must list exactly these methods, options and option types."""
    found = {n: _option_types(n) for n in METHODS}
    if found != TRAINING_OPTIONS or {n: tuple(o) for n, o in found.items()} != TRAINING_METHODS:
        raise RuntimeError(f"lowbit.recipe.TRAINING_OPTIONS is out of date: the training methods are {found}")


_check_registry()


def _binary_relax_state(model: nn.Module, eta0: float = 1.0, eval_hard: bool = True, **_: Any) -> None:
    apply_binary_relax(model, eta0, eval_hard)


#: methods that add tensors to the model's own state (so its checkpoints hold them): what puts them
#: on a freshly built model, for a checkpoint of the run to load outside training (evaluation,
#: export); training itself gets them from :func:`build_methods`
MODEL_STATE: dict[str, Callable[..., None]] = {"binary_relax": _binary_relax_state}


def restore_model_state(specs: Sequence[Mapping[str, Any]], model: nn.Module) -> None:
    """Add to ``model`` the state the methods ``specs`` (a recipe's ``methods``) give a trained
    model (:data:`MODEL_STATE`), without their training hooks."""
    for spec in specs:
        fn = MODEL_STATE.get(spec.get("name")) if isinstance(spec, Mapping) else None
        if fn is not None:
            fn(model, **{k: v for k, v in spec.items() if k != "name"})


def build_methods(specs: Sequence[Mapping[str, Any]], model: nn.Module) -> MethodHooks:
    """Hooks for ``specs`` (a recipe's ``methods`` list) on a quantized ``model``."""
    hooks = MethodHooks()
    for i, spec in enumerate(specs):
        where = f"methods[{i}]"
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise ValueError(f"recipe field {where!r}: got {spec!r}; allowed: a mapping with a name "
                             f"in {sorted(METHODS)}")
        name = spec["name"]
        if name not in METHODS:
            raise ValueError(f"recipe field {where + '.name'!r}: got {name!r}; allowed: {sorted(METHODS)}")
        opts = {k: v for k, v in spec.items() if k != "name"}
        allowed = _options(name)
        for k in opts:
            if k not in allowed:
                raise ValueError(f"recipe field {where + '.' + k!r}: got {opts[k]!r}; allowed keys for "
                                 f"{name}: {allowed}")
        fn = _CONSTRUCTORS.get(name, METHODS[name])
        for pname, param in inspect.signature(fn).parameters.items():
            if pname not in ("self", "model", "hooks") and param.default is param.empty and pname not in opts:
                hint = " (a float run directory or checkpoint)" if pname == "teacher" else ""
                raise ValueError(f"recipe field {where + '.' + pname!r}: missing; {name} needs it{hint}")
        METHODS[name](model, hooks, **opts)
    return hooks
