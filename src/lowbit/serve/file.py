"""One file holds a whole supernet: its latent weights, every sub-net's BatchNorm and quantizer
state, and a JSON description (sub-nets, quantizers, the float model to rebuild, per-sub-net info
such as validation/test accuracy).

The container is safetensors (:mod:`lowbit.export.container`): loading never executes code, and a
truncated, corrupted or foreign file is a :class:`lowbit.export.errors.FormatError`. Metadata keys:
``format`` = ``lowbit.supernet``, ``version`` = ``1``, ``supernet`` = the JSON of
:meth:`lowbit.nn.supernet.Supernet.spec` plus ``model`` (the zoo spec ``{"name", "kwargs"}``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from .._io import atomic_write
from ..export.container import parse_json, read_bytes, read_container, serialize
from ..export.errors import FormatError
from ..nn.supernet import Supernet, SupernetError

__all__ = ["FORMAT", "load_supernet", "save_supernet"]

FORMAT = "lowbit.supernet"
VERSION = "1"


def save_supernet(supernet: Supernet, path: str | os.PathLike[str],
                  model_spec: dict[str, Any] | None = None) -> None:
    """Write ``supernet`` to ``path`` atomically. ``model_spec`` (default: the float model's
    ``lowbit_spec``, set by :func:`lowbit.models.build_model`) lets :func:`load_supernet` rebuild it."""
    spec = dict(supernet.spec())
    spec["model"] = model_spec if model_spec is not None else getattr(supernet.model, "lowbit_spec", None)
    tensors = {k: v.detach() for k, v in supernet.state_dict().items()}
    meta = {"format": FORMAT, "version": VERSION, "supernet": json.dumps(spec, sort_keys=True)}
    atomic_write(path, serialize(tensors, meta))


def load_supernet(path: str | os.PathLike[str], model: nn.Module | None = None) -> Supernet:
    """Read a supernet file; ``model`` is the float model to wrap (default: rebuilt from the zoo
    spec in the file). Returns it in eval mode with every sub-net's quantized weights cached."""
    what = f"supernet file {str(path)!r}"
    tensors, meta = read_container(read_bytes(path), what)
    if meta.get("format") != FORMAT:
        raise FormatError(f"{what}: metadata format is {meta.get('format')!r}, expected {FORMAT!r} "
                          "(a file written by lowbit.serve.save_supernet)")
    if meta.get("version") != VERSION:
        raise FormatError(f"{what}: version {meta.get('version')!r} is not supported (expected {VERSION})")
    spec = parse_json(meta.get("supernet", ""), f"{what}: supernet description")
    if not isinstance(spec, dict):
        raise FormatError(f"{what}: the supernet description must be a JSON object")
    if model is None:
        from ..models import build_from_spec

        if not isinstance(spec.get("model"), dict):
            raise FormatError(f"{what}: the file names no zoo model; pass model= (the float model)")
        try:
            model = build_from_spec(spec["model"])
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{what}: cannot rebuild model {spec['model']!r}: {e}") from None
    try:
        sn = Supernet(model, spec["subnets"], spec["input_shape"], weight=spec["weight"],
                      activation=spec["activation"], keep_float=spec["keep_float"])
    except (KeyError, TypeError, SupernetError) as e:
        raise FormatError(f"{what}: bad supernet description: {e}") from None
    missing = set(sn.state_dict()) - set(tensors)
    extra = set(tensors) - set(sn.state_dict())
    if missing or extra:
        raise FormatError(f"{what}: tensors do not match the described supernet (missing "
                          f"{sorted(missing)[:5]}, unexpected {sorted(extra)[:5]})")
    try:
        sn.load_state_dict(tensors)
    except RuntimeError as e:
        raise FormatError(f"{what}: {e}") from None
    info = spec.get("info", {})
    sn.info = {n: dict(info.get(n, {})) for n in sn.names}
    return sn.prepare()
