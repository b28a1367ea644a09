"""Training configuration, optimizer and learning-rate schedule.

`TrainConfig` is a strict pydantic model: an unknown key, a value of the wrong kind or a
choice that does not exist fails with a message naming the field, the bad value and what
is allowed. `build_optimizer` and `build_scheduler` turn it into torch objects.

The schedule is computed per optimizer step from a closed form (`lr_factor`), so its whole
state is one integer and a resumed run gets exactly the learning rates the uninterrupted
run would have had.
"""

from __future__ import annotations

import difflib
import itertools
import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

__all__ = [
    "LRSchedule",
    "TrainConfig",
    "build_optimizer",
    "build_scheduler",
    "lr_factor",
    "param_groups",
]

_CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("sgd", "adam", "adamw"),
    "schedule": ("cosine", "step", "constant"),
    "precision": ("fp32", "bf16"),
}


class TrainConfig(BaseModel):
    """How to train: optimizer, schedule, regularisation, seeding, checkpointing.

    Epoch numbers (`milestones`, `warmup_epochs`) count epochs from 0: a milestone 30 means
    the learning rate drops when epoch index 30 (the 31st epoch) starts.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    epochs: int = Field(10, ge=1, description="number of training epochs")
    batch_size: int = Field(128, ge=1, description="informational: the loaders batch")
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0, description="base learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    no_decay_1d: bool = Field(
        True, description="no weight decay on 0-D/1-D parameters (biases, BN, quantizer scales)"
    )
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: list[int] = Field(default_factory=list, description="epochs where step decays")
    gamma: float = Field(0.1, gt=0, description="step schedule decay factor")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up length in epochs")
    seed: int = 0
    deterministic: bool = False
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0, description="max global gradient L2 norm")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    log_every: int = Field(
        50, ge=1, description="steps between reads of the running loss (one device sync each)"
    )
    tensorboard: bool = Field(True, description="write TensorBoard events when installed")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: autocast the forward (quantizer math and scales stay fp32)"
    )
    channels_last: bool = Field(False, description="channels_last memory format for conv nets")
    compile: bool = Field(False, description="torch.compile the model's forward")
    sync_bn: bool = Field(False, description="SyncBatchNorm across processes (DDP)")

    @model_validator(mode="before")
    @classmethod
    def _unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            allowed = list(cls.model_fields)
            for key in data:
                if key not in cls.model_fields:
                    close = difflib.get_close_matches(str(key), allowed, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(
                        f"unknown train config field {key!r}{hint}; allowed fields: "
                        + ", ".join(allowed)
                    )
        return data

    @field_validator("optimizer", "schedule", "precision", mode="before")
    @classmethod
    def _choice(cls, value: Any, info: Any) -> Any:
        allowed = _CHOICES[info.field_name]
        if isinstance(value, str):
            value = value.lower()
        if value not in allowed:
            raise ValueError(
                f"{info.field_name}={value!r} is not supported; allowed values: "
                + ", ".join(repr(a) for a in allowed)
            )
        return value

    @field_validator("milestones")
    @classmethod
    def _milestones(cls, value: list[int]) -> list[int]:
        if any(m <= 0 for m in value) or any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError(
                f"milestones={value!r} must be positive epoch numbers in increasing order"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.schedule == "step" and not self.milestones:
            raise ValueError(
                "schedule='step' needs milestones (epochs where the lr is multiplied by gamma), "
                "e.g. milestones: [30, 60]; or use schedule 'cosine' or 'constant'"
            )
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs} must be smaller than epochs={self.epochs}"
            )
        return self


# --------------------------------------------------------------------------- optimizer


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group and, with `no_decay_1d`, a group
    without weight decay holding every 0-D and 1-D parameter (biases, normalisation
    affine parameters, quantizer scales/clip values such as PACT alpha or LSQ steps).

    Parametrized weights are seen through `named_parameters()`, i.e. as their latent
    `…parametrizations.weight.original` tensor, which keeps its N-D shape and is decayed.

    A module with a `param_lr` attribute (a quantizer's own learning rate for its learned state,
    e.g. PACT's `alpha_lr`) has its own parameters in a group at that rate, without weight decay
    (one group per rate, named `param_lr/<rate>`).
    """
    own: dict[float, list[nn.Parameter]] = {}
    for m in model.modules():
        lr = getattr(m, "param_lr", None)
        if lr is not None:
            own.setdefault(float(lr), []).extend(p for p in m.parameters(recurse=False) if p.requires_grad)
    taken = {id(p) for ps in own.values() for p in ps}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in taken:
            continue
        (no_decay if cfg.no_decay_1d and p.ndim <= 1 else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    # after the model's groups: the first group's rate is the one logged as the run's lr
    groups += [{"params": ps, "weight_decay": 0.0, "lr": lr, "name": f"param_lr/{lr:g}"}
               for lr, ps in own.items() if ps]
    if not groups:
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by `cfg.optimizer` over `param_groups(model, cfg)`."""
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


# --------------------------------------------------------------------------- schedule


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based), in closed form.

    warm-up: (step+1)/W for step < W = round(warmup_epochs * steps_per_epoch);
    cosine:  0.5 * (1 + cos(pi * (step - W) / (T - W))), T = epochs * steps_per_epoch;
    step:    gamma ** #{m in milestones : step >= m * steps_per_epoch};
    constant: 1.
    """
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.gamma ** sum(step >= m * steps_per_epoch for m in cfg.milestones)
    total = cfg.epochs * steps_per_epoch
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class LRSchedule:
    """Per-step learning-rate schedule: lr_i = base_lr_i * lr_factor(step).

    Has the torch scheduler surface the trainer uses (`step`, `get_last_lr`, `state_dict`,
    `load_state_dict`); its state is JSON (a step count and the base lrs), and restoring
    it re-applies the closed form, so resumed runs see bit-identical learning rates.
    Works with any object exposing torch-style `param_groups`, wrapped optimizers included.
    """

    def __init__(self, optimizer: Any, cfg: TrainConfig, steps_per_epoch: int) -> None:
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.optimizer = optimizer
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def factor(self, step: int | None = None) -> float:
        return lr_factor(self.last_step if step is None else step, self.cfg, self.steps_per_epoch)

    def _apply(self) -> None:
        f = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * f

    def step(self) -> None:
        """Advance by one optimizer step."""
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self.last_step,
            "base_lrs": list(self.base_lrs),
            "steps_per_epoch": self.steps_per_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("steps_per_epoch", self.steps_per_epoch) != self.steps_per_epoch:
            raise ValueError(
                f"the checkpoint's schedule has {state['steps_per_epoch']} steps per epoch, "
                f"this run has {self.steps_per_epoch}: batch size or data set changed"
            )
        self.last_step = int(state["last_step"])
        self.base_lrs = [float(b) for b in state["base_lrs"]]
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["initial_lr"] = base
        self._apply()


def build_scheduler(optimizer: Any, cfg: TrainConfig, steps_per_epoch: int) -> LRSchedule:
    """The per-step schedule of `cfg` (cosine/step/constant, optional linear warm-up)."""
    return LRSchedule(optimizer, cfg, steps_per_epoch)


def _as_config(config: TrainConfig | dict[str, Any] | Iterable[Any]) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return config
    return TrainConfig.model_validate(dict(config))  # type: ignore[arg-type]
