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
    res = train_run(RunSpec(model="mlp", model_kwargs={"hidden": [32]}, dataset="digits", batch_size=64,
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
    assert row["n"] == 360  # digits: 360 test images
    # the PyTorch side is the run's selected model: its accuracy is the run's own (to < 1 image)
    assert row["torch_acc"] == pytest.approx(res.test_acc, abs=1e-6)
    # the two accuracies differ by at most the share of images whose predictions disagree
    assert abs(row["onnx_acc"] - row["torch_acc"]) <= 1 - row["agreement"] + 1e-6
    markdown = (tmp_path / "out" / "onnx_mnist.md").read_text()
    assert meta["command"] in markdown and str(meta["git"]["commit"])[:12] in markdown
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["onnx_mnist.json", "onnx_mnist.md"]


def test_releq_counts_the_agents_assignments_also_when_resumed_after_the_oracle(tmp_path):
    from torch import nn

    from lowbit.search import ReLeQ

    releq_mnist = _load(BENCH / "search" / "releq_mnist.py")
    layers = [nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(16, 8), nn.Linear(8, 10)]

    def surface(bits: tuple[int, ...]) -> float:  # fewer bits cost accuracy, the first layer most
        return 0.99 - sum((6 - b) ** 2 * w for b, w in zip(bits, (4e-3, 1e-3, 1e-3, 2e-3), strict=True))

    cache = tmp_path / "cache.json"
    fresh, n = releq_mnist.run_agent(ReLeQ(surface, layers, 0.99, seed=0, cache_path=cache), 12)
    assert 0 < n == len(json.loads(cache.read_text())) < 625
    # what the oracle leaves in the cache: every assignment measured (written at once, not one by one)
    every = ReLeQ(surface, layers, 0.99).assignments()
    cache.write_text(json.dumps({",".join(map(str, b)): surface(b) for b in every}))
    agent = ReLeQ(surface, layers, 0.99, seed=0, cache_path=cache)
    resumed, again = releq_mnist.run_agent(agent, 12)
    assert len(agent.cache) == 625 and again == n  # the cache size would have said 625
    assert resumed.best_bits == fresh.best_bits and "accuracy" not in vars(agent)
