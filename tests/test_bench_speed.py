"""The speed benchmark (benchmarks/speed): best-baseline selection, the targets' met / not met
logic on constructed rows, the memory count of a packed model, and a quick run end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed"
sys.path.insert(0, str(SPEED))

import speed_report as sr  # noqa: E402


def _row(method: str, ms: float, model: str = "mlp", batch: int = 1, threads: int = 1) -> dict:
    return {"model": model, "batch": batch, "threads": threads, "method": method, "median_ms": ms}


def test_best_baselines_pick_the_fastest_of_each_family_per_row():
    rows = [
        _row("torch-fp32", 40.0), _row("ort-fp32", 30.0),
        _row("torch-dyn-int8", 7.0), _row("ort-dyn-int8", 9.0), _row("ort-qdq-int8", 6.0),
        _row("lowbit-w1a8", 3.0),
        # another batch of the same case: PyTorch is the faster FP32 there, dynamic ORT the faster int8
        _row("torch-fp32", 50.0, batch=8), _row("ort-fp32", 60.0, batch=8),
        _row("torch-dyn-int8", 12.0, batch=8), _row("ort-dyn-int8", 10.0, batch=8),
        _row("lowbit-w1a8", 20.0, batch=8),
    ]
    best = sr.best_baselines(rows)
    assert best[("mlp", 1, 1)] == {"fp32": ("ort-fp32", 30.0), "int8": ("ort-qdq-int8", 6.0)}
    assert best[("mlp", 8, 1)] == {"fp32": ("torch-fp32", 50.0), "int8": ("ort-dyn-int8", 10.0)}
    sr.add_ratios(rows)
    low1, low8 = rows[5], rows[10]
    assert low1["best_fp32"] == "ort-fp32" and low1["best_int8"] == "ort-qdq-int8"
    assert low1["speedup_vs_best_fp32"] == pytest.approx(10.0)
    assert low1["speedup_vs_best_int8"] == pytest.approx(2.0)
    assert low1["speedup_vs_torch_fp32"] == pytest.approx(40.0 / 3.0)
    assert low8["speedup_vs_best_fp32"] == pytest.approx(2.5)
    assert low8["speedup_vs_best_int8"] == pytest.approx(0.5)
    assert rows[0]["speedup_vs_best_fp32"] == pytest.approx(0.75)  # torch-fp32 against ORT's 30 ms
    with pytest.raises(ValueError, match="unknown method"):
        sr.family("tvm-int8")


def _target(text: str, results: list[dict], threads=1) -> dict:
    return next(r for r in results if r["target"] == text and r["threads"] == threads)


def test_targets_met_not_met_and_not_measured():
    rows = [_row("torch-fp32", 60.0), _row("ort-fp32", 50.0), _row("torch-dyn-int8", 10.0),
            _row("lowbit-w1a8", 2.0), _row("lowbit-w1a4", 2.1)]
    res = sr.evaluate_targets(sr.add_ratios(rows))
    binary = _target("MLP 8x4096^2, batch 1: binary >= 25x best FP32", res)
    # 50/2.0 = 25.0 meets the threshold exactly, 50/2.1 = 23.8 does not: the worst decides
    assert binary["met"] is False
    assert binary["measured"] == pytest.approx(50 / 2.1) and binary["worst"] == "w1a4"
    rows[-1]["median_ms"] = 2.0
    res = sr.evaluate_targets(sr.add_ratios(rows))
    assert _target("MLP 8x4096^2, batch 1: binary >= 25x best FP32", res)["met"] is True
    # binary vs best int8: 10 / 2 = 5 >= 2.5, but ternary rows are absent -> only binary counts
    int8 = _target("MLP 8x4096^2, batch 1: binary and ternary >= 2.5x best int8", res)
    assert int8["met"] is True and int8["measured"] == pytest.approx(5.0)
    ternary = _target("MLP 8x4096^2, batch 1: ternary >= 14x best FP32", res)
    assert ternary["met"] is None and ternary["measured"] is None
    gemv = res[-1]
    assert "GEMV" in gemv["target"] and gemv["met"] is None


def test_thread_and_transformer_targets():
    rows = []
    for b, t1, t2 in ((1, 1.0, 1.1), (8, 10.0, 5.0), (64, 40.0, 25.0)):
        rows += [_row("torch-fp32", 100.0, "lenet5", b, 1), _row("torch-fp32", 100.0, "lenet5", b, 2),
                 _row("lowbit-w1a4", t1, "lenet5", b, 1), _row("lowbit-w1a4", t2, "lenet5", b, 2)]
    rows += [_row("torch-fp32", 4.0, "bert512"), _row("lowbit-w2a8s", 2.5, "bert512")]
    res = sr.evaluate_targets(sr.add_ratios(rows))
    scale = next(r for r in res if r["target"].startswith("2 threads >= 1.7x"))
    # batch 8: 2.0x, batch 64: 1.6x -> not met, worst 1.6
    assert scale["met"] is False and scale["measured"] == pytest.approx(1.6)
    assert scale["worst"] == "lenet5/w1a4 b64"
    never = next(r for r in res if r["target"].startswith("2 threads never slower"))
    assert never["met"] is False and never["measured"] == pytest.approx(1 / 1.1)
    slower = _target("transformer encoder, batch 1: never slower than float PyTorch", res)
    assert slower["met"] is True
    twice = _target("transformer encoder, hidden >= 512, batch 1: >= 2x float PyTorch", res)
    assert twice["met"] is False and twice["measured"] == pytest.approx(1.6)


def test_gemv_row_is_read_from_the_gemv_results(tmp_path):
    assert sr.read_gemv(tmp_path / "gemv.json")["why"].startswith("not measured")
    layer = {"part": "layer", "N": 2048, "K": 2048, "batch": 1}
    rows = [
        {**layer, "threads": 1, "method": "ort-fp32", "median_ms": 0.5},
        {**layer, "threads": 2, "method": "lowbit-ternary", "median_ms": 0.03},
        {**layer, "threads": 1, "method": "lowbit-kernel-ternary", "median_ms": 0.05},
        {**layer, "threads": 1, "method": "lowbit-ternary", "median_ms": 0.07},
        {**layer, "N": 4096, "K": 4096, "threads": 1, "method": "lowbit-ternary", "median_ms": 0.2},
    ]
    (tmp_path / "gemv.json").write_text(json.dumps({"rows": rows}))
    g = sr.read_gemv(tmp_path / "gemv.json")
    assert g["ms"] == pytest.approx(0.07)
    res = sr.evaluate_targets([], g)[-1]
    assert res["met"] is False and res["measured"] == pytest.approx(0.07)
    res = sr.evaluate_targets([], {**g, "ms": 0.05})[-1]
    assert res["met"] is True


def test_held_bytes_counts_each_buffer_once():
    import harness

    a = np.zeros(1000, np.int8)
    t = torch.from_numpy(a)  # shares a's memory
    assert harness.held_bytes({"a": a, "view": a[10:], "t": t, "b": [np.zeros(3, np.float64)]}) == 1024
    assert harness.held_bytes({"m": torch.nn.Linear(10, 10)}) == 0  # modules other than the runtime's


def test_quick_run_writes_every_column(tmp_path):
    import harness

    payload = harness.run_speed_benchmark(cases=["mlp-quick"], threads=[1], quick=True, out_dir=tmp_path)
    data = json.loads((tmp_path / "speed.json").read_text())
    md = (tmp_path / "speed.md").read_text()
    assert (tmp_path / "speed.png").is_file()
    assert not (tmp_path / "speed.partial.json").exists()
    methods = {r["method"] for r in data["rows"]}
    assert methods == {"torch-fp32", "ort-fp32", "torch-dyn-int8", "ort-dyn-int8", "ort-qdq-int8",
                       "lowbit-w1a4", "lowbit-w1a1"}
    assert {r["batch"] for r in data["rows"]} == {1, 8}
    keys = {"threads", "model", "batch", "method", "median_ms", "min_ms", "p90_ms", "rounds",
            "throughput_per_s", "speedup_vs_torch_fp32", "speedup_vs_best_fp32", "speedup_vs_best_int8",
            "best_fp32", "best_int8", "weight_bytes", "weight_bytes_in_memory"}
    for r in data["rows"]:
        assert keys <= set(r), keys - set(r)
        assert r["speedup_vs_best_fp32"] is not None and r["speedup_vs_best_int8"] is not None
        if r["method"].startswith("lowbit-"):
            # the packed model computes the quantized network's integer arithmetic exactly
            assert r["max_rel_diff_vs_fakequant_fp64"] < 1e-5
            # stored planes are 1/32 of float32; the in-memory count adds the runtime's copies
            assert r["weight_bytes"] < 0.05 * 4 * 3 * 256 * 257
            assert r["weight_bytes_in_memory"] >= r["weight_bytes"] + r["int8_copy_bytes"] - 8 * 3 * 256
    for col in ("vs best FP32", "vs best int8", "weight bytes", "in memory", "rel. diff to fp64",
                "## Targets"):
        assert col in md
    assert len(payload["targets"]) == len(data["targets"]) > 10
    assert all(t["met"] is None for t in data["targets"])  # the quick MLP is not the 4096-wide case


def test_resume_reuses_finished_cases_only_under_the_same_settings_and_code(tmp_path, monkeypatch):
    """A killed run leaves speed.partial.json; --resume times only the cases it had not finished,
    and only when the settings and the code (git commit, dirty or not) are those of the killed run."""
    import copy

    import harness

    real, timed, cache = harness.run_case, [], {}

    def run_case(name, *args):
        timed.append(name)
        if name == "lenet5" and fail:
            raise KeyboardInterrupt  # the kill, after mlp-quick finished
        if name not in cache:  # each case timed for real once; later "timings" are copies
            cache[name] = real(name, *args)
        return copy.deepcopy(cache[name])

    monkeypatch.setattr(harness, "run_case", run_case)
    code = {"commit": "a" * 40, "dirty": False}
    monkeypatch.setattr(harness, "git_state", lambda _root: dict(code))
    kw = dict(cases=["mlp-quick", "lenet5"], threads=[1], batches=[1], quick=True, out_dir=tmp_path)
    fail = True
    with pytest.raises(KeyboardInterrupt):
        harness.run_speed_benchmark(**kw)
    partial = json.loads((tmp_path / "speed.partial.json").read_text())
    assert list(partial["cases"]) == ["mlp-quick"] and timed == ["mlp-quick", "lenet5"]
    fail, timed[:] = False, []
    out = harness.run_speed_benchmark(**kw, resume=True)
    assert timed == ["lenet5"]  # the finished case is reused, not timed again
    assert {r["model"] for r in out["rows"]} == {"mlp-quick", "lenet5"}
    assert not (tmp_path / "speed.partial.json").exists()
    for change in ({"commit": "b" * 40}, {"dirty": True}, {"seed": 1}):  # other code, other settings
        fail, timed[:] = True, []
        with pytest.raises(KeyboardInterrupt):
            harness.run_speed_benchmark(**kw)
        fail, timed[:] = False, []
        code.update({k: v for k, v in change.items() if k != "seed"})
        harness.run_speed_benchmark(**kw, seed=change.get("seed", 0), resume=True)
        assert timed == ["mlp-quick", "lenet5"], change  # nothing reused
        code.update(commit="a" * 40, dirty=False)
