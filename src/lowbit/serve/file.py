"""One file holds a whole supernet.

Version 2, what :func:`save_supernet` writes and ``lowbit serve`` loads: every sub-net's packed
integer codes and scales, shared tensors stored once, no latent weights
(:mod:`lowbit.export.supernet_file`); :func:`load_supernet` returns a
:class:`~lowbit.export.supernet_file.LoadedSupernet` whose sub-nets serve the stored codes.

Version 1, the trainable form (``save_supernet(..., codes=False)``): the latent weights, every
sub-net's BatchNorm and quantizer state and a JSON description; :func:`load_supernet` returns the
:class:`~lowbit.nn.supernet.Supernet` (to train on, extract from, or write as version 2).

Both are safetensors (:mod:`lowbit.export.container`): loading never executes code, and a
truncated, corrupted or foreign file is a :class:`lowbit.export.errors.FormatError`. Metadata keys:
``format`` = ``lowbit.supernet``, ``version``, ``supernet`` = the JSON of
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
from ..export.supernet_file import VERSION as CODES_VERSION
from ..export.supernet_file import LoadedSupernet, load_supernet_file, save_supernet_file, supernet_from_spec
from ..nn.supernet import Supernet

__all__ = ["FORMAT", "load_supernet", "save_supernet"]

FORMAT = "lowbit.supernet"
VERSION = "1"


def save_supernet(supernet: Supernet | LoadedSupernet, path: str | os.PathLike[str],
                  model_spec: dict[str, Any] | None = None, codes: bool = True) -> dict[str, int] | None:
    """Write ``supernet`` to ``path`` atomically: every sub-net's packed codes (``codes=True``,
    version 2; returns the file's sizes) or the trainable latent form (``codes=False``, version 1).
    ``model_spec`` (default: the float model's ``lowbit_spec``, set by
    :func:`lowbit.models.build_model`) lets :func:`load_supernet` rebuild the architecture."""
    if codes:
        return save_supernet_file(supernet, path, model_spec)
    if not isinstance(supernet, Supernet):
        raise ValueError("save_supernet(codes=False) needs the trainable Supernet (latent weights); a "
                         "supernet loaded from codes has none")
    spec = dict(supernet.spec())
    spec["model"] = model_spec if model_spec is not None else getattr(supernet.model, "lowbit_spec", None)
    tensors = {k: v.detach() for k, v in supernet.state_dict().items()}
    meta = {"format": FORMAT, "version": VERSION, "supernet": json.dumps(spec, sort_keys=True)}
    atomic_write(path, serialize(tensors, meta), example="model.supernet")
    return None


def load_supernet(path: str | os.PathLike[str], model: nn.Module | None = None) -> Supernet | LoadedSupernet:
    """Read a supernet file; ``model`` is the float model (default: rebuilt from the zoo spec in the
    file). Version 2: every sub-net from its stored codes (:func:`load_supernet_file`). Version 1:
    the trainable supernet in eval mode with every sub-net's quantized weights cached."""
    what = f"supernet file {str(path)!r}"
    data = read_bytes(path)
    tensors, meta = read_container(data, what)
    if meta.get("format") != FORMAT:
        raise FormatError(f"{what}: metadata format is {meta.get('format')!r}, expected {FORMAT!r} "
                          "(a file written by lowbit.serve.save_supernet)")
    if meta.get("version") == CODES_VERSION:
        return load_supernet_file(path, model)
    if meta.get("version") != VERSION:
        raise FormatError(f"{what}: version {meta.get('version')!r} is not supported (expected "
                          f"{CODES_VERSION}, packed codes, or {VERSION}, latent weights)")
    spec = parse_json(meta.get("supernet", ""), f"{what}: supernet description")
    if not isinstance(spec, dict):
        raise FormatError(f"{what}: the supernet description must be a JSON object")
    sn = supernet_from_spec(spec, model, what)
    missing = set(sn.state_dict()) - set(tensors)
    extra = set(tensors) - set(sn.state_dict())
    if missing or extra:
        raise FormatError(f"{what}: tensors do not match the described supernet (missing "
                          f"{sorted(missing)[:5]}, unexpected {sorted(extra)[:5]})")
    try:
        sn.load_state_dict(tensors)
    except RuntimeError as e:
        raise FormatError(f"{what}: {e}") from None
    return sn.prepare()  # sn.info: the description's, checked by supernet_from_spec
