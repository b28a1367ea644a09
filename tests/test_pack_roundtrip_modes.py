"""Round trips that depend on the model's mode or on training wrappers: models packed in train mode
(``mixed``, BinaryRelax), ``binary_relax`` runs through ``load_run`` and ``.lowbit``, damaged run
configurations, and the messages and dtypes of ``load_packed``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import lowbit
import lowbit.runtime as rt
from lowbit import cli
from lowbit.experiment import RunSpec, load_run, train_run
from lowbit.export import FormatError, load_packed, read_packed, save_packed
from lowbit.models import build_model
from lowbit.train import CheckpointError
from lowbit.train.binary_relax import BinaryRelax, RelaxedWeight

pytestmark = pytest.mark.usefixtures("one_thread", "torch_formulas")

MIXED = {"name": "mixed-w248", "default": {"weight": {"method": "mixed", "bits": 4, "candidates": [2, 8]}}}


def _train_steps(model: torch.nn.Module, steps: int = 3) -> None:
    """A few Adam steps in train mode: learned scales, mixture logits and BN statistics move."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 1, 28, 28, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _quantized_lenet(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "mixed":
        return lowbit.quantize(build_model("lenet5"), MIXED)
    m = lowbit.quantize(build_model("lenet5"), lowbit.load_recipe("binaryrelax-w1a4"))
    BinaryRelax(m, eta0=1.0, growth=1.02, per_epoch=2, steps_per_epoch=4, hard_epoch=6)
    return m


@pytest.mark.parametrize("kind", ["mixed", "binary_relax"])
def test_train_mode_model_packs_its_eval_mode_weights(tmp_path: Path, kind: str) -> None:
    m = _quantized_lenet(kind)
    _train_steps(m)
    m.get_submodule("conv1").eval()  # one module in another mode: every flag must come back as it was
    modes = {n: sub.training for n, sub in m.named_modules()}
    p = tmp_path / "m.lowbit"
    save_packed(m, p)  # still in train mode
    assert {n: sub.training for n, sub in m.named_modules()} == modes
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m.eval()(x)
        out = load_packed(p)(x)
    assert torch.equal(out, ref)
    # a RelaxedWeight is stored as the quantizer it wraps: no eta/hard, no "inner." step
    pf = read_packed(p)
    assert not [k for k in pf.state if k.endswith((".eta", ".hard")) or ".inner." in k]
    assert {rec.weight["method"] for rec in pf.layers.values() if rec.weight} == (
        {"mixed"} if kind == "mixed" else {"binary"}
    )


def test_build_payload_restores_the_modes_on_error(tmp_path: Path) -> None:
    m = lowbit.quantize(build_model("lenet5"), {"default": {"weight": {"method": "twn", "bits": 2}}})
    m.get_submodule("fc1").register_buffer("bad", torch.zeros(2, dtype=torch.complex64))
    m.get_submodule("conv2").eval()
    modes = {n: sub.training for n, sub in m.named_modules()}
    with pytest.raises(ValueError, match="bad"):
        save_packed(m, tmp_path / "m.lowbit")
    assert {n: sub.training for n, sub in m.named_modules()} == modes


@pytest.mark.parametrize("recipe", ["binaryrelax-w1a4", MIXED], ids=["binary_relax", "mixed"])
def test_train_run_packs_and_its_run_loads_back(tmp_path: Path, recipe) -> None:
    out = tmp_path / "r"
    spec = RunSpec(model="mlp", dataset="digits", recipe=recipe, train_subset=256, batch_size=64,
                   train={"epochs": 1, "tensorboard": False}, out=str(out))
    res = train_run(spec)
    assert (out / "model.lowbit").is_file() and (out / "result.json").is_file()
    trained = res.model.eval()
    loaded, data, _ = load_run(out)
    loaded.eval()
    assert loaded.state_dict().keys() == trained.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in trained.state_dict().items())
    x = next(iter(data.test))[0]
    with torch.no_grad():
        ref = trained(x)
        assert torch.equal(loaded(x), ref)
        assert torch.equal(load_packed(out / "model.lowbit")(x), ref)
    # `lowbit export RUN` of the loaded run writes the file training wrote
    save_packed(loaded, tmp_path / "again.lowbit")
    assert (tmp_path / "again.lowbit").read_bytes() == (out / "model.lowbit").read_bytes()


