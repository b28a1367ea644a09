"""Trainer callbacks.

A callback is any object with some of these methods (all optional; subclassing
`Callback` is a convenience, not a requirement):

- ``on_fit_start(trainer)``
- ``on_epoch_start(trainer, epoch)``          epoch: 0-based index
- ``on_step_end(trainer, step, metrics)``     step: optimizer steps done so far in the run
  (1-based, counts across epochs); metrics: {"loss": detached 0-d tensor, "batch_size": int,
  "epoch": int, "reg/<name>": tensors}. Reading a tensor (`.item()`) syncs the device:
  do it only when needed.
- ``on_epoch_end(trainer, epoch, metrics)``   metrics: the epoch's dict (metrics.jsonl line;
  its "epoch" entry counts from 1); entries a callback adds (JSON values) are logged too.
  Runs before the checkpoint is written, so state changed here is saved.
- ``on_fit_end(trainer)``

State that must survive a resume (a blending factor, a counter, a schedule position) is
returned by ``state_dict()`` (JSON values and tensors) and restored by
``load_state_dict(state)``; the checkpoint stores it. Set ``trainer.stop_training = True``
to end `fit` after the current epoch (e.g. a search trial that is clearly lost).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["HOOKS", "Callback", "CallbackList"]

log = logging.getLogger(__name__)

HOOKS = ("on_fit_start", "on_epoch_start", "on_step_end", "on_epoch_end", "on_fit_end")


class Callback:
    """Base class with no-op hooks and no state."""

    def on_fit_start(self, trainer: Any) -> None: ...
    def on_epoch_start(self, trainer: Any, epoch: int) -> None: ...
    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None: ...
    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None: ...
    def on_fit_end(self, trainer: Any) -> None: ...


def _overrides(cb: Any, name: str) -> bool:
    fn = getattr(cb, name, None)
    if fn is None:
        return False
    base = getattr(Callback, name)
    return getattr(fn, "__func__", fn) is not base


class CallbackList:
    """Dispatches hooks to the callbacks that implement them (so the step loop does no
    work for callbacks without `on_step_end`) and gathers their states."""

    def __init__(self, callbacks: Iterable[Any]) -> None:
        self.callbacks = list(callbacks)
        self.hooks: dict[str, list[Callable[..., Any]]] = {
            name: [getattr(cb, name) for cb in self.callbacks if _overrides(cb, name)]
            for name in HOOKS
        }
        self.keys = [f"{i}:{type(cb).__name__}" for i, cb in enumerate(self.callbacks)]

    def __call__(self, hook: str, *args: Any) -> None:
        for fn in self.hooks[hook]:
            fn(*args)

    def state_dict(self) -> dict[str, Any]:
        return {
            key: cb.state_dict()
            for key, cb in zip(self.keys, self.callbacks, strict=True)
            if callable(getattr(cb, "state_dict", None))
        }

    def load_state_dict(self, states: dict[str, Any]) -> None:
        for key, cb in zip(self.keys, self.callbacks, strict=True):
            if not callable(getattr(cb, "load_state_dict", None)):
                continue
            if key in states:
                cb.load_state_dict(states[key])
            else:
                log.warning("checkpoint has no state for callback %s; it starts fresh", key)
        extra = set(states) - set(self.keys)
        if extra:
            log.warning("checkpoint has states for callbacks this run lacks: %s", sorted(extra))
