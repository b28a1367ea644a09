"""Bad input to ``lowbit`` and its Python API, the smaller cases: an empty recipe is refused before
training, a warning prints once, ``--calib`` beyond the training set says so, a relative
``--data-dir`` still finds the data from another directory, and the searches refuse counts and
ratios out of range before they read data or write anything.

Tiny jobs: an MLP on scikit-learn's 8x8 digits, one epoch; the float run is trained once per module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
from _cli_run import run_cli

from lowbit import cli

TINY = ["--model", "mlp", "--model-arg", "hidden=[16, 16]", "--model-arg", "in_features=64",
        "--data", "digits", "--subset", "128", "--batch-size", "64", "--schedule", "constant",
        "--epochs", "1", "--seed", "0"]

pytestmark = pytest.mark.usefixtures("torch_formulas")  # the commands, not the fused kernels


def _must_not_run(*args: object, **kwargs: object) -> None:
    raise AssertionError("the work started although its input was bad")


@pytest.fixture(scope="module")
def float_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "float"
    assert cli.main(["--threads", "1", "train", *TINY, "--out", str(run)]) == 0
    return run


@pytest.fixture
def warnings_to_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """``lowbit``'s own routing of warnings into the log, as in a fresh process: an earlier in-process
    call left logging believing it had already captured them (pytest restores ``showwarning``)."""
    monkeypatch.setattr(logging, "_warnings_showwarning", None)


def _records(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# 1) an empty recipe is a usage error before training; a warning prints once


@pytest.mark.parametrize("name", ["empty.yaml", "empty.json", "empty.lowbit", "only-a-name.yaml"])
def test_recipe_without_rules_is_refused_before_training(name: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import lowbit.experiment

    monkeypatch.setattr(lowbit.experiment, "train_run", _must_not_run)
    recipe = tmp_path / name
    recipe.write_text("name: nothing\n" if name.startswith("only") else "")
    rc, out = run_cli(capsys, "train", *TINY, "--recipe", str(recipe), "--out", str(tmp_path / "r"))
    assert rc == 2
    assert out.startswith(f"error: recipe {recipe} has no rules: a recipe needs a 'default'"), out
    assert "'rules'" in out
    assert not (tmp_path / "r").exists()


def test_a_recipe_of_training_methods_alone_loads(tmp_path: Path) -> None:
    """No quantizer, but a method (WaveQ learns the bits of a float model): a recipe that does something."""
    from lowbit.recipe import load_recipe

    p = tmp_path / "waveq.yaml"
    p.write_text("methods: [{name: waveq, weight: 1000.0, init_bits: 4.0}]\n")
    assert [m["name"] for m in load_recipe(p).methods] == ["waveq"]


def _digests(run: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in run.iterdir() if f.is_file()}


def test_recipe_without_rules_leaves_the_run_overwrite_would_replace(
        float_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = Path(shutil.copytree(float_run, tmp_path / "run"))
    before = _digests(run)
    (tmp_path / "empty.yaml").write_text("")
    rc, out = run_cli(capsys, "train", *TINY, "--recipe", str(tmp_path / "empty.yaml"), "--overwrite",
                      "--out", str(run))
    assert rc == 2 and "has no rules" in out
    assert _digests(run) == before


def test_a_warning_lowbit_logs_prints_once(tmp_path: Path, warnings_to_log: None,
                                           caplog: pytest.LogCaptureFixture,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rules:\n  - {match: fc1, weight: {method: binary, bits: 1}}\n"
                      "  - {match: 'no_such_layer*', weight: null}\n")
    with caplog.at_level(logging.WARNING):
        rc, _ = run_cli(capsys, "train", *TINY, "--recipe", str(recipe), "--out", str(tmp_path / "r"))
    assert rc == 0
    assert len(_records(caplog, "match no layer of the model")) == 1, caplog.records


def test_other_warnings_still_print_once(monkeypatch: pytest.MonkeyPatch, warnings_to_log: None,
                                         caplog: pytest.LogCaptureFixture,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    def warns(_: Any) -> int:
        warnings.warn("a warning from some library", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setitem(cli.COMMANDS, "models", warns)
    with caplog.at_level(logging.WARNING):
        assert run_cli(capsys, "models")[0] == 0
    assert len(_records(caplog, "a warning from some library")) == 1, caplog.records


# 2) --calib beyond the training images: calibrates on them all, and says so once


def test_ptq_calib_beyond_the_training_set(float_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    n = json.loads((float_run / "config.json").read_text())["dataset"]["train_samples"]
    with caplog.at_level(logging.WARNING):
        rc, out = run_cli(capsys, "ptq", str(float_run), "--calib", "100000", "--out",
                          str(tmp_path / "p.lowbit"))
    assert rc == 0 and (tmp_path / "p.lowbit").is_file(), out
    said = _records(caplog, "--calib")
    assert said == [f"--calib 100000: only {n} training images; calibrating on {n}"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rc, out = run_cli(capsys, "ptq", str(float_run), "--calib", str(n), "--out",
                          str(tmp_path / "q.lowbit"))
    assert rc == 0, out
    assert not _records(caplog, "--calib")  # enough images: nothing to say


# 3) a relative --data-dir is kept absolute, so the run loads from any working directory


def test_relative_data_dir_is_stored_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    np = pytest.importorskip("numpy")
    image = pytest.importorskip("PIL.Image")
    monkeypatch.setenv("LOWBIT_CACHE", "off")
    rng = np.random.default_rng(0)
    work = tmp_path / "work"
    for split, n in (("train", 12), ("test", 4)):
        for c in ("a", "b"):
            (work / "imgs" / split / c).mkdir(parents=True)
            for i in range(n):
                image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(
                    work / "imgs" / split / c / f"{i}.png")
    monkeypatch.chdir(work)
    rc, out = run_cli(capsys, "train", "--model", "mlp", "--model-arg", "in_features=64", "--model-arg",
                      "hidden=[8]", "--data", "imagefolder", "--data-dir", "imgs", "--epochs", "1",
                      "--batch-size", "8", "--val-size", "8", "--out", "run")
    assert rc == 0, out
    spec = json.loads((work / "run" / "config.json").read_text())["spec"]
    assert spec["data_dir"] == str((work / "imgs").resolve())
    monkeypatch.chdir(tmp_path)
    rc, out = run_cli(capsys, "eval", str(work / "run"))
    assert rc == 0 and "test accuracy" in out and "n=8" in out, out


# 4) the searches' Python API: out-of-range options fail before any data are read or outputs written


@pytest.mark.parametrize("kw,message", [
    ({"subset": 0}, "subset must be an integer >= 1 (training images used in all, or None: all of them), "
                    "got 0"),
    ({"search_n": 0}, "search_n must be an integer >= 1"),
    ({"val": 0}, "val must be an integer >= 1"),
    ({"retrain_epochs": -1}, "retrain_epochs must be an integer >= 0"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"bops_ratio": 0}, "bops_ratio must be a finite number > 0 (BOPs target = float all-conv3x3 net / "
                        "ratio, or None), got 0"),
    ({"bops_ratio": -2.0}, "bops_ratio must be a finite number > 0"),
    ({"bops_ratio": math.nan}, "bops_ratio must be a finite number > 0"),
    ({"lr": 0.0}, "lr must be a finite number > 0"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_qdarts_run_refuses_bad_options(kw: dict[str, Any], message: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import lowbit.data
    from lowbit.search.qdarts import QDARTSConfig, SearchSpace, qdarts_run

    monkeypatch.setattr(lowbit.data, "load_dataset", _must_not_run)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as e:
        qdarts_run("digits", out, SearchSpace(), QDARTSConfig(), **kw)
    assert str(e.value).startswith(f"qdarts_run: {message}")
    assert not out.exists()


@pytest.mark.parametrize("kw,message", [
    ({"episodes": 0}, "releq_run: episodes must be an integer >= 1 (episodes), got 0"),
    ({"proxy": 0}, "releq_run: proxy must be an integer >= 1 (training images), got 0"),
    ({"val": 0}, "releq_run: val must be an integer >= 1 (held-out training images), got 0"),
    ({"bops_budget": 0}, "releq_run: bops_budget must be a finite number > 0 (BOPs) or None (no limit), "
                         "got 0"),
    ({"bops_budget": math.inf}, "releq_run: bops_budget must be a finite number > 0 (BOPs) or None (no "
                                "limit), got inf"),
    ({"actions": []}, "releq: actions must be bit-widths in [1, 8] (a non-empty list), got []"),
    ({"act_actions": [9]}, "releq: act_actions must be bit-widths in [1, 8] (a non-empty list), got [9]"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_releq_run_refuses_bad_options(kw: dict[str, Any], message: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import lowbit.experiment

    monkeypatch.setattr(lowbit.experiment, "load_run", _must_not_run)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as e:
        lowbit.experiment.releq_run(tmp_path / "run", out, **kw)
    assert str(e.value) == message
    assert not out.exists()


def test_releq_run_budget_below_the_cheapest_writes_nothing(float_run: Path, tmp_path: Path) -> None:
    from lowbit.experiment import releq_run

    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"bops_budget 1 is below the cheapest assignment \(2, 2, 2\)"):
        releq_run(float_run, out, episodes=1, actions=[2, 4], proxy=16, val=16, bops_budget=1.0)
    assert not out.exists()  # no empty folder, no releq_measure.json