def test_load_run_rebuilds_the_binary_relax_wrapper(tmp_path: Path) -> None:
    out = tmp_path / "r"
    train_run(RunSpec(model="mlp", dataset="digits", recipe="binaryrelax-w1a4", train_subset=128,
                      batch_size=64, train={"epochs": 1, "tensorboard": False}, out=str(out)))
    model, _, _ = load_run(out)
    wrappers = [m for m in model.modules() if isinstance(m, RelaxedWeight)]
    assert wrappers and all(float(w.eta) > 1.0 for w in wrappers)  # the trained eta, from the checkpoint


GOOD_CONFIG = {"spec": {"model": "mlp", "dataset": "digits"}, "recipe": None}
DAMAGE = {
    "truncated": ("text", json.dumps(GOOD_CONFIG)[:20], "not valid JSON"),
    "empty": ("text", "", "not valid JSON"),
    "binary": ("bytes", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a UTF-8 JSON text file"),
    "no spec": ("text", json.dumps({"recipe": None}), "'spec'"),
    "unknown key": ("text", json.dumps({**GOOD_CONFIG, "spec": {"model": "mlp", "bogus": 1}}), "bogus"),
    "a list": ("text", "[]", "JSON list"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_config_json_is_a_clear_error(tmp_path: Path, damage: str, capsys) -> None:
    kind, content, what = DAMAGE[damage]
    run = tmp_path / "r"
    run.mkdir()
    cfg = run / "config.json"
    if kind == "bytes":
        cfg.write_bytes(content)
    else:
        cfg.write_text(content)
    pattern = f"{re.escape(str(cfg))}.*{re.escape(what)}.*lowbit train"
    with pytest.raises(CheckpointError, match=pattern):
        load_run(run)
    spec = RunSpec(model="mlp", dataset="digits", train={"epochs": 1, "tensorboard": False}, out=str(run))
    with pytest.raises(CheckpointError, match=pattern):
        train_run(spec, resume=True)
    assert cli.main(["eval", str(run)]) == 2
    printed = "".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "error:" + str(cfg) in printed and "Traceback" not in printed


@pytest.fixture
def lenet_file(tmp_path: Path) -> Path:
    m = lowbit.quantize(build_model("lenet5"), {"default": {"weight": {"method": "twn", "bits": 2}}}).eval()
    p = tmp_path / "lenet.lowbit"
    save_packed(m, p)
    return p


def test_loading_into_another_architecture_names_the_file(lenet_file: Path) -> None:
    with pytest.raises(FormatError, match=re.escape(repr(str(lenet_file))) + ".*shape"):
        load_packed(lenet_file, build_model("resnet20", width_mult=0.25))
    with pytest.raises(FormatError, match=re.escape(repr(str(lenet_file))) + ".*shape"):
        rt.load(lenet_file, model=build_model("resnet20", width_mult=0.25))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_zoo_model_loads_in_its_saved_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    m = build_model("lenet5").to(dtype)
    lowbit.quantize(m, {"default": {"weight": {"method": "twn", "bits": 2}}})
    x = torch.randn(2, 1, 28, 28, dtype=dtype, generator=torch.Generator().manual_seed(2))
    p = tmp_path / "m.lowbit"
    save_packed(m.eval(), p)
    loaded = load_packed(p)  # no model=: rebuilt from the spec, in the file's dtype
    assert {t.dtype for t in loaded.state_dict().values() if t.is_floating_point()} == {dtype}
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))
