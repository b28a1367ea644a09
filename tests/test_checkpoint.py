"""Checkpoint format, atomic writes, corruption handling and load_weights."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from _resume_worker import SignSTE, make_model
from safetensors.torch import save_file
from torch import nn

from lowbit.train import (
    CheckpointError,
    TrainConfig,
    atomic_path,
    build_optimizer,
    build_scheduler,
    load_checkpoint,
    load_weights,
    read_checkpoint,
    save_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_state(model: nn.Module, steps: int = 3):
    cfg = TrainConfig(optimizer="adam", lr=1e-2, epochs=2, weight_decay=1e-3)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 5)
    for _ in range(steps):
        model(torch.randn(8, 16)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return opt, sched


def test_roundtrip_model_optimizer_scheduler_extra(tmp_path):
    model = make_model()
    opt, sched = _trained_state(model)
    extra = {"rng": torch.get_rng_state(), "history": [{"acc": 0.5}], "t": (1, 2),
             "ints": {3: "x"}, "none": None}
    path = save_checkpoint(tmp_path / "c.safetensors", model, opt, sched, epoch=4, extra=extra)

    meta, tensors = read_checkpoint(path)
    assert "model/4.parametrizations.weight.original" in tensors
    assert any(k.startswith("optim/") for k in tensors)
    assert meta["epoch"] == 4 and meta["version"] == 1

    model2 = make_model(seed=5)
    opt2, sched2 = _trained_state(model2, steps=1)
    out = load_checkpoint(path, model2, opt2, sched2)
    assert out["epoch"] == 4
    assert torch.equal(out["extra"]["rng"], extra["rng"])
    assert out["extra"]["rng"].dtype == torch.uint8
    assert out["extra"]["t"] == (1, 2) and out["extra"]["ints"] == {3: "x"}
    assert out["extra"]["history"] == [{"acc": 0.5}] and out["extra"]["none"] is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]  # betas come back as a tuple
    for i in s1["state"]:
        for k, v in s1["state"][i].items():
            assert torch.equal(v, s2["state"][i][k])
    assert sched2.state_dict() == sched.state_dict()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


class _WithExtraState(nn.Linear):
    def __init__(self):
        super().__init__(2, 2)
        self.bits = 4

    def get_extra_state(self):
        return {"bits": self.bits, "levels": (0.5, 1.0)}

    def set_extra_state(self, state):
        self.bits = state["bits"]
        self.levels = state["levels"]


def test_module_extra_state_roundtrip(tmp_path):
    a, b = _WithExtraState(), _WithExtraState()
    a.bits = 2
    save_checkpoint(tmp_path / "e.safetensors", a, epoch=1)
    load_checkpoint(tmp_path / "e.safetensors", b)
    assert b.bits == 2 and b.levels == (0.5, 1.0) and torch.equal(a.weight, b.weight)


def test_tied_weights_are_saved(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    save_checkpoint(tmp_path / "t.safetensors", model, epoch=1)
    model2 = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    load_checkpoint(tmp_path / "t.safetensors", model2)
    assert torch.equal(model2[1].weight, model[0].weight)


# ---------------------------------------------------------------- broken files


@pytest.fixture
def ckpt(tmp_path):
    model = make_model()
    opt, sched = _trained_state(model)
    return save_checkpoint(tmp_path / "c.safetensors", model, opt, sched, 1, {"a": 1})


def _header_len(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_truncated_checkpoint(ckpt):
    data = ckpt.read_bytes()
    for cut in (0, 5, 100, len(data) // 2, len(data) - 1):
        ckpt.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated, corrupted"):
            load_checkpoint(ckpt, make_model())


def test_bit_flip_in_tensor_data_is_detected(ckpt):
    data = bytearray(ckpt.read_bytes())
    pos = _header_len(ckpt) + (len(data) - _header_len(ckpt)) // 2
    data[pos] ^= 0x10
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC-32"):
        load_checkpoint(ckpt, make_model())


def test_garbled_header(ckpt):
    data = bytearray(ckpt.read_bytes())
    data[12:20] = b"\x00\xff{]][[x"
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):  # not another check's error
        load_checkpoint(ckpt, make_model())


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a lowbit checkpoint"):
        load_checkpoint(path, make_model())


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['LOWBIT_EVIL_MARK']}",))


def test_pickle_is_never_unpickled(tmp_path, monkeypatch):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("LOWBIT_EVIL_MARK", str(mark))
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"model": _Evil()}))
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(path, make_model())
    pt = tmp_path / "evil.pt"
    torch.save({"w": _Evil()}, pt)
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(pt, make_model())
    with pytest.raises(CheckpointError, match="weights-only"):
        load_weights(make_model(), pt)
    assert not mark.exists()


def test_model_mismatch_on_load_checkpoint(ckpt):
    other = nn.Sequential(nn.Linear(16, 8))
    with pytest.raises(CheckpointError, match=r"missing|unexpected"):
        load_checkpoint(ckpt, other)


def test_missing_file():
    with pytest.raises(FileNotFoundError):
        load_checkpoint("/nonexistent/c.safetensors", make_model())


# ---------------------------------------------------------------- load_weights


def test_load_weights_float_into_float_and_into_quantized(tmp_path):
    float_model = make_model(quantize=False, seed=3)
    path = save_checkpoint(tmp_path / "float.safetensors", float_model, epoch=10)

    target = make_model(quantize=False, seed=4)
    load_weights(target, path)
    for k, v in float_model.state_dict().items():
        assert torch.equal(v, target.state_dict()[k])

    quantized = make_model(quantize=True, seed=4)  # 4.weight is parametrized here
    load_weights(quantized, path)
    assert torch.equal(quantized[4].parametrizations.weight.original, float_model[4].weight)
    assert torch.equal(quantized[0].weight, float_model[0].weight)

    plain = tmp_path / "plain.safetensors"  # a state dict without lowbit metadata
    save_file({k: v.contiguous() for k, v in float_model.state_dict().items()}, str(plain))
    load_weights(make_model(quantize=False, seed=9), plain)
    pt = tmp_path / "w.pt"
    torch.save(float_model.state_dict(), pt)
    load_weights(make_model(quantize=False, seed=9), pt)


def test_load_weights_mismatch_errors(tmp_path):
    path = save_checkpoint(tmp_path / "f.safetensors", make_model(quantize=False), epoch=1)

    wrong = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with pytest.raises(CheckpointError) as e:
        load_weights(wrong, path)
    msg = str(e.value)
    assert "shape mismatch" in msg and "0.weight: file (64, 16) vs model (32, 16)" in msg
    assert "missing" not in msg.split("shape")[0]
    assert "unexpected key(s) in the file" in msg and "1.running_mean" in msg

    renamed = nn.Sequential()
    renamed.add_module("stem", nn.Linear(16, 64))
    with pytest.raises(CheckpointError) as e:
        load_weights(renamed, path)
    assert "missing from the file: stem.weight, stem.bias" in str(e.value)

    report = load_weights(renamed, path, strict=False)
    assert report["missing"] == ["stem.weight", "stem.bias"] and "0.weight" in report["unexpected"]

    qpath = save_checkpoint(tmp_path / "q.safetensors", make_model(quantize=True), epoch=1)
    with pytest.raises(CheckpointError, match="quantize this model"):
        load_weights(make_model(quantize=False), qpath)


def test_parametrized_linear_state_dict_keys(tmp_path):
    layer = nn.Linear(3, 2)
    parametrize.register_parametrization(layer, "weight", SignSTE())
    path = save_checkpoint(tmp_path / "p.safetensors", layer, epoch=0)
    _, tensors = read_checkpoint(path)
    assert set(tensors) == {"model/bias", "model/parametrizations.weight.original"}


# ---------------------------------------------------------------- atomic writes


def test_atomic_path_keeps_old_content_on_error(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.json"]


_SAVER = """
import sys, torch
from torch import nn
from lowbit.train.checkpoint import save_checkpoint
torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))  # ~8 MB
path, i = sys.argv[1], 0
while True:
    i += 1
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(i)
    save_checkpoint(path, model, None, None, epoch=i, extra={"version": i})
    print(i, flush=True)
