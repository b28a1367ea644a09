"""Checkpoints: safetensors + JSON, written atomically, loaded without unpickling.

File layout (one safetensors file):

- tensors ``model/<state_dict key>``: the model's `state_dict()` (parametrized layers
  appear as ``<layer>.parametrizations.weight.original``, quantizers with their
  parameters and buffers);
- tensors ``optim/…``, ``sched/…``, ``extra/…``: every tensor found in the optimizer state,
  the scheduler state and the `extra` dict (RNG states are uint8 tensors there);
- header metadata ``lowbit``: JSON holding the rest of those structures (epoch,
  param_groups, scheduler state, callback states, metrics, format version) with
  references to the tensors, and ``lowbit.crc32``: a CRC-32 of every tensor's bytes and
  of the JSON, so a flipped bit anywhere is reported instead of silently loaded.

Writing goes to a hidden temp file in the target directory (``.<name>.<random>.tmp``),
which is flushed, fsynced and `os.replace`d onto the target, and the directory is
fsynced: a reader sees either the previous complete file or the new complete file.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from .._io import atomic_path, atomic_write_text, temp_pattern

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "atomic_path",
    "atomic_write_text",
    "load_checkpoint",
    "load_weights",
    "read_checkpoint",
    "save_checkpoint",
    "temp_pattern",
]

FORMAT = "lowbit.checkpoint"
FORMAT_VERSION = 1
_META_KEY = "lowbit"
_CRC_KEY = "lowbit.crc32"


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupted, foreign, or does not fit the model."""


_TAKES = ("load_checkpoint, load_weights and train --init take a run's checkpoint.safetensors or "
          "best.safetensors (load_weights also a safetensors or .pt/.pth state dict)")


def _not_a_file(path: Path, what: str, name: str) -> OSError:
    """The error for a ``path`` that is missing or a directory; ``name``: the file suggested inside it."""
    if path.is_dir():
        return IsADirectoryError(f"{path} is a directory, not a {what}; give a file in it such as "
                                 f"{path / name}")
    return FileNotFoundError(f"no {what} at {path}")


def _foreign_lowbit_file(path: Path, header: Mapping[str, str]) -> CheckpointError | None:
    """The error for a packed model or supernet file (safetensors too, told apart by the container's
    ``format`` metadata, see lowbit.export) given where a checkpoint belongs; None for other files."""
    fmt = header.get("format")
    if fmt == "lowbit":
        return CheckpointError(f"{path} is a packed model (.lowbit), not a checkpoint: load it with "
                               f"lowbit.load_packed({str(path)!r}) or inspect it with "
                               f"`lowbit report {path}`; " + _TAKES)
    if fmt == "lowbit.supernet":
        return CheckpointError(f"{path} is a supernet file, not a checkpoint: load it with "
                               f"lowbit.serve.load_supernet({str(path)!r}); " + _TAKES)
    return None


# --------------------------------------------------------------------------- encoding
# Nested python structures (optimizer/scheduler/callback state) become JSON in which each
# tensor is replaced by {"__tensor__": name}; dicts with non-string keys (the optimizer's
# integer parameter ids) and tuples are tagged so that they come back as they were.


