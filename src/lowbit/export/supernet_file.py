"""One packed file holds a whole supernet: every sub-net's integer codes and scales, stored once
where sub-nets share them, and no latent float weights.

A weight-shared supernet (:class:`lowbit.nn.supernet.Supernet`) quantizes a slice of one latent
weight per sub-net: ``W_s = Q_b(W[:c_out, :c_in])``. The codes depend on the slice and on ``b``
(a DoReFa scale is a maximum over the slice), so they cannot be cut from one stored tensor;
the file stores each sub-net's packed model (:func:`lowbit.export.packed.build_payload` of
:meth:`Supernet.extract`: codes, codebooks, scales, its BatchNorm and activation-quantizer state)
and keeps every distinct tensor once: sub-nets with the same slice and bits of a layer (e.g. two
sub-nets that differ only in activation bits, or only in another stage's width), and float layers
they share, point at the same stored bytes. A float sub-net (32-bit weights and activations) is
stored as its float state.

The container is safetensors (nothing runs on load). Tensors are named ``t<k>`` by first use;
``__metadata__`` holds ``format = "lowbit.supernet"``, ``version = "2"`` and

- ``supernet``: :meth:`Supernet.spec` (sub-nets, quantizers, ``keep_float``, per-sub-net
  ``info``) plus ``model``, the float model's zoo spec ``{"name", "kwargs"}`` (or null);
- ``subnets``: ``{name: {"header": <the sub-net's packed header, lowbit.export.packed>,
  "tensors": {<its packed tensor name>: "t<k>"}}}``, ``header`` null for a float sub-net
  (its ``tensors`` then map state keys).

**Loading** (:func:`load_supernet_file`) validates the whole file first (every sub-net through the
packed format's own checks, every reference resolved, no stray tensor), then rebuilds the
architecture (the zoo model, or the float ``model`` passed) as a supernet only to cut each
sub-net's float skeleton (:meth:`Supernet.sliced`), and loads each sub-net's stored codes into it
(:func:`lowbit.export.packed.load_packed_file`). Every quantized weight is then served by a
:class:`~lowbit.export.packed.FrozenWeight` holding the stored encoding, so the sub-net computes
exactly what the saved sub-net computed and :func:`lowbit.runtime.compile` packs the stored codes
without re-quantizing. Sub-nets are separate models: switching is picking one by name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._io import atomic_write
from ..nn.supernet import Supernet, SupernetError
from .container import parse_json, read_bytes, read_container, serialize
from .errors import FormatError
from .packed import (
    FORMAT_NAME,
    META_FORMAT,
    META_HEADER,
    FrozenWeight,
    PackedFile,
    build_payload,
    frozen_weight,
    load_packed_file,
    parse_packed_tensors,
)

__all__ = ["FORMAT", "VERSION", "LoadedSupernet", "SupernetFile", "load_supernet_file",
           "read_supernet_file", "save_supernet_file"]

FORMAT = "lowbit.supernet"
VERSION = "2"


def _subnet_models(supernet: Supernet | LoadedSupernet) -> dict[str, nn.Module]:
    if isinstance(supernet, LoadedSupernet):
        return dict(supernet.models)
    return {n: supernet.extract(n) for n in supernet.names}


def _content_key(t: Tensor) -> tuple[Any, ...]:
    t = t.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return (str(t.dtype), tuple(t.shape), hashlib.sha256(raw).hexdigest())


def build_supernet_file(supernet: Supernet | LoadedSupernet,
                        model_spec: Mapping[str, Any] | None = None) -> tuple[bytes, dict[str, int]]:
    """The file's bytes and its sizes: ``file_bytes``, ``stored_tensor_bytes`` (each distinct tensor
    once), ``subnet_tensor_bytes`` (the sum over sub-nets, as separate files would store them),
    ``largest_subnet_bytes`` (the packed file of the most expensive sub-net alone) and
    ``latent_bytes`` (the tensors of the trainable supernet: latent weights, every BatchNorm and
    quantizer; 0 for a supernet loaded from codes)."""
    spec = dict(supernet.spec())
    if model_spec is None:
        model_spec = spec.get("model") if isinstance(supernet, LoadedSupernet) else \
            getattr(supernet.model, "lowbit_spec", None)
    spec["model"] = dict(model_spec) if model_spec is not None else None
    blobs: dict[str, Tensor] = {}
    by_content: dict[tuple[Any, ...], str] = {}
    subnets: dict[str, Any] = {}
    per_subnet: dict[str, int] = {}

    def store(t: Tensor) -> str:
        key = _content_key(t)
        if key not in by_content:
            by_content[key] = f"t{len(blobs)}"
            blobs[by_content[key]] = t.detach().cpu().contiguous()
        return by_content[key]

    for name, model in _subnet_models(supernet).items():
        if getattr(model, "lowbit_recipe", None) is None:  # a float sub-net: its state as it is
            state = model.state_dict()
            subnets[name] = {"header": None, "tensors": {k: store(v) for k, v in state.items()}}
            per_subnet[name] = sum(v.numel() * v.element_size() for v in state.values())
            continue
        payload = build_payload(model)
        refs = {k: store(v) for k, v in payload.tensors.items()}
        subnets[name] = {"header": payload.header, "tensors": refs}
        per_subnet[name] = len(payload.to_bytes())
    meta = {"format": FORMAT, "version": VERSION, "supernet": json.dumps(spec, sort_keys=True),
            "subnets": json.dumps(subnets, sort_keys=True, separators=(",", ":"))}
    data = serialize(blobs, meta)
    largest = supernet.choices[-1]
    latent = 0 if isinstance(supernet, LoadedSupernet) else \
        sum(v.numel() * v.element_size() for v in supernet.state_dict().values())
    sizes = {"file_bytes": len(data),
             "stored_tensor_bytes": sum(t.numel() * t.element_size() for t in blobs.values()),
             "subnet_tensor_bytes": sum(per_subnet.values()), "largest_subnet_bytes": per_subnet[largest],
             "latent_bytes": latent}
    return data, sizes


def save_supernet_file(supernet: Supernet | LoadedSupernet, path: str | os.PathLike[str],
                       model_spec: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Write every sub-net's packed codes to ``path`` atomically; returns the sizes of
    :func:`build_supernet_file`. ``model_spec`` (default: the float model's ``lowbit_spec``, set by
    :func:`lowbit.models.build_model`) lets :func:`load_supernet_file` rebuild the architecture."""
    data, sizes = build_supernet_file(supernet, model_spec)
    atomic_write(path, data, example="model.supernet")
    return sizes


