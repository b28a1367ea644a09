"""Training: the Trainer, its configuration, checkpoints and callbacks.

Method-specific pieces (BCGD/BinaryRelax optimizers, regularizers, distillation) live in
their own modules of this package and plug into `Trainer` through `wrap_optimizer`,
`regularizers`, `loss_fn` and `callbacks`.
"""

from .callbacks import Callback, CallbackList
from .checkpoint import (
    CheckpointError,
    atomic_path,
    atomic_write_text,
    load_checkpoint,
    load_weights,
    read_checkpoint,
    save_checkpoint,
)
from .config import LRSchedule, TrainConfig, build_optimizer, build_scheduler, lr_factor, param_groups
from .trainer import Trainer, TrainingDiverged, evaluate, get_rng_state, seed_everything, set_rng_state

__all__ = [
    "Callback",
    "CallbackList",
    "CheckpointError",
    "LRSchedule",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "atomic_path",
    "atomic_write_text",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "get_rng_state",
    "load_checkpoint",
    "load_weights",
    "lr_factor",
    "param_groups",
    "read_checkpoint",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
]
