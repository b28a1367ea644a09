"""Training worker for the resume-after-SIGKILL test, and helpers shared by the train tests.

    python tests/_resume_worker.py RUN_DIR [--epochs N] [--resume] [--deterministic]
        [--out final.safetensors] [--marker FILE] [--slow-from-epoch E] [--delay S]

Trains a small dropout + batch-norm MLP (one layer weight-parametrized by a sign-STE) on
synthetic Gaussian data. With --marker, every step writes "<epoch index> <global step>"
to FILE; from epoch index --slow-from-epoch on each step sleeps --delay seconds, so the
test can SIGKILL the run in the middle of an epoch. --out receives the final weights.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

# ---------------------------------------------------------------- shared test helpers


class SyntheticLoader:
    """(x, y) batches of in-memory tensors; with set_epoch, epoch e's order depends only
    on (seed, e), like lowbit.data.BatchLoader."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *,
                 shuffle: bool = True, seed: int = 0) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.x) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        n = len(self.x)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        for i in range(0, n, self.batch_size):
            idx = order[i : i + self.batch_size]
            yield self.x[idx], self.y[idx]


def gaussian_data(n: int = 512, dim: int = 16, classes: int = 4, seed: int = 0,
                  spread: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs: class c ~ N(mu_c, spread^2 I), means ~ N(0, 1.5^2 I)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    x = means[y] + spread * torch.randn(n, dim, generator=g)
    return x, y


def loaders(batch_size: int = 32, n: int = 512, seed: int = 0):
    """Train loader (n samples, shuffled per epoch) and test loader (256 samples)."""
    x, y = gaussian_data(n + 256, seed=seed)
    return (SyntheticLoader(x[:n], y[:n], batch_size, seed=seed),
            SyntheticLoader(x[n:], y[n:], 128, shuffle=False))


class SignSTE(nn.Module):
    """Binary weights sign(w) * mean|w| with a straight-through (identity) gradient."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        q = torch.where(w >= 0, 1.0, -1.0) * w.abs().mean()
        return w + (q - w).detach()


class ClipAct(nn.Module):
    """PACT-like clipped ReLU with a learnable 0-D clip value."""

    def __init__(self, alpha: float = 4.0) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(alpha))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.relu(x), self.alpha)


def make_model(seed: int = 0, dim: int = 16, classes: int = 4, hidden: int = 64,
               dropout: float = 0.2, quantize: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), ClipAct(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, classes),
    )
    if quantize:
        parametrize.register_parametrization(model[4], "weight", SignSTE())
    return model


class StepCounter:
    """A callback with state: counts steps and sums the loss (reads it every step)."""

    def __init__(self) -> None:
        self.steps, self.loss_sum = 0, 0.0

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        self.steps += 1
        self.loss_sum += float(metrics["loss"])

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "loss_sum": self.loss_sum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.loss_sum = state["steps"], state["loss_sum"]


class Marker:
    """Writes "<epoch> <global step>" per step; sleeps from a given epoch on."""

    def __init__(self, path: str, slow_from: int, delay: float) -> None:
        self.path, self.slow_from, self.delay = path, slow_from, delay

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        with open(self.path, "w") as f:
            f.write(f"{metrics['epoch']} {step}\n")
        if metrics["epoch"] >= self.slow_from:
            time.sleep(self.delay)


# ---------------------------------------------------------------- worker


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--deterministic", action="store_true")
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--out")
    ap.add_argument("--marker")
    ap.add_argument("--slow-from-epoch", type=int, default=1)
    ap.add_argument("--delay", type=float, default=0.0)
    args = ap.parse_args(argv)

    from safetensors.torch import save_file

    from lowbit.train import TrainConfig, Trainer

    torch.set_num_threads(1)
    train, test = loaders()
    # a different init on resume: the checkpoint must overwrite every tensor
    model = make_model(seed=1 if args.resume else 0)
    cfg = TrainConfig(epochs=args.epochs, optimizer=args.optimizer, lr=3e-3, weight_decay=1e-2,
                      warmup_epochs=0.5, schedule="cosine", seed=7,
                      deterministic=args.deterministic, log_every=5, tensorboard=False)
    callbacks: list[Any] = [StepCounter()]
    if args.marker:
        callbacks.append(Marker(args.marker, args.slow_from_epoch, args.delay))
    trainer = Trainer(model, train, test, cfg, args.run_dir, callbacks=callbacks)
    trainer.fit(resume=args.resume)
    if args.out:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, args.out, metadata={"steps": str(callbacks[0].steps),
                                             "loss_sum": repr(callbacks[0].loss_sum)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
