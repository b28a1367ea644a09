"""``quantize(model, recipe)``: attach quantizers to any module that holds a weight.

- Weights: each quantized weight is parametrized (``torch.nn.utils.parametrize``) by its weight
  quantizer, so ``layer.weight`` *is* the quantized weight that forward uses and the latent float
  weight (``layer.parametrizations.weight.original``) stays trainable. This covers Linear,
  Conv1d/2d/3d, ConvTranspose, grouped and depthwise convolutions, transformers' ``Conv1D`` and
  user modules that read ``self.weight``, and these weights not called ``weight``:

  * ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``: ``weight_ih_l{k}``, ``weight_hh_l{k}`` (and
    ``weight_hr_l{k}`` of a projected LSTM), each with its ``_reverse`` twin when bidirectional.
    ``nn.RNNBase`` caches its weights in ``_flat_weights``; a forward pre-hook refreshes that list
    from the (quantized) attributes before every call, so the quantized weights are the ones used.
  * ``nn.MultiheadAttention``: ``in_proj_weight`` (or ``q_proj_weight``, ``k_proj_weight``,
    ``v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim``). Its ``out_proj`` is an
    ordinary Linear child: its weight is quantized like any Linear's (attention reads
    ``out_proj.weight``, i.e. the quantized one).

  **Names in a recipe.** A module's ``weight`` is addressed by the module's name (``"fc1"``, as
  before); any other weight by the module's name, a dot and the parameter's name:
  ``"rnn.weight_hh_l0"``, ``"rnn.weight_ih_l1_reverse"``, ``"attn.in_proj_weight"``. A rule that
  matches the module's name (``"rnn"``, ``"@first"``) applies to all of its weights; a later rule
  on the qualified name overrides it for that weight.

  **Per-channel axis.** Per-channel statistics are taken along the output-channel dimension of
  the weight, which depends on the layer type (:func:`default_channel_axis`): dim 0 for Linear,
  ConvNd, RNN and attention weights, dim 1 for ``ConvTransposeNd`` (``in x out/groups x k``; with
  ``groups > 1`` a scale is shared by the ``groups`` output channels with the same index in
  their group) and transformers' ``Conv1D`` (``in x out``). A recipe's weight option
  ``channel_axis`` overrides it.

- Activations: the activation quantizer becomes the child module ``input_quantizer`` of the
  layer and a forward pre-hook quantizes the layer's first input. Quantizing the *input of each
  quantized layer* means functional activations (``F.relu``) and any other op between layers
  cannot escape quantization. For ``nn.MultiheadAttention`` the pre-hook quantizes query, key and
  value with the one quantizer (the same tensor once, so self-attention stays self-attention);
  for an RNN it quantizes the input sequence (not the hidden state).

  What cannot be done is refused, not reported: ``MultiheadAttention.out_proj``'s forward is
  never called (attention multiplies by its weight directly), so an input quantizer there would
  never run. Such a request is skipped with a :class:`SkippedQuantizationWarning`
  (:class:`QuantizeError` under ``strict=True``), and :func:`quantized_layers` lists only what
  was attached. A recipe that leaves every layer in float warns too (an error under ``strict``).

"Layers" are modules with a quantizable weight of two or more dimensions (norm layers and
embeddings excluded), in registration order; ``@first``/``@last`` in a recipe refer to the
first and last of them.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..quant.base import ActivationQuantizer, WeightQuantizer
from ..recipe import Recipe, RecipeError

log = logging.getLogger(__name__)

_EXCLUDED = (nn.Embedding, nn.EmbeddingBag, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_RNN_WEIGHT = re.compile(r"weight_(ih|hh|hr)_l\d+(_reverse)?")
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


class QuantizeError(ValueError):
    """The model cannot be quantized as asked (e.g. it is quantized already)."""


class UnmatchedRuleWarning(UserWarning):
    """A recipe rule matched no layer of the model."""


class SkippedQuantizationWarning(UserWarning):
    """A quantizer the recipe asks for was not attached (it could not run), or none was."""


def _param(m: nn.Module, name: str) -> Tensor | None:
    """The trainable tensor behind ``m.<name>``: the latent one if parametrized."""
    if parametrize.is_parametrized(m, name):
        return m.parametrizations[name].original  # type: ignore[union-attr,index]
    return m._parameters.get(name)


def _weight_names(m: nn.Module) -> list[str]:
    """Names of ``m``'s own quantizable weights (tensors of >= 2 dims)."""
    if isinstance(m, (_EXCLUDED, WeightQuantizer, ActivationQuantizer)):
        return []
    if isinstance(m, nn.RNNBase):
        names = [n for n in m._flat_weights_names if _RNN_WEIGHT.fullmatch(n)]
    elif isinstance(m, nn.MultiheadAttention):
        names = list(_MHA_WEIGHTS)
    else:
        names = ["weight"]
    out = []
    for n in names:
        w = _param(m, n)
        if w is not None and w.dim() >= 2:
            out.append(n)
    return out


