"""The training loop: any `nn.Module`, any (x, y) loaders, resumable and deterministic.

Run directory layout (when `run_dir` is given)::

    config.json              the resolved run configuration (written at fit start)
    metrics.jsonl            one JSON line per epoch
    checkpoint.safetensors   the last checkpoint (every `checkpoint_every` epochs + last)
    best.safetensors         the checkpoint of the best accuracy on the per-epoch evaluation
                             split so far (``eval_split``: "val", a split of the training set,
                             under the evidence protocol; the test set is then read once, after
                             training, by the caller); the last epoch's without an evaluation
    tb/                      TensorBoard events (when tensorboard is installed)

Devices and scale: the model and batches go to `device` (default: where the model is);
``precision="bf16"`` autocasts the forward while every quantizer computes in fp32;
``channels_last`` and ``compile`` speed up conv nets on GPUs. Under ``torchrun`` (WORLD_SIZE
> 1) the model is wrapped in DistributedDataParallel, each rank trains on its part of every
global batch, and rank 0 writes the run directory (see :mod:`lowbit.train.distributed`).

A killed run restarted with ``fit(resume=True)`` continues from the checkpoint and, with
``deterministic=True`` on CPU, ends bit-identical to the uninterrupted run: the model,
optimizer, schedule, callback states and RNG states (torch CPU/CUDA, numpy, python) are
restored, and loaders with ``set_epoch(epoch)`` make each epoch's data order depend only
on (seed, epoch).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

try:
    import fcntl
except ImportError:  # not on Windows: runs there are not locked
    fcntl = None

from . import distributed as D
from .callbacks import CallbackList
from .checkpoint import (
    CheckpointError,
    atomic_path,
    atomic_write_text,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    temp_pattern,
)
from .config import TrainConfig, _as_config, build_optimizer, build_scheduler

__all__ = ["RunDirInUse", "Trainer", "TrainingDiverged", "get_rng_state", "seed_everything", "set_rng_state"]

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
BEST = "best.safetensors"
METRICS = "metrics.jsonl"
CONFIG = "config.json"

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class TrainingDiverged(RuntimeError):  # noqa: N818 (name fixed by the API)
    """The loss became NaN or infinite; the last good checkpoint was left untouched. The model in
    memory has taken optimizer steps since (the loss is checked every ``log_every`` steps) and is
    not usable."""


class RunDirInUse(OSError):  # noqa: N818 (reads as the condition it reports)
    """Another process is training into the same run directory."""


@contextlib.contextmanager
def _run_dir_lock(run_dir: Path | None) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir/.lock`` while a run trains into it: a second process
    started on the same directory (a campaign restarted while its workers still ran, ``--resume``
    beside a running copy) would otherwise write its checkpoints in turn with the first's. The lock
    goes with the process (a killed run leaves none). No lock where ``fcntl`` does not exist."""
    if run_dir is None or fcntl is None:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirInUse(f"{run_dir} is being trained by another process; wait for it or stop it, "
                              "or choose another run directory") from None
        yield


