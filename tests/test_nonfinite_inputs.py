"""NaN/Inf in a model or its data: saving, ONNX export and multipoint calibration refuse them and
name where they are; the uniform activation's running maximum ignores them; a diverged run says
that the model in memory is not usable."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
import lowbit.export.onnx_export as onnx_export
import lowbit.export.packed as packed
from lowbit.models import build_model
from lowbit.ptq import multipoint_ptq
from lowbit.ptq.multipoint import input_grams
from lowbit.quant.uniform import UniformActivation
from lowbit.train import Trainer, TrainingDiverged

RECIPE = {
    "default": {"weight": {"method": "uniform", "bits": 2}, "activation": {"method": "pact", "bits": 4}},
    "rules": [{"match": "@first", "activation": None}],  # the raw inputs are signed
}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=5, in_features=16, hidden=[32, 32])
    lowbit.quantize(model, RECIPE)
    return model.eval()


def _lenet() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("lenet5")
    lowbit.quantize(model, RECIPE)
    return model.eval()


# (model, state key to poison, what the message must name)
POISON = {
    "latent weight": (_mlp, "fc2.parametrizations.weight.original", "layer 'fc2', its latent weight"),
    "bias": (_mlp, "fc2.bias", "module 'fc2', tensor 'bias'"),
    "pact alpha": (_mlp, "fc2.input_quantizer.alpha", "tensor 'alpha'"),
    "batch-norm statistic": (_lenet, "bn3.running_var", "module 'bn3', tensor 'running_var'"),
}


def _poisoned(case: str, value: float = math.nan) -> tuple[nn.Module, str, str]:
    build, key, names = POISON[case]
    model = build()
    with torch.no_grad():
        model.state_dict()[key].view(-1)[0] = value
    return model, key, names


# ---------------------------------------------------------------- save_packed


@pytest.mark.parametrize("case", list(POISON))
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_save_packed_refuses_a_nonfinite_model(tmp_path: Path, case: str, value: float) -> None:
    model, key, names = _poisoned(case, value)
    path = tmp_path / "m.lowbit"
    with pytest.raises(ValueError) as e:
        lowbit.save_packed(model, path)
    msg = str(e.value)
    assert repr(key) in msg and names in msg
    assert "NaN/Inf" in msg and "diverged" in msg and "checkpoint" in msg
    assert "encode(w).decode()" not in msg  # not blamed on the quantizer's contract
    assert not path.exists()


def test_save_packed_of_a_clean_model_is_unchanged_by_the_check(tmp_path: Path, monkeypatch) -> None:
    model = _lenet()
    checked = lowbit.save_packed(model, tmp_path / "checked.lowbit")
    monkeypatch.setattr(packed, "check_finite", lambda named, action: None)
    lowbit.save_packed(model, tmp_path / "unchecked.lowbit")
    assert checked == (tmp_path / "unchecked.lowbit").stat().st_size
    assert (tmp_path / "checked.lowbit").read_bytes() == (tmp_path / "unchecked.lowbit").read_bytes()
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(lowbit.load_packed(tmp_path / "checked.lowbit")(x), model(x))


# ---------------------------------------------------------------- ONNX


@pytest.mark.parametrize("case", list(POISON))
def test_export_onnx_refuses_a_nonfinite_model_before_tracing(tmp_path: Path, monkeypatch, case: str) -> None:
    pytest.importorskip("onnx")
    model, key, names = _poisoned(case)

    def no_trace(*args, **kwargs):
        raise AssertionError("the model was traced before its values were checked")

    monkeypatch.setattr(onnx_export, "_prepare", no_trace)
    shape = (1, 28, 28) if case == "batch-norm statistic" else (16,)
    path = tmp_path / "m.onnx"
    with pytest.raises(ValueError) as e:
        onnx_export.export_onnx(model, path, shape)
    msg = str(e.value)
    assert repr(key) in msg and names in msg and "NaN/Inf" in msg
    assert not path.exists()


def test_export_onnx_of_a_clean_model_still_matches_it(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = _mlp()
    onnx_export.export_onnx(model, tmp_path / "m.onnx", (16,))
    x = torch.randn(8, 16)
    with torch.no_grad():
        ref = model(x).numpy()
    got = onnx_export.run_onnx(tmp_path / "m.onnx", x)
    assert abs(got - ref).max() <= 1e-5 * max(1.0, float(abs(ref).max()))


# ---------------------------------------------------------------- multipoint PTQ


def _float_mlp() -> nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", num_classes=5, in_features=16, hidden=[32, 32, 32]).eval()


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_multipoint_refuses_a_nonfinite_calibration_batch(value: float) -> None:
    torch.manual_seed(1)
    batches = [torch.randn(8, 16) for _ in range(3)]
    batches[1][0, 0] = value
    batches[1][2, 3] = value
    model = _float_mlp()
    with pytest.raises(ValueError, match=r"calibration batch 1 holds 2 NaN/Inf value\(s\) of 128"):
        multipoint_ptq(model, batches, bits=2, budget=1.5)
    assert getattr(model, "lowbit_recipe", None) is None  # refused before quantizing


def test_multipoint_names_the_layer_behind_nan_weights() -> None:
    model = _float_mlp()
    with torch.no_grad():
        model.fc2.weight[3, 4] = math.nan
    with pytest.raises(ValueError, match="layer 'fc3': the Gram matrix"):
        input_grams(model, {"fc3": model.fc3}, [torch.randn(8, 16)])


def test_multipoint_on_clean_batches_uses_the_inputs_gram() -> None:
    torch.manual_seed(1)
    batches = [torch.randn(8, 16) for _ in range(3)]
    model = _float_mlp()
    grams = input_grams(model, {"fc1": model.fc1}, batches)
    x = torch.cat(batches).double()
    torch.testing.assert_close(grams["fc1"], x.T @ x)
    rows = multipoint_ptq(model, batches, bits=2, budget=1.5)
    assert rows and all(math.isfinite(r.rel_output_error) and r.rel_output_error <= r.rel_output_error_1
                        for r in rows)


# ---------------------------------------------------------------- uniform running maximum


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_uniform_running_max_ignores_a_nonfinite_batch(value: float) -> None:
    q = UniformActivation(4).train()
    q(torch.rand(4, 8) * 3)
    q(torch.rand(4, 8) * 2)
    before = q.running_max.clone()
    bad = torch.rand(4, 8)
    bad[1, 2] = value
    q(bad)
    assert torch.equal(q.running_max, before)
    clean = torch.rand(4, 8) * 5  # and the next finite batch folds in as ever
    q(clean)
    expected = before * (1 - q.momentum) + clean.max() * q.momentum
    assert torch.equal(q.running_max, expected)


def test_uniform_first_batch_nonfinite_leaves_it_uninitialized() -> None:
    q = UniformActivation(4).train()
    q(torch.full((2, 3), math.nan))
    assert not q.is_initialized()
    x = torch.rand(2, 3)
    q(x)
    assert q.is_initialized() and torch.equal(q.running_max, x.max())


# ---------------------------------------------------------------- diverged training


def test_diverged_run_says_the_model_in_memory_is_not_usable(tmp_path: Path) -> None:
    calls = {"n": 0}

    class Data:  # 4 batches; the 6th one served (epoch 2, step 2) holds a NaN
        def __len__(self) -> int:
            return 4

        def __iter__(self):
            for i in range(4):
                calls["n"] += 1
                g = torch.Generator().manual_seed(i)
                x = torch.randn(8, 16, generator=g)
                if calls["n"] == 6:
                    x[0, 0] = math.nan
                yield x, torch.randint(0, 5, (8,), generator=g)

    cfg = {"epochs": 3, "optimizer": "sgd", "lr": 0.01, "tensorboard": False, "log_every": 4}
    with pytest.raises(TrainingDiverged) as e:
        Trainer(_mlp(), Data(), None, cfg, tmp_path).fit()
    msg = str(e.value)
    assert "epoch 2" in msg and "not usable" in msg and "took 3 optimizer step(s)" in msg
    assert f"checkpoint {tmp_path / 'checkpoint.safetensors'} was left untouched" in msg
    calls["n"] = 0  # without a run directory there is no checkpoint to point to
    with pytest.raises(TrainingDiverged) as e:
        Trainer(_mlp(), Data(), None, cfg).fit()
    assert "not usable" in str(e.value) and "No checkpoint of this run" in str(e.value)
