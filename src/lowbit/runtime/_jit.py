"""numba set-up for the runtime kernels: on-disk caching that survives a read-only install, and
an x86 ``popcnt`` intrinsic.

Caching: numba writes its cache next to the source (``__pycache__``) when that is writable and
otherwise in a user-wide directory; ``NUMBA_CACHE_DIR`` overrides both. When none of them is
writable (a read-only install with a read-only home) caching is switched off instead of failing.
``LOWBIT_NUMBA_CACHE=0`` switches it off explicitly.

Popcount: ``llvm.ctpop.i64`` emitted directly (``builder.ctpop``). On a CPU with AVX-512
VPOPCNTDQ, LLVM vectorises popcount reductions to ``vpopcntq`` (8 words per instruction);
elsewhere it uses the scalar ``popcnt`` instruction or a bit trick.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from numba import njit, types
from numba.extending import intrinsic

log = logging.getLogger(__name__)


def _writable(d: Path) -> bool:
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d):
            pass
        return True
    except OSError:
        return False


def _cache_enabled() -> bool:
    if os.environ.get("LOWBIT_NUMBA_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if os.environ.get("NUMBA_CACHE_DIR"):
        return _writable(Path(os.environ["NUMBA_CACHE_DIR"]))
    if _writable(Path(__file__).resolve().parent / "__pycache__"):
        return True
    # numba's user-wide fallback locator (numba.misc.appdirs user_cache_dir)
    try:
        from numba.misc.appdirs import AppDirs

        user = Path(AppDirs(appname="numba", appauthor=False).user_cache_dir)
    except Exception:  # pragma: no cover - numba internals moved
        return False
    return _writable(user)


CACHE = _cache_enabled()
if not CACHE:
    log.info("lowbit.runtime: numba on-disk cache disabled (no writable cache directory)")


def kernel(fn=None, *, parallel: bool = False):
    """``njit`` with the runtime's flags: no fastmath (exact float order), no bounds checks."""

    def wrap(f):
        return njit(parallel=parallel, fastmath=False, boundscheck=False, cache=CACHE, nogil=True)(f)

    return wrap if fn is None else wrap(fn)


@intrinsic
def popcount64(typingctx, x):
    """Number of set bits of a uint64 (``llvm.ctpop.i64``)."""
    if not isinstance(x, types.Integer):
        return None
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen
