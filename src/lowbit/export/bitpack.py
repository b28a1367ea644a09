"""Dense bit packing of integer codes, and radix ("5 trits per byte") packing.

Two layouts, both pure functions on numpy arrays (torch tensors are accepted and converted):

**Dense bits** (``pack_bits`` / ``unpack_bits``), any width ``1 <= bits <= 8``. The codes form
one little-endian bit stream: code ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``, its
least significant bit first, and stream bit ``j`` is bit ``j % 8`` (``1 << (j % 8)``) of byte
``j // 8``. So with 2-bit codes ``[1, 2, 3, 0]`` the single byte is
``1 | 2 << 2 | 3 << 4 | 0 << 6 = 0x39``. ``n`` codes take ``ceil(n * bits / 8)`` bytes; the
unused high bits of the last byte are zero (and ``unpack_bits`` rejects them otherwise).

**Radix** (``pack_radix`` / ``unpack_radix``) for codebooks whose size is not a power of two:
``k = floor(log_base 256)`` codes per byte, byte ``= sum_j code[5m + j] * base**j`` (first
code least significant). Ternary codes (base 3) go 5 per byte (3^5 = 243 <= 256): 1.6 bits a
weight instead of 2. The last byte is padded with zero digits; bytes ``>= base**k`` and non-zero
padding digits are rejected.

``choose_packing(num_levels, n)`` picks whichever is smaller (dense wins ties).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_BITS = 8
MAX_RADIX_BASE = 16


class PackingError(ValueError):
    """Codes or packed bytes that do not fit the requested layout."""


def _as_codes(codes: Any) -> np.ndarray:
    if hasattr(codes, "detach"):  # torch tensor
        codes = codes.detach().cpu().numpy()
    a = np.asarray(codes).reshape(-1)
    if a.size and a.dtype.kind not in "iub":
        raise PackingError(f"codes must be integers, got dtype {a.dtype}")
    return a


def _as_bytes(data: Any) -> np.ndarray:
    if hasattr(data, "detach"):
        data = data.detach().cpu().numpy()
    if isinstance(data, bytes | bytearray | memoryview):
        return np.frombuffer(bytes(data), dtype=np.uint8)
    a = np.asarray(data)
    if a.dtype != np.uint8:
        raise PackingError(f"packed data must be uint8, got dtype {a.dtype}")
    return a.reshape(-1)


def bits_for(num_levels: int) -> int:
    """Bits of a dense code for a codebook of ``num_levels`` entries (at least 1)."""
    if num_levels < 1:
        raise PackingError(f"a codebook needs at least 1 level, got {num_levels}")
    return max(1, (num_levels - 1).bit_length())


def packed_size_bits(n: int, bits: int) -> int:
    """Bytes that ``n`` dense codes of ``bits`` bits take."""
    return (n * bits + 7) // 8


def radix_per_byte(base: int) -> int:
    """How many base-``base`` digits fit one byte (``base**k <= 256``)."""
    if not 2 <= base <= 256:
        raise PackingError(f"radix base must be in [2, 256], got {base}")
    k = 0
    while base ** (k + 1) <= 256:
        k += 1
    return k


def packed_size_radix(n: int, base: int) -> int:
    return -(-n // radix_per_byte(base))


def _check_range(a: np.ndarray, limit: int, what: str) -> None:
    if a.size and (int(a.min()) < 0 or int(a.max()) >= limit):
        raise PackingError(
            f"{what}: codes must be in [0, {limit}), got values in [{int(a.min())}, {int(a.max())}]"
        )


def pack_bits(codes: Any, bits: int) -> np.ndarray:
    """Pack integer codes in ``[0, 2**bits)`` densely, little-endian bit order (see module doc)."""
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise PackingError(f"bits must be an integer in [1, {MAX_BITS}], got {bits!r}")
    a = _as_codes(codes)
    _check_range(a, 1 << bits, f"pack_bits({bits})")
    n = a.size
    a = a.astype(np.uint8, copy=False)
    if bits == 8:
        return a.copy()
    if 8 % bits == 0:  # 1, 2, 4: whole codes per byte, no code straddles a byte
        per = 8 // bits
        pad = (-n) % per
        if pad:
            a = np.concatenate([a, np.zeros(pad, np.uint8)])
        g = a.reshape(-1, per).astype(np.uint16)
        shifts = (np.arange(per, dtype=np.uint16) * bits)[None, :]
        return (g << shifts).sum(axis=1).astype(np.uint8)
    # general width: expand to a bit matrix, then np.packbits (LSB first)
    bitmat = (a[:, None] >> np.arange(bits, dtype=np.uint8)[None, :]) & 1
    return np.packbits(bitmat.reshape(-1), bitorder="little")


def unpack_bits(data: Any, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``n`` codes (uint8). Checks the byte count and that the
    padding bits of the last byte are zero."""
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise PackingError(f"bits must be an integer in [1, {MAX_BITS}], got {bits!r}")
    if not isinstance(n, int) or n < 0:
        raise PackingError(f"number of codes must be a non-negative integer, got {n!r}")
    b = _as_bytes(data)
    need = packed_size_bits(n, bits)
    if b.size != need:
        raise PackingError(f"{n} codes of {bits} bits take {need} bytes, but {b.size} bytes were given")
    if bits == 8:
        return b.copy()
    if 8 % bits == 0:
        per = 8 // bits
        mask = (1 << bits) - 1
        shifts = (np.arange(per, dtype=np.uint8) * bits)[None, :]
        out = ((b[:, None] >> shifts) & mask).reshape(-1)
    else:
        stream = np.unpackbits(b, bitorder="little")
        out = (
            (
                stream[: n * bits].reshape(n, bits).astype(np.uint16)
                << np.arange(bits, dtype=np.uint16)[None, :]
            )
            .sum(axis=1)
            .astype(np.uint8)
        )
        tail = stream[n * bits :]
        if tail.size and tail.any():
            raise PackingError("non-zero padding bits after the last code")
        return out
    if out[n:].any():
        raise PackingError("non-zero padding bits after the last code")
    return out[:n].copy()


