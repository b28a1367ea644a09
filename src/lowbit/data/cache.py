"""A small on-disk cache of decoded arrays (``.npy``, never pickle), written atomically.

Entries live in ``<root>/<kind>-<key>/`` where ``root`` is ``cache_dir``, else
``$LOWBIT_CACHE``, else ``~/.cache/lowbit``; ``key`` hashes a description of the source
(its path, size and mtime, and the decoding options), so a changed source gets a new
entry. An entry is built in a temporary directory and renamed into place, so readers
never see a half-written one. Set ``LOWBIT_CACHE=off`` to disable caching.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._io import fsync_dir

__all__ = ["cache_root", "file_fingerprint", "load_entry", "make_key", "save_entry"]

log = logging.getLogger(__name__)

_FORMAT_VERSION = 1


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The cache directory in use, or ``None`` when caching is off."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LOWBIT_CACHE")
    if env is not None:
        if env.strip().lower() in ("", "0", "off", "none", "false", "no"):
            return None
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lowbit"


def file_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Identity of a file for cache keys: resolved path, size and mtime (ns)."""
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def make_key(description: Mapping[str, Any]) -> str:
    blob = json.dumps({"v": _FORMAT_VERSION, **description}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _entry_dir(root: Path, kind: str, key: str) -> Path:
    return root / f"{kind}-{key}"


def load_entry(
    kind: str, key: str, names: tuple[str, ...], cache_dir: str | os.PathLike[str] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """Arrays ``names`` and the metadata of a cache entry, or ``None`` if absent/unusable."""
    root = cache_root(cache_dir)
    if root is None:
        return None
    d = _entry_dir(root, kind, key)
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        arrays = {n: np.load(d / f"{n}.npy", allow_pickle=False) for n in names}
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable cache entry %s: %s", d, e)
        return None
    log.debug("loaded cache entry %s", d)
    return arrays, meta


def save_entry(
    kind: str,
    key: str,
    arrays: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path | None:
    """Write a cache entry atomically; returns its directory (``None`` if not written).

    Failures (read-only disk, no space) are logged and swallowed: the cache is an
    optimization, never a reason to fail.
    """
    root = cache_root(cache_dir)
    if root is None:
        return None
    final = _entry_dir(root, kind, key)
    tmp: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{kind}-", dir=root))
        for name, arr in arrays.items():
            with open(tmp / f"{name}.npy", "wb") as f:
                np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        with open(tmp / "meta.json", "w") as f:
            json.dump(dict(meta), f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / "meta.json").is_file():  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            raise
        tmp = None
        fsync_dir(root)
        log.info("cached %s at %s", kind, final)
        return final
    except OSError as e:
        log.warning("could not write cache entry %s: %s", final, e)
        return None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
