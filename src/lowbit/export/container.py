"""A strict reader and a deterministic writer of safetensors containers (no code ever runs on load).

The safetensors layout: 8 bytes little-endian ``N`` | ``N`` bytes of UTF-8 JSON header |
data. The header maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the data section) plus an optional ``"__metadata__"`` string->string map.

:func:`read_container` parses it itself, in pure Python, and checks everything the format
promises (header length within the file, valid UTF-8 JSON object without duplicate keys,
known dtypes, non-negative integer shapes, byte ranges that match ``numel * itemsize`` and
tile the data section exactly, without gaps or overlaps), so that any malformed file is a
:class:`FormatError` with a precise message instead of whatever a lower layer would raise.
Files are written by :func:`serialize`: standard safetensors (the ``safetensors`` library reads
them), byte-for-byte deterministic, with two SHA-256 entries in the metadata, which
:func:`read_container` verifies: :data:`CHECKSUM_KEY`, of the data section, and
:data:`HEADER_CHECKSUM_KEY`, of the header (:func:`header_digest`: every tensor entry and every
metadata entry but these two, in a canonical JSON form, so it does not depend on how the header is
laid out). A flipped bit anywhere in the file, tensors or header, is a FormatError, not a model that
loads with wrong weights or a wrong description. A file without an entry (written before it
existed, or by other tools) is read without that check.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import FormatError

MAX_HEADER_BYTES = 100 * 1024 * 1024
#: the metadata entry holding the hex SHA-256 of the data section (taken out of the metadata
#: that :func:`read_container` returns)
CHECKSUM_KEY = "lowbit_data_sha256"
#: the metadata entry holding the hex SHA-256 of the header (:func:`header_digest`; also taken out)
HEADER_CHECKSUM_KEY = "lowbit_header_sha256"
_OWN_KEYS = (CHECKSUM_KEY, HEADER_CHECKSUM_KEY)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise FormatError(f"duplicate key {k!r} in a JSON object")
        out[k] = v
    return out


def parse_json(text: str, what: str) -> Any:
    """``json.loads`` that rejects duplicate keys, NaN/Infinity and absurd nesting."""

    def bad_constant(c: str) -> Any:
        raise FormatError(f"{what}: JSON constant {c} is not allowed")

    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=bad_constant)
    except FormatError as e:
        raise FormatError(f"{what}: {e}") from None
    except RecursionError:
        raise FormatError(f"{what}: JSON nested too deeply") from None
    except (ValueError, TypeError) as e:
        raise FormatError(f"{what} is not valid JSON: {e}") from None


def _describe_foreign(head: bytes) -> str:
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return (
            "it is a zip archive (e.g. a torch.save checkpoint); lowbit never unpickles, "
            "a .lowbit file is a safetensors container"
        )
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "it looks like a Python pickle; lowbit never unpickles, a .lowbit file is safetensors"
    if head[:4] == b"\x89HDF":
        return "it is an HDF5 file, not a safetensors container"
    if head[:1] in (b"{", b"[") or head[:3] == b"---":
        return "it looks like a text (JSON/YAML) file, not a safetensors container"
    return "it is not a safetensors container"


def header_digest(entries: dict[str, Any], metadata: dict[str, str]) -> str:
    """Hex SHA-256 of a header in canonical form: the JSON object ``{"__metadata__": metadata, **entries}``
    (``entries``: tensor name -> ``{"dtype", "shape", "data_offsets"}``; ``metadata`` without the two
    checksum entries) written by ``json.dumps(..., sort_keys=True, separators=(",", ":"),
    ensure_ascii=True)``. Key order, whitespace and padding of the stored header do not change it."""
    meta = {k: v for k, v in metadata.items() if k not in _OWN_KEYS}
    text = json.dumps({"__metadata__": meta, **entries}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _corrupted(what: str, part: str) -> FormatError:
    return FormatError(f"{what}: the {part} does not match the checksum stored with it: the file is "
                       "corrupted (a changed or damaged copy); write it again from the model")


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    p = Path(path)
    try:
        if p.is_dir():
            raise FormatError(f"{str(p)!r} is a directory, not a .lowbit file")
        return p.read_bytes()
    except FormatError:
        raise
    except FileNotFoundError:
        raise FormatError(f"{str(p)!r} does not exist") from None
    except OSError as e:
        raise FormatError(f"cannot read {str(p)!r}: {e.strerror or e}") from None


def read_container(data: bytes, what: str = "file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a safetensors byte string: ``(tensors, metadata)``; any defect is a FormatError."""
    if len(data) == 0:
        raise FormatError(f"{what} is empty")
    if len(data) < 8:
        raise FormatError(f"{what} is {len(data)} bytes long, too short for a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8 or n > MAX_HEADER_BYTES:
        raise FormatError(
            f"{what}: header length field says {n} bytes but the file has {len(data) - 8} bytes "
            f"after it ({_describe_foreign(data[:8])})"
        )
    if n < 2:
        raise FormatError(f"{what}: header length {n} is too small for a JSON object")
    try:
        text = data[8 : 8 + n].decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{what}: header is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    header = parse_json(text.rstrip(" "), f"{what}: safetensors header")
    if not isinstance(header, dict):
        raise FormatError(f"{what}: safetensors header must be a JSON object, got {type(header).__name__}")
    meta_raw = header.pop("__metadata__", {})
    if not isinstance(meta_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta_raw.items()
    ):
        raise FormatError(f"{what}: __metadata__ must map strings to strings")
    # before any other check of the entries: a flipped bit in the header reads as what it is
    want_header = meta_raw.get(HEADER_CHECKSUM_KEY)
    if want_header is not None and header_digest(header, meta_raw) != want_header:
        raise _corrupted(what, "header")
    buf = memoryview(data)[8 + n :]
    size = len(buf)
    spans: list[tuple[int, int, str]] = []
    entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        where = f"{what}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"{where}: entry must have exactly dtype, shape, data_offsets")
        dt = info["dtype"]
        if not isinstance(dt, str) or dt not in DTYPES:
            raise FormatError(f"{where}: dtype {dt!r} is not one of {', '.join(DTYPES)}")
        shape = info["shape"]
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise FormatError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if len(shape) > 16:
            raise FormatError(f"{where}: {len(shape)} dimensions is too many")
        offs = info["data_offsets"]
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise FormatError(f"{where}: data_offsets must be [begin, end], got {offs!r}")
        b, e = offs
        if not 0 <= b <= e <= size:
            raise FormatError(f"{where}: data_offsets {offs} outside the {size}-byte data section")
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty((), dtype=DTYPES[dt]).element_size()
        if numel * itemsize != e - b:
            raise FormatError(
                f"{where}: shape {shape} of {dt} needs {numel * itemsize} bytes, data_offsets give {e - b}"
            )
        spans.append((b, e, name))
        entries[name] = (DTYPES[dt], tuple(shape), b, e)
    spans.sort()
    pos = 0
    for b, e, name in spans:
        if b != pos:
            kind = "overlaps the previous tensor" if b < pos else f"leaves a gap at byte {pos}"
            raise FormatError(f"{what}: tensor {name!r} at data_offsets [{b}, {e}] {kind}")
        pos = e
    if pos != size:
        raise FormatError(f"{what}: {size - pos} trailing bytes after the last tensor")
    meta = {k: v for k, v in meta_raw.items() if k not in _OWN_KEYS}
    want = meta_raw.get(CHECKSUM_KEY)
    if want is not None and hashlib.sha256(buf).hexdigest() != want:
        raise _corrupted(what, "tensor data")
    raw = bytearray(buf)  # one writable copy; tensors are views cloned below
    tensors: dict[str, torch.Tensor] = {}
    for name, (dtype, shape, b, e) in entries.items():
        if e == b:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            t = torch.frombuffer(
                raw, dtype=dtype, count=(e - b) // torch.empty((), dtype=dtype).element_size(), offset=b
            )
            tensors[name] = t.reshape(shape).clone()
    return tensors, meta


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Standard safetensors bytes, deterministic: the same tensors and metadata always give the
    same bytes (metadata keys sorted; tensors ordered by decreasing item size, then name, so
    every tensor is aligned; header padded with spaces to a multiple of 8 bytes)."""
    items = []
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
        items.append((name, t))
    items.sort(key=lambda it: (-it[1].element_size(), it[0]))
    for key in _OWN_KEYS:
        if key in metadata:
            raise ValueError(f"metadata key {key!r} is the container's own; leave it out (serialize adds it)")
    header: dict[str, Any] = {}
    chunks: list[bytes] = []
    pos = 0
    for name, t in items:
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [pos, pos + len(raw)],
        }
        chunks.append(raw)
        pos += len(raw)
    data = b"".join(chunks)
    meta = {**metadata, CHECKSUM_KEY: hashlib.sha256(data).hexdigest(),
            HEADER_CHECKSUM_KEY: header_digest(header, metadata)}
    header = {"__metadata__": {k: meta[k] for k in sorted(meta)}, **header}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    text += b" " * ((-len(text)) % 8)
    return len(text).to_bytes(8, "little") + text + data

