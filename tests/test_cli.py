"""Every CLI command once, through ``lowbit.cli.main``: train, --resume, eval, report, export
(packed and ONNX), recipes, models, datasets, demo.

Tiny jobs: an MLP on scikit-learn's 8x8 digits (bundled, 1437 training images, 256 used), one
epoch of a few steps. The run is trained once per module and reused.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from lowbit import cli

TINY = ["--model", "mlp", "--model-arg", "hidden=[32,32]", "--model-arg", "in_features=64",
        "--data", "digits", "--subset", "256", "--batch-size", "64", "--schedule", "constant",
        "--seed", "0"]


pytestmark = pytest.mark.usefixtures("torch_formulas")  # the commands, not the fused kernels


def _main(*args: str) -> int:
    return cli.main(["--threads", "1", *args])


def _history(run: Path) -> list[dict]:
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines() if s.strip()]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "q"
    assert _main("train", *TINY, "--recipe", "lenet5-w1a4", "--epochs", "1", "--out", str(out)) == 0
    return out


def test_train_writes_a_run(run: Path) -> None:
    res = json.loads((run / "result.json").read_text())
    assert res["epochs"] == 1 and res["history"][0]["step"] == 4  # 256 images / 64
    # test_acc is the top-1 of the run's selected checkpoint on the test split, counted here
    from lowbit.experiment import load_run

    model, data, _ = load_run(run)
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in data.test)
    assert res["test_acc"] == hits / data.test.num_samples
    for f in ("best.safetensors", "checkpoint.safetensors", "config.json", "model.lowbit"):
        assert (run / f).is_file(), f
    assert res["size"]["packed_bytes"] < res["size"]["fp32_bytes"]


def test_resume_continues_from_the_checkpoint(run: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "q"
    shutil.copytree(run, out)
    assert _main("train", *TINY, "--recipe", "lenet5-w1a4", "--epochs", "2", "--out", str(out),
                 "--resume") == 0
    epochs = [h["epoch"] for h in _history(out) if "epoch" in h and not h.get("final")]
    assert epochs == [1, 2]  # epoch 1 from the first run, only epoch 2 trained now
    assert json.loads((out / "result.json").read_text())["epochs"] == 2


def test_eval(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _main("eval", str(run)) == 0
    acc = json.loads((run / "result.json").read_text())["test_acc"]
    assert f"test accuracy {acc:.2%}" in capsys.readouterr().out  # the same model, the same number


def test_report_of_run_and_file(run: Path, tmp_path: Path) -> None:
    assert _main("report", str(run), "--json", str(tmp_path / "r.json")) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    # lenet5-w1a4 on the MLP: float weights first and last, a float input first, binary / LSQ between
    assert [(r["name"], r["w_method"], r["a_method"]) for r in rep["rows"]] == [
        ("fc1", "float", "float"), ("fc2", "binary", "lsq"), ("fc3", "float", "lsq")]
    for r in rep["rows"]:  # counts from each layer's (out, in) shape
        n_out, n_in = r["shape"]
        assert r["params"] == n_out * n_in + n_out and r["macs"] == n_out * n_in, r
        assert r["bops"] == r["macs"] * r["w_bits"] * r["a_bits"], r
    assert rep["rows"][1]["code_bytes"] == 32 * 32 // 8  # one bit per binary weight
    assert rep["totals"]["params"] == sum(r["params"] for r in rep["rows"])
    assert rep["totals"]["file_bytes"] == (run / "model.lowbit").stat().st_size
    # the packed file alone: the same layers and bytes (no example input: no MACs)
    assert _main("report", str(run / "model.lowbit"), "--json", str(tmp_path / "f.json")) == 0
    rows = json.loads((tmp_path / "f.json").read_text())["rows"]
    assert [{**r, "macs": None, "bops": None} for r in rep["rows"]] == rows


def test_export_packed_and_onnx(run: Path, tmp_path: Path) -> None:
    import lowbit
    from lowbit.experiment import load_run

    packed = tmp_path / "m.lowbit"
    assert _main("export", str(run), "--out", str(packed)) == 0
    model, data, _ = load_run(run)
    model.eval()
    x = torch.randn(5, *data.in_shape)
    back = lowbit.load_packed(packed).eval()  # a zoo model rebuilds itself
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    pytest.importorskip("onnx")
    onnx_path = tmp_path / "m.onnx"
    assert _main("export", str(run), "--format", "onnx", "--out", str(onnx_path)) == 0
    pytest.importorskip("onnxruntime")
    from lowbit.export.onnx_export import run_onnx

    with torch.no_grad():  # the file computes the run's model: logits within 1e-4 of max(1, |logits|)
        ref = model(x)
    torch.testing.assert_close(torch.from_numpy(run_onnx(onnx_path, x)), ref, rtol=0,
                               atol=1e-4 * max(1.0, float(ref.abs().max())))


@pytest.mark.parametrize("cmd,expect", [("recipes", "lenet5-w1a4"), ("models", "resnet20"),
                                        ("datasets", "digits")])
def test_listings(cmd: str, expect: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(cmd) == 0
    assert expect in capsys.readouterr().out


def test_demo_on_a_data_subset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo has no data-subset option; its runs are made small here (256 MNIST images)."""
    import lowbit.demo as demo
    from lowbit.data import DatasetNotFoundError, load_dataset

    try:
        load_dataset("mnist")
    except DatasetNotFoundError as e:
        pytest.skip(f"MNIST is not installed here: {e}")
    small = functools.partial(demo.RunSpec, train_subset=256, val_size=256, batch_size=64)
    monkeypatch.setattr(demo, "RunSpec", small)
    assert _main("demo", "--out", str(tmp_path), "--fp-epochs", "1", "--q-epochs", "1") == 0
    for sub in ("fp", "quantized"):
        assert (tmp_path / sub / "result.json").is_file()
    assert (tmp_path / "quantized" / "model.lowbit").is_file()
