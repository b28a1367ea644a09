"""The quick-start job: a float LeNet-5 on MNIST, then a binary-weight / 4-bit-activation
fine-tune started from it, and a table of accuracy, bits and real packed size."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .experiment import RunSpec, train_run
from .recipe import load_recipe

FP_TRAIN = {"optimizer": "adam", "lr": 2e-3, "schedule": "cosine", "weight_decay": 0.0, "seed": 0}


def _bits(spec: dict[str, Any] | None) -> str:
    return "32" if spec is None else f"{spec['bits']} {spec['method']}"


def run_demo(
    out: str | Path,
    fp_epochs: int = 10,
    q_epochs: int = 10,
    recipe: str = "lenet5-w1a4",
    progress_factory: Callable[[], Any] | None = None,
    say: Callable[[str], Any] = lambda s: None,
) -> list[dict[str, Any]]:
    """Train both runs under ``out`` (resuming any that was interrupted); returns table rows."""
    out = Path(out)
    prog = progress_factory or (lambda: None)
    say("[bold]1/2[/] full-precision LeNet-5 on MNIST")
    fp = train_run(
        RunSpec(model="lenet5", dataset="mnist", train={**FP_TRAIN, "epochs": fp_epochs},
                out=str(out / "fp")),
        resume=True, progress=prog(),
    )
    r = load_recipe(recipe)
    say(f"[bold]2/2[/] {r.name or recipe}: {r.description}")
    q = train_run(
        RunSpec(model="lenet5", dataset="mnist", recipe=recipe, train={"epochs": q_epochs},
                init=str(out / "fp" / "best.safetensors"), out=str(out / "quantized")),
        resume=True, progress=prog(),
    )
    fp_bytes = 4 * sum(p.numel() for p in fp.model.parameters())  # type: ignore[union-attr]
    rd = r.to_dict()["default"]
    return [
        {"name": "float", "weight_bits": "32", "act_bits": "32", "test_acc": fp.test_acc,
         "bytes": fp_bytes, "compression": 1.0},
        {"name": r.name or str(recipe), "weight_bits": _bits(rd["weight"]),
         "act_bits": _bits(rd["activation"]), "test_acc": q.test_acc,
         "bytes": q.size["file_bytes"], "compression": fp_bytes / q.size["file_bytes"]},
    ]
