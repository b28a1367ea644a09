"""The packed ``.lowbit`` format: integer codes bit-packed, plus scales and JSON metadata.

A ``.lowbit`` file is a standard **safetensors** container (loading never unpickles or runs
code). Its tensors:

- ``quant/<layer>/<i>/codes``  uint8, the packed codes of encoding ``i`` of a quantized
  layer's weight (``weight_quantizer(layer).encode(latent)``; ``i = 0`` is the encoding itself,
  ``i >= 1`` its residual-expansion branches, in pre-order);
- ``quant/<layer>/<i>/levels`` the codebook (1-D float), ``quant/<layer>/<i>/scale`` the scale
  (0-d per tensor, or per output channel with the shape that broadcasts against the weight);
- ``state/<key>`` every other entry of the model's ``state_dict`` as it is: biases, batch
  norm statistics, full-precision layers, quantizer parameters (PACT alpha, learned scales).
  Only the latent float weights of quantized layers are left out: the codes replace them.
  (A weight quantizer is stored as :meth:`~lowbit.quant.base.WeightQuantizer.stored` says: a
  training-time wrapper such as BinaryRelax's as the quantizer it wraps, without its training
  state, under the keys the stored recipe's model has.)

Weights are encoded as the model computes them in eval mode, whatever mode it is in.

Its ``__metadata__`` holds ``format = "lowbit"`` and ``lowbit`` = a JSON header::

    {"format": "lowbit", "version": 2, "lowbit_version": "0.1.0",
     "recipe": {...model.lowbit_recipe...}, "spec": {...model.lowbit_spec...} | null,
     "fp32_params": <parameters of the float model, the FP32 size baseline / 4>,
     "layers": {"<name>": {"type": "Conv2d", "shape": [...], "dtype": "float32",
                          "param": <the parameter's name, only when it is not "weight">,
                          "weight": null | {"method", "bits", "per_channel",
                              "channel_axis": null | <axis of the per-channel scale>, "encodings": [
                              {"parent": null|int, "bits", "num_levels", "numel",
                               "packing": {"kind": "bits", "bits": b} | {"kind": "radix",
                                           "base": 3, "per_byte": 5},
                               "nbytes", "levels_dtype", "scale_dtype", "scale_shape"}]},
                          "activation": null | {"method", "bits"}}},
     "state": ["<key>", ...],
     "tied": {"<key>": "<stored key>", ...}}

``tied`` lists state entries that are the same tensor as a stored one (tied parameters, e.g.
an embedding and an unquantized LM head): each is stored once. A scale's ``scale_shape`` keeps
the weight's rank (size ``C`` on ``channel_axis``: 0 for Linear/Conv, 1 for ConvTranspose and
transformers' ``Conv1D``). Version 1 files (no ``tied``, no ``channel_axis``) read unchanged.

``layers`` lists every quantizable weight (conv/linear/any module with a >= 2-D weight, named
as in recipes: the module, or ``module.param`` for a weight not called ``weight``, e.g. an LSTM's
``weight_hh_l0``), so a report can be made from the file alone. The packing layouts are in :mod:`.bitpack`.

**Loading** (:func:`load_packed`) validates everything before building anything, rebuilds
the float model (zoo models from ``spec``, in the weights' stored dtype; otherwise the ``model``
the caller passes: a fresh float instance of the same architecture), quantizes it with the stored recipe
(:func:`lowbit.quantize`), loads the stored state and sets each quantized layer's latent
weight so that the layer's weight equals the decoded weight **bit for bit**:

1. the latent weight is set to the decoded weight ``w_hat`` (or, for quantizers that define
   ``preimage(encoded)``, e.g. DoReFa's ``atanh``, to that preimage);
2. if the quantizer maps it back exactly (``torch.equal(Q(latent), w_hat)``), the layer is an
   ordinary quantized layer, ready to fine-tune;
3. otherwise (in floating point, re-quantizing is often *not* a fixed point: binary's
   ``alpha = mean|w|`` of ``N`` copies of ``alpha`` rounds differently, DoReFa's ``tanh``
   normalisation moves the levels), a :class:`FrozenWeight` parametrization is appended
   after the quantizer. It serves the stored ``w_hat`` exactly (gradients still flow to the
   latent weight straight-through) and keeps the stored encoding, so saving the loaded model
   again writes the same codes. :func:`thaw` removes it to fine-tune with the live quantizer
   (whose output then starts from ``Q(w_hat)``, not ``w_hat``).

A quantized layer whose latent weight is tied to a stored float tensor (GPT-2's ``lm_head``
shares ``wte``'s Parameter) is never written to: the float twin keeps its stored values and,
unless the quantizer reproduces the codes from it, a :class:`FrozenWeight` serves them.

Either way the loaded model computes exactly what the saved fake-quantized model computed.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._io import atomic_write
from ..nn.quantize import (
    SkippedQuantizationWarning,
    UnmatchedRuleWarning,
    input_quantizer,
    quantizable_weights,
    quantize,
    refresh_rnn_weights,
    weight_quantizer,
)
from ..quant.base import Encoded, Quantizer, WeightQuantizer, straight_through
from ..recipe import Recipe, RecipeError
from .bitpack import Packing, PackingError, choose_packing
from .container import DTYPE_NAMES, parse_json, read_bytes, read_container, serialize
from .errors import FormatError

log = logging.getLogger(__name__)

FORMAT_NAME = "lowbit"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)  # version 1: no "tied" map, no "channel_axis"; it reads unchanged
META_FORMAT = "format"
META_HEADER = "lowbit"
MAX_LEVELS = 256

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_FLOAT_NAMES = {v: k for k, v in FLOAT_DTYPES.items()}


# ----------------------------------------------------------------------------------------------
# frozen (exactly served) weights
# ----------------------------------------------------------------------------------------------
def flatten_encoded(enc: Encoded) -> list[tuple[Encoded, int | None]]:
    """Pre-order list of ``(encoding, parent index)``; the root has parent ``None``."""
    out: list[tuple[Encoded, int | None]] = []

    def walk(e: Encoded, parent: int | None) -> None:
        idx = len(out)
        out.append((e, parent))
        for b in e.branches:
            walk(b, idx)

    walk(enc, None)
    return out


def unflatten_encoded(items: list[tuple[Tensor, Tensor, Tensor, int, int | None]]) -> Encoded:
    """Inverse of :func:`flatten_encoded` from ``(codes, levels, scale, bits, parent)``."""
    children: dict[int, list[int]] = {i: [] for i in range(len(items))}
    for i, it in enumerate(items):
        if it[4] is not None:
            children[it[4]].append(i)

    def build(i: int) -> Encoded:
        codes, levels, scale, bits, _ = items[i]
        return Encoded(
            codes=codes, levels=levels, scale=scale, bits=bits, branches=tuple(build(j) for j in children[i])
        )

    return build(0)


class FrozenWeight(nn.Module):
    """A parametrization appended after a layer's quantizer that serves a stored quantized
    weight exactly (``forward`` returns it, with a straight-through gradient to its input) and
    remembers the encoding it came from. Its buffers are not persistent: a ``state_dict`` of
    the layer has the same keys as an ordinary quantized layer."""

    def __init__(self, enc: Encoded) -> None:
        super().__init__()
        flat = flatten_encoded(enc)
        self._meta = [(e.bits, p) for e, p in flat]
        for i, (e, _) in enumerate(flat):
            self.register_buffer(f"codes{i}", e.codes.detach().clone(), persistent=False)
            self.register_buffer(f"levels{i}", e.levels.detach().clone(), persistent=False)
            self.register_buffer(f"scale{i}", e.scale.detach().clone(), persistent=False)
        self.register_buffer("decoded", enc.decode().detach().clone(), persistent=False)

    def encoded(self) -> Encoded:
        return unflatten_encoded(
            [
                (getattr(self, f"codes{i}"), getattr(self, f"levels{i}"), getattr(self, f"scale{i}"), b, p)
                for i, (b, p) in enumerate(self._meta)
            ]
        )

    def forward(self, w: Tensor) -> Tensor:
        return straight_through(self.decoded.to(w.dtype), w)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.decoded.shape)}, encodings={len(self._meta)}"


def _plist(layer: nn.Module, param: str = "weight") -> Any:
    return layer.parametrizations[param]  # type: ignore[index]


def frozen_weight(layer: nn.Module, param: str = "weight") -> FrozenWeight | None:
    if not parametrize.is_parametrized(layer, param):
        return None
    for p in _plist(layer, param):
        if isinstance(p, FrozenWeight):
            return p
    return None


def quantizer_input(layer: nn.Module, param: str = "weight") -> Tensor:
    """The tensor the layer's weight quantizer sees: the latent weight, passed through any
    parametrization registered before the quantizer."""
    plist = _plist(layer, param)
    wq = weight_quantizer(layer, param)
    x = plist.original
    for p in plist:
        if p is wq:
            break
        x = p(x)
    return x


def encode_weight(layer: nn.Module, param: str = "weight") -> Encoded:
    """The encoding of a quantized weight (``layer.<param>``), as save_packed stores it (the
    stored one for a :class:`FrozenWeight` weight, else ``weight_quantizer(layer).encode(...)``).

    The one definition of a layer's codes: :func:`save_packed`, ONNX export and the packed
    runtime (``lowbit.runtime.layers.build_packed``, ``compiler.reference_fp64``) all call it."""
    fz = frozen_weight(layer, param)
    if fz is not None:
        return fz.encoded()
    wq = weight_quantizer(layer, param)
    if wq is None:
        raise ValueError(f"layer has no quantizer on {param!r}")
    with torch.no_grad():
        return wq.encode(quantizer_input(layer, param).detach())


def thaw(model: nn.Module) -> nn.Module:
    """Remove every :class:`FrozenWeight` (left by :func:`load_packed` where re-quantizing the
    decoded weight is not a fixed point), so the live quantizers drive the weights again, e.g.
    to fine-tune. Returns ``model``."""
    for m in model.modules():
        for param in list(getattr(m, "parametrizations", {}) or {}):
            plist = _plist(m, param)
            for i in reversed(range(len(plist))):
                if isinstance(plist[i], FrozenWeight):
                    del plist[i]
    return model


def _latent_candidates(q: WeightQuantizer, enc: Encoded, decoded: Tensor) -> list[Tensor]:
    """The decoded weight, then the quantizer's own preimage of the encoding (if it has one)."""
    out = [decoded, q.preimage(enc)]
    return [c.to(decoded.dtype) for c in out if isinstance(c, Tensor) and c.shape == decoded.shape]


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def is_hf_conv1d(layer: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a Linear whose weight is stored in x out."""
    mro = type(layer).__mro__
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in mro)


def torch_type_name(module: nn.Module) -> str:
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn.modules"):
            return cls.__name__
    return type(module).__name__


def _latent_key(module: str, param: str = "weight") -> str:
    key = f"parametrizations.{param}.original"
    return f"{module}.{key}" if module else key


def split_target(target: str, param: str) -> str:
    """The module name of a weight's recipe name (``"rnn.weight_hh_l0"`` -> ``"rnn"``)."""
    if param == "weight":
        return target
    return target[: -len(param) - 1] if target.endswith("." + param) else ""


def _state_key(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def quant_tensor_name(layer: str, i: int, part: str) -> str:
    return f"quant/{layer}/{i}/{part}"


def state_tensor_name(key: str) -> str:
    return f"state/{key}"


def _method_name(q: nn.Module) -> str:
    return str(getattr(type(q), "name", type(q).__name__))


@dataclass
class Payload:
    """What :func:`save_packed` writes: tensors, the JSON header and per-layer byte counts."""

    tensors: dict[str, Tensor]
    header: dict[str, Any]
    layer_bytes: dict[str, dict[str, int]] = field(default_factory=dict)

    def metadata(self) -> dict[str, str]:
        return {META_FORMAT: FORMAT_NAME, META_HEADER: json.dumps(self.header, separators=(",", ":"))}

    def to_bytes(self) -> bytes:
        return serialize(self.tensors, self.metadata())


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def float_param_count(model: nn.Module) -> int:
    """Parameters of the float model: latent weights stand for the quantized ones; quantizer
    parameters (PACT alpha, learned steps) and buffers (batch-norm statistics) do not count."""
    skip = {id(p) for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def _channel_axis(enc: Encoded) -> int | None:
    """The axis a per-channel scale runs along (its one dimension > 1), None for per-tensor."""
    for e, _ in flatten_encoded(enc):
        big = [d for d, n in enumerate(e.scale.shape) if n > 1]
        if e.scale.numel() > 1 and len(big) == 1:
            return big[0] + e.codes.dim() - e.scale.dim()
    return None


def _tensor_identity(t: Tensor) -> tuple:
    """Two state entries with the same identity are one tensor (tied parameters)."""
    if t.numel() == 0:
        return ("empty", id(t))
    ptr = t.untyped_storage().data_ptr()
    return (t.device.type, ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _packed_state(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` as a file stores it: the entries of a weight quantizer that is stored
    as another one (:meth:`WeightQuantizer.stored`, e.g. BinaryRelax's wrapper) are replaced, in
    place, by that one's entries under the same prefix, so they have the keys of the model the
    stored recipe builds and no training-only state."""
    swaps = {f"{n}.": m.stored() for n, m in model.named_modules()
             if isinstance(m, WeightQuantizer) and m.stored() is not m}
    out: dict[str, Tensor] = {}
    done: set[str] = set()
    for key, value in model.state_dict().items():
        prefix = next((p for p in swaps if key.startswith(p)), None)
        if prefix is None:
            out[key] = value
        elif prefix not in done:  # at a swapped quantizer's first entry: all of its stored one's
            done.add(prefix)
            out.update({prefix + k: v for k, v in swaps[prefix].state_dict().items()})
    return out


def _describe_key(key: str) -> str:
    """``'fc2.bias'`` -> ``module 'fc2', tensor 'bias'``; a latent weight names its layer."""
    module, found, rest = ("." + key).partition(".parametrizations.")
    if found:
        return f"layer {module[1:]!r}, its latent {rest.split('.')[0]}"
    module, _, tensor = key.rpartition(".")
    return f"module {module!r}, tensor {tensor!r}"


def check_finite(named: Iterable[tuple[str, Tensor]], action: str) -> None:
    """Raise ValueError naming each floating tensor of ``named`` that holds NaN or Inf (``action``:
    what is refused, e.g. "cannot save the packed model"). Such a model came from a diverged run:
    its file would compute NaN in PyTorch and finite garbage in a runtime that clips NaN to a code."""
    bad = []
    for key, t in named:
        if not isinstance(t, Tensor) or not t.is_floating_point():
            continue
        n = int((~torch.isfinite(t.detach())).sum())
        if n:
            bad.append(f"{key!r} ({_describe_key(key)}: {n} of {t.numel()} values)")
    if bad:
        shown = "; ".join(bad[:8]) + (f"; and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise ValueError(
            f"{action}: the model holds NaN/Inf values in {shown}. A diverged training run leaves such "
            "values; load an earlier checkpoint (a run directory's checkpoint.safetensors holds its last "
            "good epoch) and use that"
        )


def build_payload(model: nn.Module) -> Payload:
    """Encode and pack ``model`` (a model quantized with :func:`lowbit.quantize`).

    The weights are encoded as the model computes them in eval mode (what :func:`load_packed`
    restores; in train mode e.g. ``mixed`` runs its soft mixture); every module's train/eval
    flag is restored afterwards, also on error."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return _build_payload(model)
    finally:
        for m, mode in modes.items():
            m.training = mode


def _build_payload(model: nn.Module) -> Payload:
    from .. import __version__

    recipe = getattr(model, "lowbit_recipe", None)
    if recipe is None:
        raise ValueError("model has no lowbit_recipe: quantize it with lowbit.quantize(model, recipe) first")
    spec = getattr(model, "lowbit_spec", None)
    # before encoding: a NaN latent would otherwise surface as a broken encode/decode contract
    check_finite(_packed_state(model).items(), "cannot save the packed model")
    tensors: dict[str, Tensor] = {}
    layers_hdr: dict[str, Any] = {}
    layer_bytes: dict[str, dict[str, int]] = {}
    skip_keys: set[str] = set()
    seen_modules: set[int] = set()
    for name, (layer, param) in quantizable_weights(model).items():
        module_name = split_target(name, param)
        wq = weight_quantizer(layer, param)
        wq = None if wq is None else wq.stored()
        # the activation quantizer is the module's: recorded on its first weight
        aq = input_quantizer(layer) if id(layer) not in seen_modules else None
        first_of_module = id(layer) not in seen_modules
        seen_modules.add(id(layer))
        stored_w = _plist(layer, param).original if wq is not None else getattr(layer, param)
        dt = stored_w.dtype
        if dt not in _FLOAT_NAMES:
            raise ValueError(f"layer {name!r}: weight dtype {dt} is not a float dtype lowbit can store")
        entry: dict[str, Any] = {
            "type": torch_type_name(layer),
            "shape": list(stored_w.shape),
            "dtype": _FLOAT_NAMES[dt],
            "weight": None,
            "activation": None if aq is None else {"method": _method_name(aq), "bits": int(aq.bits)},
        }
        if param != "weight":
            entry["param"] = param
        bias = getattr(layer, "bias", None)
        counts = {"code_bytes": 0, "scale_bytes": 0, "float_bytes": 0}
        if isinstance(bias, Tensor) and first_of_module:
            counts["float_bytes"] += _nbytes(bias)
        if wq is None:
            counts["float_bytes"] += _nbytes(stored_w)
        else:
            skip_keys.add(_latent_key(module_name, param))
            enc = encode_weight(layer, param)
            with torch.no_grad():
                actual = getattr(layer, param).detach()
                decoded = enc.decode()
            if decoded.shape != actual.shape or not torch.equal(decoded.to(actual.dtype), actual):
                live = weight_quantizer(layer, param)
                if live is not wq:  # a training-time wrapper still in its training form
                    raise ValueError(
                        f"layer {name!r}: its {_method_name(live)} weight quantizer is in a training "
                        f"form in eval mode, not the {_method_name(wq)} weight a file stores; switch it "
                        "to its final form first (BinaryRelax: set_hard(), or train past hard_epoch)"
                    )
                raise ValueError(
                    f"layer {name!r}: {_method_name(wq)}.encode(w).decode() differs from the weight the "
                    "layer uses in eval mode (a quantizer must satisfy forward(w) == encode(w).decode() "
                    "bit for bit, and no parametrization may follow it)"
                )
            encs = []
            for i, (e, parent) in enumerate(flatten_encoded(enc)):
                codes = e.codes.detach().cpu()
                if tuple(codes.shape) != tuple(stored_w.shape):
                    raise ValueError(f"layer {name!r}: codes shape {tuple(codes.shape)} != weight shape")
                L = int(e.levels.numel())
                if not 1 <= L <= MAX_LEVELS or e.levels.dim() != 1:
                    raise ValueError(f"layer {name!r}: codebook must be 1-D with 1..{MAX_LEVELS} levels")
                if not 1 <= int(e.bits) <= 8:
                    raise ValueError(f"layer {name!r}: {e.bits}-bit codes cannot be packed (1..8 bits)")
                if e.levels.dtype not in _FLOAT_NAMES or e.scale.dtype not in _FLOAT_NAMES:
                    raise ValueError(f"layer {name!r}: levels and scale must be float tensors")
                packing = choose_packing(L, codes.numel())
                try:
                    packed = torch.from_numpy(packing.pack(codes.reshape(-1).to(torch.int64).numpy()))
                except PackingError as err:
                    raise ValueError(f"layer {name!r}: {err}") from None
                levels = e.levels.detach().cpu().contiguous()
                scale = e.scale.detach().cpu().contiguous()
                if not (bool(torch.isfinite(levels).all()) and bool(torch.isfinite(scale).all())):
                    raise ValueError(  # the reader refuses such a file: do not write it
                        f"layer {name!r}: {_method_name(wq)} encoding {i} has a non-finite codebook or "
                        "scale although the latent weight is finite (values beyond the weight dtype's range?)"
                    )
                tensors[quant_tensor_name(name, i, "codes")] = packed
                tensors[quant_tensor_name(name, i, "levels")] = levels
                tensors[quant_tensor_name(name, i, "scale")] = scale
                counts["code_bytes"] += _nbytes(packed)
                counts["scale_bytes"] += _nbytes(levels) + _nbytes(scale)
                encs.append(
                    {
                        "parent": parent,
                        "bits": int(e.bits),
                        "num_levels": L,
                        "numel": int(codes.numel()),
                        "packing": packing.to_dict(),
                        "nbytes": int(packed.numel()),
                        "levels_dtype": _FLOAT_NAMES[levels.dtype],
                        "scale_dtype": _FLOAT_NAMES[scale.dtype],
                        "scale_shape": list(scale.shape),
                    }
                )
            entry["weight"] = {
                "method": _method_name(wq),
                "bits": int(wq.bits),
                "per_channel": bool(getattr(wq, "per_channel", False)),
                "channel_axis": _channel_axis(enc),
                "encodings": encs,
            }
        layers_hdr[name] = entry
        layer_bytes[name] = counts
    state_keys = []
    tied: dict[str, str] = {}
    first_key: dict[tuple, str] = {}
    for key, value in _packed_state(model).items():
        if key in skip_keys:
            continue
        if not isinstance(value, Tensor):
            raise ValueError(f"state entry {key!r} is not a tensor ({type(value).__name__}); cannot store it")
        if value.dtype not in DTYPE_NAMES:
            raise ValueError(f"state entry {key!r} has dtype {value.dtype}, not storable in safetensors")
        ident = _tensor_identity(value)
        if ident in first_key:  # a tied tensor (GPT-2's wte / lm_head): stored once
            tied[key] = first_key[ident]
            continue
        first_key[ident] = key
        tensors[state_tensor_name(key)] = value.detach().cpu()
        state_keys.append(key)
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "lowbit_version": __version__,
        "recipe": recipe,
        "spec": spec,
        "fp32_params": float_param_count(model),
        "layers": layers_hdr,
        "state": state_keys,
        "tied": tied,
    }
    json.dumps(header)  # recipe and spec must be JSON (they are by construction)
    return Payload(tensors=tensors, header=header, layer_bytes=layer_bytes)


def save_packed(model: nn.Module, path: str | os.PathLike[str]) -> int:
    """Write ``model`` (quantized with :func:`lowbit.quantize`) as a packed ``.lowbit`` file,
    atomically (temp file, fsync, rename). Returns the file size in bytes."""
    data = build_payload(model).to_bytes()
    atomic_write(path, data)
    return len(data)


# ----------------------------------------------------------------------------------------------
# reading and validation
# ----------------------------------------------------------------------------------------------
@dataclass
class LayerRecord:
    name: str
    type: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    weight: dict[str, Any] | None
    activation: dict[str, Any] | None
    encoded: Encoded | None = None
    param: str = "weight"  # the module's parameter ("weight_hh_l0" of an LSTM)

    @property
    def module(self) -> str:
        return split_target(self.name, self.param)


@dataclass
class PackedFile:
    """A validated ``.lowbit`` file: its header, layers (with decoded encodings) and state."""

    header: dict[str, Any]
    layers: dict[str, LayerRecord]
    state: dict[str, Tensor]
    tensors: dict[str, Tensor]
    file_bytes: int

    @property
    def recipe(self) -> dict[str, Any]:
        return self.header["recipe"]

    @property
    def spec(self) -> dict[str, Any] | None:
        return self.header["spec"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_name(v: Any, table: dict[str, Any]) -> bool:
    return isinstance(v, str) and v in table


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise FormatError(msg)


def _check_keys(d: Any, required: set[str], where: str, optional: frozenset[str] = frozenset()) -> None:
    _expect(isinstance(d, dict), f"{where} must be a JSON object, got {type(d).__name__}")
    missing = required - set(d)
    _expect(not missing, f"{where} lacks key(s) {sorted(missing)}")
    extra = set(d) - required - optional
    _expect(not extra, f"{where} has unknown key(s) {sorted(extra)}")


def _validate_header(h: Any) -> None:
    _check_keys(
        h,
        {"format", "version", "lowbit_version", "recipe", "spec", "fp32_params", "layers", "state"},
        "header",
        frozenset({"tied"}),
    )
    _expect(h["format"] == FORMAT_NAME, f"header format is {h['format']!r}, expected {FORMAT_NAME!r}")
    _expect(_is_int(h["version"]), f"header version must be an integer, got {h['version']!r}")
    _expect(
        h["version"] in READ_VERSIONS,
        f"unsupported format version {h['version']}; this lowbit reads versions {list(READ_VERSIONS)}",
    )
    _expect(isinstance(h["lowbit_version"], str), "header lowbit_version must be a string")
    _expect(isinstance(h["recipe"], dict), "header recipe must be a JSON object")
    _expect(_is_int(h["fp32_params"]) and h["fp32_params"] >= 0, "header fp32_params must be an integer >= 0")
    spec = h["spec"]
    if spec is not None:
        _check_keys(spec, {"name"}, "header spec", frozenset({"kwargs"}))
        _expect(isinstance(spec["name"], str), "header spec.name must be a string")
        _expect(isinstance(spec.get("kwargs", {}), dict), "header spec.kwargs must be an object")
    state = h["state"]
    _expect(
        isinstance(state, list) and all(isinstance(k, str) for k in state),
        "header state must be a list of strings",
    )
    _expect(len(set(state)) == len(state), "header state lists a key twice")
    tied = h.get("tied", {})
    _expect(
        isinstance(tied, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()),
        "header tied must be an object mapping state keys to state keys",
    )
    for k, v in tied.items():
        _expect(v in state, f"header tied[{k!r}] = {v!r} is not a stored state key")
        _expect(k not in state, f"header tied[{k!r}]: the key is stored as well as tied")
    layers = h["layers"]
    _expect(isinstance(layers, dict), "header layers must be a JSON object")
    for name, e in layers.items():
        w = f"header layers[{name!r}]"
        _check_keys(e, {"type", "shape", "dtype", "weight", "activation"}, w, frozenset({"param"}))
        _expect(isinstance(e["type"], str), f"{w}.type must be a string")
        param = e.get("param", "weight")
        ends = isinstance(param, str) and (param == "weight" or name == param or name.endswith("." + param))
        _expect(
            ends and param.isidentifier(),
            f"{w}.param must be the parameter name that ends the entry's name, got {param!r}",
        )
        _expect(
            isinstance(e["shape"], list)
            and 2 <= len(e["shape"]) <= 8
            and all(_is_int(s) and s >= 0 for s in e["shape"]),
            f"{w}.shape must be a list of 2..8 non-negative integers, got {e['shape']!r}",
        )
        _expect(
            _is_name(e["dtype"], FLOAT_DTYPES),
            f"{w}.dtype must be one of {list(FLOAT_DTYPES)}, got {e['dtype']!r}",
        )
        a = e["activation"]
        if a is not None:
            _check_keys(a, {"method", "bits"}, f"{w}.activation")
            _expect(isinstance(a["method"], str), f"{w}.activation.method must be a string")
            _expect(_is_int(a["bits"]) and 1 <= a["bits"] <= 32, f"{w}.activation.bits must be in 1..32")
        q = e["weight"]
        if q is None:
            continue
        wkeys = {"method", "bits", "per_channel", "encodings"}
        _check_keys(q, wkeys, f"{w}.weight", frozenset({"channel_axis"}))
        ax = q.get("channel_axis")
        _expect(
            ax is None or (_is_int(ax) and 0 <= ax < len(e["shape"])),
            f"{w}.weight.channel_axis must be null or a dimension of the weight (0..{len(e['shape']) - 1})",
        )
        _expect(isinstance(q["method"], str), f"{w}.weight.method must be a string")
        _expect(_is_int(q["bits"]) and 1 <= q["bits"] <= 32, f"{w}.weight.bits must be in 1..32")
        _expect(isinstance(q["per_channel"], bool), f"{w}.weight.per_channel must be true/false")
        encs = q["encodings"]
        _expect(
            isinstance(encs, list) and 1 <= len(encs) <= 64,
            f"{w}.weight.encodings must be a list of 1..64 encodings",
        )
        numel = math.prod(e["shape"])
        for i, c in enumerate(encs):
            wc = f"{w}.weight.encodings[{i}]"
            _check_keys(
                c,
                {
                    "parent",
                    "bits",
                    "num_levels",
                    "numel",
                    "packing",
                    "nbytes",
                    "levels_dtype",
                    "scale_dtype",
                    "scale_shape",
                },
                wc,
            )
            if i == 0:
                _expect(c["parent"] is None, f"{wc}.parent must be null (the root encoding)")
            else:
                _expect(_is_int(c["parent"]) and 0 <= c["parent"] < i, f"{wc}.parent must be an index < {i}")
            _expect(_is_int(c["bits"]) and 1 <= c["bits"] <= 8, f"{wc}.bits must be an integer in 1..8")
            L = c["num_levels"]
            _expect(
                _is_int(L) and 1 <= L <= 2 ** c["bits"], f"{wc}.num_levels must be in 1..2**bits, got {L!r}"
            )
            _expect(c["numel"] == numel, f"{wc}.numel {c['numel']!r} != {numel} (product of the shape)")
            try:
                packing = Packing.from_dict(c["packing"])
            except PackingError as err:
                raise FormatError(f"{wc}.packing: {err}") from None
            if packing.kind == "bits":
                _expect(2**packing.bits >= L, f"{wc}: {packing.bits}-bit packing cannot hold {L} levels")
            else:
                _expect(packing.base == L, f"{wc}: radix base {packing.base} != num_levels {L}")
            _expect(
                c["nbytes"] == packing.nbytes(numel),
                f"{wc}.nbytes {c['nbytes']!r} != {packing.nbytes(numel)} ({numel} codes packed as "
                f"{packing.to_dict()})",
            )
            for k in ("levels_dtype", "scale_dtype"):
                _expect(_is_name(c[k], FLOAT_DTYPES), f"{wc}.{k} must be one of {list(FLOAT_DTYPES)}")
            ss = c["scale_shape"]
            _expect(
                isinstance(ss, list)
                and len(ss) <= len(e["shape"])
                and all(_is_int(s) and s >= 0 for s in ss),
                f"{wc}.scale_shape must be a list of at most {len(e['shape'])} integers",
            )
            try:
                _expect(
                    torch.broadcast_shapes(tuple(ss), tuple(e["shape"])) == tuple(e["shape"]),
                    f"{wc}.scale_shape {ss} does not broadcast to the weight shape {e['shape']}",
                )
            except RuntimeError:
                raise FormatError(
                    f"{wc}.scale_shape {ss} does not broadcast to the weight shape {e['shape']}"
                ) from None


def _tensor(tensors: dict[str, Tensor], name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    t = tensors[name]
    _expect(t.dtype == dtype, f"tensor {name!r} has dtype {t.dtype}, the header declares {dtype}")
    _expect(
        tuple(t.shape) == tuple(shape), f"tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}"
    )
    return t


def parse_packed(data: bytes, what: str = "file") -> PackedFile:
    """Validate a ``.lowbit`` byte string completely and decode its weights (no model built)."""
    tensors, meta = read_container(data, what)
    return parse_packed_tensors(tensors, meta, what, len(data))


def parse_packed_tensors(
    tensors: dict[str, Tensor], meta: dict[str, str], what: str = "file", file_bytes: int = 0
) -> PackedFile:
    """:func:`parse_packed` of a container already read: its tensors and metadata (a supernet file
    holds one such set per sub-net)."""
    fmt = meta.get(META_FORMAT)
    if fmt != FORMAT_NAME or META_HEADER not in meta:
        raise FormatError(
            f"{what} is a safetensors file but not a lowbit packed model (metadata format is {fmt!r}, "
            f"expected {FORMAT_NAME!r} with a {META_HEADER!r} header)"
        )
    header = parse_json(meta[META_HEADER], f"{what}: lowbit header")
    _validate_header(header)
    expected: set[str] = {state_tensor_name(k) for k in header["state"]}
    for name, e in header["layers"].items():
        if e["weight"] is not None:
            for i in range(len(e["weight"]["encodings"])):
                expected |= {quant_tensor_name(name, i, p) for p in ("codes", "levels", "scale")}
    missing = sorted(expected - set(tensors))
    _expect(not missing, f"{what}: tensor(s) declared by the header are missing: {missing[:5]}")
    extra = sorted(set(tensors) - expected)
    _expect(not extra, f"{what}: tensor(s) not declared by the header: {extra[:5]}")
    layers: dict[str, LayerRecord] = {}
    for name, e in header["layers"].items():
        rec = LayerRecord(
            name, e["type"], tuple(e["shape"]), FLOAT_DTYPES[e["dtype"]], e["weight"], e["activation"],
            param=e.get("param", "weight"),
        )
        if e["weight"] is not None:
            items = []
            for i, c in enumerate(e["weight"]["encodings"]):
                packing = Packing.from_dict(c["packing"])
                packed = _tensor(tensors, quant_tensor_name(name, i, "codes"), torch.uint8, (c["nbytes"],))
                levels = _tensor(
                    tensors,
                    quant_tensor_name(name, i, "levels"),
                    FLOAT_DTYPES[c["levels_dtype"]],
                    (c["num_levels"],),
                )
                scale = _tensor(
                    tensors,
                    quant_tensor_name(name, i, "scale"),
                    FLOAT_DTYPES[c["scale_dtype"]],
                    tuple(c["scale_shape"]),
                )
                where = f"layer {name!r} encoding {i}"
                _expect(bool(torch.isfinite(levels).all()), f"{where}: codebook has non-finite values")
                _expect(bool(torch.isfinite(scale).all()), f"{where}: scale has non-finite values")
                try:
                    codes = packing.unpack(packed.numpy(), c["numel"])
                except PackingError as err:
                    raise FormatError(f"{where}: {err}") from None
                if codes.size and int(codes.max()) >= c["num_levels"]:
                    raise FormatError(
                        f"{where}: code {int(codes.max())} >= number of levels {c['num_levels']}"
                    )
                codes_t = torch.from_numpy(np.ascontiguousarray(codes)).reshape(rec.shape)
                items.append((codes_t, levels, scale, c["bits"], c["parent"]))
            rec.encoded = unflatten_encoded(items)
            decoded = rec.encoded.decode()
            _expect(
                bool(torch.isfinite(decoded).all()), f"layer {name!r}: decoded weight has non-finite values"
            )
        layers[name] = rec
    state = {k: tensors[state_tensor_name(k)] for k in header["state"]}
    for k, v in header.get("tied", {}).items():
        state[k] = state[v]
    return PackedFile(header=header, layers=layers, state=state, tensors=tensors, file_bytes=file_bytes)


def read_packed(path: str | os.PathLike[str]) -> PackedFile:
    """Read and validate a ``.lowbit`` file (raises :class:`FormatError`)."""
    data = read_bytes(path)
    return _guard(lambda: parse_packed(data, repr(str(path))))


def _guard(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except FormatError:
        raise
    except Exception as e:  # last line of defence: nothing but FormatError escapes
        raise FormatError(f"internal error while reading a packed model: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------------------
# loading into a model
# ----------------------------------------------------------------------------------------------
def _build_from_spec(spec: dict[str, Any], pf: PackedFile) -> nn.Module:
    from ..models import build_from_spec

    # 1. on the meta device (no memory): the architecture must match the file's shapes
    try:
        with torch.device("meta"):
            meta_model = build_from_spec(spec)
    except Exception as e:
        raise FormatError(f"model spec {spec!r} cannot be built: {type(e).__name__}: {e}") from None
    _check_float_shapes(meta_model, pf)
    try:
        model = build_from_spec(spec)
    except Exception as e:  # pragma: no cover - built once on meta already
        raise FormatError(f"model spec {spec!r} cannot be built: {type(e).__name__}: {e}") from None
    # a model saved in float64/float16/bfloat16 is rebuilt in that dtype (the header records it)
    dtypes = {rec.dtype for rec in pf.layers.values()}
    return model.to(dtypes.pop()) if len(dtypes) == 1 else model


def _check_float_shapes(model: nn.Module, pf: PackedFile) -> None:
    """The float model's parameters/buffers must have the shapes the file declares."""
    sd = model.state_dict()
    for name, rec in pf.layers.items():
        key = _state_key(rec.module, rec.param)
        _expect(key in sd, f"the model has no layer {name!r} with a weight, the file has one")
        _expect(
            tuple(sd[key].shape) == rec.shape,
            f"layer {name!r}: the model's weight has shape {list(sd[key].shape)}, the file {list(rec.shape)}",
        )


def load_packed(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Load a ``.lowbit`` file into a quantized model (in eval mode).

    ``model=None``: zoo models rebuild from the file's spec. Otherwise pass a fresh *float*
    instance of the saved architecture; it is quantized with the stored recipe in place and
    returned. The result computes exactly what the saved fake-quantized model computed (see the
    module docstring). Any defect of the file raises :class:`FormatError`.
    """
    pf = read_packed(path)
    if model is not None and getattr(model, "lowbit_recipe", None) is not None:
        raise ValueError("load_packed(model=...) needs a fresh float model; this one is already quantized")
    try:
        return _guard(lambda: _load_into(pf, model))
    except FormatError as e:  # name the file, as read_packed does
        raise FormatError(f"{str(path)!r}: {e}") from e.__cause__


def load_packed_file(pf: PackedFile, model: nn.Module | None = None) -> nn.Module:
    """:func:`load_packed` of a file already read and validated (:func:`read_packed`)."""
    if model is not None and getattr(model, "lowbit_recipe", None) is not None:
        raise ValueError("load_packed_file(model=...) needs a fresh float model; this one is quantized")
    return _guard(lambda: _load_into(pf, model))


def _load_into(pf: PackedFile, model: nn.Module | None) -> nn.Module:
    if model is None:
        if pf.spec is None:
            raise FormatError(
                "the file holds no model spec (the model is not from lowbit.models); pass "
                "load_packed(path, model=<a fresh float instance of the architecture>)"
            )
        return _fill(pf, _build_from_spec(pf.spec, pf))
    _check_float_shapes(model, pf)
    before = copy.deepcopy(model)
    try:
        return _fill(pf, model)
    except BaseException:  # a load that fails leaves the caller's model as it was, not half quantized
        model.__class__ = before.__class__
        model.__dict__.clear()
        model.__dict__.update(before.__dict__)
        raise


def _fill(pf: PackedFile, model: nn.Module) -> nn.Module:
    """Quantize the float ``model`` with the file's recipe and load the file's state and codes."""
    try:
        recipe = Recipe.from_dict(pf.recipe)
    except RecipeError as e:
        raise FormatError(f"stored recipe is invalid: {e}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnmatchedRuleWarning)
        warnings.simplefilter("ignore", SkippedQuantizationWarning)
        level = logging.getLogger("lowbit.nn.quantize").level
        logging.getLogger("lowbit.nn.quantize").setLevel(logging.ERROR)
        try:
            quantize(model, recipe)
        except (ValueError, TypeError) as e:
            raise FormatError(f"stored recipe cannot quantize the model: {e}") from None
        finally:
            logging.getLogger("lowbit.nn.quantize").setLevel(level)
    _check_structure(model, pf)
    _load_state(model, pf)
    model.eval()  # weights are restored as the deployed (eval-mode) quantizers compute them
    # A latent weight tied to a stored float tensor (GPT-2's lm_head and wte) is never
    # overwritten: the float twin keeps its stored values, a FrozenWeight serves the codes.
    sd = model.state_dict()
    protected = {_tensor_identity(sd[k]) for k in pf.state if k in sd and isinstance(sd[k], Tensor)}
    done = [(name, rec) for name, rec in pf.layers.items() if rec.encoded is not None]
    for name, rec in done:
        _set_weight(model.get_submodule(rec.module), name, rec, protected)
    for _, rec in done:  # a latent shared by two quantized layers: both must still hold
        layer = model.get_submodule(rec.module)
        assert rec.encoded is not None
        with torch.no_grad():
            w = getattr(layer, rec.param)
            ok = torch.equal(w, rec.encoded.decode().to(w.dtype))
        if not ok:
            parametrize.register_parametrization(layer, rec.param, FrozenWeight(rec.encoded))
    refresh_rnn_weights(model)
    return model


def _check_structure(model: nn.Module, pf: PackedFile) -> None:
    weights = quantizable_weights(model)
    _expect(
        set(weights) == set(pf.layers),
        f"the model's layers {sorted(weights)[:8]} differ from the file's {sorted(pf.layers)[:8]}",
    )
    seen: set[int] = set()
    for name, (layer, param) in weights.items():
        rec = pf.layers[name]
        _expect(rec.param == param, f"layer {name!r}: parameter {rec.param!r} in the file, {param!r} here")
        wq = weight_quantizer(layer, param)
        aq = input_quantizer(layer) if id(layer) not in seen else None
        seen.add(id(layer))
        _expect(
            (wq is None) == (rec.weight is None),
            f"layer {name!r}: the stored recipe {'does not quantize' if wq is None else 'quantizes'} its "
            f"weight, the file says the opposite",
        )
        if wq is not None and rec.weight is not None:
            _expect(
                _method_name(wq) == rec.weight["method"] and wq.bits == rec.weight["bits"],
                f"layer {name!r}: recipe gives {_method_name(wq)}/{wq.bits} bits, file says "
                f"{rec.weight['method']}/{rec.weight['bits']}",
            )
        _expect(
            (aq is None) == (rec.activation is None),
            f"layer {name!r}: activation quantizer presence differs between the recipe and the file",
        )
        if aq is not None and rec.activation is not None:
            _expect(
                _method_name(aq) == rec.activation["method"] and aq.bits == rec.activation["bits"],
                f"layer {name!r}: activation {_method_name(aq)}/{aq.bits} bits, file says "
                f"{rec.activation['method']}/{rec.activation['bits']}",
            )


def _load_state(model: nn.Module, pf: PackedFile) -> None:
    sd = model.state_dict()
    skip = {_latent_key(r.module, r.param) for r in pf.layers.values() if r.weight is not None}
    want = {k: v for k, v in sd.items() if k not in skip}
    missing = sorted(set(want) - set(pf.state))
    extra = sorted(set(pf.state) - set(want))
    _expect(not missing, f"the file lacks state entries the model has: {missing[:5]}")
    _expect(not extra, f"the file has state entries the model does not have: {extra[:5]}")
    for k, v in want.items():
        t = pf.state[k]
        if isinstance(v, Tensor):
            _expect(
                tuple(t.shape) == tuple(v.shape),
                f"state {k!r}: shape {list(t.shape)} in the file, {list(v.shape)} in the model",
            )
            _expect(
                t.dtype == v.dtype,
                f"state {k!r}: dtype {t.dtype} in the file, {v.dtype} in the model; pass a float model "
                f"in the file's dtype, e.g. load_packed(path, model=build_model(...).to({t.dtype}))",
            )
    try:
        result = model.load_state_dict(pf.state, strict=False)
    except RuntimeError as e:
        raise FormatError(f"state does not fit the model: {e}") from None
    _expect(not result.unexpected_keys, f"unexpected state keys {result.unexpected_keys[:5]}")
    _expect(
        set(result.missing_keys) <= skip, f"missing state keys {sorted(set(result.missing_keys) - skip)[:5]}"
    )


def _set_weight(layer: nn.Module, name: str, rec: LayerRecord, protected: Collection[tuple] = ()) -> None:
    assert rec.encoded is not None
    wq = weight_quantizer(layer, rec.param)
    assert wq is not None
    plist = _plist(layer, rec.param)
    original = plist.original
    decoded = rec.encoded.decode().to(original.dtype)
    _expect(decoded.shape == original.shape, f"layer {name!r}: decoded shape differs from the model's")
    exact = False
    tied = _tensor_identity(original) in protected
    with torch.no_grad():
        if tied:
            exact = torch.equal(getattr(layer, rec.param), decoded)
        for cand in [] if tied else _latent_candidates(wq, rec.encoded, decoded):
            if not bool(torch.isfinite(cand).all()):
                continue
            original.copy_(cand)
            try:
                got = getattr(layer, rec.param)
            except Exception:  # a quantizer that cannot take this latent
                continue
            if got.shape == decoded.shape and torch.equal(got, decoded):
                exact = True
                break
        if not exact and not tied:
            original.copy_(decoded)
    if not exact:
        parametrize.register_parametrization(layer, rec.param, FrozenWeight(rec.encoded))
        log.debug("layer %s: %s is not a fixed point on its decoded weight; weight frozen", name, rec.weight)
        with torch.no_grad():
            _expect(
                torch.equal(getattr(layer, rec.param), decoded),
                f"layer {name!r}: could not restore the decoded weight",
            )


def frozen_layers(model: nn.Module) -> list[str]:
    """Names (as in a recipe) of weights a :class:`FrozenWeight` serves (see :func:`thaw`)."""
    return [n for n, (m, p) in quantizable_weights(model).items() if frozen_weight(m, p) is not None]


def copy_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