@dataclass
class SupernetFile:
    """A validated supernet file: its description, and per sub-net a :class:`PackedFile` (or, for a
    float sub-net, its float state)."""

    spec: dict[str, Any]
    packed: dict[str, PackedFile]
    float_state: dict[str, dict[str, Tensor]]
    file_bytes: int

    @property
    def names(self) -> list[str]:
        return [s["name"] for s in self.spec["subnets"]]


def parse_supernet_file(data: bytes, what: str = "supernet file") -> SupernetFile:
    """Validate a supernet file's bytes completely (no model built)."""
    tensors, meta = read_container(data, what)
    if meta.get("format") != FORMAT:
        raise FormatError(f"{what}: metadata format is {meta.get('format')!r}, expected {FORMAT!r} "
                          "(a file written by lowbit.serve.save_supernet)")
    if meta.get("version") != VERSION:
        raise FormatError(f"{what}: version {meta.get('version')!r} is not a packed supernet file (expected "
                          f"{VERSION}; version 1 holds latent weights: lowbit.serve.load_supernet reads it)")
    spec = parse_json(meta.get("supernet", ""), f"{what}: supernet description")
    if not isinstance(spec, dict) or not isinstance(spec.get("subnets"), list):
        raise FormatError(f"{what}: the supernet description must be a JSON object with a 'subnets' list")
    names = [s.get("name") if isinstance(s, dict) else None for s in spec["subnets"]]
    subnets = parse_json(meta.get("subnets", ""), f"{what}: sub-net table")
    if not isinstance(subnets, dict) or sorted(subnets) != sorted(str(n) for n in names):
        got = sorted(subnets) if isinstance(subnets, dict) else type(subnets).__name__
        raise FormatError(f"{what}: the sub-net table lists {got}, the description {names}")
    used: set[str] = set()
    packed: dict[str, PackedFile] = {}
    float_state: dict[str, dict[str, Tensor]] = {}
    for name in names:
        entry = subnets[name]
        where = f"{what}: sub-net {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"header", "tensors"} or not isinstance(
                entry["tensors"], dict):
            raise FormatError(f"{where}: entry must be an object with 'header' and a 'tensors' map")
        refs = entry["tensors"]
        missing = sorted({str(v) for v in refs.values()} - set(tensors))
        if missing:
            raise FormatError(f"{where}: refers to tensors the file does not hold: {missing[:5]}")
        own = {k: tensors[v] for k, v in refs.items()}
        used.update(refs.values())
        if entry["header"] is None:
            float_state[name] = own
            continue
        sub_meta = {META_FORMAT: FORMAT_NAME, META_HEADER: json.dumps(entry["header"])}
        try:
            packed[name] = parse_packed_tensors(own, sub_meta, where)
        except FormatError as e:  # name the sub-net in every message
            raise FormatError(str(e) if where in str(e) else f"{where}: {e}") from None
        except Exception as e:  # every defect is a FormatError naming the sub-net
            raise FormatError(f"{where}: {type(e).__name__}: {e}") from e
    stray = sorted(set(tensors) - used)
    if stray:
        raise FormatError(f"{what}: tensors no sub-net refers to: {stray[:5]}")
    return SupernetFile(spec=spec, packed=packed, float_state=float_state, file_bytes=len(data))


