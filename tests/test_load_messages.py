"""Loading a damaged, foreign or misplaced file fails with an error that names the file and says what
to do instead, and ``lowbit bench speed`` runs only its own checkout's harness."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit import cli, quantize, save_packed
from lowbit._io import claim_settings
from lowbit.data import DatasetFormatError
from lowbit.data import datasets as D
from lowbit.models import build_model
from lowbit.recipe import RecipeError, load_recipe
from lowbit.search.releq import ReLeQ
from lowbit.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_weights,
    read_checkpoint,
    save_checkpoint,
)


class Evil:
    """A pickle payload that would create ``marker`` if it ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def packed(path: Path, model: str = "lenet5") -> Path:
    """A binary-weight zoo ``model`` saved as a packed .lowbit file at ``path``."""
    save_packed(quantize(build_model(model), {"default": {"weight": {"method": "binary", "bits": 1}}}).eval(),
                path)
    return path


def flat(text: str) -> str:
    """``text`` without whitespace: the CLI's console wraps long lines (and paths) anywhere."""
    return "".join(text.split())


# ---- problem 4: damaged JSON records --------------------------------------------------------------

@pytest.mark.parametrize("content", ['{"lr": 0.1, "see', "", b"\x89PNG\r\n\x1a\n", "[1, 2]"],
                         ids=["truncated", "empty", "binary", "not-an-object"])
def test_claim_settings_names_a_damaged_record(tmp_path: Path, content: str | bytes) -> None:
    state, record = tmp_path / "state.safetensors", tmp_path / "settings.json"
    state.write_bytes(b"x")
    record.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ValueError) as e:
        claim_settings(state, record, {"lr": 0.1})
    msg = str(e.value)
    assert str(record) in msg and "delete settings.json and state.safetensors" in msg
    assert record.read_bytes() == (content.encode() if isinstance(content, str) else content)  # kept


@pytest.mark.parametrize("content", ['{"2,2": 0.5, "3', '["2,2"]', '{"2,2": "high"}'],
                         ids=["truncated", "not-an-object", "not-a-number"])
def test_releq_names_a_damaged_cache(tmp_path: Path, content: str) -> None:
    cache = tmp_path / "releq_cache.json"
    cache.write_text(content)
    with pytest.raises(ValueError) as e:
        ReLeQ(lambda bits: 0.5, [nn.Linear(2, 2), nn.Linear(2, 2)], 0.9, cache_path=cache)
    assert str(cache) in str(e.value) and "delete it to measure the assignments again" in str(e.value)


# ---- problem 6: recipe files that are not YAML text ----------------------------------------------

