"""``load(path) -> PackedModel``: packed inference straight from a ``.lowbit`` file.

The model is rebuilt with :func:`lowbit.load_packed`; then every quantized weight is served by a
:class:`~lowbit.export.packed.FrozenWeight` holding the file's stored encoding (``load_packed``
already adds one where re-quantizing the decoded weight is not a fixed point; here every
quantized layer gets one), so :func:`~lowbit.export.packed.encode_weight`, the one function that
gives a layer's codes, returns the stored codes and :func:`compile` never re-quantizes a weight.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from ..export.packed import FrozenWeight, frozen_weight, load_packed, read_packed
from .compiler import PackedModel, compile


def freeze_stored_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Make every quantized weight of ``model`` (loaded from ``path``) serve the file's stored
    encoding through a :class:`FrozenWeight`. Returns ``model``."""
    pf = read_packed(path)
    for rec in pf.layers.values():
        layer = model.get_submodule(rec.module)
        if rec.encoded is not None and frozen_weight(layer, rec.param) is None:
            # load_packed checked that the layer's weight equals the decoded codes bit for bit
            parametrize.register_parametrization(layer, rec.param, FrozenWeight(rec.encoded))
    return model


def load(
    path: str | os.PathLike[str],
    example_inputs: Any = None,
    *,
    model: nn.Module | None = None,
    **compile_kwargs: Any,
) -> PackedModel:
    """Packed inference of a ``.lowbit`` file, built from its stored codes (no re-quantization).

    ``model``: as for :func:`lowbit.load_packed` (None for zoo models, else a fresh float instance
    of the architecture). ``example_inputs``: as ``example_input`` of :func:`compile` (None: the
    model must be traceable by ``torch.fx``; nothing is measured). Other keyword arguments go to
    :func:`compile`.
    """
    loaded = load_packed(path, model)
    freeze_stored_weights(loaded, path)
    return compile(loaded, example_inputs, **compile_kwargs)