def read_supernet_file(path: str | os.PathLike[str]) -> SupernetFile:
    """Read and validate a packed supernet file (raises :class:`FormatError`)."""
    return parse_supernet_file(read_bytes(path), f"supernet file {str(path)!r}")


@dataclass
class LoadedSupernet:
    """Every sub-net of a supernet file as its own eval-mode model serving the stored codes.

    ``models[name]``: the sub-net (quantized layers hold :class:`FrozenWeight` encodings; float
    sub-nets are plain float models). ``names``, ``choices`` (cheapest first), ``input_shape``,
    ``info``, :meth:`cost` and :meth:`table` as on :class:`Supernet`."""

    skeleton: Supernet
    models: dict[str, nn.Module]
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    model_spec: dict[str, Any] | None = None

    @property
    def names(self) -> list[str]:
        return self.skeleton.names

    @property
    def choices(self) -> list[str]:
        return self.skeleton.choices

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.skeleton.input_shape

    def cost(self, name: str) -> dict[str, int]:
        return self.skeleton.cost(name)

    def run(self, x: Tensor, name: str) -> Tensor:
        """Sub-net ``name`` on ``x`` (each sub-net is its own model: nothing is switched)."""
        model = self.models.get(name)
        if model is None:
            raise SupernetError(f"supernet: no sub-net {name!r}; sub-nets: {self.names}")
        return model(x)

    def spec(self) -> dict[str, Any]:
        return {**self.skeleton.spec(), "info": self.info, "model": self.model_spec}

    def table(self) -> list[dict[str, Any]]:
        return [{**s.to_dict(), **self.cost(s.name), **self.info.get(s.name, {})}
                for s in self.skeleton.specs]


def _entry(spec: dict[str, Any], key: str) -> str:
    return "no entry" if key not in spec else repr(spec[key])[:120]


def _check_description(spec: dict[str, Any], what: str) -> None:
    """The entries :class:`Supernet` takes, checked before use: a damaged or edited description is a
    FormatError saying what is wrong, not whatever the constructor would raise."""
    bad = f"{what}: bad supernet description:"
    shape = spec.get("input_shape")
    if not isinstance(shape, list) or not shape or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise FormatError(f"{bad} 'input_shape' must be a non-empty list of positive integers (one sample's "
                          f"shape, e.g. [1, 28, 28]), got {_entry(spec, 'input_shape')}")
    for key in ("weight", "activation"):
        if not isinstance(spec.get(key), dict) or not isinstance(spec[key].get("method"), str):
            raise FormatError(f"{bad} {key!r} must be a quantizer object such as {{\"method\": \"dorefa\"}}, "
                              f"got {_entry(spec, key)}")
    keep = spec.get("keep_float")
    if not isinstance(keep, list) or not all(isinstance(r, str) for r in keep):
        raise FormatError(f"{bad} 'keep_float' must be a list of layer globs such as "
                          f"[\"@first\", \"@last\"], got {_entry(spec, 'keep_float')}")
    if spec.get("order") not in (None, "l1"):
        raise FormatError(f"{bad} 'order' must be \"l1\" or absent, got {_entry(spec, 'order')}")
    info = spec.get("info", {})  # optional: a description without it has no per-sub-net info
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise FormatError(f"{bad} 'info' must be an object mapping sub-net names to objects, got "
                          f"{_entry(spec, 'info')}")


