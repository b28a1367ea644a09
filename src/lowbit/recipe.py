"""Recipes: which layer gets which quantizer at which bit-width.

A recipe is a small YAML (or dict)::

    name: my-w1a4
    description: binary weights, 4-bit PACT activations, first and last layer in float
    default:
      weight: {method: binary, bits: 1}
      activation: {method: pact, bits: 4, alpha_init: 8}
    rules:                      # matched in order by glob on module names; later rules win
      - match: "@first"         # or "conv1"; "@first"/"@last" = first/last quantizable layer
        weight: null            # null = keep full precision
        activation: null
      - match: ["fc*", "classifier.*"]
        weight: {method: dorefa, bits: 8}
    methods: [{name: bcgd, rho: 1.0e-5}]               # optional training methods
    train: {epochs: 10, optimizer: adam, lr: 0.001}    # optional, read by the trainer

Any key of a quantizer spec besides ``method`` and ``bits`` is an option of that quantizer's
constructor (``per_channel``, ``ste``, ``alpha_init``, ``signed`` ...), except the weight option
``channel_axis`` (an integer: the weight's output-channel dimension for per-channel statistics;
by default ``lowbit.quantize`` picks it from the layer type). Weights not called ``weight`` (RNN,
attention) are matched by ``module.param`` names, e.g. ``"rnn.weight_hh_l0"`` (see
``lowbit.nn.quantize``). ``methods`` entries are checked against :data:`TRAINING_OPTIONS` (names,
option keys and types). Option values must fit the type annotated on the constructor parameter
they are passed to (an int where a float is annotated; a bool is not a number); quantizer options
are also range-checked at load, by building the quantizer. Every mistake raises
:class:`RecipeError` naming the field, the bad value and what is allowed.
"""

from __future__ import annotations

import fnmatch
import os
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from torch import nn

from .quant import registry

Kind = Literal["weight", "activation"]
_UNSET: Any = object()
SPECIAL_MATCHES = ("@first", "@last")

#: Training methods a recipe's ``methods`` list may name -> each option and the type annotated on the
#: method's constructor. The implementations live in ``lowbit.train.methods`` (which checks that it
#: matches this table); the table sits here so a recipe is validated when it is loaded, without
#: importing training. Option values are checked against these types (see :func:`check_option`);
#: their ranges are checked by the constructors when training starts.
TRAINING_OPTIONS: dict[str, dict[str, Any]] = {
    "bcgd": {"rho": float},
    "binary_relax": {"eta0": float, "growth": float, "per_epoch": int, "every_steps": int | None,
                     "steps_per_epoch": int | None, "hard_epoch": int | None, "eval_hard": bool},
    "pact_l2": {"weight": float},
    "sinreq": {"weight": float, "bits": int | None, "grid": str, "layers": Sequence[str] | None,
               "reduction": str},
    "waveq": {"weight": float, "beta_weight": float, "init_bits": float | None, "min_bits": int,
              "max_bits": int, "grid": str, "layers": Sequence[str] | None, "reduction": str,
              "beta_lr": float | None, "ramp": float},
    # teacher: a run directory or checkpoint path in a recipe, loaded into a module by lowbit.experiment
    "kd": {"teacher": nn.Module, "alpha": float, "temperature": float},
    "dcq": {"teacher": nn.Module, "cut_after": Sequence[str] | None, "dcq_epochs": int | None,
            "alpha": float, "temperature": float},
    "rvsm": {"lam": float, "beta": float, "penalty": str, "a": float, "layers": Sequence[str] | None,
             "finalize": bool},
    "wpc": {"lam": float, "group": str, "pe_in": int, "wpc": bool, "wpc_scale": float,
            "layers": Sequence[str] | None},
    "bits_penalty": {"weight": float},
}
#: Training method -> the option keys it accepts.
TRAINING_METHODS: dict[str, tuple[str, ...]] = {n: tuple(o) for n, o in TRAINING_OPTIONS.items()}


class RecipeError(ValueError):
    """A recipe that cannot be applied: names the field, the bad value and what is allowed."""


def _err(path: str, value: Any, allowed: str) -> RecipeError:
    return RecipeError(f"recipe field {path!r}: got {value!r}; allowed: {allowed}")


