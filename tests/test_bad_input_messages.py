"""Bad inputs to export, the atomic writer, ``quantize``, PTQ calibration and the CLI give errors
that say what was wrong and what would be right (CLI: ``error: ...`` and exit status 2)."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli_run import run_cli
from torch import nn

import lowbit
from lowbit import cli
from lowbit._io import atomic_path, atomic_write
from lowbit.export import export_onnx
from lowbit.export.onnx_export import run_onnx
from lowbit.models import build_model
from lowbit.ptq import calibration_batches
from lowbit.recipe import load_recipe

TINY = ["--model", "mlp", "--model-arg", "hidden=[16]", "--model-arg", "in_features=64",
        "--data", "digits", "--subset", "128", "--batch-size", "64", "--epochs", "1", "--seed", "0"]


pytestmark = pytest.mark.usefixtures("torch_formulas")  # the commands, not the fused kernels


_main = run_cli


@pytest.fixture(scope="module")
def lenet() -> nn.Module:
    # seeded: with weights drawn from whatever state earlier tests left the global generator in, an
    # activation can land within float rounding of a code boundary, where onnxruntime's order of
    # operations picks the other code (the 1e-4 check below then fails for reasons of test order)
    torch.manual_seed(0)
    return lowbit.quantize(build_model("lenet5"), load_recipe("lenet5-w1a4"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A float run and a quantized run of a tiny MLP on the bundled digits."""
    root = tmp_path_factory.mktemp("bad_input")
    out = {"float": root / "rf", "quant": root / "rq"}
    assert cli.main(["--threads", "1", "train", *TINY, "--out", str(out["float"])]) == 0
    assert cli.main(["--threads", "1", "train", *TINY, "--recipe", "lenet5-w1a4",
                     "--out", str(out["quant"])]) == 0
    return out


# a) ONNX export: input_shape is one sample without the batch dimension