@torch.no_grad()
def _probe(model: nn.Module, shape: tuple[int, ...]) -> None:
    """One float forward pass on a zero sample of ``shape`` (the supernet's cost count runs the same),
    in eval mode so that no BatchNorm statistic moves."""
    mode = model.training
    model.eval()
    try:
        model(torch.zeros((1, *shape)))
    finally:
        model.train(mode)


def supernet_from_spec(spec: dict[str, Any], model: nn.Module | None, what: str) -> Supernet:
    """The supernet a file's JSON description names, over ``model`` (default: the zoo model the
    description names), with the description's per-sub-net ``info``; a bad description, or a model
    the description does not fit, raises FormatError naming ``what``."""
    _check_description(spec, what)
    zoo = spec.get("model")
    arch = zoo["name"] if isinstance(zoo, dict) and isinstance(zoo.get("name"), str) else "model"
    rebuilt = model is None
    if model is None:
        from ..models import build_from_spec

        if not isinstance(zoo, dict):
            raise FormatError(f"{what}: the file names no zoo model; pass model= (the float model)")
        try:
            model = build_from_spec(zoo)
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{what}: cannot rebuild model {zoo!r}: {e}") from None
    shape = tuple(spec["input_shape"])
    hint = (f"the description does not fit its own {arch}: the file is damaged; write it again from the "
            "supernet" if rebuilt else
            f"is it the {arch} the file was saved from? Pass a fresh float instance of that architecture "
            "as model=, or no model to rebuild it from the file")
    try:
        _probe(model, shape)
    except Exception as e:  # any error of the model's own forward: it does not take this input
        raise FormatError(f"{what}: the model does not take the file's input shape {shape} "
                          f"({type(e).__name__}: {e}): {hint}") from e
    try:
        sn = Supernet(model, spec["subnets"], shape, weight=spec["weight"], activation=spec["activation"],
                      keep_float=spec["keep_float"], order=spec.get("order"))
    except (KeyError, TypeError, ValueError, RuntimeError, SupernetError) as e:  # description or model
        raise FormatError(f"{what}: cannot build the supernet the file describes ({type(e).__name__}: {e}): "
                          f"{hint}") from None
    info = spec.get("info", {})
    sn.info = {n: dict(info.get(n, {})) for n in sn.names}
    return sn


def load_supernet_file(path: str | os.PathLike[str], model: nn.Module | None = None) -> LoadedSupernet:
    """Load every sub-net of a packed supernet file from its stored codes. ``model``: a fresh float
    instance of the architecture (default: rebuilt from the zoo spec in the file)."""
    sf = read_supernet_file(path)
    what = f"supernet file {str(path)!r}"
    spec = sf.spec
    skeleton = supernet_from_spec(spec, model, what)
    models: dict[str, nn.Module] = {}
    for name in skeleton.names:
        skeleton_model = skeleton.sliced(name)
        if name in sf.float_state:
            try:
                skeleton_model.load_state_dict(sf.float_state[name])
            except RuntimeError as e:
                raise FormatError(f"{what}: float sub-net {name!r}: {e}") from None
            models[name] = skeleton_model.eval()
            continue
        pf = sf.packed[name]
        if skeleton.recipe(name) != pf.recipe:
            raise FormatError(f"{what}: sub-net {name!r}: the stored recipe differs from the description's")
        try:
            sub = load_packed_file(pf, skeleton_model)
        except FormatError as e:
            raise FormatError(f"{what}: sub-net {name!r}: {e}") from None
        for rec in pf.layers.values():  # serve the stored encoding everywhere: never re-quantize
            layer = sub.get_submodule(rec.module)
            if rec.encoded is not None and frozen_weight(layer, rec.param) is None:
                parametrize.register_parametrization(layer, rec.param, FrozenWeight(rec.encoded))
        models[name] = sub.eval()
    return LoadedSupernet(skeleton=skeleton, models=models,
                          info={n: dict(skeleton.info[n]) for n in skeleton.names},
                          model_spec=spec.get("model"))
