"""Reader (and writer) for the IDX format of MNIST and Fashion-MNIST.

IDX (LeCun et al., http://yann.lecun.com/exdb/mnist/): a 4-byte magic number
``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian uint32 dimensions, then the data in
row-major order, big-endian. Type codes: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
0x0D float32, 0x0E float64. Files may be gzip-compressed (detected by content, not name).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .errors import DatasetFormatError

__all__ = ["IDX_DTYPES", "parse_idx", "read_idx", "write_idx"]

#: IDX type code -> big-endian numpy dtype
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {(dt.kind, dt.itemsize): c for c, dt in IDX_DTYPES.items()}


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the (uncompressed) bytes of an IDX file into a native-endian array."""
    if len(data) < 4:
        raise DatasetFormatError(f"{name}: not an IDX file (only {len(data)} bytes)")
    zero1, zero2, code, ndim = data[0], data[1], data[2], data[3]
    if zero1 != 0 or zero2 != 0:
        raise DatasetFormatError(
            f"{name}: bad IDX magic number 0x{data[:4].hex()} (must start with 0x0000)"
        )
    if code not in IDX_DTYPES:
        raise DatasetFormatError(
            f"{name}: unknown IDX data type code 0x{code:02x} "
            f"(known: {', '.join(f'0x{c:02x}' for c in IDX_DTYPES)})"
        )
    if ndim == 0:
        raise DatasetFormatError(f"{name}: IDX file with 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetFormatError(
            f"{name}: truncated IDX header ({len(data)} bytes, need {header} for {ndim} dims)"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header
    if got < expected:
        raise DatasetFormatError(
            f"{name}: truncated IDX file: dims {dims} need {expected} data bytes, found {got}"
        )
    if got > expected:
        raise DatasetFormatError(
            f"{name}: IDX file has {got - expected} trailing bytes after dims {dims}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    return arr.reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not, with validation.

    Raises :class:`DatasetFormatError` (a ``ValueError``) for a wrong magic number, an
    unknown type code, a truncated or corrupt file, or trailing bytes.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise DatasetFormatError(f"{path}: corrupt or truncated gzip stream ({e})") from e
    return parse_idx(raw, str(path))


def write_idx(path: str | os.PathLike[str], array: np.ndarray, *, compress: bool | None = None):
    """Write ``array`` as an IDX file (gzip'd if ``compress`` or the name ends in .gz)."""
    path = Path(path)
    a = np.asarray(array)
    key = (a.dtype.kind, a.dtype.itemsize)
    if key not in _CODES:
        raise ValueError(f"dtype {a.dtype} has no IDX type code")
    code = _CODES[key]
    if not 1 <= a.ndim <= 255:
        raise ValueError("IDX arrays need 1..255 dimensions")
    payload = (
        bytes([0, 0, code, a.ndim])
        + struct.pack(f">{a.ndim}I", *a.shape)
        + np.ascontiguousarray(a, dtype=IDX_DTYPES[code]).tobytes()
    )
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path