def test_recipe_that_is_a_binary_file(tmp_path: Path) -> None:
    packed(tmp_path / "model.lowbit")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    for name in ("image.png", "model.lowbit"):
        with pytest.raises(RecipeError, match="is not a UTF-8 YAML text file") as e:
            load_recipe(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and "give a recipe YAML file" in str(e.value)


def test_recipe_that_is_a_directory(tmp_path: Path) -> None:
    d = tmp_path / "w1a4.yaml"
    d.mkdir()
    with pytest.raises(RecipeError, match="is a directory; give a recipe YAML file") as e:
        load_recipe(d)
    assert str(d) in str(e.value)


# ---- problem 7: checkpoints ------------------------------------------------------------------------

@pytest.mark.parametrize("load,name", [
    (lambda d: read_checkpoint(d), "checkpoint.safetensors"),
    (lambda d: load_checkpoint(d, build_model("lenet5")), "checkpoint.safetensors"),
    (lambda d: load_weights(build_model("lenet5"), d), "best.safetensors"),
], ids=["read_checkpoint", "load_checkpoint", "load_weights"])
def test_loading_a_directory_names_the_file_in_it(tmp_path: Path, load, name: str) -> None:
    with pytest.raises(IsADirectoryError) as e:
        load(tmp_path)
    assert f"{tmp_path} is a directory" in str(e.value) and str(tmp_path / name) in str(e.value)


def test_save_checkpoint_into_a_directory_suggests_a_checkpoint_name(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError) as e:
        save_checkpoint(tmp_path, build_model("lenet5"))
    assert str(tmp_path / "checkpoint.safetensors") in str(e.value) and "model.lowbit" not in str(e.value)


@pytest.mark.parametrize("load", [
    lambda p: load_weights(build_model("lenet5"), p),
    lambda p: load_checkpoint(p, build_model("lenet5")),
], ids=["load_weights", "load_checkpoint"])
def test_a_packed_model_given_as_weights_names_load_packed(tmp_path: Path, load) -> None:
    p = packed(tmp_path / "model.lowbit")
    with pytest.raises(CheckpointError) as e:
        load(p)
    msg = str(e.value)
    assert f"{p} is a packed model" in msg and "lowbit.load_packed(" in msg and "best.safetensors" in msg


def test_init_with_a_packed_model_on_the_command_line(tmp_path: Path, capsys) -> None:
    p = packed(tmp_path / "model.lowbit", "mlp")
    argv = ["--threads", "1", "train", "--model", "mlp", "--data", "digits", "--init", str(p),
            "--epochs", "1", "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 2  # refused at --init, before any training
    out = flat(capsys.readouterr().out)
    assert flat(f"{p} is a packed model") in out and "--inittake" in out


def _mnist_pickle(marker: Path) -> bytes:
    return gzip.compress(pickle.dumps(((Evil(marker), None), (None, None), (None, None)), protocol=2))


def _cifar_dir(root: Path, marker: Path) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for n in D._CIFAR_FILES:
        (d / n).write_bytes(pickle.dumps({b"data": Evil(marker), b"labels": [1]}, protocol=4))
    return d


def test_refused_dataset_pickles_name_the_file(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    mnist = tmp_path / "mnist.pkl.gz"
    mnist.write_bytes(_mnist_pickle(marker))
    with pytest.raises(DatasetFormatError) as e:
        D.read_mnist_pickle(mnist)
    assert str(mnist) in str(e.value) and "refusing to load global" in str(e.value)
    assert "original file" in str(e.value)
    assert isinstance(e.value, pickle.UnpicklingError)  # callers catching that still do
    cifar = _cifar_dir(tmp_path / "c", marker)
    with pytest.raises(DatasetFormatError) as e:
        D.read_cifar10_batches(cifar)
    assert str(cifar / "data_batch_1") in str(e.value) and "original file" in str(e.value)
    assert f"refusing to load global {os.system.__module__}.system" in str(e.value)
    assert not marker.exists()


def test_a_refused_dataset_pickle_on_the_command_line(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    cifar = _cifar_dir(tmp_path / "data", marker)
    argv = ["--threads", "1", "train", "--model", "lenet5", "--data", "cifar10", "--data-dir",
            str(tmp_path / "data"), "--epochs", "1", "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 2  # an error line, not a traceback
    out = flat(capsys.readouterr().out)
    assert flat(f"{cifar / 'data_batch_1'} cannot be read as a dataset pickle") in out
    assert not marker.exists()


# ---- problem 8: lowbit bench speed runs only its own checkout's harness ------------------------------

def _planted_harness(root: Path, marker: Path) -> None:
    """A benchmarks/speed/bench_speed.py under ``root`` that writes ``marker`` when it is run."""
    script = root / "benchmarks" / "speed" / "bench_speed.py"
    script.parent.mkdir(parents=True)
    script.write_text(f"open({str(marker)!r}, 'w').close()\n"
                      "def run_speed_benchmark(**kwargs):\n    pass\n")


def test_bench_speed_ignores_a_harness_in_the_current_directory(tmp_path: Path, monkeypatch) -> None:
    marker, ran = tmp_path / "planted-ran", tmp_path / "checkout-harness-ran"
    _planted_harness(tmp_path / "cwd", marker)
    monkeypatch.chdir(tmp_path / "cwd")
    # the checkout's own harness is swapped for a stub that records its arguments (the real one is slow)
    checkout = Path(cli.__file__).resolve().parents[2] / "benchmarks" / "speed" / "bench_speed.py"
    stub = tmp_path / "stub.py"
    stub.write_text("from pathlib import Path\n\n"
                    f"def run_speed_benchmark(**kwargs):\n    Path({str(ran)!r}).write_text(repr(kwargs))\n")
    real = importlib.util.spec_from_file_location

    def spec_from_file_location(name, location, *args, **kwargs):
        if Path(location).resolve() == checkout:
            location = stub
        return real(name, location, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "spec_from_file_location", spec_from_file_location)
    assert cli.main(["bench", "speed", "--quick", "--out", str(tmp_path / "out")]) == 0
    assert not marker.exists()
    assert "'quick': True" in ran.read_text()


def test_bench_speed_outside_a_source_checkout_says_so(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "planted-ran"
    _planted_harness(tmp_path, marker)  # where parents[2] of an installed lowbit/cli.py would point
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "lowbit" / "cli.py"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "speed", "--quick", "--out", str(tmp_path / "out")])
    assert "needs a source checkout" in str(e.value) and "pip install -e" in str(e.value)
    assert str(tmp_path / "site-packages" / "lowbit") in str(e.value)
    assert not marker.exists()


def test_a_checkpoint_file_still_loads(tmp_path: Path) -> None:
    # the checks above catch only directories and packed files
    m = build_model("lenet5")
    p = save_checkpoint(tmp_path / "checkpoint.safetensors", m)
    m2 = build_model("lenet5")
    load_checkpoint(p, m2)
    for a, b in zip(m.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
