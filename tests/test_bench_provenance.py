"""The reproduction scripts that build on the repro suite's float LeNet-5 reach it with the
arguments ``run_mnist.fp_run`` takes, and the ONNX benchmark writes its provenance."""

from __future__ import annotations

import importlib.util
import inspect
import json
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _ReachedError(Exception):
    pass


@pytest.mark.parametrize("script", ["multipoint_mnist", "distill_mnist", "sinreq_mnist", "wpc_mnist",
                                    "rvsm_mnist"])
def test_scripts_ask_fp_run_for_the_suites_seed0_float_model(script, monkeypatch):
    run_mnist = _load(BENCH / "repro" / "run_mnist.py")
    module = _load(BENCH / "repro" / f"{script}.py")
    signature = inspect.signature(run_mnist.fp_run)
    asked = {}

    def fake(*args, **kwargs):
        asked.update(signature.bind(*args, **kwargs).arguments)  # TypeError where the call does not fit
        raise _ReachedError

    monkeypatch.setattr(module, "fp_run", fake)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(_ReachedError):
            module.main([])
    finally:
        torch.set_num_threads(threads)
    # the run the repro suite trains by default: its --runs-dir, --fp-epochs, width 1, seed 0
    assert asked["dataset"] in ("mnist", "fashion_mnist")
    assert asked["runs"] == Path("runs/repro-val") and asked["epochs"] == 10
    assert asked["width"] == 1.0 and asked["seed"] == 0


def test_onnx_mnist_records_its_provenance(tmp_path):
    from lowbit.experiment import RunSpec, train_run

    run = tmp_path / "run"
    train_run(RunSpec(model="mlp", model_kwargs={"hidden": [32]}, dataset="digits", batch_size=64,
                      recipe={"default": {"weight": {"method": "binary", "bits": 1}}},
                      train={"epochs": 1, "seed": 0}, out=str(run)))
    onnx_mnist = _load(BENCH / "export" / "onnx_mnist.py")
    threads = torch.get_num_threads()
    assert onnx_mnist.main([str(run), "--out", str(tmp_path / "out")]) == 0
    payload = json.loads((tmp_path / "out" / "onnx_mnist.json").read_text())
    meta = payload["meta"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCH, capture_output=True, text=True)
    if head.returncode == 0:
        assert meta["git"]["commit"] == head.stdout.strip() and isinstance(meta["git"]["dirty"], bool)
    assert meta["command"] == f"python benchmarks/export/onnx_mnist.py {run} --out {tmp_path / 'out'}"
    assert meta["machine"]["cpus"] >= 1 and meta["machine"]["torch_threads"] == threads
    assert meta["versions"]["torch"] == torch.__version__ and meta["onnxruntime"]
    assert meta["opset"] == 21 and meta["wall_time_s"] >= 0
    (row,) = payload["rows"]
    assert row["n"] == 360 and 0.0 <= row["agreement"] <= 1.0  # digits: 360 test images
    markdown = (tmp_path / "out" / "onnx_mnist.md").read_text()
    assert meta["command"] in markdown and str(meta["git"]["commit"])[:12] in markdown
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["onnx_mnist.json", "onnx_mnist.md"]