_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def _fits(tp: Any, value: Any) -> bool:
    """Whether ``value`` (as YAML gives it) fits the annotation ``tp``. An int fits ``float``; a bool is
    not a number. Types a recipe cannot hold (a module, ``Any``) fit anything: their user checks them."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(a, value) for a in args)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin in (list, tuple, Sequence):
        return isinstance(value, list | tuple) and all(not args or _fits(args[0], v) for v in value)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in _WORDS:
        return isinstance(value, tp)
    return True


def _describe(tp: Any) -> str:
    """``tp`` in words, as a recipe writes it: ``int | None`` -> 'an integer or null'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, Sequence):
        return f"a list, each {_describe(args[0])}" if args else "a list"
    return _WORDS.get(tp, getattr(tp, "__name__", str(tp)))


def check_option(path: str, value: Any, tp: Any, owner: str) -> None:
    """Raise :class:`RecipeError` at ``path`` unless ``value`` fits ``tp``, the type annotated on the
    constructor parameter it is passed to (``owner`` names that method or quantizer)."""
    if _fits(tp, value):
        return
    hint = ""
    if isinstance(value, str) and _fits(tp, 0.5):
        try:
            float(value)
            hint = " (YAML reads a number like 1e-5 as a string: write 1.0e-5)"
        except ValueError:
            pass
    raise _err(path, value, f"{_describe(tp)} for {owner}{hint}")


@dataclass(frozen=True)
class QuantSpec:
    """One quantizer choice: registry method name, bit-width and constructor options."""

    method: str
    bits: int
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "bits": self.bits, **dict(self.options)}

    @property
    def channel_axis(self) -> int | None:
        """The weight option ``channel_axis`` (None: chosen from the layer type)."""
        return self.options.get("channel_axis")

    def build(self, kind: Kind) -> registry.Quantizer:
        opts = {k: v for k, v in self.options.items() if k != "channel_axis"}
        return registry.create(kind, self.method, self.bits, **opts)


def _parse_spec(raw: Any, kind: Kind, path: str) -> QuantSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise _err(path, raw, "a mapping like {method: ..., bits: ...} or null (full precision)")
    methods = registry.names(kind)
    if "method" not in raw:
        raise _err(f"{path}.method", None, f"one of {methods}")
    method = raw["method"]
    if method not in methods:
        raise _err(f"{path}.method", method, f"{kind} methods {methods}")
    cls = registry.get(kind, method)
    if "bits" not in raw:
        raise _err(f"{path}.bits", None, f"an integer in {list(cls.bits_allowed)} for {method}")
    bits = raw["bits"]
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in cls.bits_allowed:
        raise _err(f"{path}.bits", bits, f"{list(cls.bits_allowed)} for {kind} method {method!r}")
    allowed_opts = registry.options(cls)
    if kind == "weight":
        allowed_opts["channel_axis"] = None
    options = {k: v for k, v in raw.items() if k not in ("method", "bits")}
    axis = options.get("channel_axis")
    if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
        raise _err(f"{path}.channel_axis", axis, "an integer (the weight's output-channel dimension) or null")
    try:
        types_ = typing.get_type_hints(cls.__init__)
    except Exception:  # a user's quantizer whose annotations do not resolve: its options go unchecked
        types_ = {}
    for k in options:
        if k not in allowed_opts:
            raise _err(
                f"{path}.{k}",
                options[k],
                f"keys method, bits, {', '.join(allowed_opts) or '(no options)'} for {method!r}",
            )
        if k != "channel_axis":
            check_option(f"{path}.{k}", options[k], types_.get(k, Any), f"{kind} method {method!r}")
    spec = QuantSpec(method=method, bits=bits, options=options)
    try:  # options with bad values surface now, not mid-training
        spec.build(kind)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"recipe field {path!r}: {e}") from None
    return spec


@dataclass(frozen=True)
class Rule:
    match: tuple[str, ...]
    weight: Any = _UNSET  # QuantSpec | None | _UNSET (inherit)
    activation: Any = _UNSET

    def matches(self, name: str, first: str | None, last: str | None) -> bool:
        """Whether a pattern matches ``name`` (a glob, or ``@first``/``@last``)."""
        for pat in self.match:
            if pat == "@first" and name == first:
                return True
            if pat == "@last" and name == last:
                return True
            if pat not in SPECIAL_MATCHES and fnmatch.fnmatchcase(name, pat):
                return True
        return False


