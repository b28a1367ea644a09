"""Integrity of every container lowbit writes (.lowbit, supernet files version 1 and 2): a flipped bit in
the JSON header is a FormatError like a flipped data bit, files of older writers still load, and a supernet
file loaded into another architecture or with a bad description is a FormatError naming the file."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import lowbit
from lowbit.export.container import (
    CHECKSUM_KEY,
    HEADER_CHECKSUM_KEY,
    header_digest,
    read_container,
    serialize,
)
from lowbit.export.errors import FormatError
from lowbit.models import build_model
from lowbit.nn.supernet import Supernet
from lowbit.serve import load_supernet, save_supernet

SUBNETS = [{"name": "w0.5-b2", "width": 0.5, "bits": 2}, {"name": "w1-b4", "width": 1.0, "bits": 4},
           {"name": "float", "width": 0.5, "bits": 32}]
X = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2
KINDS = ("lowbit", "v1", "v2")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    recipe = {"default": {"weight": {"method": "twn", "bits": 2},
                          "activation": {"method": "uniform", "bits": 4, "clip": 2.0}},
              "rules": [{"match": "@first", "activation": None}]}
    return lowbit.quantize(build_model("lenet5"), recipe).eval()


@pytest.fixture(scope="module")
def supernet() -> Supernet:
    torch.manual_seed(0)
    sn = Supernet(build_model("lenet5"), SUBNETS, (1, 28, 28))
    sn.train()
    for n in sn.names:  # move every BatchNorm away from its initial statistics
        sn.set_subnet(n)
        sn(torch.randn(8, 1, 28, 28))
    sn.info = {"w0.5-b2": {"val_acc": 0.25}, "w1-b4": {}, "float": {}}
    return sn.eval()


@pytest.fixture(scope="module")
def files(model, supernet, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("integrity")
    lowbit.save_packed(model, d / "m.lowbit")
    save_supernet(supernet, d / "v1.supernet", codes=False)
    save_supernet(supernet, d / "v2.supernet")
    return {"lowbit": d / "m.lowbit", "v1": d / "v1.supernet", "v2": d / "v2.supernet"}


def _load(kind: str, path: Path, model: torch.nn.Module | None = None) -> Any:
    return lowbit.load_packed(path) if kind == "lowbit" else load_supernet(path, model)


@torch.no_grad()
def _outputs(kind: str, loaded: Any) -> list[torch.Tensor]:
    if kind == "lowbit":
        return [loaded(X)]
    if kind == "v1":
        return [(loaded.set_subnet(n), loaded(X))[1] for n in loaded.names]
    return [loaded.run(X, n) for n in loaded.names]


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict[str, Any], body: bytes, **dumps: Any) -> bytes:
    text = json.dumps(header, **dumps).encode("utf-8")
    text += b" " * ((-len(text)) % 8)
    return len(text).to_bytes(8, "little") + text + body


# the needle's last byte is XORed with the bit: every flip keeps the header valid JSON
FLIPS = [
    ("lowbit", b'\\"clip\\":2', 0x01),  # an activation clip 2.0 -> 3.0
    ("lowbit", b'"shape":[6', 0x01),  # a tensor's shape in the tensor table, outside the metadata
    ("v1", b'\\"w_bits\\": 2', 0x04),  # sub-net bits 2 -> 6
    ("v1", b'\\"val_acc\\": 0.2', 0x01),  # the sub-net's recorded accuracy
    ("v2", b'\\"w_bits\\": 2', 0x04),
    ("v2", b'\\"val_acc\\": 0.2', 0x01),
]


@pytest.mark.parametrize("kind,needle,bit", FLIPS)
def test_a_flipped_header_bit_is_a_format_error(files, tmp_path, kind, needle, bit) -> None:
    data = bytearray(files[kind].read_bytes())
    n = int.from_bytes(data[:8], "little")
    at = bytes(data[: 8 + n]).index(needle) + len(needle) - 1
    data[at] ^= bit
    bad = tmp_path / files[kind].name
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="the header does not match the checksum stored with it: the file "
                                          "is corrupted") as e:
        _load(kind, bad)
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_without_the_header_entry_still_loads_and_its_data_is_still_checked(files, tmp_path,
                                                                                    kind) -> None:
    header, body = _split(files[kind].read_bytes())
    assert HEADER_CHECKSUM_KEY in header["__metadata__"]  # every writer writes it
    del header["__metadata__"][HEADER_CHECKSUM_KEY]
    old = tmp_path / f"old-{files[kind].name}"
    old.write_bytes(_join(header, body, separators=(",", ":"), ensure_ascii=True))  # as the older writer
    for a, b in zip(_outputs(kind, _load(kind, old)), _outputs(kind, _load(kind, files[kind])), strict=True):
        assert torch.equal(a, b)
    damaged = bytearray(old.read_bytes())
    damaged[-1] ^= 0x10
    old.write_bytes(bytes(damaged))
    with pytest.raises(FormatError, match="the tensor data does not match the checksum"):
        _load(kind, old)


def test_the_header_checksum_does_not_depend_on_key_order_or_whitespace(files, tmp_path) -> None:
    header, body = _split(files["lowbit"].read_bytes())
    meta = header.pop("__metadata__")
    want = meta[HEADER_CHECKSUM_KEY]
    reordered = {"__metadata__": dict(reversed(meta.items())), **dict(reversed(header.items()))}
    assert header_digest(dict(reversed(header.items())), dict(reversed(meta.items()))) == want
    relaid = _join(reordered, body, indent=3, separators=(" , ", " : "))
    assert relaid != files["lowbit"].read_bytes()
    _, got = read_container(relaid)  # both checksums still verify
    assert got == {k: v for k, v in meta.items() if k not in (CHECKSUM_KEY, HEADER_CHECKSUM_KEY)}
    (tmp_path / "relaid.lowbit").write_bytes(relaid)
    assert torch.equal(_outputs("lowbit", lowbit.load_packed(tmp_path / "relaid.lowbit"))[0],
                       _outputs("lowbit", lowbit.load_packed(files["lowbit"]))[0])
    # the same layout change with one value changed is caught
    reordered["__metadata__"]["note"] = "added"
    with pytest.raises(FormatError, match="the header does not match the checksum"):
        read_container(_join(reordered, body, indent=3))


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_unchanged(files, model, supernet, tmp_path, kind) -> None:
    data = files[kind].read_bytes()
    meta = _split(data)[0]["__metadata__"]
    assert {CHECKSUM_KEY, HEADER_CHECKSUM_KEY} <= set(meta)
    loaded = _load(kind, files[kind])
    again = tmp_path / files[kind].name
    if kind == "lowbit":
        lowbit.save_packed(loaded, again)
        assert torch.equal(_outputs(kind, loaded)[0], _outputs(kind, model)[0])
    else:
        save_supernet(loaded, again, codes=kind == "v2")
        with torch.no_grad():
            want = [(supernet.set_subnet(n), supernet(X))[1] for n in supernet.names]
        for a, b in zip(_outputs(kind, loaded), want, strict=True):
            assert torch.equal(a, b)
        assert loaded.info == supernet.info
    assert again.read_bytes() == data


def _edit(files: dict[str, Path], tmp_path: Path, kind: str, key: str, value: Any) -> Path:
    tensors, meta = read_container(files[kind].read_bytes())
    spec = json.loads(meta["supernet"])
    if value is _DROP:
        del spec[key]
    else:
        spec[key] = value
    path = tmp_path / f"edited-{kind}.supernet"
    path.write_bytes(serialize(tensors, {**meta, "supernet": json.dumps(spec)}))
    return path


_DROP = object()
EDITS = [
    ("input_shape", "x", "'input_shape' must be a non-empty list of positive integers"),
    ("input_shape", [], "'input_shape' must be a non-empty list of positive integers"),
    ("input_shape", [0, 28, 28], "'input_shape' must be a non-empty list of positive integers"),
    ("input_shape", _DROP, "'input_shape' must be .* got no entry"),
    ("input_shape", [1, 2],
     re.escape("does not take the file's input shape (1, 2)") + ".*does not fit its own lenet5: the file is "
     "damaged"),
    ("weight", "x", "'weight' must be a quantizer object"),
    ("weight", {}, "'weight' must be a quantizer object"),
    ("activation", "x", "'activation' must be a quantizer object"),
    ("keep_float", "x", "'keep_float' must be a list of layer globs"),
    ("info", 7, "'info' must be an object mapping sub-net names to objects"),
    ("info", {"w0.5-b2": 7}, "'info' must be an object mapping sub-net names to objects"),
]


@pytest.mark.parametrize("kind", ("v1", "v2"))
@pytest.mark.parametrize("key,value,match", EDITS,
                         ids=[f"{k}={'dropped' if v is _DROP else repr(v)}" for k, v, _ in EDITS])
def test_a_bad_description_is_a_format_error_naming_the_file(files, tmp_path, kind, key, value,
                                                             match) -> None:
    path = _edit(files, tmp_path, kind, key, value)
    with pytest.raises(FormatError, match=match) as e:
        load_supernet(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("kind", ("v1", "v2"))
def test_another_architecture_is_a_format_error_naming_the_file(files, kind) -> None:
    other = build_model("resnet20", width_mult=0.25)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    match = re.escape("the model does not take the file's input shape (1, 28, 28)") + ".*is it the lenet5 "
    with pytest.raises(FormatError, match=match) as e:
        load_supernet(files[kind], other)
    assert str(files[kind]) in str(e.value)
    assert other.state_dict().keys() == before.keys()  # left as it was: not made a supernet
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
