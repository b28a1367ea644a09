"""One training run, end to end: data -> model -> (init) -> quantize -> train -> evaluate.

This is what ``lowbit train`` and ``lowbit eval`` call; it is equally usable from Python::

    from lowbit.experiment import RunSpec, train_run
    result = train_run(RunSpec(model="lenet5", dataset="mnist", recipe="lenet5-w1a4",
                               init="runs/fp/best.safetensors", out="runs/w1a4"))

A run directory holds ``config.json`` (the resolved configuration: model, data, recipe and
training settings after every flag was applied), ``metrics.jsonl``, ``checkpoint.safetensors``
(last epoch), ``best.safetensors``, ``result.json`` and, for quantized runs, the packed model
``model.lowbit``.

Evidence protocol: a validation split carved from the training set (``val_size``, default
the last 5,000 training images of MNIST/Fashion-MNIST/CIFAR-10) is evaluated after every
epoch (``val_loss``/``val_acc`` in metrics.jsonl) and chooses ``best.safetensors``; the test
set is evaluated once, after training, on that checkpoint (the last line of metrics.jsonl,
``{"final": true, "split": "test", ...}``, and ``result.json``). The packed model is that
checkpoint too. ``val_size=0`` trains on every training image and tests the last epoch.

Under ``torchrun`` every process calls :func:`train_run`; see :mod:`lowbit.train.distributed`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import claim_settings
from .data import load_dataset
from .models import build_model
from .nn import quantize
from .recipe import Recipe, RecipeError, load_recipe
from .train import (
    CheckpointError,
    TrainConfig,
    Trainer,
    atomic_write_text,
    evaluate,
    load_checkpoint,
    load_weights,
    seed_everything,
)
from .train import distributed as dist
from .train.methods import MethodHooks, build_methods, restore_model_state

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
    batch_size: int = 128  # the global batch: split over the processes under torchrun
    train_subset: int | None = None
    val_size: int | str | None = "auto"  # validation images carved from the training set
    device: str = "auto"  # auto, cpu, cuda, cuda:N

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
    """``test_acc``/``test_loss``: the test set, read once, on the checkpoint chosen by
    ``selected_on`` (``val_acc``: the best validation epoch ``best_epoch``, whose validation
    accuracy is ``best_acc``; ``last_epoch`` when there is no validation split)."""

    run_dir: str | None
    test_acc: float
    test_loss: float
    best_acc: float | None
    epochs: int
    wall_time_s: float
    history: list[dict[str, Any]]
    size: dict[str, Any] | None = None
    model: nn.Module | None = field(default=None, repr=False)
    selected_on: str = "val_acc"
    best_epoch: int | None = None
    val_size: int = 0
    device: str = "cpu"
    world_size: int = 1

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
    """Data bundle, model (initialised and quantized), recipe and training config (all on
    the CPU; :func:`train_run` moves them to the device)."""
    recipe = spec.resolved_recipe()
    cfg = train_config(spec, recipe)
    data = load_dataset(
        spec.dataset,
        data_dir=spec.data_dir,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        train_subset=spec.train_subset,
        val_size=spec.val_size,
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
    run_dir = Path(spec.out) if spec.out else None
    if resume and run_dir is not None:
        spec = _resume_spec(spec, run_dir)
    if spec.data_dir:  # config.json keeps it: eval/export may run from another directory
        spec = replace(spec, data_dir=str(Path(spec.data_dir).expanduser().resolve()))
    device = dist.resolve_device(spec.device)
    dist.init_distributed(device)
    model, data, recipe, cfg = prepare(spec)
    model.to(device)  # before the methods: they may hold tensors shaped on the model's
    if device.type != "cpu":
        data.to(device)  # small data sets live on the GPU; batches are cut and augmented there
    if not dist.is_main():
        progress = None
    run_config = {
        "spec": {k: v for k, v in asdict(spec).items() if k != "recipe"},
        "recipe": recipe.to_dict() if recipe is not None else None,
        "recipe_source": spec.recipe if isinstance(spec.recipe, str) else None,
        "model_spec": getattr(model, "lowbit_spec", None),
        "dataset": {"name": data.name, "in_shape": list(data.in_shape),
                    "num_classes": data.num_classes,
                    "train_samples": data.train.num_samples,
                    "val_samples": data.val.num_samples if data.val is not None else 0,
                    "test_samples": data.test.num_samples},
        "train": cfg.model_dump(mode="json"),
        "device": str(device),
        "world_size": dist.world_size(),
    }
    if resume and run_dir is not None:
        _check_same_run(run_dir, run_config)
    hooks = MethodHooks()
    if recipe is not None and recipe.methods:
        try:
            hooks = build_methods(resolve_teachers(recipe.methods, device), model)
        except (TypeError, ValueError) as e:
            raise RecipeError(str(e)) from None
    trainer = Trainer(model, data.train, data.val, cfg, run_dir, run_config=run_config,
                      progress=progress, wrap_optimizer=hooks.wrap_optimizer, callbacks=hooks.callbacks,
                      regularizers=hooks.regularizers, loss_fn=hooks.loss_fn, device=device,
                      eval_split="val")
    history = trainer.fit(resume=resume)
    model = trainer.model  # (SyncBatchNorm conversion may have replaced it)
    selected = "last_epoch"
    if data.val is not None and run_dir is not None and (run_dir / "best.safetensors").exists():
        load_checkpoint(run_dir / "best.safetensors", model)
        selected = "val_acc"
    elif data.val is not None:
        selected = "last_epoch (no run directory to keep the best checkpoint in)"
    final = evaluate(model, data.test, device)  # the test set: once, at the end
    size = None
    if recipe is not None and run_dir is not None and dist.is_main():
        size = pack_run_model(model, run_dir / "model.lowbit", tuple(data.in_shape))
    result = RunResult(
        run_dir=str(run_dir) if run_dir else None,
        test_acc=final["acc"],
        test_loss=final["loss"],
        best_acc=trainer.best_acc if data.val is not None and history else None,
        epochs=cfg.epochs,
        wall_time_s=time.perf_counter() - t0,
        history=history,
        size=size,
        model=model,
        selected_on=selected,
        best_epoch=trainer.best_epoch if selected == "val_acc" else cfg.epochs,
        val_size=data.val.num_samples if data.val is not None else 0,
        device=str(device),
        world_size=dist.world_size(),
    )
    if run_dir is not None and dist.is_main():
        line = {"final": True, "split": "test", "checkpoint": "best.safetensors" if selected == "val_acc"
                else "checkpoint.safetensors", "selected_on": selected, "best_epoch": result.best_epoch,
                "test_loss": final["loss"], "test_acc": final["acc"], "n": final["n"]}
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        atomic_write_text(run_dir / "result.json", json.dumps(result.to_json(), indent=2))
    dist.barrier()
    return result


#: what a run directory holds (beside the TensorBoard folder ``tb``)
RUN_FILES = ("checkpoint.safetensors", "best.safetensors", "metrics.jsonl", "config.json", "result.json",
             "model.lowbit")


def claim_run_dir(out: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Make sure a fresh run may write ``out``: a directory that already holds a run is an error
    (its checkpoints would be overwritten), unless ``overwrite``, which deletes that run's files."""
    path = Path(out)
    found = [f for f in RUN_FILES if (path / f).is_file()]
    if not found:
        return
    if not overwrite:
        raise ValueError(f"{out} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                         "--overwrite to start it again (its files are deleted), or choose another --out")
    for f in found:
        (path / f).unlink()
    tb = path / "tb"
    if tb.is_dir():
        for event in tb.glob("events.out.tfevents.*"):
            event.unlink()
    log.info("%s: the previous run's files were deleted (--overwrite)", out)


def _normalized(x: Any) -> Any:
    return json.loads(json.dumps(x, sort_keys=True))


def _check_same_run(run_dir: Path, run_config: Mapping[str, Any]) -> None:
    """A resumed run must be the run its directory holds: the same model, data set and recipe
    (quantizer bit-widths are not in the checkpoint's tensors, so another recipe of the same shapes
    would load and carry on under the wrong name). The training options may change (a longer
    schedule); the Trainer logs it."""
    if not (run_dir / "config.json").exists():
        return
    saved = read_run_config(run_dir)
    diffs = []
    for key, now in (("model_spec", run_config["model_spec"]),
                     ("dataset", run_config["dataset"]["name"])):
        was = saved.get(key)
        was = was.get("name") if key == "dataset" and isinstance(was, dict) else was
        if was is not None and _normalized(was) != _normalized(now):
            diffs.append(f"{key.replace('_spec', '')} {was!r}, now {now!r}")
    was_recipe = saved.get("recipe")
    if was_recipe is not None:
        with contextlib.suppress(RecipeError):  # stored by another version: compared as stored
            was_recipe = Recipe.from_dict(was_recipe).to_dict()
    if "recipe" in saved and _normalized(was_recipe) != _normalized(run_config["recipe"]):
        diffs.append(f"recipe {saved.get('recipe_source') or 'stored in config.json'}, now "
                     f"{run_config.get('recipe_source') or 'another'}")
    if diffs:
        raise ValueError(f"resuming: {run_dir} holds a different run ({'; '.join(diffs)}); resume it with "
                         "its own model, data set and recipe, or start the new run in another directory "
                         "(or over this one: lowbit train --overwrite)")


def _resume_spec(spec: RunSpec, run_dir: Path) -> RunSpec:
    """A run started before validation splits existed resumes as it began (no split)."""
    if not (run_dir / "config.json").exists():
        return spec
    saved = read_run_config(run_dir)["spec"]
    if saved and "val_size" not in saved and spec.val_size:
        log.warning("%s was started without a validation split: resuming it without one "
                    "(its best checkpoint was chosen on the test set)", run_dir)
        return replace(spec, val_size=None)
    return spec


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """A run directory's ``config.json``, checked as far as :func:`load_run` and resuming use it: a
    JSON object whose ``spec`` is an object of :class:`RunSpec` fields and whose ``recipe`` is an
    object or null. A damaged file raises :class:`CheckpointError` naming it."""
    path = run_dir / "config.json"
    todo = ("it is written by `lowbit train`: restore it from a copy, or train the run again "
            "(lowbit train --overwrite)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not a UTF-8 JSON text file; {todo}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); {todo}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}, expected an object with the "
                              f"run's 'spec'; {todo}")
    spec = config.get("spec")
    if not isinstance(spec, dict):
        found = "none" if spec is None else f"a {type(spec).__name__}"
        raise CheckpointError(f"{path}: 'spec' (the run's settings) must be an object, found {found}; {todo}")
    known = {f.name for f in fields(RunSpec)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise CheckpointError(f"{path}: 'spec' has unknown key(s) {unknown}, expected keys among "
                              f"{sorted(known)}; {todo}")
    if not isinstance(config.get("recipe"), dict | None):
        raise CheckpointError(f"{path}: 'recipe' must be an object or null, found "
                              f"{type(config['recipe']).__name__}; {todo}")
    return config


def resolve_teachers(methods: Sequence[Mapping[str, Any]],
                     device: str | torch.device | None = None) -> list[dict[str, Any]]:
    """The recipe's methods with each ``teacher: PATH`` (a run directory or checkpoint) loaded
    (onto ``device``)."""
    out = []
    for m in methods:
        m = dict(m)
        if isinstance(m.get("teacher"), str | os.PathLike):
            path = Path(m["teacher"])
            if not path.exists():
                raise RecipeError(f"recipe field 'methods.{m.get('name')}.teacher': {str(path)!r} does "
                                  "not exist; give a run directory written by `lowbit train` or a "
                                  "checkpoint in one")
            m["teacher"], _, _ = load_run(path, device)
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


def load_run(
    path: str | Path, device: str | torch.device | None = None, data_dir: str | os.PathLike[str] | None = None
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Rebuild a run's model from its directory (or a checkpoint inside it) and its data;
    ``device`` (``auto``, ``cpu``, ``cuda``...) moves the model there (the data stay on the CPU);
    ``data_dir`` replaces the data directory the run was trained with (the data moved)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"{p} does not exist; give a run directory written by `lowbit train` or a .safetensors "
            "checkpoint in one"
        )
    run_dir = p if p.is_dir() else p.parent
    ckpt = p if p.is_file() else run_dir / "best.safetensors"
    if not ckpt.exists():
        ckpt = run_dir / "checkpoint.safetensors"
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(
            f"{run_dir} has no config.json: give a run directory written by `lowbit train`"
        )
    config = read_run_config(run_dir)
    spec = RunSpec(**{**config["spec"], "recipe": config.get("recipe"), "init": None,
                      **({"data_dir": str(data_dir)} if data_dir is not None else {})})
    try:
        model, data, recipe, _ = prepare(spec)
    except RecipeError as e:
        raise CheckpointError(f"{cfg_path}: the stored recipe is invalid: {e}") from None
    # state a training method added to the model (BinaryRelax's eta): the checkpoint holds it
    restore_model_state(recipe.methods if recipe is not None else (), model)
    load_checkpoint(ckpt, model)
    if device is not None:
        model.to(dist.resolve_device(device))
    return model, data, config


def require_quantized_run(model: nn.Module, run: str | Path, what: str = "nothing to pack") -> None:
    """A ValueError telling a CLI user what to do when ``run`` (loaded by :func:`load_run`) is a
    float run, which has nothing packed to write or report."""
    if getattr(model, "lowbit_recipe", None) is None:
        raise ValueError(
            f"{run} is a float run (trained without --recipe): {what}; train with --recipe, or run "
            f"`lowbit ptq {run} --out F.lowbit`"
        )


def releq_run(
    run: str | Path,
    out: str | Path,
    *,
    episodes: int = 300,
    actions: Sequence[int] = (2, 3, 4, 5, 6),
    proxy: int = 2048,
    val: int = 2000,
    weight: Mapping[str, Any] | None = None,
    act_actions: Sequence[int] | None = None,
    activation: Mapping[str, Any] | None = None,
    bops_budget: float | None = None,
    seed: int = 0,
    progress: Any = None,
    device: str | torch.device | None = None,
    step_rewards: bool = True,
) -> dict[str, Any]:
    """ReLeQ search over the weight bits (and, with ``act_actions``, each layer's input bits) of a
    float run's layers (see :mod:`lowbit.search.releq`).

    The measurement fine-tunes one epoch on ``proxy`` training images and reads ``val`` other
    training images (never the test set). ``bops_budget``: a hard limit on the searched layers'
    bit operations, ``sum MACs x weight bits x input bits`` (32 for float inputs), MACs counted by
    :func:`lowbit.models.layer_table` as ``lowbit report`` does; assignments above it are never
    chosen nor measured. Writes ``out/releq.json`` (best assignment, history, BOPs),
    ``out/releq_cache.json`` (measured accuracies: a rerun resumes) and ``out/recipe.yaml``: the
    best assignment as a recipe for ``lowbit train --recipe out/recipe.yaml --init RUN/...``.
    ``step_rewards=False`` measures each episode once, at its end, instead of after every layer
    (:class:`lowbit.search.ReLeQ`): ``L`` times fewer fine-tunes per episode.
    """
    import copy
    import math

    from .models import layer_table
    from .nn.quantize import quantizable_layers, quantized_layers
    from .search import FineTuneEvaluator, ReLeQ
    from .search.releq import check_actions

    # bad options fail here, before a run is loaded or anything is written to ``out``
    for name, value, what in (("episodes", episodes, "episodes"), ("proxy", proxy, "training images"),
                              ("val", val, "held-out training images")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"releq_run: {name} must be an integer >= 1 ({what}), got {value!r}")
    if bops_budget is not None and (isinstance(bops_budget, bool) or not isinstance(bops_budget, int | float)
                                    or not 0 < bops_budget < math.inf):
        raise ValueError("releq_run: bops_budget must be a finite number > 0 (BOPs) or None (no limit), "
                         f"got {bops_budget!r}")
    check_actions(actions, act_actions)
    float_model, data, _ = load_run(run, device)
    if quantized_layers(float_model):
        raise ValueError(f"{run} is a quantized run; ReLeQ searches from a float run")
    out = Path(out)
    held, rest = data.train.split(val, seed=seed)
    proxy_loader = rest.subset(proxy, seed=seed)
    cfg = TrainConfig(epochs=1, optimizer="adam", lr=1e-3, schedule="constant", seed=seed, tensorboard=False)
    w = dict(weight or {"method": "uniform", "scale": "mse", "per_channel": True})
    act = dict(activation or {"method": "pact"})
    names = list(quantizable_layers(float_model))
    # the first layer reads the normalised data, which goes negative: a signed grid there
    signed = names[:1] if act.get("method", "pact") in ("pact", "lsq", "uniform") else []
    evaluator = FineTuneEvaluator(lambda: copy.deepcopy(float_model), proxy_loader, held, cfg, w,
                                  device=device, activation=act, signed_inputs=signed)
    macs = {r.name: r.macs for r in layer_table(copy.deepcopy(float_model).cpu(), data.in_shape)}

    def bops(bits: Sequence[Any]) -> float:
        pairs = [(b, 32) if isinstance(b, int) else tuple(b) for b in bits]
        return float(sum(macs[n] * wb * ab for n, (wb, ab) in zip(names, pairs, strict=True)))

    if bops_budget is not None:  # (ReLeQ checks it too, but only after the float model is measured)
        cheapest = (min(actions) if act_actions is None else (min(actions), min(act_actions)),) * len(names)
        if bops(cheapest) > bops_budget:
            raise ValueError(f"releq_run: bops_budget {bops_budget:.6g} is below the cheapest assignment "
                             f"{cheapest} (BOPs {bops(cheapest):.6g}); give a budget of at least that")
    out.mkdir(parents=True, exist_ok=True)
    # the cached accuracies hold for this float model and this way of measuring only
    ckpt = Path(run) if Path(run).is_file() else Path(run) / "best.safetensors"
    claim_settings(out / "releq_cache.json", out / "releq_measure.json",
                   {"proxy": proxy, "val": val, "seed": seed, "weight": w, "activation": act, "layers": names,
                    "checkpoint_sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest()})
    float_val = Trainer(copy.deepcopy(float_model), proxy_loader, held, cfg).evaluate()["acc"]
    budget = {} if bops_budget is None else {"cost": bops, "budget": float(bops_budget)}
    search = ReLeQ(evaluator, evaluator.layers(), float_val, actions=actions, act_actions=act_actions,
                   seed=seed, cache_path=out / "releq_cache.json", step_rewards=step_rewards, **budget)
    result = search.run(episodes, progress=progress)
    rules = []
    for n, b in zip(names, result.best_bits, strict=True):
        if isinstance(b, int):
            rules.append({"match": n, "weight": {**w, "bits": b}})
        else:
            a_spec = {**act, "bits": int(b[1])} | ({"signed": True} if n in signed else {})
            rules.append({"match": n, "weight": {**w, "bits": int(b[0])}, "activation": a_spec})
    recipe = Recipe.from_dict({"name": "releq", "description": f"ReLeQ search of {run}",
                               "default": {"weight": None}, "rules": rules})
    atomic_write_text(out / "recipe.yaml", recipe.to_yaml())
    payload = {"run": str(run), "layers": names, "float_val_acc": float_val, **result.to_json(),
               "best_bops": bops(result.best_bits), "bops_budget": bops_budget, "step_rewards": step_rewards,
               "macs": [macs[n] for n in names]}
    atomic_write_text(out / "releq.json", json.dumps(payload, indent=1) + "\n")
    return payload
