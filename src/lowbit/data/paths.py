"""Where datasets are looked for: ``data_dir``, ``$LOWBIT_DATA``, installed packages and
the data shipped beside the repository."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import site
import sys
import sysconfig
from pathlib import Path

__all__ = ["find_package_data", "search_dirs", "shipped_data_files"]

_PKG_DIR = Path(__file__).resolve().parent


def search_dirs(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    """``data_dir`` (if given), then each directory of ``$LOWBIT_DATA`` (os.pathsep-separated)."""
    dirs: list[Path] = []
    if data_dir is not None:
        dirs.append(Path(data_dir).expanduser())
    for part in os.environ.get("LOWBIT_DATA", "").split(os.pathsep):
        if part.strip():
            dirs.append(Path(part.strip()).expanduser())
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def _repo_root(start: Path) -> Path | None:
    for p in (start, *start.parents):
        if (p / "pyproject.toml").is_file() or (p / ".git").exists():
            return p
    return None


def shipped_data_files(name: str) -> list[Path]:
    """Candidate paths of a file shipped in ``shared/data/`` beside (or inside) the repo.

    Roots: the current directory, the repository holding the current directory, and the
    repository holding this package (none when installed in site-packages). For each
    root ``r``: ``r/../shared/data/<name>`` and ``r/shared/data/<name>``.
    """
    roots: list[Path] = []
    try:
        cwd = Path.cwd()
    except OSError:
        cwd = None
    if cwd is not None:
        roots.append(cwd)
        r = _repo_root(cwd)
        if r is not None:
            roots.append(r)
    r = _repo_root(_PKG_DIR)
    if r is not None and "site-packages" not in r.parts:
        roots.append(r)
    out: list[Path] = []
    for root in roots:
        for cand in (root.parent / "shared" / "data" / name, root / "shared" / "data" / name):
            if cand not in out:
                out.append(cand)
    return out


def _site_dirs() -> list[Path]:
    dirs: list[str] = []
    for key in ("purelib", "platlib"):
        with_path = sysconfig.get_paths().get(key)
        if with_path:
            dirs.append(with_path)
    with contextlib.suppress(AttributeError):  # old virtualenvs lack these
        dirs += site.getsitepackages()
    with contextlib.suppress(AttributeError):
        dirs.append(site.getusersitepackages())
    dirs += [p for p in sys.path if p]
    out: list[Path] = []
    for d in dirs:
        p = Path(d)
        if p not in out:
            out.append(p)
    return out


def find_package_data(package: str, relpath: str) -> tuple[Path | None, list[str]]:
    """Locate ``<package>/<relpath>`` of an installed package *without importing it*.

    Uses ``importlib.util.find_spec`` (which does not import a top-level package), then
    scans site-packages and ``sys.path``. Returns the path (or ``None``) and a list of the
    places looked at, for error messages.
    """
    searched: list[str] = []
    locations: list[Path] = []
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        locations += [Path(p) for p in spec.submodule_search_locations]
    locations += [d / package for d in _site_dirs()]
    seen: list[Path] = []
    for loc in locations:
        if loc in seen:
            continue
        seen.append(loc)
        cand = loc / relpath
        searched.append(str(cand))
        if cand.is_file():
            return cand, searched
    return None, searched