def _encode(obj: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key, n = name, 1
        while key in tensors:
            key, n = f"{name}#{n}", n + 1
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{name}/{k}", tensors) for k, v in obj.items()}
        for k in obj:
            if not isinstance(k, str | int | float | bool) and k is not None:
                raise CheckpointError(f"cannot store a dict key of type {type(k).__name__} "
                                      f"at {name!r} in a checkpoint")
        return {"__items__": [[k, _encode(v, f"{name}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    if isinstance(obj, torch.dtype | torch.device):
        return str(obj)
    raise CheckpointError(
        f"cannot store a value of type {type(obj).__name__} at {name!r} in a checkpoint "
        "(only tensors and JSON values are allowed)"
    )


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            try:
                return tensors[obj["__tensor__"]]
            except KeyError:
                raise CheckpointError(
                    f"metadata refers to tensor {obj['__tensor__']!r} which the file lacks"
                ) from None
        if "__items__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _crc(tensors: Mapping[str, torch.Tensor], meta: str) -> int:
    crc = 0
    for name in sorted(tensors):
        t = tensors[name]
        crc = zlib.crc32(f"{name}:{t.dtype}:{tuple(t.shape)}".encode(), crc)
        if t.numel():
            crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().data, crc)
    return zlib.crc32(meta.encode(), crc)


def _prepare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached, and no two entries sharing storage (safetensors refuses
    aliased tensors, e.g. tied weights)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


# --------------------------------------------------------------------------- save / load


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: Any = None,
    scheduler: Any = None,
    epoch: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write model/optimizer/scheduler state, `epoch` (completed epochs) and `extra`
    (JSON values and tensors) to `path` atomically. Returns the path."""
    model_state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {
        f"model/{k}": v for k, v in model_state.items() if isinstance(v, torch.Tensor)
    }
    # non-tensor entries: modules' get_extra_state() (e.g. a quantizer's settings)
    model_extra = {k: v for k, v in model_state.items() if not isinstance(v, torch.Tensor)}
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "epoch": int(epoch),
        "model_extra": _encode(model_extra, "model_extra", tensors),
        "optimizer": _encode(optimizer.state_dict(), "optim", tensors) if optimizer else None,
        "scheduler": _encode(scheduler.state_dict(), "sched", tensors) if scheduler else None,
        "extra": _encode(extra or {}, "extra", tensors),
    }
    tensors = _prepare(tensors)
    meta_json = json.dumps(meta)
    # serialise in memory and write the bytes ourselves: safetensors' save_file goes
    # through a temp file of its own that a killed process would leave behind
    data = save(tensors, metadata={_META_KEY: meta_json, _CRC_KEY: str(_crc(tensors, meta_json))})
    with atomic_path(path, example="checkpoint.safetensors") as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and verify a checkpoint: (metadata dict, all tensors by name). No unpickling."""
    path = Path(path)
    if not path.is_file():
        raise _not_a_file(path, "checkpoint", "checkpoint.safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError) as e:
        with open(path, "rb") as fh:
            head = fh.read(4)
        hint = ""
        if head[:2] == b"PK" or head[:1] == b"\x80":
            hint = (" It looks like a torch.save/pickle file; lowbit never unpickles "
                    "checkpoints (load it yourself with torch.load(weights_only=True) and "
                    "re-save it with lowbit.train.save_checkpoint).")
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, corrupted or not safetensors): "
            f"{e}.{hint}"
        ) from None
    foreign = _foreign_lowbit_file(path, header)
    if foreign is not None:
        raise foreign
    if _META_KEY not in header:
        raise CheckpointError(
            f"{path} is a safetensors file but not a lowbit checkpoint (no {_META_KEY!r} "
            f"metadata); to initialise a model from plain weights use load_weights()"
        )
    meta_json = header[_META_KEY]
    if _CRC_KEY in header and str(_crc(tensors, meta_json)) != header[_CRC_KEY]:
        raise CheckpointError(
            f"{path} is corrupted: its CRC-32 does not match its content (disk or copy error)"
        )
    try:
        meta = json.loads(meta_json)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} has unreadable metadata JSON: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
    if int(meta.get("version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written in checkpoint format version {meta['version']}; this lowbit "
            f"reads versions <= {FORMAT_VERSION}: upgrade lowbit"
        )
    return meta, tensors


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: Any = None,
    scheduler: Any = None,
) -> dict[str, Any]:
    """Restore model (strictly), optimizer and scheduler state from `path`.

    Returns {"epoch": completed epochs, "extra": the saved extra dict (tensors decoded),
    "optimizer": bool, "scheduler": bool} ; the booleans say what the file contained.
    """
    meta, tensors = read_checkpoint(path)
    _load_model_state(model, _model_state(meta, tensors), strict=True, source=str(path))
    if optimizer is not None:
        if meta.get("optimizer") is None:
            raise CheckpointError(f"{path} holds no optimizer state")
        saved = _decode(meta["optimizer"], tensors)
        _match_tuples(saved, optimizer.state_dict())
        try:
            optimizer.load_state_dict(saved)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(
                f"{path}: optimizer state does not fit this optimizer ({e}); was the model, "
                "the optimizer type or the no_decay_1d setting changed?"
            ) from None
    if scheduler is not None:
        if meta.get("scheduler") is None:
            raise CheckpointError(f"{path} holds no scheduler state")
        scheduler.load_state_dict(_decode(meta["scheduler"], tensors))
    return {
        "epoch": int(meta["epoch"]),
        "extra": _decode(meta["extra"], tensors),
        "optimizer": meta.get("optimizer") is not None,
        "scheduler": meta.get("scheduler") is not None,
    }


def _model_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state: dict[str, Any] = {
        k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")
    }
    state.update(_decode(meta.get("model_extra") or {}, tensors))
    return state


def _match_tuples(saved: Any, live: Any) -> None:
    """JSON has no tuples: where the live optimizer's param_groups hold a tuple (Adam
    betas), turn the saved list back into a tuple."""
    if not (isinstance(saved, dict) and isinstance(live, dict)):
        return
    for g_saved, g_live in zip(saved.get("param_groups", []), live.get("param_groups", []),
                               strict=False):
        for k, v in g_live.items():
            if isinstance(v, tuple) and isinstance(g_saved.get(k), list):
                g_saved[k] = tuple(g_saved[k])
    for k, v in live.items():
        if k not in ("state", "param_groups"):
            _match_tuples(saved.get(k), v)


# --------------------------------------------------------------------------- weights only


def _preview(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", … ({len(keys) - n} more)" if len(keys) > n else "")


def _load_model_state(
    model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool, source: str
) -> dict[str, list[str]]:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and isinstance(state[k], torch.Tensor)
        and isinstance(expected[k], torch.Tensor) and state[k].shape != expected[k].shape
    ]
    problems = []
    if shapes:
        problems.append(f"shape mismatch for {len(shapes)} tensor(s): {_preview(shapes, 3)}")
    if strict and missing:
        problems.append(f"{len(missing)} key(s) missing from the file: {_preview(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) in the file: {_preview(unexpected)}")
    if problems:
        hint = ""
        quant_file = any(".parametrizations." in k for k in state)
        quant_model = any(".parametrizations." in k for k in expected)
        if quant_file and not quant_model:
            hint = (" The file holds a quantized model: quantize this model with the same "
                    "recipe (lowbit.quantize) before loading.")
        elif quant_model and not quant_file:
            hint = (" The file holds a float model: load it before quantizing "
                    "(the --init path), or use load_weights(..., strict=False).")
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: " + "; ".join(problems) + "." + hint
        )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return {"missing": missing, "unexpected": unexpected}


