"""One training run, end to end: data -> model -> (init) -> quantize -> train -> evaluate.

This is what ``lowbit train`` and ``lowbit eval`` call; it is equally usable from Python::

    from lowbit.experiment import RunSpec, train_run
    result = train_run(RunSpec(model="lenet5", dataset="mnist", recipe="lenet5-w1a4",
                               init="runs/fp/best.safetensors", out="runs/w1a4"))

A run directory holds ``config.json`` (the resolved configuration: model, data, recipe and
training settings after every flag was applied), ``metrics.jsonl``, ``checkpoint.safetensors``
(last epoch), ``best.safetensors``, ``result.json`` and, for quantized runs, the packed model
``model.lowbit``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .data import load_dataset
from .models import build_model
from .nn import quantize
from .recipe import Recipe, RecipeError, load_recipe
from .train import (
    TrainConfig,
    Trainer,
    atomic_write_text,
    load_checkpoint,
    load_weights,
    seed_everything,
)
from .train.methods import MethodHooks, build_methods

log = logging.getLogger(__name__)


@dataclass
class RunSpec:
    """Everything that defines a run. ``train`` overrides the recipe's ``train`` section."""

    model: str = "lenet5"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str = "mnist"
    data_dir: str | None = None
    recipe: str | dict[str, Any] | None = None  # path, shipped name, dict; None = float
    train: dict[str, Any] = field(default_factory=dict)
    init: str | None = None  # checkpoint whose model weights initialise the float model
    out: str | None = None
    batch_size: int = 128
    train_subset: int | None = None

    def resolved_recipe(self) -> Recipe | None:
        if self.recipe is None:
            return None
        if isinstance(self.recipe, Recipe):
            return self.recipe
        if isinstance(self.recipe, dict):
            return Recipe.from_dict(self.recipe)
        return load_recipe(self.recipe)


@dataclass
class RunResult:
    run_dir: str | None
    test_acc: float
    test_loss: float
    best_acc: float
    epochs: int
    wall_time_s: float
    history: list[dict[str, Any]]
    size: dict[str, Any] | None = None
    model: nn.Module | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("model")
        return d


def train_config(spec: RunSpec, recipe: Recipe | None) -> TrainConfig:
    """Defaults < recipe ``train`` section < ``spec.train`` (flags)."""
    merged: dict[str, Any] = {}
    if recipe is not None:
        merged.update(recipe.train)
    merged.update(spec.train)
    merged.setdefault("batch_size", spec.batch_size)
    try:
        return TrainConfig.model_validate(merged)
    except Exception as e:  # pydantic's message already names field and value
        raise RecipeError(f"training options: {e}") from None


