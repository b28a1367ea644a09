"""The registry of named quantizers: ``registry.get("weight", "binary")`` -> class.

Quantizer classes register themselves with ``@register``; recipes refer to them by name.
"""

from __future__ import annotations

import inspect
from typing import Any

from .base import ActivationQuantizer, Kind, Quantizer, WeightQuantizer

_REGISTRY: dict[Kind, dict[str, type[Quantizer]]] = {"weight": {}, "activation": {}}


def register(cls: type[Quantizer]) -> type[Quantizer]:
    """Class decorator: register under ``cls.kind`` / ``cls.name``."""
    kind = cls.kind
    if cls.name in _REGISTRY[kind]:
        raise ValueError(f"{kind} quantizer {cls.name!r} is already registered")
    _REGISTRY[kind][cls.name] = cls
    return cls


def get(kind: Kind, name: str) -> type[Quantizer]:
    if kind not in _REGISTRY:
        raise KeyError(f"unknown quantizer kind {kind!r}; allowed: weight, activation")
    table = _REGISTRY[kind]
    if name not in table:
        raise KeyError(f"unknown {kind} method {name!r}; allowed: {', '.join(sorted(table))}")
    return table[name]


def names(kind: Kind) -> list[str]:
    return sorted(_REGISTRY[kind])


def options(cls: type[Quantizer]) -> dict[str, Any]:
    """Keyword options a recipe may set for ``cls`` (constructor arguments except ``bits``)."""
    sig = inspect.signature(cls.__init__)
    out: dict[str, Any] = {}
    for p in list(sig.parameters.values())[1:]:
        if p.name == "bits" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[p.name] = None if p.default is inspect.Parameter.empty else p.default
    return out


def create(kind: Kind, name: str, bits: int, **kwargs: Any) -> Quantizer:
    cls = get(kind, name)
    q = cls(bits=bits, **kwargs)
    base = WeightQuantizer if kind == "weight" else ActivationQuantizer
    assert isinstance(q, base)
    return q
