"""``quantize(model, recipe)``: attach quantizers to any module that holds a weight.

- Weights: the layer's ``weight`` is parametrized (``torch.nn.utils.parametrize``) by the weight
  quantizer, so ``layer.weight`` *is* the quantized weight that forward uses and the latent float
  weight (``layer.parametrizations.weight.original``) stays trainable. This covers Linear,
  Conv1d/2d/3d, grouped and depthwise convolutions and user modules that read ``self.weight``.
- Activations: the activation quantizer becomes the child module ``input_quantizer`` of the
  layer and a forward pre-hook quantizes the layer's first input. Quantizing the *input of each
  quantized layer* means functional activations (``F.relu``) and any other op between layers
  cannot escape quantization.

"Layers" are modules with a direct ``weight`` parameter of two or more dimensions (norm layers
and embeddings excluded), in registration order; ``@first``/``@last`` in a recipe refer to
the first and last of them.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..quant.base import ActivationQuantizer, WeightQuantizer
from ..recipe import Recipe, RecipeError

log = logging.getLogger(__name__)

_EXCLUDED = (nn.Embedding, nn.EmbeddingBag, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


class QuantizeError(ValueError):
    """The model cannot be quantized as asked (e.g. it is quantized already)."""


class UnmatchedRuleWarning(UserWarning):
    """A recipe rule matched no layer of the model."""


def _weight_param(m: nn.Module) -> Tensor | None:
    if parametrize.is_parametrized(m, "weight"):
        return m.parametrizations.weight.original  # type: ignore[union-attr]
    w = m._parameters.get("weight")
    return w


def latent_weight(layer: nn.Module) -> Tensor:
    """The trainable float weight: the latent one behind a weight quantizer, else ``layer.weight``."""
    w = _weight_param(layer)
    if w is None:
        raise QuantizeError(f"{type(layer).__name__} has no weight parameter")
    return w


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules with a direct ``weight`` parameter of >= 2 dims, in registration order."""
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, (_EXCLUDED, WeightQuantizer, ActivationQuantizer)):
            continue
        w = _weight_param(m)
        if w is not None and w.dim() >= 2:
            out[name] = m
    return out


def weight_quantizer(layer: nn.Module) -> WeightQuantizer | None:
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    for p in layer.parametrizations.weight:  # type: ignore[union-attr]
        if isinstance(p, WeightQuantizer):
            return p
    return None


def input_quantizer(layer: nn.Module) -> ActivationQuantizer | None:
    q = getattr(layer, "input_quantizer", None)
    return q if isinstance(q, ActivationQuantizer) else None


def _quantize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    # A module-level function (not a closure) so deepcopy'd models quantize their own inputs.
    q = module.input_quantizer
    if not args or not isinstance(args[0], Tensor):
        return None
    return (q(args[0]), *args[1:])


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> layer for every layer that ``quantize`` changed."""
    return {
        n: m
        for n, m in model.named_modules()
        if weight_quantizer(m) is not None or input_quantizer(m) is not None
    }


def quantize(model: nn.Module, recipe: Recipe | dict[str, Any], *, strict: bool = False) -> nn.Module:
    """Quantize ``model`` in place following ``recipe``; returns the same model.

    ``strict=True`` turns a rule that matches no layer into a :class:`RecipeError`; otherwise
    it is logged and warned about (:class:`UnmatchedRuleWarning`).
    """
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_dict(recipe)
    already = quantized_layers(model)
    if already:
        raise QuantizeError(
            f"model is already quantized ({len(already)} quantized layers, e.g. "
            f"{next(iter(already))!r}); quantizing twice would wrap quantizers in quantizers. "
            "Quantize a fresh copy of the float model instead."
        )
    layers = quantizable_layers(model)
    if not layers:
        raise QuantizeError(
            "model has no layer with a weight of 2 or more dimensions (Linear, Conv, or a module "
            "with a `weight` parameter); nothing to quantize"
        )
    names = list(layers)
    first, last = names[0], names[-1]
    unmatched = recipe.unmatched_rules(names, first, last)
    if unmatched:
        msg = (
            f"recipe rule(s) matching {unmatched} match no layer of the model; layers are: "
            f"{', '.join(names[:12])}{' ...' if len(names) > 12 else ''}"
        )
        if strict:
            raise RecipeError(msg)
        log.warning(msg)
        warnings.warn(msg, UnmatchedRuleWarning, stacklevel=2)
    for name, layer in layers.items():
        plan = recipe.plan(name, first, last)
        if plan.weight is not None:
            wq = plan.weight.build("weight")
            assert isinstance(wq, WeightQuantizer)
            wq.initialize(_weight_param(layer).detach())  # type: ignore[union-attr]
            parametrize.register_parametrization(layer, "weight", wq)
        if plan.activation is not None:
            aq = plan.activation.build("activation")
            layer.input_quantizer = aq
            layer.register_forward_pre_hook(_quantize_input)
        if plan.weight is not None or plan.activation is not None:
            log.debug("quantized %s: weight=%s activation=%s", name, plan.weight, plan.activation)
    model.lowbit_recipe = recipe.to_dict()
    return model