def build_run_model(spec: RunSpec, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    kw = dict(spec.model_kwargs)
    kw.setdefault("num_classes", num_classes)
    if len(in_shape) == 3:
        if spec.model == "mlp":
            kw.setdefault("in_features", in_shape[0] * in_shape[1] * in_shape[2])
        else:
            kw.setdefault("in_channels", in_shape[0])
            if "input_size" in _model_params(spec.model):
                kw.setdefault("input_size", in_shape[1])
    elif len(in_shape) == 1 and spec.model == "mlp":
        kw.setdefault("in_features", in_shape[0])
    return build_model(spec.model, **kw)


def _model_params(name: str) -> set[str]:
    from .models import MODELS

    entry = MODELS.get(name)
    return set(entry.parameters()) if entry is not None else set()


def prepare(spec: RunSpec) -> tuple[nn.Module, Any, Recipe | None, TrainConfig]:
    """Data bundle, model (initialised and quantized), recipe and training config."""
    recipe = spec.resolved_recipe()
    cfg = train_config(spec, recipe)
    data = load_dataset(
        spec.dataset,
        data_dir=spec.data_dir,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        train_subset=spec.train_subset,
    )
    seed_everything(cfg.seed)  # the model's initial weights depend on the seed, not on the process
    model = build_run_model(spec, tuple(data.in_shape), data.num_classes)
    if spec.init:
        load_weights(model, spec.init)  # float weights go in before quantizers are attached
    if recipe is not None:
        quantize(model, recipe)
    return model, data, recipe, cfg


def train_run(spec: RunSpec, *, resume: bool = False, progress: Any = None) -> RunResult:
    """Train (or resume) one run and write its directory. Returns the final numbers."""
    t0 = time.perf_counter()
    model, data, recipe, cfg = prepare(spec)
    run_dir = Path(spec.out) if spec.out else None
    run_config = {
        "spec": {k: v for k, v in asdict(spec).items() if k != "recipe"},
        "recipe": recipe.to_dict() if recipe is not None else None,
        "recipe_source": spec.recipe if isinstance(spec.recipe, str) else None,
        "model_spec": getattr(model, "lowbit_spec", None),
        "dataset": {"name": data.name, "in_shape": list(data.in_shape),
                    "num_classes": data.num_classes},
        "train": cfg.model_dump(mode="json"),
    }
    hooks = MethodHooks()
    if recipe is not None and recipe.methods:
        try:
            hooks = build_methods(resolve_teachers(recipe.methods), model)
        except (TypeError, ValueError) as e:
            raise RecipeError(str(e)) from None
    trainer = Trainer(model, data.train, data.test, cfg, run_dir, run_config=run_config,
                      progress=progress, wrap_optimizer=hooks.wrap_optimizer, callbacks=hooks.callbacks,
                      regularizers=hooks.regularizers, loss_fn=hooks.loss_fn)
    history = trainer.fit(resume=resume)
    final = trainer.evaluate()
    size = None
    if recipe is not None and run_dir is not None:
        size = pack_run_model(model, run_dir / "model.lowbit", tuple(data.in_shape))
    result = RunResult(
        run_dir=str(run_dir) if run_dir else None,
        test_acc=final["acc"],
        test_loss=final["loss"],
        best_acc=max((h.get("test_acc", 0.0) for h in history), default=final["acc"]),
        epochs=cfg.epochs,
        wall_time_s=time.perf_counter() - t0,
        history=history,
        size=size,
        model=model,
    )
    if run_dir is not None:
        atomic_write_text(run_dir / "result.json", json.dumps(result.to_json(), indent=2))
    return result


def resolve_teachers(methods: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The recipe's methods with each ``teacher: PATH`` (a run directory or checkpoint) loaded."""
    out = []
    for m in methods:
        m = dict(m)
        if isinstance(m.get("teacher"), str | os.PathLike):
            path = Path(m["teacher"])
            if not path.exists():
                raise RecipeError(f"recipe field 'methods.{m.get('name')}.teacher': {str(path)!r} does "
                                  "not exist; give a run directory written by `lowbit train` or a "
                                  "checkpoint in one")
            m["teacher"], _, _ = load_run(path)
        out.append(m)
    return out


def pack_run_model(model: nn.Module, path: Path, in_shape: tuple[int, ...]) -> dict[str, Any]:
    """Write the packed model and return its real size numbers."""
    from .export import model_report, save_packed

    save_packed(model, path)
    rep = model_report(model, in_shape)
    out = rep.totals() if hasattr(rep, "totals") else {}
    out["file_bytes"] = path.stat().st_size
    out["fp32_bytes"] = 4 * sum(p.numel() for p in _float_params(model))
    out["compression_vs_fp32"] = out["fp32_bytes"] / out["file_bytes"]
    return out


def _float_params(model: nn.Module) -> list[Any]:
    """Parameters of the float model: latent weights stand for the quantized ones;
    quantizer parameters (PACT alpha ...) are not model parameters."""
    from .quant.base import Quantizer

    skip = {id(p) for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in skip]


def load_run(path: str | Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Rebuild a run's model from its directory (or a checkpoint inside it) and its data."""
    p = Path(path)
    run_dir = p if p.is_dir() else p.parent
    ckpt = p if p.is_file() else run_dir / "best.safetensors"
    if not ckpt.exists():
        ckpt = run_dir / "checkpoint.safetensors"
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(
            f"{run_dir} has no config.json: give a run directory written by `lowbit train`"
        )
    config = json.loads(cfg_path.read_text())
    spec = RunSpec(**{**config["spec"], "recipe": config.get("recipe"), "init": None})
    model, data, _, _ = prepare(spec)
    load_checkpoint(ckpt, model)
    return model, data, config


def releq_run(
    run: str | Path,
    out: str | Path,
    *,
    episodes: int = 300,
    actions: Sequence[int] = (2, 3, 4, 5, 6),
    proxy: int = 2048,
    val: int = 2000,
    weight: Mapping[str, Any] | None = None,
    seed: int = 0,
    progress: Any = None,
) -> dict[str, Any]:
    """ReLeQ search over the weight bits of a float run's layers (see :mod:`lowbit.search.releq`).

    The measurement fine-tunes one epoch on ``proxy`` training images and reads ``val`` other
    training images (never the test set). Writes ``out/releq.json`` (best assignment, history),
    ``out/releq_cache.json`` (measured accuracies: a rerun resumes) and ``out/recipe.yaml``: the
    best assignment as a recipe for ``lowbit train --recipe out/recipe.yaml --init RUN/...``.
    """
    import copy

    from .nn.quantize import quantizable_layers, quantized_layers
    from .search import FineTuneEvaluator, ReLeQ

    float_model, data, _ = load_run(run)
    if quantized_layers(float_model):
        raise ValueError(f"{run} is a quantized run; ReLeQ searches from a float run")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    held, rest = data.train.split(val, seed=seed)
    proxy_loader = rest.subset(proxy, seed=seed)
    cfg = TrainConfig(epochs=1, optimizer="adam", lr=1e-3, schedule="constant", seed=seed, tensorboard=False)
    w = dict(weight or {"method": "uniform", "scale": "mse", "per_channel": True})
    evaluator = FineTuneEvaluator(lambda: copy.deepcopy(float_model), proxy_loader, held, cfg, w)
    float_val = Trainer(copy.deepcopy(float_model), proxy_loader, held, cfg).evaluate()["acc"]
    search = ReLeQ(evaluator, evaluator.layers(), float_val, actions=actions, seed=seed,
                   cache_path=out / "releq_cache.json")
    result = search.run(episodes, progress=progress)
    names = list(quantizable_layers(float_model))
    rules = [{"match": n, "weight": {**w, "bits": b}} for n, b in zip(names, result.best_bits, strict=True)]
    recipe = Recipe.from_dict({"name": "releq", "description": f"ReLeQ search of {run}",
                               "default": {"weight": None}, "rules": rules})
    atomic_write_text(out / "recipe.yaml", recipe.to_yaml())
    payload = {"run": str(run), "layers": names, "float_val_acc": float_val, **result.to_json()}
    atomic_write_text(out / "releq.json", json.dumps(payload, indent=1) + "\n")
    return payload