def load_weights(
    model: nn.Module, path: str | os.PathLike[str], strict: bool = True
) -> dict[str, list[str]]:
    """Initialise `model` from weights only (the `--init` path).

    Accepts a lowbit checkpoint (its ``model/`` tensors), a plain safetensors state dict,
    or a ``.pt``/``.pth`` state dict (read with ``torch.load(weights_only=True)``). A float
    checkpoint may be loaded into an already-quantized model: ``<layer>.weight`` fills the
    latent ``<layer>.parametrizations.weight.original``. With ``strict=False`` missing and
    unexpected keys are skipped (shape mismatches still fail); returns them.
    """
    path = Path(path)
    if path.suffix in (".pt", ".pth"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses arbitrary objects
            raise CheckpointError(f"{path}: cannot read as a weights-only torch file: {e}") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} does not hold a state dict")
    else:
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as e:
            if not path.is_file():
                raise _not_a_file(path, "weights file", "best.safetensors") from None
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
        foreign = _foreign_lowbit_file(path, header)
        if foreign is not None:
            raise foreign
        if _META_KEY in header:
            meta, tensors = read_checkpoint(path)  # verifies the CRC
            state = _model_state(meta, tensors)
    expected = model.state_dict()
    for key in list(state):
        if key not in expected and key.endswith(".weight"):
            alias = key[: -len("weight")] + "parametrizations.weight.original"
            if alias in expected and alias not in state:
                state[alias] = state.pop(key)
    return _load_model_state(model, state, strict=strict, source=str(path))
