"""Which engine runs each sub-net of a served supernet: the packed runtime or PyTorch.

A supernet loaded from a packed supernet file (:class:`lowbit.export.supernet_file.LoadedSupernet`,
what ``lowbit serve`` loads) holds every sub-net as its own model serving the file's stored codes:
``runtime="packed"`` compiles each once by :func:`lowbit.runtime.compile`, which packs the stored
codes (never re-quantizing a weight), and ``runtime="torch"`` runs each model as it is. A trainable
:class:`~lowbit.nn.supernet.Supernet` (a version-1 file) is served as before: each sub-net is
extracted (:meth:`~lowbit.nn.supernet.Supernet.extract`) and compiled, or switched inside
``Supernet.run``.

``runtime="packed"`` (the default of ``lowbit serve``): at start every sub-net is compiled once
on a seeded example batch of the supernet's input shape; a batch then runs on that sub-net's own
packed model, so the bit width of the sub-net sets its latency. A sub-net that does not compile (a
float sub-net has no quantized layer to pack, for example) runs in PyTorch instead, with the
reason logged and reported. ``threads`` caps the packed kernels' threads (numba's count is per
thread, so it is set in each thread that runs a packed sub-net). ``runtime="torch"``: every
sub-net runs as its stored model (``LoadedSupernet.run``) or as ``Supernet.run`` (eval mode,
quantized weights cached).

Packed and stored sub-nets share no state, and a trainable supernet's sub-nets switch and run under
its lock, so a batch is never computed by a half-switched model. Outputs of a packed sub-net equal
``lowbit.runtime.compile(supernet.extract(name), x)(x)`` (same model, same kernels), which the
compiler keeps within its measured ``max_abs_diff`` of the fake-quantized sub-net. The equality is
per batch: a request batched with others can differ in the last bits from the same request run
alone where a layer stays in PyTorch (a float classifier: PyTorch's float kernels round differently
at other batch sizes); the packed layers give the same bits at every batch size.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
from torch import Tensor, nn

from ..export.supernet_file import LoadedSupernet
from ..nn.supernet import Supernet

__all__ = ["RUNTIMES", "SubnetEngines"]

log = logging.getLogger(__name__)

RUNTIMES = ("packed", "torch")


class SubnetEngines:
    """``run(x, name)`` on each sub-net's engine; ``runtime[name]`` is ``"packed"`` or ``"torch"``,
    ``reasons[name]`` why a sub-net runs in PyTorch under ``runtime="packed"``."""

    def __init__(self, supernet: Supernet | LoadedSupernet, runtime: str = "packed", example_batch: int = 2,
                 threads: int | None = None) -> None:
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime {runtime!r} is not known; allowed: {', '.join(RUNTIMES)}")
        self.supernet = supernet
        self.names = supernet.names
        self.input_shape = supernet.input_shape
        self.packed: dict[str, nn.Module] = {}
        self.reasons: dict[str, str] = {}
        self.max_abs_diff: dict[str, float] = {}
        self.threads = threads
        self._local = threading.local()
        torch_threads = torch.get_num_threads()
        if runtime == "packed":
            from ..runtime import compile as compile_packed  # numba is loaded only when packing

            g = torch.Generator().manual_seed(0)
            x = torch.randn((example_batch, *self.input_shape), generator=g)
            for name in self.names:
                try:
                    sub = supernet.models[name] if isinstance(supernet, LoadedSupernet) else \
                        supernet.extract(name)
                    pm = compile_packed(sub, x)
                except Exception as e:  # any failure: this sub-net runs in PyTorch, and says why
                    self.reasons[name] = f"{type(e).__name__}: {e}"
                    log.warning("sub-net %s runs in PyTorch: it does not compile (%s)", name,
                                self.reasons[name])
                    continue
                self.packed[name] = pm
                self.max_abs_diff[name] = float(pm.max_abs_diff)
                log.info("sub-net %s compiled (%s; max abs diff %.3g to the fake-quantized sub-net)",
                         name, pm.extra_repr(), pm.max_abs_diff)
        # the caller's PyTorch thread count must survive compiling (numba's OpenMP layer resets it when
        # it launches; runtime.kernels_threads restores it): else every PyTorch op of a sub-net runs on
        # oversubscribed threads (measured: 20-40 ms instead of 1-8 ms a call on a busy box)
        torch.set_num_threads(torch_threads)
        self.runtime = {n: "packed" if n in self.packed else "torch" for n in self.names}

    def run(self, x: Tensor, name: str) -> Tensor:
        pm = self.packed.get(name)
        if pm is None:
            return self.supernet.run(x, name)
        if self.threads and not getattr(self._local, "threads_set", False):
            import numba

            numba.set_num_threads(max(1, min(self.threads, numba.config.NUMBA_NUM_THREADS)))
            torch.set_num_threads(self.threads)  # the cap holds for the PyTorch ops of a sub-net too
            self._local.threads_set = True
        return pm(x)

    def describe(self) -> dict[str, Any]:
        """JSON for /health and /metrics: the engine of each sub-net, why PyTorch where it is, and
        PyTorch's intra-op thread count in the calling thread."""
        return {"runtime": dict(self.runtime), "runtime_reasons": dict(self.reasons),
                "torch_threads": torch.get_num_threads()}
