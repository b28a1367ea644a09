"""Atomic files: a reader sees the previous complete file or the new complete file, never a
torn one, even when the writer is killed.

The content goes to a temp file in the target's folder (``.NAME.XXXX.tmp``), which is fsynced
and ``os.replace``d onto the target; then the folder is fsynced so the rename survives a crash.
This module imports nothing of lowbit, so every package may use it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write", "atomic_write_text", "check_file_path", "claim_settings",
           "fsync_dir", "temp_pattern"]


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make renames inside ``directory`` durable (a no-op where folders cannot be opened)."""
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_pattern(path: str | os.PathLike[str]) -> str:
    """Glob pattern of the temp files ``atomic_path(path)`` creates (to clean up after kills)."""
    return f".{Path(path).name}.*.tmp"


def check_file_path(path: str | os.PathLike[str], example: str = "model.lowbit") -> Path:
    """``path`` as a Path, or a ValueError (empty path) / IsADirectoryError (an existing folder)
    that names a file path to give instead (``example`` is the file name suggested inside it), or a
    NotADirectoryError when a file stands where one of its folders would be."""
    if not os.fspath(path):
        raise ValueError(f"the output path is empty; give a file path such as {example}")
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{p} is a directory; give a file path such as {p / example}")
    existing = next((a for a in p.parents if a.exists()), None)  # mkdir would fail on a file here
    if existing is not None and not existing.is_dir():
        raise NotADirectoryError(f"{existing} is a file, not a folder: {p} cannot be written inside it")
    return p


@contextmanager
def atomic_path(path: str | os.PathLike[str], example: str = "model.lowbit") -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it is fsynced and renamed onto ``path``.

    On any exception (or if the process dies) ``path`` keeps its previous content and the temp
    file is removed (or, after a kill, left to be matched by :func:`temp_pattern`). An empty
    ``path`` or an existing folder is refused before anything is written (see
    :func:`check_file_path`; ``example`` is the file name its message suggests).
    """
    path = check_file_path(path, example)
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(parent)


def atomic_write(path: str | os.PathLike[str], data: bytes, example: str = "model.lowbit") -> None:
    """Write ``data`` to ``path`` atomically (``example``: see :func:`atomic_path`)."""
    with atomic_path(path, example) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, example: str = "out.json") -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (``example``: see :func:`atomic_path`)."""
    with atomic_path(path, example) as tmp:
        tmp.write_text(text, encoding="utf-8")


def claim_settings(state: str | os.PathLike[str], record: str | os.PathLike[str],
                   settings: Mapping[str, Any]) -> None:
    """Let a resumable job continue ``state`` (its checkpoint or cache) only under the ``settings``
    it was started with, kept as JSON in ``record``: other settings would carry the old work on under
    the new ones, so they are a ValueError naming what differs. A ``state`` without a record (older
    than records) is continued as it is, with a warning; the record is (re)written otherwise."""
    state, record = Path(state), Path(record)
    now = json.loads(json.dumps(settings, sort_keys=True, default=str))
    if state.exists() and record.exists():
        try:
            was = json.loads(record.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{record} is not a valid settings record ({e}): it holds the settings "
                             f"{state.name} was made with; delete {record.name} and {state.name} to start "
                             "again, or give another --out") from None
        if not isinstance(was, dict):
            raise ValueError(f"{record} holds {type(was).__name__}, not a JSON object of settings: delete "
                             f"{record.name} and {state.name} to start again, or give another --out")
        if was != now:
            changed = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
            raise ValueError(f"{state} was made with other settings ({', '.join(changed)} differ); give "
                             f"another --out, or delete {state.name} to start it again")
    elif state.exists():
        logging.getLogger(__name__).warning("%s has no %s (an older run): continuing it as it is", state,
                                            record.name)
    atomic_write_text(record, json.dumps(now, indent=1, sort_keys=True) + "\n")