def weight_target(module_name: str, param: str) -> str:
    """The name a recipe uses for a weight: the module's name for ``weight``, else ``module.param``."""
    if param == "weight":
        return module_name
    return f"{module_name}.{param}" if module_name else param


def _qualified(module_name: str, param: str) -> str:
    return f"{module_name}.{param}" if module_name else param


def latent_weight(layer: nn.Module, name: str = "weight") -> Tensor:
    """The trainable float weight: the latent one behind a weight quantizer, else ``layer.<name>``."""
    w = _param(layer, name)
    if w is None:
        raise QuantizeError(f"{type(layer).__name__} has no parameter {name!r}")
    return w


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules with a quantizable weight of >= 2 dims, in registration order."""
    return {name: m for name, m in model.named_modules() if _weight_names(m)}


def quantizable_weights(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Recipe name (see the module docstring) -> (module, parameter name) of every quantizable weight."""
    return {
        weight_target(name, p): (m, p) for name, m in model.named_modules() for p in _weight_names(m)
    }


def default_channel_axis(layer: nn.Module, param: str = "weight") -> int:
    """The output-channel dimension of ``layer.<param>``: 1 for ConvTransposeNd and transformers'
    ``Conv1D`` (weight stored in x out), 0 otherwise."""
    if param == "weight":
        if isinstance(layer, nn.modules.conv._ConvTransposeNd):
            return 1
        if any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers")
               for c in type(layer).__mro__):
            return 1
    return 0


def weight_quantizer(layer: nn.Module, name: str = "weight") -> WeightQuantizer | None:
    """The quantizer of ``layer.<name>``, or None."""
    if not parametrize.is_parametrized(layer, name):
        return None
    for p in layer.parametrizations[name]:  # type: ignore[index]
        if isinstance(p, WeightQuantizer):
            return p
    return None


def weight_quantizers(model: nn.Module) -> dict[str, tuple[nn.Module, str, WeightQuantizer]]:
    """Qualified parameter name (``"fc1.weight"``, ``"rnn.weight_hh_l0"``) -> (module, parameter
    name, quantizer) for every quantized weight of ``model``, in registration order."""
    out: dict[str, tuple[nn.Module, str, WeightQuantizer]] = {}
    for name, m in model.named_modules():
        params = getattr(m, "parametrizations", None)
        if params is None:
            continue
        for p in params:
            q = weight_quantizer(m, p)
            if q is not None:
                out[_qualified(name, p)] = (m, p, q)
    return out


def input_quantizer(layer: nn.Module) -> ActivationQuantizer | None:
    q = getattr(layer, "input_quantizer", None)
    return q if isinstance(q, ActivationQuantizer) else None


def _quantize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    # A module-level function (not a closure) so deepcopy'd models quantize their own inputs.
    q = module.input_quantizer
    if not args or not isinstance(args[0], Tensor):
        return None
    return (q(args[0]), *args[1:])


def _quantize_qkv(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Pre-hook of MultiheadAttention: query, key and value through the one input quantizer."""
    q = module.input_quantizer
    names = ("query", "key", "value")
    vals = [args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names)]
    done: list[tuple[Tensor, Tensor]] = []  # the same tensor is quantized once (self-attention)
    new = []
    for v in vals:
        if not isinstance(v, Tensor):
            new.append(v)
            continue
        hit = next((o for t, o in done if t is v), None)
        if hit is None:
            hit = q(v)
            done.append((v, hit))
        new.append(hit)
    args = tuple(new[i] if i < 3 else a for i, a in enumerate(args))
    kwargs = {k: (new[names.index(k)] if k in names else v) for k, v in kwargs.items()}
    return args, kwargs


def _refresh_flat_weights(module: nn.Module, args: tuple[Any, ...]) -> None:
    # nn.RNNBase passes its cached ``_flat_weights`` to the kernel: rebuild the list from the
    # (parametrized) attributes so forward uses the current quantized weights.
    module._flat_weights = [getattr(module, n) if hasattr(module, n) else None
                            for n in module._flat_weights_names]


def refresh_rnn_weights(model: nn.Module) -> None:
    """Rebuild every ``nn.RNNBase``'s cached ``_flat_weights`` from its (quantized) weights, without
    autograd history (after loading, the cache must hold the restored weights)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.RNNBase):
                _refresh_flat_weights(m, ())