def test_onnx_shape_with_batch_dimension(lenet: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as e:
        export_onnx(lenet, tmp_path / "a.onnx", (1, 1, 28, 28))
    msg = str(e.value)
    assert ("the model failed on an example of shape (1, 1, 1, 28, 28) made from "
            "input_shape=(1, 1, 28, 28)") in msg
    assert "Expected 3D (unbatched) or 4D (batched) input to conv2d" in msg  # the cause
    assert "input_shape is ONE sample without the batch dimension, e.g. (1, 28, 28)" in msg
    assert not (tmp_path / "a.onnx").exists()


def test_onnx_shape_of_the_wrong_size(lenet: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as e:
        export_onnx(lenet, tmp_path / "a.onnx", (1, 32, 32))
    msg = str(e.value)
    assert "example of shape (1, 1, 32, 32) made from input_shape=(1, 32, 32)" in msg
    assert "shape '[-1, 400]' is invalid" in msg
    assert "ONE sample without the batch dimension, e.g. (1, 28, 28)" in msg


def test_onnx_right_shape_still_exports(lenet: nn.Module, tmp_path: Path) -> None:
    rep = export_onnx(lenet, tmp_path / "a.onnx", (1, 28, 28))
    assert len(rep.rows) == 5
    # the file computes the model (eval mode, as exported): logits within 1e-4 of max(1, |logits|)
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = copy.deepcopy(lenet).eval()(x).numpy()
    pytest.importorskip("onnxruntime")
    got = run_onnx(tmp_path / "a.onnx", x)
    assert got.shape == (64, 10) and (got.argmax(1) == ref.argmax(1)).all()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


def test_onnx_tensor_example_errors_are_the_models_own(lenet: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="Expected 3D"):  # a tensor is used as given: no shape advice
        export_onnx(lenet, tmp_path / "a.onnx", torch.zeros(1, 1, 1, 28, 28))


# b) the atomic writer refuses an empty path or a folder before writing


def test_atomic_path_refuses_a_directory(tmp_path: Path) -> None:
    d = tmp_path / "somedir"
    d.mkdir()
    msg = f"{d} is a directory; give a file path such as {d}/x.json"
    with pytest.raises(IsADirectoryError, match=f"^{re.escape(msg)}$"), atomic_path(d, "x.json"):
        raise AssertionError("the body must not run")
    assert os.listdir(d) == [] and sorted(os.listdir(tmp_path)) == ["somedir"]  # no temp file left


def test_atomic_write_refuses_an_empty_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^the output path is empty; give a file path such as "
                                         r"model\.lowbit$"):
        atomic_write("", b"x")
    assert os.listdir(tmp_path) == []


def test_save_packed_to_a_directory(lenet: nn.Module, tmp_path: Path) -> None:
    msg = f"{tmp_path} is a directory; give a file path such as {tmp_path}/model.lowbit"
    with pytest.raises(IsADirectoryError, match=f"^{re.escape(msg)}$"):
        lowbit.save_packed(lenet, tmp_path)
    with pytest.raises(ValueError, match="output path is empty"):
        lowbit.save_packed(lenet, "")
    assert os.listdir(tmp_path) == []


def test_cli_export_to_a_directory(runs: dict[str, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    for fmt, name in (("lowbit", "model.lowbit"), ("onnx", "model.onnx")):
        rc, out = _main(capsys, "export", str(runs["quant"]), "--format", fmt, "--out", str(tmp_path))
        assert rc == 2, out
        assert f"error: {tmp_path} is a directory; give a file path such as {tmp_path}/{name}" in out
    assert os.listdir(tmp_path) == []


def test_cli_turns_other_os_errors_into_exit_2(runs: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("a file, not a folder")
    f, m = tmp_path / "f", tmp_path / "f" / "m"
    rc, out = _main(capsys, "export", str(runs["quant"]), "--format", "lowbit", "--out", str(m))
    assert rc == 2, out
    assert out == f"error: {f} is a file, not a folder: {m} cannot be written inside it"


# c) CLI messages name the path that is wrong and what a CLI user can do


@pytest.mark.parametrize("cmd", [["eval"], ["report"], ["export", "--format", "onnx", "--out", "x.onnx"]])
def test_cli_missing_run(cmd: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "x" / "[red]nonexistent_run"  # printed as it is, not read as rich markup
    rc, out = _main(capsys, cmd[0], str(missing), *cmd[1:])
    assert rc == 2
    assert out == (f"error: {missing} does not exist; give a run directory written by `lowbit train` or a "
                   ".safetensors checkpoint in one")


def test_cli_report_missing_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    rc, out = _main(capsys, "report", "model.pt")
    assert rc == 2 and out.startswith("error: model.pt does not exist;"), out


def test_cli_float_run_has_nothing_to_pack(runs: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    rf = runs["float"]
    rc, out = _main(capsys, "export", str(rf), "--format", "lowbit", "--out", str(tmp_path / "m.lowbit"))
    assert rc == 2
    assert out == (f"error: {rf} is a float run (trained without --recipe): nothing to pack; train with "
                   f"--recipe, or run `lowbit ptq {rf} --out F.lowbit`")
    rc, out = _main(capsys, "report", str(rf))
    assert rc == 2 and f"error: {rf} is a float run (trained without --recipe)" in out
    assert "lowbit_recipe" not in out and not (tmp_path / "m.lowbit").exists()
    rc, out = _main(capsys, "export", str(rf), "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert rc == 0 and (tmp_path / "m.onnx").is_file()  # a float ONNX model is still fine


# d) PTQ calibration takes at least one sample


def test_cli_ptq_calib_zero(runs: dict[str, Path], tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _main(capsys, "ptq", str(runs["float"]), "--calib", "0", "--out", str(tmp_path / "p.lowbit"))
    assert rc == 2 and out == "error: --calib must be >= 1, got 0"
    assert not (tmp_path / "p.lowbit").exists()


def test_calibration_batches_needs_one_sample() -> None:
    loader = [(torch.zeros(4, 2), torch.zeros(4))] * 3
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        calibration_batches(loader, 0)
    assert len(calibration_batches(loader, 5)) == 2  # 4 + 4 >= 5


# e) quantize takes a module


def test_quantize_a_name_instead_of_a_module() -> None:
    with pytest.raises(TypeError, match=r"^model must be an nn.Module, got str \(e.g. "
                                        r"lowbit.models.build_model\('lenet5'\)\)$"):
        lowbit.quantize("lenet5", load_recipe("lenet5-w1a4"))  # type: ignore[arg-type]