# --------------------------------------------------------------------------- RNG


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """All global RNG states, as tensors and JSON values (for a checkpoint)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("checkpoint has %d CUDA RNG states, this machine %d devices: not restored",
                        len(cuda), torch.cuda.device_count())


# --------------------------------------------------------------------------- helpers


def _name_of(fn: Any, taken: set[str]) -> str:
    name = getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__
    name = "reg" if name == "<lambda>" else str(name)
    base, i = name, 1
    while name in taken:
        i += 1
        name = f"{base}{i}"
    taken.add(name)
    return name


def _hook(obj: Any, name: str) -> Callable[..., Any]:
    fn = getattr(obj, name, None) if obj is not None else None
    return fn if callable(fn) else (lambda *a, **k: None)


def _count_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    pred = logits.detach().argmax(1)
    if y.dtype.is_floating_point and y.shape == logits.shape:  # soft / one-hot targets
        y = y.argmax(1)
    return (pred == y).sum()


def evaluate(model: nn.Module, loader: Iterable[Any], device: torch.device | None = None) -> dict[str, float]:
    """Cross-entropy loss and top-1 accuracy of `model(x)` over `loader` (``{"loss", "acc", "n"}``),
    in eval mode under `torch.no_grad` (not `inference_mode`: tensors a quantizer creates lazily
    in its first forward must stay usable for training); the model's mode is restored. The loss
    is plain cross-entropy whatever a run trained with, so methods compare fairly."""
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    try:
        with torch.no_grad():
            for x, y in loader:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                logits = model(x)
                target = y.argmax(1) if y.dtype.is_floating_point and y.ndim > 1 else y
                loss_sum += F.cross_entropy(logits.float(), target, reduction="sum")
                correct += _count_correct(logits, y)
                n += y.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        return {"loss": math.nan, "acc": math.nan, "n": 0}
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n, "n": n}


class _NoTensorBoard:
    def add_scalar(self, *a: Any, **k: Any) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def _tensorboard(log_dir: Path, purge_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard missing or broken: metrics.jsonl is enough
        log.debug("tensorboard not available; writing metrics.jsonl only")
        return _NoTensorBoard()
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


# --------------------------------------------------------------------------- trainer


class Trainer:
    """Train `model` on `train_loader`, evaluate on `test_loader`, checkpoint to `run_dir`.

    Args:
        model: any `nn.Module` (quantized models are ordinary modules). Batches are moved
            to the device of its first parameter.
        train_loader, test_loader: iterables of (x, y) batches with `__len__`; an optional
            `set_epoch(epoch)` is called before each training epoch. `test_loader` is the
            loader evaluated after every epoch (see `eval_split`); it may be None (no
            evaluation, no best checkpoint). Under DDP the train loader must have
            ``shard(rank, world)`` (lowbit.data loaders do) and its batch size is the global one.
        config: a `TrainConfig` or a dict for one.
        run_dir: where config.json, metrics.jsonl, checkpoints and TensorBoard events go;
            None writes nothing (and `fit(resume=True)` is impossible).
        loss_fn: `loss_fn(model, x, y) -> (loss, logits)`; default cross-entropy with
            `config.label_smoothing`. Distillation methods pass their own.
        regularizers: callables `model -> scalar tensor`, added to the loss and logged as
            ``reg/<name>`` (name: the callable's `name` attribute, else its function/class
            name). A regularizer that is an `nn.Module` with trainable parameters (WaveQ's
            bit-widths) gets them optimized as an extra param group without weight decay, at its
            `param_lr` attribute's learning rate when that is set (unless `optimizer` is given);
            pass it as a callback too to checkpoint them.
        callbacks: see `lowbit.train.callbacks`.
        optimizer: a ready optimizer; overrides `build_optimizer`.
        wrap_optimizer: `wrap_optimizer(opt, model) -> opt` wraps the optimizer (BCGD). The
            lr schedule drives the param_groups of the unwrapped optimizer; the wrapper's
            `state_dict()` is what the checkpoint saves.
        run_config: the resolved run configuration written to config.json and stored in
            checkpoints (JSON values); default {"train": config}.
        progress: optional event sink, see `lowbit.progress` (the library never prints).
        device: move the model there (``auto``, ``cpu``, ``cuda``, ``cuda:N``); default:
            the device of the model's first parameter.
        eval_split: what `test_loader` holds, named in metrics.jsonl (``<split>_loss``,
            ``<split>_acc``): "val" for a validation split of the training data (the
            protocol: it chooses best.safetensors), "test" (the default) otherwise.

    Attributes readable by callbacks: `epoch` (0-based index of the running epoch, or of
    the next one between epochs), `global_step` (optimizer steps done), `steps_per_epoch`,
    `history`, `best_acc`, `optimizer`, `scheduler`, `config`, `stop_training`.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable[Any],
        test_loader: Iterable[Any] | None,
        config: TrainConfig | dict[str, Any],
        run_dir: str | os.PathLike[str] | None = None,
        *,
        loss_fn: LossFn | None = None,
        regularizers: Sequence[Callable[[nn.Module], torch.Tensor]] = (),
        callbacks: Sequence[Any] = (),
        optimizer: Any = None,
        wrap_optimizer: Callable[[Any, nn.Module], Any] | None = None,
        run_config: dict[str, Any] | None = None,
        progress: Any = None,
        device: str | torch.device | None = None,
        eval_split: str = "test",
    ) -> None:
        self.config: TrainConfig = _as_config(config)
        self.model = model
        self.train_loader = train_loader
        self.test_loader = test_loader
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.loss_fn: LossFn = loss_fn or self._cross_entropy
        taken: set[str] = set()
        self.regularizers = [(_name_of(r, taken), r) for r in regularizers]
        self.callbacks = CallbackList(callbacks)
        self.steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
        if self.steps_per_epoch < 1:
            raise ValueError("train_loader is empty (len 0)")
        param = next(model.parameters(), None)
        if device is not None:
            self.device = D.resolve_device(device)
            model.to(self.device)
        else:
            self.device = param.device if param is not None else torch.device("cpu")
        for obj in (*regularizers, *callbacks, loss_fn):  # learned method state (WaveQ bits, ...)
            if isinstance(obj, nn.Module):
                obj.to(self.device)
        cfg = self.config
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.world = D.world_size()
        if self.world > 1:
            if cfg.sync_bn:
                if self.device.type == "cpu":
                    raise ValueError("sync_bn: torch's SyncBatchNorm runs on GPUs only; drop --sync-bn "
                                     "for CPU processes (each rank then normalises with its own batch)")
                self.model = model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            D.shard_loader(train_loader)
        elif cfg.sync_bn:
            log.info("sync_bn has no effect in a single process")
        if cfg.precision == "bf16":
            _quantizers_in_fp32(model)
        self.eval_split = eval_split
        self._fwd: nn.Module | None = None  # the module the training forward calls (DDP, compiled)

        base = optimizer if optimizer is not None else build_optimizer(model, self.config)
        if optimizer is None:  # learned regularizer state (WaveQ's bits) trains beside the model
            for name, reg in self.regularizers:
                extra = [p for p in reg.parameters() if p.requires_grad] if isinstance(reg, nn.Module) else []
                if extra:
                    group = {"params": extra, "weight_decay": 0.0, "name": f"regularizer/{name}"}
                    if getattr(reg, "param_lr", None) is not None:
                        group["lr"] = reg.param_lr
                    base.add_param_group(group)
        self.scheduler = build_scheduler(base, self.config, self.steps_per_epoch)
        self.optimizer = wrap_optimizer(base, model) if wrap_optimizer else base
        self._clip_params = [p for p in model.parameters() if p.requires_grad]

        self.run_config = dict(run_config) if run_config is not None else {}
        self.run_config.setdefault("train", self.config.model_dump(mode="json"))
        self.run_config = json.loads(json.dumps(self.run_config, default=str))
        self.progress = progress
        self._p_start = _hook(progress, "start")
        self._p_start_epoch = _hook(progress, "start_epoch")
        self._p_advance = _hook(progress, "advance")
        self._p_summary = _hook(progress, "epoch_summary")
        self._p_close = _hook(progress, "close")

        self.epoch = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.best_acc = -math.inf
        self.best_epoch = 0
        self.stop_training = False
        self._tb: Any = _NoTensorBoard()

    # ------------------------------------------------------------------ public API

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def fit(self, resume: bool = False) -> list[dict[str, Any]]:
        """Train until `config.epochs`; returns the per-epoch history (metrics dicts).

        `resume=True` continues from run_dir/checkpoint.safetensors when it exists (and
        starts from scratch, with a log message, when it does not). Raises
        `TrainingDiverged` on a non-finite loss.
        """
        cfg = self.config
        self.stop_training = False
        if resume:
            if self.run_dir is None:
                raise ValueError("fit(resume=True) needs a run_dir")
            self._resume()
        if self.epoch == 0:  # a fresh start (also: resume=True but no checkpoint yet)
            seed_everything(cfg.seed)
        with _run_dir_lock(self.run_dir if D.is_main() else None), self._determinism():
            self._prepare_run_dir()
            try:
                self._p_start(cfg.epochs, self.steps_per_epoch, self.epoch)
                self.callbacks("on_fit_start", self)
                while self.epoch < cfg.epochs and not self.stop_training:
                    self._run_epoch(self.epoch)
                self.callbacks("on_fit_end", self)
            finally:
                self._p_close()
                self._tb.close()
                self._tb = _NoTensorBoard()
        return self.history

    def evaluate(self, loader: Iterable[Any] | None = None) -> dict[str, float]:
        """:func:`evaluate` of the model over `loader` (default: the test loader)."""
        loader = self.test_loader if loader is None else loader
        if loader is None:
            raise ValueError("no loader to evaluate on")
        return evaluate(self.model, loader, self.device)

    # ------------------------------------------------------------------ epoch

    def _setup_forward(self) -> None:
        """The training forward: DDP (after data-dependent quantizer initialisation on the
        global first batch, as one process would see it in its first step: after on_fit_start and
        on_epoch_start), then torch.compile when asked. Done once per Trainer."""
        if self._fwd is not None:
            return
        fwd = self.model
        fresh = self.global_step == 0 and hasattr(self.train_loader, "global_batch")
        if fresh and (self.world > 1 or self.config.compile):
            # LSQ steps etc. from the global first batch, eagerly: identical on every rank, and
            # the compiled graph never sees the data-dependent initialisation branch
            x, _ = self.train_loader.global_batch(0)  # type: ignore[attr-defined]
            D.init_from_batch(self.model, self._input(x))
        if self.world > 1:
            fwd = D.ddp_wrap(self.model, self.device)
        if self.config.compile:
            fwd = torch.compile(fwd)
        self._fwd = fwd

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.config.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _autocast(self) -> Any:
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _cross_entropy(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=self.config.label_smoothing), logits

    def _run_epoch(self, epoch: int) -> None:
        cfg = self.config
        model, optimizer, scheduler = self.model, self.optimizer, self.scheduler
        loss_fn, regs, device = self.loss_fn, self.regularizers, self.device
        world = self.world
        # under DDP a last, smaller global batch splits unevenly: weight each rank's mean
        # loss by its share so the averaged gradient is the global batch's mean gradient
        n_total = getattr(self.train_loader, "num_samples", None)
        global_bs = getattr(self.train_loader, "batch_size", None)
        step_hooks = self.callbacks.hooks["on_step_end"]
        clip = cfg.grad_clip
        log_every = cfg.log_every

        model.train()  # before on_epoch_start, which may freeze parts (e.g. BN statistics)
        set_epoch = getattr(self.train_loader, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        self.callbacks("on_epoch_start", self, epoch)
        self._setup_forward()  # after the callbacks set the model up, right before its first batch
        fwd = self._fwd
        self._p_start_epoch(epoch, self.steps_per_epoch)
        lr_start = self.lr

        # Per-step values stay on the device; they are read every `log_every` steps.
        losses: list[torch.Tensor] = []
        totals: list[torch.Tensor] = []
        corrects: list[torch.Tensor] = []
        sizes: list[int] = []
        reg_vals: list[torch.Tensor] = []
        acc = {"loss": 0.0, "correct": 0, "n": 0, "steps": 0, "reg": [0.0] * len(regs)}

        t0 = time.perf_counter()
        for b, (x, y) in enumerate(self.train_loader):
            x = self._input(x)
            y = y.to(device, non_blocking=True)
            with self._autocast():
                loss, logits = loss_fn(fwd, x, y)
            total = loss
            if regs:
                rv = [r(model) for _, r in regs]
                total = loss + sum(rv)
            optimizer.zero_grad(set_to_none=True)
            if world > 1 and n_total is not None and global_bs is not None:
                g = min(global_bs, n_total - b * global_bs)
                if g != y.shape[0] * world:
                    (total * (y.shape[0] * world / g)).backward()
                else:
                    total.backward()
            else:
                total.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(self._clip_params, clip)
            optimizer.step()
            scheduler.step()
            self.global_step += 1

            losses.append(loss.detach())
            corrects.append(_count_correct(logits, y))
            sizes.append(y.shape[0])
            if regs:
                totals.append(total.detach())
                reg_vals.append(torch.stack([v.detach().float().reshape(()) for v in rv]))
            if step_hooks:
                step_metrics: dict[str, Any] = {"loss": losses[-1], "batch_size": sizes[-1],
                                                "epoch": epoch}
                if regs:
                    for (name, _), v in zip(regs, rv, strict=True):
                        step_metrics[f"reg/{name}"] = v.detach()
                for fn in step_hooks:
                    fn(self, self.global_step, step_metrics)
            if len(losses) >= log_every:
                self._flush(epoch, acc, losses, totals, corrects, sizes, reg_vals)
        if losses:
            self._flush(epoch, acc, losses, totals, corrects, sizes, reg_vals)
        train_time = time.perf_counter() - t0

        metrics = {
            "epoch": epoch + 1,
            "step": self.global_step,
            "lr": lr_start,
            "train_loss": acc["loss"] / max(1, acc["n"]),
            "train_acc": acc["correct"] / max(1, acc["n"]),
        }
        for i, (name, _) in enumerate(regs):
            metrics[f"reg/{name}"] = acc["reg"][i] / max(1, acc["steps"])
        split = self.eval_split
        if self.test_loader is not None:
            D.broadcast_buffers(self.model)  # every rank evaluates rank 0's exact model
            ev = self.evaluate()
            metrics[f"{split}_loss"], metrics[f"{split}_acc"] = ev["loss"], ev["acc"]
        metrics["epoch_time_s"] = time.perf_counter() - t0
        metrics["images_per_s"] = acc["n"] / train_time if train_time > 0 else 0.0

        self.callbacks("on_epoch_end", self, epoch, metrics)
        self.epoch = epoch + 1
        self.history.append(metrics)
        self._p_summary(metrics)
        self._log_epoch(metrics)
        last = self.epoch >= cfg.epochs or self.stop_training
        if metrics.get(f"{split}_acc") is None:
            improved = last  # nothing evaluated per epoch: best.safetensors is the final model
        else:
            improved = metrics[f"{split}_acc"] > self.best_acc
            if improved:
                self.best_acc = metrics[f"{split}_acc"]
                self.best_epoch = self.epoch
        if self.run_dir is not None and D.is_main():
            if self.epoch % cfg.checkpoint_every == 0 or last:
                self._save(self.run_dir / CHECKPOINT)
                if improved:
                    _link_or_copy(self.run_dir / CHECKPOINT, self.run_dir / BEST)
            elif improved:
                self._save(self.run_dir / BEST)
        D.barrier()  # no rank runs ahead of the files rank 0 writes

    def _flush(self, epoch: int, acc: dict[str, Any], losses: list[torch.Tensor],
               totals: list[torch.Tensor], corrects: list[torch.Tensor], sizes: list[int],
               reg_vals: list[torch.Tensor]) -> None:
        """Read the buffered per-step values (one device sync), check them, update the
        epoch sums and the progress display; empties the buffers."""
        loss_t = torch.stack(losses).double()
        total_t = torch.stack(totals).double() if totals else loss_t
        size_t = torch.tensor(sizes, dtype=torch.float64, device=loss_t.device)
        correct_t = torch.stack(corrects).double().sum().reshape(1)
        reg_t = torch.stack(reg_vals).double().sum(0) if reg_vals else loss_t.new_zeros(0)
        if self.world > 1:  # every rank sees (and checks) the global batch means: one all_reduce
            buf = torch.cat([loss_t * size_t, total_t * size_t, size_t, correct_t, reg_t])
            torch.distributed.all_reduce(buf)
            k = len(sizes)
            size_t = buf[2 * k:3 * k]
            loss_t, total_t = buf[:k] / size_t, buf[k:2 * k] / size_t
            correct_t, reg_t = buf[3 * k:3 * k + 1], buf[3 * k + 1:] / self.world
        vals = loss_t.tolist()
        checked = total_t.tolist()
        sizes_g = size_t.tolist()
        first = self.global_step - len(vals) + 1
        for i, v in enumerate(checked):
            if not math.isfinite(v):
                self._diverged(epoch, first + i, v, vals[i])
        acc["loss"] += sum(v * n for v, n in zip(vals, sizes_g, strict=True))
        acc["correct"] += int(correct_t.sum().item())
        acc["n"] += int(sum(sizes_g))
        acc["steps"] += len(vals)
        if reg_vals:
            sums = reg_t.tolist()
            acc["reg"] = [a + s for a, s in zip(acc["reg"], sums, strict=True)]
        n = len(vals)
        losses.clear(), totals.clear(), corrects.clear(), sizes.clear(), reg_vals.clear()
        running_loss, running_acc = acc["loss"] / acc["n"], acc["correct"] / acc["n"]
        self._p_advance(n, running_loss, running_acc)
        self._tb.add_scalar("train/running_loss", running_loss, self.global_step)

    def _diverged(self, epoch: int, step: int, total: float, loss: float) -> None:
        in_epoch = step - epoch * self.steps_per_epoch
        what = f"loss {loss}" if total == loss or not math.isfinite(loss) else (
            f"total loss {total} (data loss {loss}: a regularizer is not finite)")
        # The losses are read every log_every steps (no device sync per step), so the optimizer
        # has already stepped on the non-finite loss: the weights may hold NaN by now.
        if self.run_dir is not None and (self.run_dir / CHECKPOINT).exists():
            ckpt = (f" The last good checkpoint {self.run_dir / CHECKPOINT} was left untouched and holds "
                    "the last checkpointed epoch, a good one: load it instead.")
        else:
            ckpt = " No checkpoint of this run holds a good state: rebuild the model."
        raise TrainingDiverged(
            f"training diverged at epoch {epoch + 1}, step {in_epoch}/{self.steps_per_epoch} "
            f"(global step {step}): {what}. Lower the learning rate (lr={self.config.lr}), "
            f"add warm-up or grad_clip, or check the recipe and loss function. The model in memory "
            f"took {self.global_step - step + 1} optimizer step(s) from that loss on and is not usable "
            f"(its weights or quantizer state may hold NaN/Inf): do not save or evaluate it.{ckpt}"
        )

    # ------------------------------------------------------------------ run dir

    @contextlib.contextmanager
    def _determinism(self):
        if not self.config.deterministic:
            yield
            return
        prev = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[2:]

    def _prepare_run_dir(self) -> None:
        if self.run_dir is None or not D.is_main():
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in (CHECKPOINT, BEST, METRICS, CONFIG):  # temp files of killed writes
            for stale in self.run_dir.glob(temp_pattern(name)):
                with contextlib.suppress(OSError):
                    stale.unlink()
        atomic_write_text(self.run_dir / CONFIG, json.dumps(self.run_config, indent=2) + "\n")
        # metrics.jsonl is rewritten from the (checkpointed) history, so lines of epochs
        # that ran after the last checkpoint of a killed run do not appear twice.
        atomic_write_text(self.run_dir / METRICS,
                          "".join(json.dumps(m) + "\n" for m in self.history))
        if self.config.tensorboard:
            self._tb = _tensorboard(self.run_dir / "tb", purge_step=self.global_step)

    def _log_epoch(self, metrics: dict[str, Any]) -> None:
        if self.run_dir is None or not D.is_main():
            return
        with open(self.run_dir / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for key, value in metrics.items():
            if key not in ("epoch", "step") and isinstance(value, int | float):
                tag = key if "/" in key else key.replace("_", "/", 1)
                self._tb.add_scalar(tag, value, self.global_step)
        self._tb.flush()

    def _save(self, path: Path) -> None:
        extra = {
            "global_step": self.global_step,
            "history": self.history,
            "best_acc": self.best_acc if math.isfinite(self.best_acc) else None,
            "best_epoch": self.best_epoch,
            "eval_split": self.eval_split,
            "callbacks": self.callbacks.state_dict(),
            "config": self.config.model_dump(mode="json"),
            "run_config": self.run_config,
            "rng": get_rng_state(),  # = the RNG state the next epoch starts from
        }
        save_checkpoint(path, self.model, self.optimizer, self.scheduler, self.epoch, extra)

    def _resume(self) -> None:
        assert self.run_dir is not None
        path = self.run_dir / CHECKPOINT
        if not path.exists():
            log.info("no checkpoint in %s: starting from scratch", self.run_dir)
            return
        ckpt = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        extra = ckpt["extra"]
        saved_cfg = extra.get("config") or {}
        now = self.config.model_dump(mode="json")
        changed = {k: (saved_cfg[k], now[k]) for k in now if k in saved_cfg and saved_cfg[k] != now[k]}
        if changed:
            log.warning("resuming with a changed train config (saved -> now): %s", changed)
        self.epoch = ckpt["epoch"]
        self.global_step = int(extra["global_step"])
        self.history = list(extra["history"])
        self.best_acc = extra["best_acc"] if extra.get("best_acc") is not None else -math.inf
        self.best_epoch = int(extra.get("best_epoch") or 0)
        self.callbacks.load_state_dict(extra.get("callbacks") or {})
        set_rng_state(extra["rng"])
        self._repair_best()
        log.info("resumed from %s at epoch %d (step %d)", path, self.epoch, self.global_step)

    def _repair_best(self) -> None:
        """A run killed after its checkpoint was written and before best.safetensors followed it
        leaves an older best beside a checkpoint that names its own epoch the best: link it again."""
        assert self.run_dir is not None
        best, ckpt = self.run_dir / BEST, self.run_dir / CHECKPOINT
        if not D.is_main() or self.best_epoch != self.epoch:
            return
        if best.exists():
            try:
                if int(read_checkpoint(best)[0]["epoch"]) == self.best_epoch:
                    return
            except CheckpointError:  # a damaged best is replaced too
                pass
        log.warning("%s did not hold epoch %d, the best one: taken from the checkpoint", best, self.epoch)
        _link_or_copy(ckpt, best)


def _to_fp32(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _quantizers_in_fp32(model: nn.Module) -> None:
    """Under bf16 autocast, feed every quantizer fp32 inputs: levels, steps and clip values
    are computed in fp32 (the convolutions and matmuls around them run in bf16)."""
    from ..quant.base import Quantizer

    for m in model.modules():
        if isinstance(m, Quantizer) and not getattr(m, "_lowbit_fp32_hook", False):
            m.register_forward_pre_hook(_to_fp32)
            m._lowbit_fp32_hook = True


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make `dst` an atomic copy of the just-written `src` (a hard link when possible:
    `src` is later replaced by rename, so `dst` keeps this version)."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            import shutil

            shutil.copyfile(src, tmp)
