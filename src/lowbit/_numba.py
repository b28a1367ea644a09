"""The one numba set-up of lowbit: on/off switch, on-disk cache and thread policy.

Two families of numba loops use it (imports go one way: ``quant`` and ``runtime`` both import
this module, neither imports the other):

- ``lowbit.quant.fused``: the training fast path of the activation (and DoReFa weight)
  quantizers. Every loop there has a torch formula in its quantizer module that computes the
  same thing, so numba is optional for it.
- ``lowbit.runtime.kernels_*``: the packed inference kernels. They are the runtime; there is
  no torch path, so the switch below does not apply to them.

Switch: ``LOWBIT_NUMBA=0`` (or :func:`set_enabled` with False, for this process) turns the
optional numba loops off: the quantizers take their torch formulas and numba is not even
imported for training. The old name ``LOWBIT_FUSED`` is an alias (either set to 0 switches off).

Cache: compiled loops are cached on disk. numba writes its cache next to the source
(``__pycache__``) when that is writable and otherwise in a user-wide directory;
``NUMBA_CACHE_DIR`` overrides both. When none is writable (a read-only install with a read-only
home) caching is off instead of failing. ``LOWBIT_NUMBA_CACHE=0`` switches it off explicitly,
for every loop of the package. numba invalidates a cached loop only when the file that defines it
changes, but lowbit's loops inline code from other files (``runtime/_jit.py``'s epilogues,
``runtime/_amx.py``'s tile intrinsics, kernels calling kernels of other modules): after an
upgrade or an edit of those, a stale cached loop would run the old code. So every loop of the
package is stamped with its own file *and* a hash of every file it may inline (:data:`STAMP_FILES`):
a change to any of them recompiles all of them.

Thread policy (which loops may open numba ``parallel=True`` regions, and why):

- **Training loops (``quant/fused.py``) may.** They run between PyTorch ops of a training step
  on large tensors (2M floats per ResNet-20 layer input at batch 128); PyTorch's own OpenMP pool
  is idle while they run. A tensor of at least ``fused.PARALLEL_MIN_NUMEL`` elements runs the
  ``prange`` variant on ``torch.get_num_threads()`` numba threads; smaller tensors, and any
  process whose numba threading layer is ``workqueue`` (it aborts when two Python threads enter
  parallel regions at once), run the serial variant.
- **Runtime kernels (``runtime/kernels_*.py``) may not.** They are serial loops over a range
  that release the GIL (``nogil``); ``runtime.kernels_threads.parallel_for`` splits large work
  over the runtime's own Python worker threads. An OpenMP region's idle threads spin: next to
  PyTorch's pool (inference interleaves torch ops and kernels at sub-millisecond steps) two
  spinning pools steal each other's cores (on a 2-core machine a 0.1 ms batch-1 model took
  ~10 ms), and the server calls kernels from several threads at once.

- **Small calls run on one thread.** A packed model called on one sample of at most
  ``runtime.compiler.SERIAL_MAX_NUMEL`` input values (a transformer at batch 1, a conv net on one
  image) sets PyTorch's intra-op threads to 1 and ``runtime.kernels_threads.set_serial`` for the
  call: its steps are too small to pay for a fork/join, and on a busy machine a second thread costs
  more than it brings (measured: BERT-256 at batch 1 was 23x slower with 2 PyTorch threads).

:func:`jit` enforces the policy: ``parallel=True`` is refused outside :data:`PARALLEL_MODULES`.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: modules whose loops may use numba parallel regions (see the thread policy above)
PARALLEL_MODULES = frozenset({"lowbit.quant.fused"})

_OFF = ("0", "false", "no", "off")


def _env_off(*names: str) -> bool:
    return any(os.environ.get(n, "1").strip().lower() in _OFF for n in names)


# ---- the switch ---------------------------------------------------------------------------------
#: ``LOWBIT_NUMBA`` (alias ``LOWBIT_FUSED``) as the process started: False when either is 0
ENV_ENABLED = not _env_off("LOWBIT_NUMBA", "LOWBIT_FUSED")
_ENABLED = True


def enabled() -> bool:
    """Whether the optional numba loops (the training fast path) may run: ``LOWBIT_NUMBA`` (alias
    ``LOWBIT_FUSED``) was not 0 at start and :func:`set_enabled` did not switch them off."""
    return _ENABLED and ENV_ENABLED


def set_enabled(flag: bool) -> None:
    """Switch the optional numba loops on or off for this process (tests, benchmarks)."""
    global _ENABLED
    _ENABLED = bool(flag)


# ---- the cache ----------------------------------------------------------------------------------
def _writable(d: Path) -> bool:
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d):
            pass
        return True
    except OSError:
        return False


@functools.cache
def _cache_ok(source_dir: str) -> bool:
    if os.environ.get("NUMBA_CACHE_DIR"):
        return _writable(Path(os.environ["NUMBA_CACHE_DIR"]))
    if _writable(Path(source_dir) / "__pycache__"):
        return True
    try:  # numba's user-wide fallback locator
        from numba.misc.appdirs import AppDirs

        user = Path(AppDirs(appname="numba", appauthor=False).user_cache_dir)
    except Exception:  # pragma: no cover - numba internals moved
        return False
    ok = _writable(user)
    if not ok:
        log.info("lowbit: numba on-disk cache disabled (no writable cache directory for %s)", source_dir)
    return ok


def cache_enabled(source_file: str | os.PathLike[str] | None = None) -> bool:
    """Whether loops defined in ``source_file`` (default: this package) are cached on disk."""
    if _env_off("LOWBIT_NUMBA_CACHE"):
        return False
    src = Path(source_file) if source_file is not None else Path(__file__)
    return _cache_ok(str(src.resolve().parent))


#: the package files (relative to it) whose code numba loops may inline: a change to any of them
#: invalidates every cached loop of the package
STAMP_FILES = ("_numba.py", "quant/fused.py", "runtime/*.py")
_PKG = Path(__file__).resolve().parent


def package_stamp(files: list[Path] | None = None) -> str:
    """SHA-256 over the names and contents of ``files`` (default: :data:`STAMP_FILES`)."""
    import hashlib

    if files is None:
        files = sorted({f for pat in STAMP_FILES for f in _PKG.glob(pat)})
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


@functools.cache
def _stamp() -> str:
    return package_stamp()


@functools.cache
def _install_locators() -> bool:
    """Put locators in front of numba's that add :func:`package_stamp` to the source stamp of the
    package's own loops (everything else keeps numba's locators). False where numba's cache
    internals are not what this expects: those loops are then compiled without a disk cache."""
    try:
        from numba.core import caching
    except Exception:  # pragma: no cover - numba internals moved
        return False

    class _PackageStamp:
        @classmethod
        def from_function(cls, py_func: Any, py_file: str) -> Any:
            if not Path(py_file).resolve().is_relative_to(_PKG):
                return None
            return super().from_function(py_func, py_file)  # type: ignore[misc]

        def get_source_stamp(self) -> Any:
            return (super().get_source_stamp(), _stamp())  # type: ignore[misc]

    bases = [getattr(caching, n, None) for n in
             ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")]
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    if impl is None or not isinstance(getattr(impl, "_locator_classes", None), list) or None in bases:
        log.info("lowbit: numba cache internals differ from the expected; caching off")
        return False
    ours = [type(f"Lowbit{b.__name__}", (_PackageStamp, b), {}) for b in bases]
    impl._locator_classes[:0] = ours
    return True


def stamped_cache(dispatcher: Any) -> bool:
    """Whether a compiled loop's disk cache carries the package stamp (tests)."""
    c = getattr(dispatcher, "_cache", None)
    loc = getattr(getattr(c, "_impl", None), "locator", None)
    return loc is not None and type(loc).__name__.startswith("Lowbit")


