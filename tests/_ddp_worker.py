"""Workers of the DistributedDataParallel tests (gloo on the CPU), started with
``torch.multiprocessing``: one rank each, file rendezvous, results as safetensors files.

The model: a small MLP (no BatchNorm, whose per-rank statistics would differ from one
process's) with binary weights and 4-bit LSQ activations, whose steps are initialised from
the first training batch; trained with BCGD around SGD with momentum. (Adam is left out of the
equality test on purpose: its per-element normalisation turns the 1e-8 rounding differences of
gradients that are zero up to rounding into steps of size lr, so 1-process and 2-process Adam
runs agree to about 1e-3 relative after an epoch, not 1e-5.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from lowbit.data import BatchLoader
from lowbit.nn import quantize
from lowbit.train import TrainConfig, Trainer
from lowbit.train import distributed as D
from lowbit.train.bcgd import BCGD
from lowbit.train.methods import build_methods

RECIPE = {
    "default": {"weight": {"method": "binary", "bits": 1}, "activation": {"method": "lsq", "bits": 4}},
    "rules": [{"match": "@first", "weight": None, "activation": None}],
}


def data(n: int = 256, dim: int = 12, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    means = torch.randn(classes, dim, generator=g) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    return means[y] + torch.randn(n, dim, generator=g), y


def model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    return quantize(m, RECIPE)


class _StopAfter:
    """Ends fit after `epochs` epochs (a run killed right after a checkpoint)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        if epoch + 1 >= self.epochs:
            trainer.stop_training = True


class _DieOnRank:
    """Kills rank `rank` in the middle of the first epoch (a crashed process)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, Any]) -> None:
        if step == 3 and dist.get_rank() == self.rank:
            os._exit(17)


def train(world: int, rank: int, batch: int, epochs: int, run_dir: str | None, out: str,
          resume: bool = False, stop_after: int | None = None, die_rank: int | None = None,
          optimizer: str = "sgd", bcgd: bool = True, methods: tuple[str, ...] = ()) -> None:
    """``methods``: some of BinaryRelax (a callback), SinReQ (a regularizer) and KD (a loss with a
    float teacher), used instead of BCGD."""
    torch.set_num_threads(1)
    x, y = data()
    loader = BatchLoader(x, y, batch_size=batch * world, shuffle=True, seed=3)
    cfg = TrainConfig(epochs=epochs, optimizer=optimizer, lr=1e-2, schedule="cosine", seed=0,
                      tensorboard=False, log_every=3)
    callbacks: list[Any] = []
    if stop_after is not None:
        callbacks.append(_StopAfter(stop_after))
    if die_rank is not None:
        callbacks.append(_DieOnRank(die_rank))
    net = model()
    wrap = BCGD.wrapper(rho=1e-3) if bcgd and not methods else None
    extra: dict[str, Any] = {}
    if methods:
        torch.manual_seed(1)
        teacher = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
        specs = {"binary_relax": {"eta0": 1.0, "growth": 1.1, "per_epoch": 2},
                 "sinreq": {"weight": 1e-3, "bits": 2, "grid": "max"},
                 "kd": {"teacher": teacher, "alpha": 0.5, "temperature": 2.0}}
        hooks = build_methods([{"name": n, **specs[n]} for n in methods], net)
        callbacks += hooks.callbacks
        extra = {"regularizers": hooks.regularizers, "loss_fn": hooks.loss_fn}
    trainer = Trainer(net, loader, None, cfg, run_dir, wrap_optimizer=wrap, callbacks=callbacks, **extra)
    trainer.fit(resume=resume)
    state = {k: v.detach().clone().contiguous() for k, v in trainer.model.state_dict().items()
             if isinstance(v, torch.Tensor)}
    save_file(state, f"{out}.rank{rank}.safetensors")
    Path(f"{out}.rank{rank}.json").write_text(str(trainer.history[-1]["train_loss"]))


def worker(rank: int, world: int, rdzv: str, jobs: list[dict[str, Any]]) -> None:
    """``torch.multiprocessing.spawn`` entry: join the group, run the training jobs one after
    the other (each a fresh model and Trainer; starting processes is the slow part), leave."""
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        for kwargs in jobs:
            train(world, rank, **kwargs)
    except BaseException:
        dist.destroy_process_group()
        raise
    D.exit_process(0)  # leaves the group; the interpreter's teardown could abort on gloo's threads
