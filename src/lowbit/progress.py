"""Progress display for the command line (rich).

The library never prints. A `Trainer` (and anything else that runs long) takes an
optional `progress` object and sends it events; every method is optional:

- ``start(total_epochs, steps_per_epoch, start_epoch)`` once per `fit`;
- ``start_epoch(epoch, total_steps)`` with a 0-based epoch index;
- ``advance(steps, loss, acc)``: `steps` more optimizer steps are done; `loss`/`acc` are
  the epoch's running means (sent every `log_every` steps, so they cost one sync each);
- ``epoch_summary(metrics)``: the epoch's metrics dict, as written to metrics.jsonl;
- ``close()`` when `fit` ends, normally or not.

`RichProgress` draws an epoch bar and a step bar (running loss/accuracy, it/s, ETA) and
prints one summary line per epoch. `ProgressSink` is the protocol, for type checkers.
"""

from __future__ import annotations

from typing import Any, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["ProgressSink", "RichProgress", "format_epoch_summary"]


class ProgressSink(Protocol):
    def start(self, total_epochs: int, steps_per_epoch: int, start_epoch: int = 0) -> None: ...
    def start_epoch(self, epoch: int, total_steps: int) -> None: ...
    def advance(self, steps: int, loss: float, acc: float) -> None: ...
    def epoch_summary(self, metrics: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class _RateColumn(ProgressColumn):
    """Iterations per second of a task."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("  -   it/s" if speed is None else f"{speed:6.1f} it/s", style="cyan")


def format_epoch_summary(m: dict[str, Any], total_epochs: int | None = None) -> str:
    """One line for an epoch's metrics dict (keys as in metrics.jsonl)."""
    of = f"/{total_epochs}" if total_epochs else ""
    parts = [f"epoch {m['epoch']}{of}",
             f"train loss {m['train_loss']:.4f} acc {m['train_acc']:.2%}"]
    for split in ("val", "test"):  # runs with a validation split report val_* per epoch
        if m.get(f"{split}_acc") is not None:  # (a callback may set the accuracy alone)
            loss = m.get(f"{split}_loss")
            parts.append(f"{split}{'' if loss is None else f' loss {loss:.4f}'} acc {m[f'{split}_acc']:.2%}")
    regs = [f"{k[4:]} {v:.4g}" for k, v in m.items() if k.startswith("reg/")]
    if regs:
        parts.append("reg " + " ".join(regs))
    parts.append(f"lr {m['lr']:.3g}")
    parts.append(f"{m['epoch_time_s']:.1f} s, {m['images_per_s']:,.0f} img/s")
    return " | ".join(parts)


class RichProgress:
    """Epoch bar + step bar with running loss/accuracy, it/s and ETA; a line per epoch.

    Use one per command; it can serve several consecutive `fit` calls.
    """

    def __init__(self, console: Console | None = None, *, transient: bool = True) -> None:
        self.console = console or Console(stderr=True)
        self.transient = transient
        self._bars: Progress | None = None
        self._epoch_task: Any = None
        self._step_task: Any = None
        self._total_epochs: int | None = None

    def start(self, total_epochs: int, steps_per_epoch: int, start_epoch: int = 0) -> None:
        self.close()
        self._total_epochs = total_epochs
        self._bars = Progress(
            TextColumn("[bold]{task.description:>12}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            _RateColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=self.transient,
        )
        self._bars.start()
        self._epoch_task = self._bars.add_task(
            "epochs", total=total_epochs, completed=start_epoch, info=""
        )
        self._step_task = self._bars.add_task("steps", total=steps_per_epoch, info="")

    def start_epoch(self, epoch: int, total_steps: int) -> None:
        if self._bars is not None:
            self._bars.reset(self._step_task, total=total_steps,
                             description=f"epoch {epoch + 1}", info="")

    def advance(self, steps: int, loss: float, acc: float) -> None:
        if self._bars is not None:
            self._bars.update(self._step_task, advance=steps,
                              info=f"loss {loss:.4f} acc {acc:6.2%}")

    def epoch_summary(self, metrics: dict[str, Any]) -> None:
        line = format_epoch_summary(metrics, self._total_epochs)
        if self._bars is not None:
            self._bars.console.print(line, highlight=False)
            self._bars.update(self._epoch_task, advance=1)
        else:
            self.console.print(line, highlight=False)

    def close(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