"""


def test_kill_during_save_leaves_a_complete_checkpoint(tmp_path):
    """SIGKILL savers at random moments: the checkpoint always loads and is one whole
    version, the last reported save or the one after it; temp files never pose as it."""
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    procs, leftovers = [], 0
    for k in range(3):
        d = tmp_path / f"run{k}"
        d.mkdir()
        with open(tmp_path / f"stderr{k}", "w") as err:
            procs.append((d, subprocess.Popen(
                [sys.executable, "-c", _SAVER, str(d / "checkpoint.safetensors")],
                stdout=subprocess.PIPE, stderr=err, text=True)))
    try:
        for d, p in procs:
            first = p.stdout.readline()
            assert first.strip() == "1", (d.parent / f"stderr{d.name[3:]}").read_text()
            delay = rng.uniform(0.0, 0.4)
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=60)
            out = p.stdout.read()  # through readline's buffer (communicate would skip it)
            done = int((first + out).split()[-1])
            meta, tensors = read_checkpoint(d / "checkpoint.safetensors")
            version = meta["epoch"]
            where = f"seed {seed}, delay {delay:.3f}s, saved {done}, on disk {version}"
            assert version in (done, done + 1), where
            assert meta["extra"]["version"] == version, where
            for name, t in tensors.items():
                if name.startswith("model/"):
                    assert bool((t == version).all()), (name, where)
            model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))
            load_checkpoint(d / "checkpoint.safetensors", model)
            names = os.listdir(d)
            leftovers += len(names) - 1
            assert [n for n in names if n.endswith(".safetensors")] == ["checkpoint.safetensors"]
            assert all(n == "checkpoint.safetensors" or
                       (n.startswith(".checkpoint.safetensors.") and n.endswith(".tmp"))
                       for n in names), names
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_checkpoint_metadata_is_plain_json(ckpt):
    from safetensors import safe_open

    with safe_open(str(ckpt), "pt") as f:
        meta = json.loads(f.metadata()["lowbit"])
    assert meta["format"] == "lowbit.checkpoint"
    assert meta["optimizer"]["param_groups"][0]["name"] == "decay"
