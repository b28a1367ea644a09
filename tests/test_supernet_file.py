"""The packed supernet file: every sub-net's codes in one file, shared tensors stored once, no latent
weights; a sub-net loaded from it equals the extracted sub-net (PyTorch and packed runtime, bit for
bit), a round trip writes the same bytes, and bad files are clear FormatErrors."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit.runtime
from lowbit.export.container import read_container, serialize
from lowbit.export.errors import FormatError
from lowbit.export.packed import frozen_weight
from lowbit.export.supernet_file import build_supernet_file, load_supernet_file, save_supernet_file
from lowbit.models import build_model
from lowbit.nn.quantize import quantizable_weights, weight_quantizer
from lowbit.nn.supernet import Supernet
from lowbit.serve import load_supernet, save_supernet

SUBNETS = [
    {"name": "w0.5-b2", "width": 0.5, "bits": 2},
    {"name": "w1-w4a8", "width": 1.0, "bits": [4, 8]},
    {"name": "w1-b4", "width": 1.0, "bits": 4},  # shares w1-w4a8's 4-bit weight codes
    {"name": "float", "width": 0.5, "bits": 32},
]


def _trained_like(model_name: str, shape: tuple[int, ...], subnets=SUBNETS, **kwargs) -> Supernet:
    """A supernet whose every BatchNorm and PACT clip moved away from its initial value."""
    torch.manual_seed(0)
    sn = Supernet(build_model(model_name, **kwargs), subnets, shape)
    with torch.no_grad():
        for m in sn.modules():
            if hasattr(m, "alpha") and isinstance(m.alpha, torch.Tensor):
                m.alpha.mul_(0.7)
    sn.train()
    for n in sn.names:
        sn.set_subnet(n)
        sn(torch.randn(8, *shape))
    sn.info = {n: {"val_acc": 0.1 * i} for i, n in enumerate(sn.names)}
    return sn.eval()


@pytest.fixture(scope="module")
def lenet() -> Supernet:
    return _trained_like("lenet5", (1, 28, 28))


@pytest.fixture(scope="module")
def lenet_file(lenet: Supernet, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("sf") / "lenet.supernet"
    sizes = save_supernet_file(lenet, path)
    return path, sizes


def test_subnets_from_the_file_equal_the_extracted_subnets_bit_for_bit(lenet, lenet_file) -> None:
    path, _ = lenet_file
    loaded = load_supernet_file(path)
    assert loaded.names == lenet.names and loaded.choices == lenet.choices and loaded.info == lenet.info
    x = torch.randn(5, 1, 28, 28)
    for n in lenet.names:
        with torch.inference_mode():
            assert torch.equal(loaded.run(x, n), lenet.run(x, n)), n
        assert loaded.cost(n) == lenet.cost(n)
        if n == "float":
            continue
        # every quantized weight serves the stored encoding: compile packs it, never re-quantizes
        quantized = [(m, p) for m, p in quantizable_weights(loaded.models[n]).values()
                     if weight_quantizer(m, p) is not None]
        assert len(quantized) == 3 and all(frozen_weight(m, p) is not None for m, p in quantized)
        got = lowbit.runtime.compile(loaded.models[n], x)(x)
        ref = lowbit.runtime.compile(lenet.extract(n), x)(x)
        assert torch.equal(got, ref), n
    # different sub-nets really differ (the test above could not pass by serving one model)
    assert not torch.equal(loaded.run(x, "w0.5-b2"), loaded.run(x, "w1-b4"))


def test_round_trip_writes_the_same_bytes_and_shared_codes_are_stored_once(lenet, lenet_file) -> None:
    path, sizes = lenet_file
    data = path.read_bytes()
    assert sizes["file_bytes"] == len(data)
    again, sizes2 = build_supernet_file(load_supernet_file(path))
    assert again == data  # load -> save never changes a byte
    assert sizes2["latent_bytes"] == 0 and sizes["latent_bytes"] > 0
    tensors, meta = read_container(data)
    table = json.loads(meta["subnets"])
    a, b = table["w1-w4a8"]["tensors"], table["w1-b4"]["tensors"]
    codes = [k for k in a if k.endswith("/codes")]
    assert codes and all(a[k] == b[k] for k in codes)  # same slice, same weight bits: one copy
    assert sizes["stored_tensor_bytes"] < sizes["subnet_tensor_bytes"]
    # no latent weight in the file: the only float tensors of a quantized layer's size are float layers
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == sizes["stored_tensor_bytes"]


def test_resnet20_with_residual_groups_loads_bit_exact(tmp_path) -> None:
    subnets = [{"name": "s", "width": {"layer1.*": 0.5, "layer2.*": 0.75}, "bits": 2},
               {"name": "l", "width": 1.0, "bits": 4}]
    sn = _trained_like("resnet20", (3, 32, 32), subnets, width_mult=0.5)
    save_supernet_file(sn, tmp_path / "r.supernet")
    loaded = load_supernet(tmp_path / "r.supernet")  # the serving door reads version 2 the same way
    x = torch.randn(1, 3, 32, 32)
    for n in sn.names:
        got = lowbit.runtime.compile(loaded.models[n], x)(x)
        assert torch.equal(got, lowbit.runtime.compile(sn.extract(n), x)(x)), n


def test_trainable_form_still_reads_and_converts(lenet, tmp_path) -> None:
    save_supernet(lenet, tmp_path / "v1.supernet", codes=False)
    back = load_supernet(tmp_path / "v1.supernet")
    assert isinstance(back, Supernet)
    save_supernet(back, tmp_path / "v2.supernet")
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(load_supernet(tmp_path / "v2.supernet").run(x, "w0.5-b2"), lenet.run(x, "w0.5-b2"))
    with pytest.raises(ValueError, match="latent weights"):
        save_supernet(load_supernet(tmp_path / "v2.supernet"), tmp_path / "x", codes=False)


def _rewrite(path, tmp_path, edit) -> str:
    tensors, meta = read_container(path.read_bytes())
    edit(tensors, meta)
    out = tmp_path / "bad.supernet"
    out.write_bytes(serialize(tensors, meta))
    return str(out)


def _table(meta, fn):
    t = json.loads(meta["subnets"])
    fn(t)
    meta["subnets"] = json.dumps(t)


def test_bad_files_give_clear_errors(lenet_file, tmp_path) -> None:
    path, _ = lenet_file
    cases = [
        (lambda t, m: m.update(version="9"), "version '9' is not a packed supernet file"),
        (lambda t, m: m.update(format="lowbit"), "expected 'lowbit.supernet'"),
        (lambda t, m: m.update(subnets="{"), "sub-net table is not valid JSON"),
        (lambda t, m: _table(m, lambda s: s.pop("w1-b4")), "the sub-net table lists"),
        (lambda t, m: t.update(extra=torch.zeros(3)), "tensors no sub-net refers to: ['extra']"),
        (lambda t, m: t.pop("t0"), "refers to tensors the file does not hold"),
        (lambda t, m: _table(m, lambda s: s["w0.5-b2"]["header"]["layers"].clear()), "sub-net 'w0.5-b2'"),
    ]
    for edit, msg in cases:
        bad = _rewrite(path, tmp_path, edit)
        with pytest.raises(FormatError) as e:
            load_supernet_file(bad)
        assert msg in str(e.value), (msg, str(e.value))
    # codes replaced by another sub-net's codes of a different size: the packed checks name it
    def swap(t, m):
        s = json.loads(m["subnets"])
        a, b = s["w0.5-b2"]["tensors"], s["w1-b4"]["tensors"]
        k = next(k for k in a if k.endswith("/codes") and k in b and a[k] != b[k])
        a[k] = b[k]
        m["subnets"] = json.dumps(s)
    with pytest.raises(FormatError, match=r"sub-net 'w0\.5-b2'"):
        load_supernet_file(_rewrite(path, tmp_path, swap))
    trunc = tmp_path / "trunc.supernet"
    trunc.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(FormatError, match=r"trailing bytes|outside|data_offsets"):
        load_supernet_file(trunc)
    with pytest.raises(FormatError, match="does not exist"):
        load_supernet_file(tmp_path / "missing.supernet")


@pytest.mark.parametrize("save", [save_supernet, save_supernet_file], ids=["v1", "v2"])
def test_saving_into_a_directory_names_a_supernet_file(tmp_path, save):
    sn = Supernet(build_model("lenet5"), SUBNETS[:1], (1, 28, 28)).eval()
    with pytest.raises(IsADirectoryError, match=f"give a file path such as {tmp_path}/model.supernet"):
        save(sn, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written
