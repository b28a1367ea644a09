"""The model zoo registry: ``name -> constructor + one-line description``.

Every model built by :func:`build_model` carries ``model.lowbit_spec = {"name": ...,
"kwargs": {...}}`` (JSON-serializable, with every constructor argument resolved, defaults
included) so that a packed file can rebuild the same architecture with
``build_model(**spec)`` or :func:`build_from_spec`.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from .hsi import HSICNN3d
from .lenet import LeNet5, LeNet5Avg, ReLeQLeNet, ReLeQSimpleNet
from .mlp import MLP
from .mobilenet import MobileNetTiny
from .resnet import resnet18, resnet20, resnet32, resnet44, resnet56
from .svhn import SVHNCNN, DoReFaSVHN
from .vgg import VGG11, VGGSmall


@dataclass(frozen=True)
class ModelEntry:
    constructor: Callable[..., nn.Module]
    description: str

    def parameters(self) -> list[str]:
        """Keyword arguments the constructor accepts."""
        return list(inspect.signature(self.constructor).parameters)


MODELS: dict[str, ModelEntry] = {
    "mlp": ModelEntry(MLP, "MLP 784-512-512-10 (hidden sizes, optional BN), flattens its input"),
    "lenet5": ModelEntry(LeNet5, "LeNet-5 with BN, MNIST 28x28 (input_size=32 for 32x32)"),
    "lenet5_avg": ModelEntry(LeNet5Avg, "LeNet-5 with BN and average pooling (converts exactly to an SNN)"),
    "hsi_cnn3d": ModelEntry(
        HSICNN3d, "HybridSN-style 3-D/2-D CNN for hyperspectral (bands, patch, patch) cubes (lowbit.snn)"
    ),
    "releq_lenet": ModelEntry(ReLeQLeNet, "ReLeQ's Caffe LeNet: conv20-5, conv50-5, fc500, fc10"),
    "releq_simplenet": ModelEntry(
        ReLeQSimpleNet, "ReLeQ's CIFAR SimpleNet: conv6-5, conv16-5, fc120, fc84, fc10"
    ),
    "svhn_cnn": ModelEntry(SVHNCNN, "ReLeQ's SVHN net: 7 BN convs (32..256) + fc10, 32x32"),
    "dorefa_svhn": ModelEntry(DoReFaSVHN, "DoReFa-Net's SVHN model (40x40, also 32x32)"),
    "resnet20": ModelEntry(resnet20, "CIFAR ResNet-20 (He et al. 2016), option-A shortcuts"),
    "resnet32": ModelEntry(resnet32, "CIFAR ResNet-32 (He et al. 2016), option-A shortcuts"),
    "resnet44": ModelEntry(resnet44, "CIFAR ResNet-44 (He et al. 2016), option-A shortcuts"),
    "resnet56": ModelEntry(resnet56, "CIFAR ResNet-56 (He et al. 2016), option-A shortcuts"),
    "resnet18": ModelEntry(resnet18, "ImageNet ResNet-18 (torchvision keys); cifar_stem for 32x32"),
    "vgg_small": ModelEntry(VGGSmall, "VGG-Small of LQ-Nets: 2x128C3-MP-2x256C3-MP-2x512C3-MP-FC"),
    "vgg11": ModelEntry(VGG11, "CIFAR VGG-11 with BN, 512 -> num_classes classifier"),
    "mobilenet_tiny": ModelEntry(
        MobileNetTiny, "tiny depthwise-separable CNN for 28x28/32x32 (depthwise conv coverage)"
    ),
}


def list_models() -> list[str]:
    """Names of the registered models, in registration order."""
    return list(MODELS)


def register_model(name: str, description: str) -> Callable:
    """Decorator adding a user constructor (class or function taking JSON-serializable
    keyword arguments) to :data:`MODELS`, so that ``build_model`` and packed files can
    rebuild it."""

    def deco(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = ModelEntry(constructor, description)
        return constructor

    return deco


def _jsonable(value: Any, where: str) -> Any:
    """Tuples -> lists, recursively; anything JSON cannot hold is a ValueError."""
    if isinstance(value, tuple | list):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, where) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ValueError(f"{where}: value {value!r} is not JSON-serializable")


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build zoo model ``name`` with constructor keyword arguments ``kwargs``.

    ``build_model(**model.lowbit_spec)`` (i.e. ``name=..., kwargs={...}``) also works.
    Unknown names or keyword arguments raise ``ValueError`` listing the allowed ones.
    """
    if set(kwargs) == {"kwargs"} and isinstance(kwargs["kwargs"], Mapping):
        kwargs = dict(kwargs["kwargs"])
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(list_models())}")
    entry = MODELS[name]
    sig = inspect.signature(entry.constructor)
    allowed = entry.parameters()
    var_kw = [p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD]
    unknown = [k for k in kwargs if k not in allowed]
    if unknown and not var_kw:
        raise ValueError(
            f"model {name!r}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(allowed)}"
        )
    try:
        bound = sig.bind(**kwargs)
    except TypeError as exc:  # e.g. a required argument of a user-registered model
        raise ValueError(f"model {name!r}: {exc}; allowed: {', '.join(allowed)}") from None
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    for v in var_kw:  # a user constructor's **kwargs: record them flat
        arguments.update(arguments.pop(v, {}))
    resolved = {k: _jsonable(v, f"model {name!r}, parameter {k!r}") for k, v in arguments.items()}
    model = entry.constructor(**kwargs)
    model.lowbit_spec = {"name": name, "kwargs": resolved}
    json.dumps(model.lowbit_spec)  # guaranteed by _jsonable; keeps the promise explicit
    return model


def build_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild a model from its ``lowbit_spec`` (e.g. read back from a packed file)."""
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"a model spec is a mapping with 'name' and 'kwargs', got {spec!r}")
    unknown = set(spec) - {"name", "kwargs"}
    if unknown:
        raise ValueError(f"unknown model spec key(s) {sorted(unknown)}; allowed: name, kwargs")
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"model spec 'kwargs' must be a mapping, got {kwargs!r}")
    return build_model(spec["name"], **kwargs)
