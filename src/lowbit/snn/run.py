"""``lowbit snn convert``: a float run's spiking twin, quantized by a recipe, trained through time,
measured (accuracy, spike rates, energy); what the CLI calls, equally usable from Python::

    from lowbit.snn.run import snn_run
    res = snn_run("runs/fp", "runs/snn-t5", timesteps=5, recipe="snn-w6", epochs=1)

Validation: ``val`` training images are held out (seed ``seed``); they pick the best epoch and
report the converted twin's accuracy; the test set is evaluated once, at the end. The run
directory gets the Trainer's files (``config.json``, ``metrics.jsonl``, checkpoints: ``--resume``
continues a killed run), ``snn.safetensors`` (the final twin) and ``snn.json`` (the numbers).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..experiment import load_run
from ..nn import quantize, quantized_layers
from ..recipe import RecipeError, load_recipe
from ..train import TrainConfig, Trainer, atomic_write_text, evaluate, save_checkpoint
from .convert import convert
from .energy import ENERGY_MODELS, spike_energy


def snn_run(
    run: str | Path,
    out: str | Path,
    *,
    timesteps: int = 5,
    recipe: str | None = "snn-w6",
    epochs: int = 1,
    lr: float | None = None,
    percentile: float = 99.9,
    threshold_scale: float = 1.0,
    calib: int = 512,
    val: int = 5000,
    train_subset: int | None = None,
    energy_images: int = 2000,
    energy_model: str = "fp32_45nm",
    seed: int = 0,
    resume: bool = False,
    progress: Any = None,
) -> dict[str, Any]:
    """Convert the float run ``run`` (see the module docstring); returns what ``snn.json`` holds."""
    if energy_model not in ENERGY_MODELS:
        raise ValueError(f"unknown energy model {energy_model!r}; allowed: {', '.join(ENERGY_MODELS)}")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0 (0: convert only), got {epochs}")
    t0 = time.perf_counter()
    cnn, data, _ = load_run(run)
    if quantized_layers(cnn):
        raise ValueError(f"{run} is a quantized run; convert a float run and quantize the twin (--recipe)")
    n = data.train.num_samples
    if not 0 <= val < n:
        raise ValueError(f"--val must be in [0, {n - 1}] (training images to hold out), got {val}")
    held, rest = data.train.split(val, seed=seed) if val else (None, data.train)
    plain = {"shuffle": False, "augment": None}
    calib_loader = rest.subset(min(calib, rest.num_samples), seed, batch_size=calib, **plain)
    snn = convert(cnn.eval(), timesteps, calib_loader, percentile=percentile, threshold_scale=threshold_scale)
    rec = load_recipe(recipe) if recipe else None
    if rec is not None:
        quantize(snn, rec)
    held_eval = held.replace(**plain) if held is not None else None
    result: dict[str, Any] = {"run": str(run), "timesteps": timesteps,
                              "recipe": rec.to_dict() if rec else None, "percentile": percentile,
                              "threshold_scale": threshold_scale, "seed": seed}
    if held_eval is not None:
        result["converted_val_acc"] = evaluate(snn, held_eval)["acc"]
    out = Path(out)
    if epochs:
        train = rest.subset(train_subset, seed) if train_subset else rest
        merged = {**(rec.train if rec else {}), "epochs": epochs, "seed": seed, "tensorboard": False}
        if lr is not None:
            merged["lr"] = lr
        try:
            cfg = TrainConfig.model_validate(merged)
        except Exception as e:  # pydantic names the field and value
            raise RecipeError(f"training options: {e}") from None
        trainer = Trainer(snn, train, held_eval, cfg, out, progress=progress,
                          run_config={"snn": {k: v for k, v in result.items() if k != "recipe"},
                                      "recipe": result["recipe"], "train": cfg.model_dump(mode="json")})
        history = trainer.fit(resume=resume)
        result["history"] = history
        if held_eval is not None:
            result["val_acc"] = evaluate(snn, held_eval)["acc"]
    result["test_acc"] = evaluate(snn, data.test)["acc"]
    batches, seen = [], 0
    for x, _ in data.test:
        if seen >= energy_images:
            break
        batches.append(x[: energy_images - seen])
        seen += batches[-1].shape[0]
    result["energy"] = spike_energy(snn, batches, ENERGY_MODELS[energy_model])
    result["thresholds"] = {k: m.threshold.item() for k, m in snn.lif_layers().items()}
    result["leaks"] = {k: m.leak.item() for k, m in snn.lif_layers().items()}
    result["wall_time_s"] = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "snn.safetensors", snn, epoch=epochs, extra={"timesteps": timesteps})
    atomic_write_text(out / "snn.json", json.dumps(result, indent=1, default=float) + "\n")
    return result
