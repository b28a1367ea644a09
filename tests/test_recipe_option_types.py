"""Recipe option values are checked against the types annotated on the constructors they are passed
to, when the recipe is loaded: a wrong type is a RecipeError naming the field path, the value and
what is allowed, not a TypeError deep in training."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any

import pytest

from lowbit import Recipe, cli
from lowbit.quant import registry
from lowbit.recipe import TRAINING_OPTIONS, RecipeError, _fits, load_recipe

ROOT = Path(__file__).resolve().parents[1]
W1 = {"weight": {"method": "binary", "bits": 1}}


def _method(**opts: Any) -> dict[str, Any]:
    return {"default": W1, "methods": [opts]}


def _act(**spec: Any) -> dict[str, Any]:
    return {"default": {"activation": spec}}


def _weight(**spec: Any) -> dict[str, Any]:
    return {"default": {"weight": spec}}


def test_method_option_of_wrong_type_fails_at_load() -> None:
    with pytest.raises(RecipeError, match=r"recipe field 'methods\[0\]\.rho': got 'abc'; allowed: a number "
                       r"for method 'bcgd'"):
        Recipe.from_dict(_method(name="bcgd", rho="abc"))


def test_quantizer_option_of_wrong_type_fails_at_load() -> None:
    with pytest.raises(RecipeError, match=r"recipe field 'default\.activation\.alpha_init': got 'big'; "
                       r"allowed: a number for activation method 'pact'"):
        Recipe.from_dict(_act(method="pact", bits=4, alpha_init="big"))


@pytest.mark.parametrize(
    ("raw", "field", "allowed"),
    [
        (_method(name="binary_relax", eval_hard="yes"), "methods[0].eval_hard", "true or false"),
        (_method(name="binary_relax", hard_epoch=2.5), "methods[0].hard_epoch", "an integer or null"),
        (_method(name="wpc", pe_in=True), "methods[0].pe_in", "an integer"),  # a bool is not a number
        (_method(name="rvsm", lam=True), "methods[0].lam", "a number"),
        (_method(name="rvsm", penalty=1), "methods[0].penalty", "a string"),
        (_method(name="sinreq", layers="conv1"), "methods[0].layers", "a list, each a string or null"),
        (_method(name="kd", teacher="runs/fp", temperature=[4]), "methods[0].temperature", "a number"),
        (_weight(method="binary", bits=1, per_channel=1), "default.weight.per_channel", "true or false"),
        (_weight(method="binary", bits=1, clip="1"), "default.weight.clip", "a number or null"),
        (_weight(method="uniform", bits=4, scale=2), "default.weight.scale", "a string"),
        (_weight(method="mixed", bits=4, candidates=[2, "4"]), "default.weight.candidates", "a list"),
        (_act(method="dorefa", bits=4, ste="straight"), "default.activation.ste",
         "one of 'identity', 'relu', 'clipped_relu' or null"),
        (_act(method="pact", bits=4, signed="true"), "default.activation.signed", "true or false"),
        (_act(method="lsq", bits=4, grad_scale=False), "default.activation.grad_scale", "a number or null"),
        ({"default": W1, "rules": [{"match": "fc*", "activation": {"method": "uniform", "bits": 4,
                                                                   "momentum": "0.1"}}]},
         "rules[0].activation.momentum", "a number"),
    ],
)
def test_wrong_types_of_other_options(raw: dict[str, Any], field: str, allowed: str) -> None:
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict(raw)
    msg = str(e.value)
    assert msg.startswith(f"recipe field {field!r}: got "), msg
    assert f"allowed: {allowed}" in msg


def test_yaml_number_read_as_string_is_explained(tmp_path: Path) -> None:
    """PyYAML reads ``1e-5`` (no dot) as a string: the error says how to write it."""
    p = tmp_path / "r.yaml"
    p.write_text("default: {weight: {method: binary, bits: 1}}\nmethods: [{name: bcgd, rho: 1e-5}]\n")
    with pytest.raises(RecipeError, match=r"'methods\[0\]\.rho': got '1e-5'.*write 1\.0e-5"):
        Recipe.from_yaml(p)
    p.write_text("default: {weight: {method: binary, bits: 1}}\nmethods: [{name: bcgd, rho: 1.0e-5}]\n")
    assert Recipe.from_yaml(p).methods[0]["rho"] == 1e-5


def test_cli_recipe_with_wrong_option_type_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("default: {activation: {method: pact, bits: 4, alpha_init: big}}\n")
    rc = cli.main(["--threads", "1", "train", "--model", "mlp", "--data", "digits", "--recipe", str(p),
                   "--out", str(tmp_path / "run")])
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert rc == 2
    assert "'default.activation.alpha_init': got 'big'; allowed: a number" in out
    assert not (tmp_path / "run").exists()


def test_valid_values_keep_their_meaning() -> None:
    """int where a float is annotated, null for optional options, lists for sequences."""
    r = Recipe.from_dict({
        "default": {"weight": {"method": "binary", "bits": 1, "clip": 1},
                    "activation": {"method": "pact", "bits": 4, "alpha_init": 8, "signed": False}},
        "methods": [{"name": "bcgd", "rho": 0}, {"name": "sinreq", "layers": ["fc*"], "bits": None},
                    {"name": "kd", "teacher": "runs/fp", "temperature": 2}],
    })
    assert r.default_activation is not None and r.default_activation.options["alpha_init"] == 8
    assert float(r.default_activation.build("activation").alpha.detach()) == 8.0
    assert r.methods[0]["rho"] == 0 and r.methods[1]["layers"] == ["fc*"]


def _checkable(tp: Any) -> bool:
    return not _fits(tp, {"a": 1})  # a mapping fits no option type a recipe can hold


def test_every_quantizer_option_is_type_checked() -> None:
    """A mapping is of the wrong type for every option whose annotation a recipe can hold."""
    checked = 0
    for kind in ("weight", "activation"):
        for name in registry.names(kind):
            cls = registry.get(kind, name)
            hints = typing.get_type_hints(cls.__init__)
            for opt in registry.options(cls):
                if not _checkable(hints.get(opt, Any)):
                    continue
                spec = {"method": name, "bits": cls.bits_allowed[-1], opt: {"a": 1}}
                field = rf"'default\.{kind}\.{opt}'"
                with pytest.raises(RecipeError, match=rf"{field}: got \{{'a': 1\}}; allowed"):
                    Recipe.from_dict({"default": {kind: spec}})
                checked += 1
    assert checked >= 30


def test_every_method_option_is_type_checked() -> None:
    checked = 0
    for name, opts in TRAINING_OPTIONS.items():
        for opt, tp in opts.items():
            if not _checkable(tp):
                assert opt == "teacher"  # a path in the recipe, a module in build_methods
                continue
            with pytest.raises(RecipeError, match=rf"'methods\[0\]\.{opt}': got \{{'a': 1\}}; allowed"):
                Recipe.from_dict(_method(name=name, **{opt: {"a": 1}}))
            checked += 1
    assert checked == sum(len(o) for o in TRAINING_OPTIONS.values()) - 2


def test_method_types_table_matches_the_constructors(monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbit.train import methods

    for name in methods.METHODS:
        assert TRAINING_OPTIONS[name] == methods._option_types(name)
    methods._check_registry()
    monkeypatch.setitem(TRAINING_OPTIONS, "bcgd", {"rho": int})
    with pytest.raises(RuntimeError, match="TRAINING_OPTIONS is out of date"):
        methods._check_registry()


def test_option_defaults_fit_their_annotations() -> None:
    """Each constructor's default is a valid recipe value: the check agrees with the code."""
    for kind in ("weight", "activation"):
        for name in registry.names(kind):
            cls = registry.get(kind, name)
            hints = typing.get_type_hints(cls.__init__)
            for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
                if p.name != "bits" and p.default is not p.empty:
                    assert _fits(hints.get(p.name, Any), p.default), (name, p.name, p.default)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "recipes").glob("*.yaml")) + sorted((ROOT / "recipes" / "cifar10").glob("*.yaml")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_shipped_recipes_still_load(path: Path) -> None:
    r = load_recipe(path)
    assert r.default_weight is not None or r.default_activation is not None or r.rules
    assert Recipe.from_dict(r.to_dict()).to_dict() == r.to_dict()


def test_all_shipped_recipes_are_tested() -> None:
    assert len(list((ROOT / "recipes").glob("*.yaml"))) >= 20
    assert len(list((ROOT / "recipes" / "cifar10").glob("*.yaml"))) >= 10
