"""Several processes, one model: DistributedDataParallel under ``torchrun``.

``torchrun --nproc-per-node N -m lowbit train ...`` starts N processes with the usual
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...); several machines
join through torchrun's own rendezvous (``--nnodes``, ``--rdzv-endpoint``). This module
reads that environment, opens the process group (NCCL on CUDA, gloo on the CPU) and holds
the small collective helpers the Trainer needs. The Trainer does the rest:

- each rank serves its contiguous part of every global batch (``Loader.shard``), so N
  processes with batch B/N take the same steps as one process with batch B;
- data-dependent quantizer state (LSQ steps, clip values set from the first batch) is
  initialised from the *global* first batch on every rank (:func:`init_from_batch`), then
  DDP broadcasts rank 0's state;
- gradients are averaged by DDP; epoch metrics are summed over ranks; rank 0 writes
  every file, atomically, and the others wait at a barrier.

A rank that dies makes its peers' next collective fail (gloo/NCCL), and torchrun stops the
job and names the failed rank; the process group's ``timeout`` bounds any wait.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistributedError",
    "all_sum",
    "barrier",
    "broadcast_buffers",
    "ddp_wrap",
    "env_world_size",
    "exit_process",
    "init_distributed",
    "init_from_batch",
    "is_main",
    "launch",
    "rank",
    "resolve_device",
    "shard_loader",
    "without_nproc",
    "world_size",
]

log = logging.getLogger(__name__)


class DistributedError(RuntimeError):
    """A distributed run could not start or lost a process."""


def env_world_size() -> int:
    """``WORLD_SIZE`` of the environment torchrun sets (1 when not under torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that writes files and logs."""
    return rank() == 0


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``: CUDA when available (under torchrun: ``cuda:LOCAL_RANK``), else the CPU.
    ``cuda`` under torchrun also means this process's local GPU. A device that is not there
    is an error naming what is."""
    name = "auto" if device is None else str(device)
    local = int(os.environ.get("LOCAL_RANK", "0")) if env_world_size() > 1 else 0
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local}"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if dev.index is not None and dev.index >= n:
            found = f"{n} CUDA device(s)" if n else "no CUDA device (torch.cuda.is_available() is False)"
            raise ValueError(f"--device {name}: this machine has {found}; use --device cpu or auto")
        torch.cuda.set_device(dev)
    elif dev.type not in ("cpu", "meta", "mps", "xpu"):
        raise ValueError(f"--device {device!r}: unsupported device type {dev.type!r}")
    return dev


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> bool:
    """Open the process group when run under torchrun with WORLD_SIZE > 1 (NCCL for CUDA,
    gloo otherwise); returns whether this is a distributed run. Idempotent."""
    if env_world_size() <= 1:
        return False
    if not dist.is_available():
        raise DistributedError("torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as e:  # rendezvous failures carry torch's own message
            raise DistributedError(f"could not join the process group ({backend}): {e}") from e
        log.info("rank %d of %d (%s, %s)", dist.get_rank(), dist.get_world_size(), backend, device)
    return dist.get_world_size() > 1


def exit_process(code: int) -> NoReturn:
    """End this process with ``code``. A rank of a distributed run leaves its process group,
    flushes its output and exits without the interpreter's teardown: gloo's worker threads free
    a finished collective's tensors after the caller has moved on, freeing a tensor Python has
    seen takes the GIL, and a thread that asks for the GIL while the interpreter shuts down
    aborts the whole process (SIGABRT, "terminate called without an active exception"), turning
    a finished run into a failed one: 4 of 67 runs of the two-rank DDP test on a 2-core machine
    ended so with a normal exit, none of 50 with this one. Any other process exits normally."""
    if not (dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    try:
        dist.destroy_process_group()
    except Exception as e:  # the run's status stands; say why the group was not left cleanly
        log.warning("leaving the process group failed: %s", e)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):  # a closed or broken stream has nothing to lose
            stream.flush()
    os._exit(code)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64; the identity in one process)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics, quantizer state) to every rank."""
    if world_size() == 1:
        return
    for b in model.buffers():
        dist.broadcast(b.data, src=0)


@contextmanager
def _state_kept(model: nn.Module, keep: set[str]) -> Iterator[None]:
    """Restore every state entry of ``model`` not named in ``keep``, and the RNG state."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    rng = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(rng)
        with torch.no_grad():
            current = model.state_dict()
            for k, v in saved.items():
                if k not in keep and k in current and current[k].shape == v.shape:
                    current[k].copy_(v)


def init_from_batch(model: nn.Module, x: torch.Tensor) -> None:
    """Run one training-mode forward on ``x`` so that quantizers initialised from the data
    they first see (LSQ activation steps, clip values) take their values from ``x``; all
    other state (BatchNorm statistics, the RNG) is put back. Every rank calls this with the
    same global batch, so every rank initialises identically (and as one process would,
    whose first batch is that global batch)."""
    from ..quant.base import Quantizer

    keep = {f"{name}.{k}" if name else k
            for name, m in model.named_modules() if isinstance(m, Quantizer)
            for k in m.state_dict()}
    was_training = model.training
    model.train()
    with _state_kept(model, keep), torch.no_grad():
        model(x)
    model.train(was_training)


def launch(nproc: int, argv: list[str]) -> int:
    """Re-run ``lowbit`` with ``argv`` as ``nproc`` processes on this machine through
    torchrun (``lowbit train --nproc N`` is this); returns the exit status. A failed rank
    ends the job: torchrun stops the others and its summary names the rank."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        ["--nproc-per-node", str(nproc), "--standalone", "--module", "lowbit", *argv])
    try:
        run(args)
    except ChildFailedError as e:
        failures = ", ".join(f"rank {r} (exit code {f.exitcode})" for r, f in sorted(e.failures.items()))
        raise DistributedError(f"the distributed run failed: {failures}; the first failure's "
                               f"traceback is above. Fix it and rerun with --resume.") from None
    return 0


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less its ``--nproc N`` / ``--nproc=N`` (what each launched process runs)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def ddp_wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` (rank 0's parameters and buffers are broadcast)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # buffers (BatchNorm statistics) follow rank 0 at every forward; the keyword was renamed
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    sync = {"forward_sync_buffers": True} if "forward_sync_buffers" in params else {"broadcast_buffers": True}
    return DistributedDataParallel(model, device_ids=ids, **sync)


def shard_loader(loader: Any) -> Any:
    """Shard ``loader`` for this rank (see ``Loader.shard``); an error for loaders that
    cannot be sharded."""
    if world_size() == 1:
        return loader
    shard = getattr(loader, "shard", None)
    if not callable(shard):
        raise DistributedError(f"{type(loader).__name__} cannot be sharded across processes: "
                               "use a lowbit.data loader (it has shard(rank, world))")
    return shard(rank(), world_size())