@dataclass(frozen=True)
class LayerPlan:
    weight: QuantSpec | None
    activation: QuantSpec | None


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. Build with :meth:`from_yaml` or :meth:`from_dict`."""

    default_weight: QuantSpec | None = None
    default_activation: QuantSpec | None = None
    rules: tuple[Rule, ...] = ()
    name: str = ""
    description: str = ""
    methods: tuple[Mapping[str, Any], ...] = ()
    train: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def asks_quantizers(self) -> bool:
        """Whether it names any quantizer (a default or a rule); a recipe may hold training methods
        alone (WaveQ learning the bits of a float model)."""
        return self.default_weight is not None or self.default_activation is not None or bool(self.rules)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "") -> Recipe:
        if not isinstance(raw, Mapping):
            raise RecipeError(f"a recipe must be a mapping at the top level, got {type(raw).__name__}")
        top_keys = ("name", "description", "default", "rules", "methods", "train")
        for k in raw:
            if k not in top_keys:
                raise _err(k, raw[k], f"top-level keys {', '.join(top_keys)}")
        default = raw.get("default") or {}
        if not isinstance(default, Mapping):
            raise _err("default", default, "a mapping with keys weight, activation")
        for k in default:
            if k not in ("weight", "activation"):
                raise _err(f"default.{k}", default[k], "keys weight, activation")
        dw = _parse_spec(default.get("weight"), "weight", "default.weight")
        da = _parse_spec(default.get("activation"), "activation", "default.activation")
        rules_raw = raw.get("rules") or []
        if not isinstance(rules_raw, list):
            raise _err("rules", rules_raw, "a list of {match, weight, activation}")
        rules = []
        for i, r in enumerate(rules_raw):
            p = f"rules[{i}]"
            if not isinstance(r, Mapping):
                raise _err(p, r, "a mapping with keys match, weight, activation")
            for k in r:
                if k not in ("match", "weight", "activation"):
                    raise _err(f"{p}.{k}", r[k], "keys match, weight, activation")
            m = r.get("match")
            pats = (m,) if isinstance(m, str) else tuple(m) if isinstance(m, list) else None
            if not pats or not all(isinstance(s, str) and s for s in pats):
                raise _err(f"{p}.match", m, "a glob string like 'conv1' or 'layer*.conv2', "
                           "'@first', '@last', or a list of them")
            rules.append(
                Rule(
                    match=pats,
                    weight=_parse_spec(r["weight"], "weight", f"{p}.weight")
                    if "weight" in r else _UNSET,
                    activation=_parse_spec(r["activation"], "activation", f"{p}.activation")
                    if "activation" in r else _UNSET,
                )
            )
        train = raw.get("train") or {}
        if not isinstance(train, Mapping):
            raise _err("train", train, "a mapping of training options (epochs, lr, ...)")
        methods = raw.get("methods") or []
        if not isinstance(methods, list) or not all(isinstance(m, Mapping) and "name" in m for m in methods):
            raise _err("methods", methods, "a list of {name: <method>, <option>: <value>}, e.g. "
                       "[{name: bcgd, rho: 1.0e-5}]")
        for i, m in enumerate(methods):
            _check_method(m, f"methods[{i}]")
        for k in ("name", "description"):
            if k in raw and not isinstance(raw[k], str):
                raise _err(k, raw[k], "a string")
        return cls(
            default_weight=dw,
            default_activation=da,
            rules=tuple(rules),
            name=str(raw.get("name", "")),
            description=str(raw.get("description", "")),
            methods=tuple(dict(m) for m in methods),
            train=dict(train),
            source=source,
        )

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> Recipe:
        p = Path(path)
        if not p.exists():
            raise RecipeError(f"recipe file {str(p)!r} does not exist")
        if p.is_dir():
            raise RecipeError(f"recipe file {str(p)!r} is a directory; give a recipe YAML file inside it "
                              "or the name of a shipped recipe")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise RecipeError(f"recipe file {str(p)!r} is not a UTF-8 YAML text file (a packed model, "
                              "checkpoint or image?); give a recipe YAML file or the name of a shipped "
                              "recipe") from None
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe file {str(p)!r} is not valid YAML: {e}") from None
        return cls.from_dict(raw or {}, source=str(p))

    # ---- use ------------------------------------------------------------------------------
    def plan(
        self, name: str, first: str | None = None, last: str | None = None, also: Iterable[str] = ()
    ) -> LayerPlan:
        """The weight and activation spec for the module (or weight) called ``name``.

        A rule applies when it matches ``name`` or one of the names in ``also`` (a weight's module).
        """
        w, a = self.default_weight, self.default_activation
        names = (name, *also)
        for r in self.rules:
            if any(r.matches(n, first, last) for n in names):
                if r.weight is not _UNSET:
                    w = r.weight
                if r.activation is not _UNSET:
                    a = r.activation
        return LayerPlan(w, a)

    def unmatched_rules(self, names: Iterable[str], first: str | None, last: str | None) -> list[str]:
        """Patterns of rules that match none of ``names``."""
        names = list(names)
        out = []
        for r in self.rules:
            if not any(r.matches(n, first, last) for n in names):
                out.append(", ".join(r.match))
        return out

    def to_dict(self) -> dict[str, Any]:
        def spec(s: QuantSpec | None) -> dict[str, Any] | None:
            return None if s is None else s.to_dict()

        rules = []
        for r in self.rules:
            d: dict[str, Any] = {"match": list(r.match) if len(r.match) > 1 else r.match[0]}
            if r.weight is not _UNSET:
                d["weight"] = spec(r.weight)
            if r.activation is not _UNSET:
                d["activation"] = spec(r.activation)
            rules.append(d)
        out: dict[str, Any] = {
            "default": {"weight": spec(self.default_weight), "activation": spec(self.default_activation)},
            "rules": rules,
        }
        if self.name:
            out["name"] = self.name
        if self.description:
            out["description"] = self.description
        if self.methods:
            out["methods"] = [dict(m) for m in self.methods]
        if self.train:
            out["train"] = dict(self.train)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_method(m: Mapping[str, Any], path: str) -> None:
    name = m["name"]
    if name not in TRAINING_METHODS:
        raise _err(f"{path}.name", name, f"training methods {sorted(TRAINING_METHODS)}")
    allowed = TRAINING_OPTIONS[name]
    for k in m:
        if k != "name" and k not in allowed:
            raise _err(f"{path}.{k}", m[k], f"keys name, {', '.join(allowed)} for method {name!r}")
        if k != "name":
            check_option(f"{path}.{k}", m[k], allowed[k], f"method {name!r}")


def recipe_dirs() -> list[Path]:
    """Where shipped recipes live: the installed package data, else the source tree."""
    here = Path(__file__).resolve().parent
    return [p for p in (here / "_recipes", here.parents[1] / "recipes") if p.is_dir()]


def shipped_recipes() -> dict[str, Path]:
    """Name -> path of every shipped recipe."""
    out: dict[str, Path] = {}
    for d in recipe_dirs():
        for p in sorted(d.glob("*.yaml")):
            out.setdefault(p.stem, p)
    return out


def load_recipe(name_or_path: str | os.PathLike[str]) -> Recipe:
    """A recipe from a YAML path, or by the name of a shipped recipe. A recipe without a default
    quantizer, a rule or a training method (an empty file) is a :class:`RecipeError`: it would do
    nothing."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        recipe = Recipe.from_yaml(p)
    else:
        shipped = shipped_recipes()
        if str(name_or_path) not in shipped:
            raise RecipeError(
                f"no recipe file or shipped recipe called {str(name_or_path)!r}; "
                f"shipped recipes: {', '.join(shipped) or '(none found)'}"
            )
        recipe = Recipe.from_yaml(shipped[str(name_or_path)])
    if not recipe.asks_quantizers and not recipe.methods:  # (methods alone are a recipe)
        raise RecipeError(
            f"recipe {name_or_path} has no rules: a recipe needs a 'default' (weight and/or activation "
            "quantizer for every layer, e.g. default: {weight: {method: binary, bits: 1}}), 'rules' "
            "(quantizers by layer name: {match: 'conv*', weight: ...}) or training 'methods'; the "
            "shipped recipes (lowbit recipes) are examples; to train in float, give no recipe"
        )
    return recipe