# ---- compiling ----------------------------------------------------------------------------------
def jit(
    fn: Callable[..., Any] | None = None,
    *,
    parallel: bool = False,
    fastmath: Any = False,
    error_model: str = "python",
) -> Any:
    """``numba.njit`` with lowbit's flags: GIL released, no bounds checks, cached on disk where
    possible, ``fastmath`` off unless asked (exact float order). ``parallel=True`` is allowed only
    in :data:`PARALLEL_MODULES`. Usable as ``@jit`` or ``jit(fn, parallel=True)``."""
    if fn is None:
        return functools.partial(jit, parallel=parallel, fastmath=fastmath, error_model=error_model)
    if parallel and fn.__module__ not in PARALLEL_MODULES:
        raise ValueError(
            f"{fn.__module__}.{fn.__name__}: numba parallel regions are allowed only in "
            f"{sorted(PARALLEL_MODULES)} (lowbit._numba's thread policy); split the work with "
            "runtime.kernels_threads.parallel_for instead"
        )
    import numba

    opts = {"parallel": parallel, "fastmath": fastmath, "nogil": True, "boundscheck": False,
            "error_model": error_model}
    cache = cache_enabled(fn.__code__.co_filename) and _install_locators()
    try:
        return numba.njit(cache=cache, **opts)(fn)
    except Exception:  # a cache directory that went away meanwhile: compile in memory
        if not cache:
            raise
        return numba.njit(cache=False, **opts)(fn)


def import_numba() -> Any | None:
    """numba for the optional loops: None when the environment switched them off
    (:data:`ENV_ENABLED`) or numba is not importable."""
    if not ENV_ENABLED:
        return None
    try:
        import numba
    except Exception as e:  # numba missing or broken: the torch formulas stay in use
        log.info("lowbit: numba unavailable (%s); using torch ops", e)
        return None
    return numba