def _detach_flat_weights(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    # After forward the cache would keep the quantized weights with their autograd history:
    # non-leaf tensors, which copy.deepcopy refuses (an EMA copy, a best-model copy). The graph
    # already holds what backward needs, so the cache keeps detached values only.
    module._flat_weights = [w.detach() if isinstance(w, Tensor) else w for w in module._flat_weights]


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> layer for every layer that ``quantize`` changed (a weight or its input quantized)."""
    out = {}
    for n, m in model.named_modules():
        params = getattr(m, "parametrizations", None)
        has_w = params is not None and any(weight_quantizer(m, p) is not None for p in params)
        if has_w or input_quantizer(m) is not None:
            out[n] = m
    return out


def _skip(msg: str, strict: bool) -> None:
    if strict:
        raise QuantizeError(msg)
    log.warning(msg)
    warnings.warn(msg, SkippedQuantizationWarning, stacklevel=3)


def _attn_out_projs(model: nn.Module) -> set[str]:
    """Names of the ``out_proj`` children of MultiheadAttention modules (never called)."""
    return {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention)}


def _set_channel_axis(wq: WeightQuantizer, axis: int | None, layer: nn.Module, param: str, w: Tensor,
                      target: str) -> None:
    a = default_channel_axis(layer, param) if axis is None else axis
    if not -w.dim() <= a < w.dim():
        raise RecipeError(f"recipe weight option 'channel_axis' for {target!r}: got {a}; allowed: an "
                          f"integer in [{-w.dim()}, {w.dim() - 1}] (the weight has shape {tuple(w.shape)})")
    wq.channel_axis = a % w.dim()


def quantize(model: nn.Module, recipe: Recipe | dict[str, Any], *, strict: bool = False) -> nn.Module:
    """Quantize ``model`` in place following ``recipe``; returns the same model.

    ``strict=True`` turns a rule that matches no layer into a :class:`RecipeError`, and a
    quantizer that cannot be attached (or a recipe that quantizes nothing) into a
    :class:`QuantizeError`; otherwise each is logged and warned about.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__} "
                        "(e.g. lowbit.models.build_model('lenet5'))")
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
            "model has no layer with a weight of 2 or more dimensions (Linear, Conv, RNN, attention, or "
            "a module with a `weight` parameter); nothing to quantize"
        )
    names = list(layers)
    first, last = names[0], names[-1]
    targets = {n: [weight_target(n, p) for p in _weight_names(m)] for n, m in layers.items()}
    all_names = names + [t for ts in targets.values() for t in ts if t not in layers]
    unmatched = recipe.unmatched_rules(all_names, first, last)
    if unmatched:
        msg = (
            f"recipe rule(s) matching {unmatched} match no layer of the model; layers are: "
            f"{', '.join(all_names[:12])}{' ...' if len(all_names) > 12 else ''}"
        )
        if strict:
            raise RecipeError(msg)
        log.warning(msg)
        warnings.warn(msg, UnmatchedRuleWarning, stacklevel=2)
    never_called = _attn_out_projs(model)
    for name, layer in layers.items():
        plan = recipe.plan(name, first, last)
        for param, target in zip(_weight_names(layer), targets[name], strict=True):
            spec = plan.weight if target == name else recipe.plan(target, first, last, also=(name,)).weight
            if spec is None:
                continue
            wq = spec.build("weight")
            assert isinstance(wq, WeightQuantizer)
            w = _param(layer, param)
            assert w is not None
            _set_channel_axis(wq, spec.channel_axis, layer, param, w, target)
            wq.initialize(w.detach())
            parametrize.register_parametrization(layer, param, wq)
            log.debug("quantized weight %s: %s", _qualified(name, param), spec)
        if isinstance(layer, nn.RNNBase) and any(weight_quantizer(layer, p) for p in _weight_names(layer)):
            layer.register_forward_pre_hook(_refresh_flat_weights)
            layer.register_forward_hook(_detach_flat_weights)
            _refresh_flat_weights(layer, ())
        if plan.activation is not None:
            if name in never_called:
                _skip(f"layer {name!r}: its input cannot be quantized (MultiheadAttention never calls "
                      "out_proj's forward, it multiplies by out_proj.weight directly); the activation "
                      f"quantizer {plan.activation.method!r} was not attached. Its weight is quantized "
                      "as asked. Set `activation: null` for it to silence this.", strict)
                continue
            aq = plan.activation.build("activation")
            assert isinstance(aq, ActivationQuantizer)
            aq.layer_name = name
            layer.input_quantizer = aq
            if isinstance(layer, nn.MultiheadAttention):
                layer.register_forward_pre_hook(_quantize_qkv, with_kwargs=True)
            else:
                layer.register_forward_pre_hook(_quantize_input)
            log.debug("quantized input of %s: %s", name, plan.activation)
    if not quantized_layers(model) and (recipe.asks_quantizers or not recipe.methods):
        # (a recipe of training methods alone quantizes nothing: WaveQ learning a float model's bits)
        more = " ..." if len(names) > 12 else ""
        _skip(f"the recipe quantized none of the model's {len(names)} layers (every weight and activation "
              f"spec resolved to null); layers are: {', '.join(names[:12])}{more}", strict)
    model.lowbit_recipe = recipe.to_dict()
    return model