def pack_radix(codes: Any, base: int) -> np.ndarray:
    """Pack codes in ``[0, base)`` as base-``base`` digits, ``radix_per_byte(base)`` a byte."""
    k = radix_per_byte(base)
    a = _as_codes(codes)
    _check_range(a, base, f"pack_radix({base})")
    pad = (-a.size) % k
    a = a.astype(np.int64)
    if pad:
        a = np.concatenate([a, np.zeros(pad, np.int64)])
    powers = base ** np.arange(k, dtype=np.int64)
    return (a.reshape(-1, k) * powers[None, :]).sum(axis=1).astype(np.uint8)


def unpack_radix(data: Any, base: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_radix`: ``n`` codes (uint8); rejects bytes ``>= base**k`` and
    non-zero padding digits."""
    k = radix_per_byte(base)
    if not isinstance(n, int) or n < 0:
        raise PackingError(f"number of codes must be a non-negative integer, got {n!r}")
    b = _as_bytes(data)
    need = -(-n // k)
    if b.size != need:
        raise PackingError(f"{n} base-{base} codes take {need} bytes, but {b.size} bytes were given")
    if b.size and int(b.max()) >= base**k:
        raise PackingError(f"byte value {int(b.max())} is not a valid group of {k} base-{base} digits")
    powers = base ** np.arange(k, dtype=np.int64)
    digits = ((b.astype(np.int64)[:, None] // powers[None, :]) % base).reshape(-1)
    if digits[n:].any():
        raise PackingError("non-zero padding digits after the last code")
    return digits[:n].astype(np.uint8)


@dataclass(frozen=True)
class Packing:
    """How one code tensor is packed: ``kind`` "bits" (dense, ``bits`` per code) or "radix"
    (``base`` digits, ``per_byte`` a byte)."""

    kind: str
    bits: int = 0
    base: int = 0

    @property
    def per_byte(self) -> int:
        return radix_per_byte(self.base) if self.kind == "radix" else 0

    def nbytes(self, n: int) -> int:
        if self.kind == "bits":
            return packed_size_bits(n, self.bits)
        return packed_size_radix(n, self.base)

    def bits_per_code(self) -> float:
        return float(self.bits) if self.kind == "bits" else 8.0 / self.per_byte

    def pack(self, codes: Any) -> np.ndarray:
        return pack_bits(codes, self.bits) if self.kind == "bits" else pack_radix(codes, self.base)

    def unpack(self, data: Any, n: int) -> np.ndarray:
        if self.kind == "bits":
            return unpack_bits(data, self.bits, n)
        return unpack_radix(data, self.base, n)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "bits":
            return {"kind": "bits", "bits": self.bits}
        return {"kind": "radix", "base": self.base, "per_byte": self.per_byte}

    @classmethod
    def from_dict(cls, d: Any) -> Packing:
        """Parse and validate a packing description (raises :class:`PackingError`)."""
        if not isinstance(d, dict):
            raise PackingError(f"packing must be an object, got {d!r}")
        kind = d.get("kind")
        if kind == "bits":
            if set(d) != {"kind", "bits"}:
                raise PackingError(f"packing 'bits' has keys kind, bits; got {sorted(d)}")
            b = d["bits"]
            if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_BITS:
                raise PackingError(f"packing bits must be an integer in [1, {MAX_BITS}], got {b!r}")
            return cls("bits", bits=b)
        if kind == "radix":
            if set(d) != {"kind", "base", "per_byte"}:
                raise PackingError(f"packing 'radix' has keys kind, base, per_byte; got {sorted(d)}")
            base = d["base"]
            if isinstance(base, bool) or not isinstance(base, int) or not 2 <= base <= MAX_RADIX_BASE:
                raise PackingError(f"radix base must be an integer in [2, {MAX_RADIX_BASE}], got {base!r}")
            if d["per_byte"] != radix_per_byte(base):
                raise PackingError(
                    f"radix base {base} packs {radix_per_byte(base)} codes a byte, "
                    f"header says {d['per_byte']!r}"
                )
            return cls("radix", base=base)
        raise PackingError(f"packing kind must be 'bits' or 'radix', got {kind!r}")


def choose_packing(num_levels: int, n: int, allow_radix: bool = True) -> Packing:
    """The smaller of dense ``bits_for(num_levels)``-bit packing and radix-``num_levels``
    packing for ``n`` codes (dense on ties, and always for power-of-two codebooks, for which radix
    packing is never smaller)."""
    dense = Packing("bits", bits=bits_for(num_levels))
    if not allow_radix or num_levels < 3 or num_levels > MAX_RADIX_BASE or num_levels & (num_levels - 1) == 0:
        return dense
    radix = Packing("radix", base=num_levels)
    return radix if radix.nbytes(n) < dense.nbytes(n) else dense


def bits_per_code_table() -> dict[int, float]:
    """Bits a code costs under :func:`choose_packing` for codebooks of 2..256 levels."""
    return {L: choose_packing(L, 10**6).bits_per_code() for L in range(2, 257)}


__all__ = [
    "MAX_BITS",
    "Packing",
    "PackingError",
    "bits_for",
    "bits_per_code_table",
    "choose_packing",
    "pack_bits",
    "pack_radix",
    "packed_size_bits",
    "packed_size_radix",
    "radix_per_byte",
    "unpack_bits",
    "unpack_radix",
]
