"""Bit packing, the packed .lowbit format (exact round trips, validation) and size reports."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

import lowbit
from lowbit.export import (
    FormatError,
    FrozenWeight,
    Packing,
    PackingError,
    choose_packing,
    encode_weight,
    frozen_layers,
    load_packed,
    model_report,
    pack_bits,
    pack_radix,
    read_packed,
    report_from_file,
    save_packed,
    thaw,
    unpack_bits,
    unpack_radix,
)
from lowbit.export.container import read_container
from lowbit.models import build_model, layer_table
from lowbit.nn import quantizable_layers, weight_quantizer
from lowbit.quant import registry
from lowbit.quant.base import Encoded, WeightQuantizer, straight_through

# ------------------------------------------------------------------------------------------------
# bit packing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 8, 9, 13, 64, 1001])
def test_pack_bits_round_trip(bits: int, n: int) -> None:
    rng = np.random.default_rng(bits * 1000 + n)
    codes = rng.integers(0, 2**bits, size=n)
    packed = pack_bits(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.size == (n * bits + 7) // 8  # dense: no byte wasted
    np.testing.assert_array_equal(unpack_bits(packed, bits, n), codes)
    # extremes: all zeros and all ones
    for fill in (0, 2**bits - 1):
        c = np.full(n, fill)
        np.testing.assert_array_equal(unpack_bits(pack_bits(c, bits), bits, n), c)


def test_pack_bits_layout_is_little_endian() -> None:
    assert pack_bits([1, 2, 3, 0], 2).tolist() == [0x39]  # 1 | 2<<2 | 3<<4
    assert pack_bits([1, 0, 0, 0, 0, 0, 0, 1, 1], 1).tolist() == [0x81, 0x01]
    # 3-bit codes 5, 3, 7: stream bits (LSB first) 101 110 111 -> byte0 = 0b11_011_101, byte1 = 0b1
    assert pack_bits([5, 3, 7], 3).tolist() == [0b11011101, 0b1]
    assert pack_bits([0xA, 0x5], 4).tolist() == [0x5A]


@pytest.mark.parametrize("base", [3, 5, 6])
@pytest.mark.parametrize("n", [0, 1, 4, 5, 6, 11, 1000])
def test_pack_radix_round_trip(base: int, n: int) -> None:
    rng = np.random.default_rng(base * 7 + n)
    codes = rng.integers(0, base, size=n)
    packed = pack_radix(codes, base)
    per = {3: 5, 5: 3, 6: 3}[base]
    assert packed.size == -(-n // per)
    np.testing.assert_array_equal(unpack_radix(packed, base, n), codes)


def test_trits_five_per_byte() -> None:
    assert pack_radix([1, 2, 0, 1, 2], 3).tolist() == [1 + 2 * 3 + 0 + 1 * 27 + 2 * 81]
    assert pack_radix([2] * 5, 3).tolist() == [242]
    # ternary picks radix when smaller: 1.6 bits instead of 2
    assert choose_packing(3, 1000) == Packing("radix", base=3)
    assert choose_packing(3, 1000).nbytes(1000) == 200
    assert choose_packing(2, 1000) == Packing("bits", bits=1)
    assert choose_packing(4, 1000) == Packing("bits", bits=2)
    assert choose_packing(3, 1) == Packing("bits", bits=2)  # tie: dense
    assert choose_packing(16, 10) == Packing("bits", bits=4)


@given(st.integers(1, 8), st.lists(st.integers(0, 255), max_size=300))
@settings(max_examples=200, deadline=None)
def test_pack_bits_property(bits: int, raw: list[int]) -> None:
    codes = np.array([c % (2**bits) for c in raw], dtype=np.int64)
    np.testing.assert_array_equal(unpack_bits(pack_bits(codes, bits), bits, len(codes)), codes)


def test_packing_rejects_bad_input() -> None:
    with pytest.raises(PackingError, match="codes must be in"):
        pack_bits([4], 2)
    with pytest.raises(PackingError, match="codes must be in"):
        pack_bits([-1], 2)
    with pytest.raises(PackingError, match="bits must be"):
        pack_bits([0], 9)
    with pytest.raises(PackingError, match="take 1 bytes"):
        unpack_bits(np.zeros(2, np.uint8), 3, 2)
    with pytest.raises(PackingError, match="padding"):
        unpack_bits(np.array([0xF0], np.uint8), 2, 2)
    with pytest.raises(PackingError, match="padding"):
        unpack_bits(np.array([0, 0x80], np.uint8), 3, 3)
    with pytest.raises(PackingError, match="not a valid group"):
        unpack_radix(np.array([243], np.uint8), 3, 5)
    with pytest.raises(PackingError, match="padding"):
        unpack_radix(np.array([81], np.uint8), 3, 4)
    # torch tensors are accepted
    t = torch.tensor([0, 1, 2, 2, 1, 0, 1], dtype=torch.uint8)
    np.testing.assert_array_equal(unpack_radix(pack_radix(t, 3), 3, 7), t.numpy())


# ------------------------------------------------------------------------------------------------
# packed format: exact round trips
# ------------------------------------------------------------------------------------------------

WEIGHTS = {
    "binary": {"method": "binary", "bits": 1},
    "twn": {"method": "twn", "bits": 2},
    "dorefa2": {"method": "dorefa", "bits": 2},
    "dorefa4": {"method": "dorefa", "bits": 4},
    "dorefa8": {"method": "dorefa", "bits": 8},
}


def _recipe(weight: dict, per_channel: bool, act_bits: int = 4) -> dict:
    return {
        "default": {
            "weight": {**weight, "per_channel": per_channel},
            "activation": {"method": "pact", "bits": act_bits, "alpha_init": 3.0},
        },
        "rules": [{"match": "@first", "activation": None}],
    }


def _prepared(name: str, recipe: dict, shape: tuple[int, ...], seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(name, **kw)
    lowbit.quantize(model, recipe)
    model.train()
    with torch.no_grad():  # non-trivial batch-norm statistics
        model(torch.randn(16, *shape))
    return model.eval()


# DoReFa k >= 2 refuses per_channel (fixed levels, no scale): per-tensor only
_ROUND_TRIPS = [(w, pc) for w in WEIGHTS for pc in (False, True)
                if not (pc and WEIGHTS[w]["method"] == "dorefa" and WEIGHTS[w]["bits"] >= 2)]


@pytest.mark.parametrize(("wname", "per_channel"), _ROUND_TRIPS)
@pytest.mark.parametrize(
    "model_name,shape,kw",
    [("lenet5", (1, 28, 28), {}), ("resnet20", (3, 32, 32), {"width_mult": 0.5})],
)
def test_round_trip_predictions_exact(tmp_path: Path, wname, per_channel, model_name, shape, kw) -> None:
    model = _prepared(model_name, _recipe(WEIGHTS[wname], per_channel), shape, **kw)
    x = torch.randn(32, *shape)
    with torch.no_grad():
        ref = model(x)
    path = tmp_path / "m.lowbit"
    size = save_packed(model, path)
    assert size == os.path.getsize(path)
    loaded = load_packed(path)
    assert not loaded.training
    assert loaded.lowbit_spec == model.lowbit_spec
    assert loaded.lowbit_recipe == model.lowbit_recipe
    with torch.no_grad():
        out = loaded(x)
    assert torch.equal(out, ref)
    for name, layer in lowbit.quantized_layers(model).items():
        other = loaded.get_submodule(name)
        assert torch.equal(other.weight, layer.weight), name
    # saving the loaded model writes the very same bytes
    save_packed(loaded, tmp_path / "again.lowbit")
    assert (tmp_path / "again.lowbit").read_bytes() == path.read_bytes()


def _weight_quantizer_cases() -> list[tuple[str, int, bool]]:
    cases = []
    for name in registry.names("weight"):
        cls = registry.get("weight", name)
        allowed = list(cls.bits_allowed)
        pcs = (False, True) if "per_channel" in registry.options(cls) else (None,)
        for bits in sorted({allowed[0], allowed[len(allowed) // 2], allowed[-1]}):
            for pc in pcs:
                cases.append((name, bits, pc))
    return cases


@pytest.mark.parametrize("method,bits,per_channel", _weight_quantizer_cases())
def test_every_registered_weight_quantizer_round_trips(tmp_path: Path, method, bits, per_channel) -> None:
    """Whether or not re-quantizing the decoded weight is a fixed point (binary's mean of N equal
    floats rounds, DoReFa's tanh moves the levels...), the loaded weight is the saved one bit for
    bit: fixed points load as ordinary layers, the others with a FrozenWeight."""
    weight = {"method": method, "bits": bits}
    if per_channel is not None:
        weight["per_channel"] = per_channel
    recipe = {"default": {"weight": weight}}
    if per_channel:
        try:  # methods that document per-channel scales as unsupported (TTQ) refuse it clearly
            lowbit.Recipe.from_dict(recipe)
        except lowbit.RecipeError as e:
            assert "per_channel" in str(e)
            return
    model = _prepared("lenet5", recipe, (1, 28, 28), seed=bits)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    save_packed(model, tmp_path / "m.lowbit")
    loaded = load_packed(tmp_path / "m.lowbit")
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    frozen = set(frozen_layers(loaded))
    for name, layer in quantizable_layers(loaded).items():
        wq = weight_quantizer(layer)
        latent = layer.parametrizations.weight.original
        with torch.no_grad():
            fixed = torch.equal(wq(latent), layer.weight)
        # a layer is frozen exactly when its quantizer is not a fixed point on the loaded latent
        assert (name in frozen) == (not fixed), name
    # thaw: the live quantizers take over; the model still runs and keeps its structure
    thaw(loaded)
    assert frozen_layers(loaded) == []
    assert not any(isinstance(p, FrozenWeight) for p in loaded.modules())
    with torch.no_grad():
        assert loaded(x).shape == ref.shape


@pytest.mark.parametrize("method", registry.names("activation"))
def test_every_registered_activation_quantizer_round_trips(tmp_path: Path, method: str) -> None:
    """Activation quantizer state (PACT alpha, LSQ step, running ranges, init flags) is restored."""
    bits = 4 if 4 in registry.get("activation", method).bits_allowed else 2
    recipe = {
        "default": {"weight": {"method": "twn", "bits": 2}, "activation": {"method": method, "bits": bits}},
        "rules": [{"match": "@first", "activation": None}],
    }
    model = _prepared("lenet5", recipe, (1, 28, 28))  # one training batch: lazy initialisations
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    save_packed(model, tmp_path / "m.lowbit")
    loaded = load_packed(tmp_path / "m.lowbit")
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)


def test_fixed_point_report_for_core_quantizers(tmp_path: Path) -> None:
    """DoReFa k >= 2 loads as a fixed point thanks to its atanh preimage; binary typically needs
    freezing (alpha = mean|w| of N copies of alpha is not alpha in float32)."""
    model = _prepared("lenet5", _recipe(WEIGHTS["dorefa4"], False), (1, 28, 28))
    save_packed(model, tmp_path / "d.lowbit")
    assert frozen_layers(load_packed(tmp_path / "d.lowbit")) == []


class _ResidualBinary(WeightQuantizer):
    """Residual expansion for the test: w ~ a1 sign(w) + a2 sign(r1) + ..., one Encoded branch
    per extra term (nested: each branch carries the next)."""

    name = "residual_binary_test"
    bits_allowed = (1,)

    def __init__(self, bits: int = 1, per_channel: bool = False, terms: int = 3) -> None:
        super().__init__(bits, per_channel)
        self.terms = terms

    def _enc(self, r: Tensor, k: int) -> Encoded:
        scale = self.reduce_abs_mean(r)
        codes = (r >= 0).to(torch.uint8)
        levels = torch.tensor([-1.0, 1.0], dtype=r.dtype)
        branches = ()
        if k > 1:
            branches = (self._enc(r - levels[codes.long()] * scale, k - 1),)
        return Encoded(codes, levels, scale, 1, branches)

    def encode(self, w: Tensor) -> Encoded:
        return self._enc(w.detach(), self.terms)

    def forward(self, w: Tensor) -> Tensor:
        return straight_through(self.encode(w).decode(), w)


@pytest.fixture
def residual_registered():
    registry.register(_ResidualBinary)
    try:
        yield _ResidualBinary
    finally:
        del registry._REGISTRY["weight"][_ResidualBinary.name]


def test_residual_expansion_branches(tmp_path: Path, residual_registered) -> None:
    recipe = {
        "default": {"weight": {"method": "residual_binary_test", "bits": 1, "terms": 3, "per_channel": True}},
        "rules": [{"match": "@first", "weight": None}],
    }
    model = _prepared("lenet5", recipe, (1, 28, 28))
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    path = tmp_path / "r.lowbit"
    save_packed(model, path)
    pf = read_packed(path)
    encs = pf.header["layers"]["conv2"]["weight"]["encodings"]
    assert [e["parent"] for e in encs] == [None, 0, 1]  # nested tree kept, so decode adds in order
    loaded = load_packed(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    rep = model_report(model, (1, 28, 28))
    rows = {r.name: r for r in rep.rows}
    assert rows["conv2"].w_bits == 3 and rows["conv1"].w_bits == 32
    assert rows["conv2"].code_bytes == 3 * (16 * 6 * 25 // 8)
    assert report_from_file(path).totals()["code_bytes"] == rep.totals()["code_bytes"]


def test_load_with_user_model(tmp_path: Path) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4 * 6 * 6, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))

    torch.manual_seed(0)
    model = lowbit.quantize(Net(), _recipe(WEIGHTS["twn"], True)).eval()
    save_packed(model, tmp_path / "u.lowbit")
    with pytest.raises(FormatError, match="no model spec"):
        load_packed(tmp_path / "u.lowbit")
    loaded = load_packed(tmp_path / "u.lowbit", model=Net())
    x = torch.randn(4, 2, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    # a model of another architecture is refused with a clear message
    class Other(Net):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4 * 6 * 6, 7)

    with pytest.raises(FormatError, match="shape"):
        load_packed(tmp_path / "u.lowbit", model=Other())


def test_save_requires_quantized_model_and_writes_atomically(tmp_path: Path) -> None:
    path = tmp_path / "m.lowbit"
    with pytest.raises(ValueError, match="lowbit_recipe"):
        save_packed(build_model("lenet5"), path)
    assert not path.exists()
    model = _prepared("lenet5", _recipe(WEIGHTS["binary"], False), (1, 28, 28))
    path.write_bytes(b"old")
    save_packed(model, path)
    assert path.read_bytes()[:8] != b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.lowbit"]  # no temp files left


def test_file_layout_matches_header(tmp_path: Path) -> None:
    model = _prepared("lenet5", _recipe(WEIGHTS["twn"], True), (1, 28, 28))
    save_packed(model, tmp_path / "m.lowbit")
    with safe_open(tmp_path / "m.lowbit", "pt") as f:  # a standard safetensors file
        meta = f.metadata()
        keys = set(f.keys())
        header = json.loads(meta["lowbit"])
        assert meta["format"] == "lowbit" and header["format"] == "lowbit" and header["version"] == 2
        assert header["spec"] == model.lowbit_spec and header["recipe"] == model.lowbit_recipe
        conv2 = header["layers"]["conv2"]
        enc = conv2["weight"]["encodings"][0]
        assert conv2["weight"]["method"] == "twn" and enc["packing"] == {
            "kind": "radix",
            "base": 3,
            "per_byte": 5,
        }
        assert enc["nbytes"] == -(-16 * 6 * 25 // 5)
        assert f.get_tensor("quant/conv2/0/codes").dtype == torch.uint8
        assert tuple(f.get_tensor("quant/conv2/0/scale").shape) == (16, 1, 1, 1)
        # the latent float weights are not stored, everything else of the state dict is
        assert "state/conv2.parametrizations.weight.original" not in keys
        assert "state/bn2.running_var" in keys and "state/conv2.input_quantizer.alpha" in keys
        # decoding the file by hand gives the model's weight
        codes = unpack_radix(f.get_tensor("quant/conv2/0/codes").numpy(), 3, enc["numel"])
        w = f.get_tensor("quant/conv2/0/levels")[torch.from_numpy(codes).long()].reshape(conv2["shape"])
        assert torch.equal(w * f.get_tensor("quant/conv2/0/scale"), model.conv2.weight.detach())


def test_encode_weight_is_what_is_stored(tmp_path: Path) -> None:
    model = _prepared("lenet5", _recipe(WEIGHTS["binary"], False), (1, 28, 28))
    save_packed(model, tmp_path / "m.lowbit")
    pf = read_packed(tmp_path / "m.lowbit")
    layers = {n: m for n, m in lowbit.quantized_layers(model).items() if weight_quantizer(m) is not None}
    assert sorted(layers) == sorted(pf.layers) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    for name, layer in layers.items():
        enc = encode_weight(layer)
        assert torch.equal(pf.layers[name].encoded.decode(), enc.decode())


# ------------------------------------------------------------------------------------------------
# malformed input: FormatError with a message, nothing else
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory) -> Path:
    model = _prepared("lenet5", _recipe(WEIGHTS["twn"], True), (1, 28, 28))
    path = tmp_path_factory.mktemp("pk") / "m.lowbit"
    save_packed(model, path)
    return path


def _rewrite(path: Path, out: Path, edit_header=None, edit_tensors=None, edit_meta=None) -> Path:
    tensors, meta = read_container(path.read_bytes())
    header = json.loads(meta["lowbit"])
    if edit_header:
        edit_header(header)
    if edit_tensors:
        edit_tensors(tensors)
    meta["lowbit"] = json.dumps(header)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(out), metadata=meta)
    return out


def _expect_error(path: Path, match: str) -> None:
    with pytest.raises(FormatError, match=match) as info:
        load_packed(path)
    assert "internal error" not in str(info.value)


def test_malformed_container(packed_file: Path, tmp_path: Path) -> None:
    data = packed_file.read_bytes()
    p = tmp_path / "x.lowbit"
    p.write_bytes(b"")
    _expect_error(p, "empty")
    p.write_bytes(data[:5])
    _expect_error(p, "too short")
    p.write_bytes(data[: len(data) // 2])
    _expect_error(p, "outside the|header length")
    p.write_bytes(data[:-1])
    _expect_error(p, "outside the")
    p.write_bytes(data + b"\0")
    _expect_error(p, "trailing bytes")
    p.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    _expect_error(p, "header length field says")
    p.write_bytes(struct.pack("<Q", 4) + b"{]} " + b"x")
    _expect_error(p, "not valid JSON")
    p.write_bytes(struct.pack("<Q", 2) + b"[]")
    _expect_error(p, "must be a JSON object")
    _expect_error(tmp_path, "is a directory")
    _expect_error(tmp_path / "missing.lowbit", "does not exist")


def test_foreign_files_refused(tmp_path: Path) -> None:
    p = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.randn(3, 3)}, str(p), metadata={"format": "pt"})
    _expect_error(p, "not a lowbit packed model")
    z = tmp_path / "a.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("data.txt", "hello")
    _expect_error(z, "zip archive")
    j = tmp_path / "a.json"
    j.write_text(json.dumps({"format": "lowbit"}))
    _expect_error(j, "header length|text")


class _Marker:
    """Unpickling this would create a marker file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_payloads_are_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    p = tmp_path / "evil.lowbit"
    p.write_bytes(pickle.dumps(_Marker(str(marker)), protocol=4))
    _expect_error(p, "pickle")
    assert not marker.exists()
    # a torch.save of a module (zip + pickle inside)
    buf = io.BytesIO()
    torch.save({"model": nn.Linear(2, 2), "evil": _Marker(str(marker))}, buf)
    p.write_bytes(buf.getvalue())
    _expect_error(p, "zip archive")
    assert not marker.exists()
    # a pickle smuggled into a tensor of an otherwise valid safetensors file is just bytes
    raw = np.frombuffer(pickle.dumps(_Marker(str(marker))), dtype=np.uint8).copy()
    q = tmp_path / "smuggled.lowbit"
    save_file({"payload": torch.from_numpy(raw)}, str(q), metadata={"format": "lowbit", "lowbit": "{}"})
    with pytest.raises(FormatError):
        load_packed(q)
    assert not marker.exists()


def test_header_validation(packed_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "bad.lowbit"

    def case(match: str, **edits) -> None:
        _expect_error(_rewrite(packed_file, out, **edits), match)

    case("unsupported format version 3", edit_header=lambda h: h.__setitem__("version", 3))
    case("tied", edit_header=lambda h: h.__setitem__("tied", {"x": "not-a-key"}))
    case("channel_axis", edit_header=lambda h: h["layers"]["conv1"]["weight"].__setitem__("channel_axis", 9))
    case("header format", edit_header=lambda h: h.__setitem__("format", "other"))
    case("lacks key", edit_header=lambda h: h.pop("layers"))
    case("unknown key", edit_header=lambda h: h.__setitem__("extra", 1))
    case("not a lowbit packed model", edit_meta=lambda m: m.__setitem__("format", "pt"))
    case("lowbit header is not valid JSON", edit_meta=lambda m: m.__setitem__("lowbit", "{nope"))

    def enc(h):
        return h["layers"]["conv2"]["weight"]["encodings"][0]

    case("nbytes", edit_header=lambda h: enc(h).__setitem__("nbytes", enc(h)["nbytes"] + 1))
    case("numel", edit_header=lambda h: enc(h).__setitem__("numel", 7))
    case("num_levels", edit_header=lambda h: enc(h).__setitem__("num_levels", 9))
    case("radix base", edit_header=lambda h: enc(h).__setitem__("num_levels", 4))
    case("packing", edit_header=lambda h: enc(h).__setitem__("packing", {"kind": "zip"}))
    case("scale_shape", edit_header=lambda h: enc(h).__setitem__("scale_shape", [5, 1, 1, 1]))
    case("dtype", edit_header=lambda h: h["layers"]["conv2"].__setitem__("dtype", "int8"))
    case("missing", edit_tensors=lambda t: t.pop("quant/conv2/0/scale"))
    case("not declared", edit_tensors=lambda t: t.__setitem__("quant/extra", torch.zeros(1)))
    case("not declared", edit_tensors=lambda t: t.__setitem__("state/extra", torch.zeros(1)))
    case(
        "has dtype torch.int8",
        edit_tensors=lambda t: t.__setitem__("quant/conv2/0/codes", t["quant/conv2/0/codes"].to(torch.int8)),
    )
    case(
        "has dtype torch.float64",
        edit_tensors=lambda t: t.__setitem__("quant/conv2/0/scale", t["quant/conv2/0/scale"].double()),
    )
    case("non-finite", edit_tensors=lambda t: t["quant/conv2/0/scale"].__setitem__(0, float("inf")))
    case("non-finite", edit_tensors=lambda t: t["quant/conv2/0/levels"].__setitem__(0, float("nan")))
    case("not a valid group", edit_tensors=lambda t: t["quant/conv2/0/codes"].__setitem__(0, 250))
    case("state .* shape", edit_tensors=lambda t: t.__setitem__("state/bn2.running_var", torch.ones(3)))
    case("cannot be built", edit_header=lambda h: h.__setitem__("spec", {"name": "no_such_model"}))
    case("shape", edit_header=lambda h: h["spec"]["kwargs"].__setitem__("width_mult", 2.0))
    case(
        "stored recipe",
        edit_header=lambda h: h.__setitem__("recipe", {"default": {"weight": {"method": "x"}}}),
    )


def test_codes_beyond_levels_rejected(tmp_path: Path) -> None:
    # dense 2-bit packing of a 3-level codebook: code 3 is representable but invalid
    model = _prepared("lenet5", _recipe(WEIGHTS["twn"], False), (1, 28, 28))
    src = tmp_path / "m.lowbit"
    save_packed(model, src)

    def to_dense(h):
        e = h["layers"]["fc1"]["weight"]["encodings"][0]
        e["packing"], e["nbytes"] = {"kind": "bits", "bits": 2}, (e["numel"] * 2 + 7) // 8

    def codes(t):
        t["quant/fc1/0/codes"] = torch.from_numpy(pack_bits(np.full(120 * 400, 3), 2))

    _expect_error(
        _rewrite(src, tmp_path / "b.lowbit", edit_header=to_dense, edit_tensors=codes),
        "code 3 >= number of levels 3",
    )


# ------------------------------------------------------------------------------------------------
# reports and size targets
# ------------------------------------------------------------------------------------------------


def _file_sums(path: Path) -> dict[str, int]:
    sums = {"codes": 0, "scales": 0, "all": 0}
    with safe_open(path, "pt") as f:
        for k in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            t = f.get_tensor(k)
            nb = t.numel() * t.element_size()
            sums["all"] += nb
            if k.endswith("/codes"):
                sums["codes"] += nb
            elif k.startswith("quant/"):
                sums["scales"] += nb
    return sums


def test_report_matches_file(tmp_path: Path) -> None:
    model = _prepared("lenet5", _recipe({"method": "uniform", "bits": 4}, True), (1, 28, 28))
    rep = model_report(model, (1, 28, 28))
    path = tmp_path / "m.lowbit"
    save_packed(model, path)
    sums = _file_sums(path)
    assert sum(r.code_bytes for r in rep.rows) == sums["codes"]
    assert sum(r.scale_bytes for r in rep.rows) == sums["scales"]
    assert rep.packed_bytes == sums["all"]
    assert rep.file_bytes == os.path.getsize(path)
    assert rep.compression == pytest.approx(rep.fp32_bytes / os.path.getsize(path))
    # fp32 baseline: 4 bytes per parameter of the float model (no BN buffers, no PACT alphas)
    assert rep.fp32_bytes == 4 * sum(p.numel() for p in build_model("lenet5").parameters())
    # MACs from lowbit.models.layer_table, BOPs = MACs * w_bits * a_bits
    macs = {r.name: r.macs for r in layer_table(model, (1, 28, 28))}
    for r in rep.rows:
        assert r.macs == macs[r.name]
        assert r.bops == r.macs * r.w_bits * r.a_bits
        assert r.w_bits == 4 and r.a_bits == (32 if r.name == "conv1" else 4)
    # the file alone gives the same report
    from_file = report_from_file(path, (1, 28, 28))
    assert from_file.totals() == rep.totals()
    assert [r.as_dict() for r in from_file.rows] == [r.as_dict() for r in rep.rows]
    no_macs = report_from_file(path)
    assert no_macs.total_macs is None and no_macs.file_bytes == rep.file_bytes
    # outputs
    d = json.loads(rep.to_json())
    assert d["totals"]["file_bytes"] == rep.file_bytes and len(d["rows"]) == 5
    from rich.console import Console
    from rich.table import Table

    table = rep.to_rich_table()
    assert isinstance(table, Table) and table.row_count == 6
    Console(file=io.StringIO(), width=200).print(table)
    png = rep.plot(tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_float_layers_and_residual_bits(tmp_path: Path) -> None:
    recipe = {
        "default": {"weight": {"method": "binary", "bits": 1}, "activation": None},
        "rules": [{"match": ["@first", "@last"], "weight": None}],
    }
    model = _prepared("lenet5", recipe, (1, 28, 28))
    rep = model_report(model, (1, 28, 28))
    rows = {r.name: r for r in rep.rows}
    assert rows["conv1"].w_bits == 32 and rows["conv1"].w_method == "float" and rows["conv1"].code_bytes == 0
    assert rows["conv1"].float_bytes == 6 * 25 * 4
    assert rows["conv2"].w_bits == 1 and rows["conv2"].a_bits == 32
    assert rows["conv2"].code_bytes == 16 * 6 * 25 // 8
    save_packed(model, tmp_path / "m.lowbit")
    assert rep.file_bytes == os.path.getsize(tmp_path / "m.lowbit")


SIZE_TARGETS = {
    "binary": ({"method": "binary", "bits": 1}, 28.0),
    "ternary": ({"method": "twn", "bits": 2}, 15.0),
    "4-bit": ({"method": "dorefa", "bits": 4}, 7.5),
}


@pytest.mark.parametrize("kind", list(SIZE_TARGETS))
def test_size_targets_mlp(tmp_path: Path, kind: str) -> None:
    weight, target = SIZE_TARGETS[kind]
    torch.manual_seed(0)
    model = build_model("mlp", hidden=(1024, 1024))
    lowbit.quantize(model, {"default": {"weight": weight}})
    assert len(lowbit.quantized_layers(model)) == 3  # every layer quantized
    path = tmp_path / f"{kind}.lowbit"
    save_packed(model, path)
    params = sum(p.numel() for p in build_model("mlp", hidden=(1024, 1024)).parameters())
    ratio = 4 * params / os.path.getsize(path)
    print(f"{kind}: {os.path.getsize(path)} bytes, {ratio:.2f}x smaller than FP32 ({4 * params} bytes)")
    assert ratio >= target
    assert model_report(model).compression == pytest.approx(ratio)


class TiedLM(nn.Module):
    """A language model whose output head shares the embedding's Parameter (GPT-2's wte/lm_head)."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(self.emb(ids))))


TIED_RECIPES = {
    "head_binary": {"default": {"weight": {"method": "binary", "bits": 1}}},
    "head_twn_per_channel": {"default": {"weight": {"method": "twn", "bits": 2, "per_channel": True}}},
    "head_float": {
        "default": {"weight": {"method": "binary", "bits": 1}},
        "rules": [{"match": "head", "weight": None}],
    },
}


@pytest.mark.parametrize("recipe", list(TIED_RECIPES))
def test_tied_weights_survive_save_load(tmp_path: Path, recipe: str) -> None:
    torch.manual_seed(0)
    model = lowbit.quantize(TiedLM(), TIED_RECIPES[recipe]).eval()
    emb_before = model.emb.weight.detach().clone()
    ids = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
    save_packed(model, tmp_path / "t.lowbit")
    fresh = TiedLM()
    loaded = load_packed(tmp_path / "t.lowbit", model=fresh)
    # the float embedding is untouched (not overwritten by the decoded head weight) ...
    assert torch.equal(loaded.emb.weight, emb_before)
    # ... still one Parameter with the head's latent weight, and outputs equal bit for bit
    head_latent = (
        loaded.head.parametrizations.weight.original if recipe != "head_float" else loaded.head.weight
    )
    assert head_latent is loaded.emb.weight
    with torch.no_grad():
        assert torch.equal(loaded(ids), ref)
    # the tied tensor is stored once
    with safe_open(tmp_path / "t.lowbit", "pt") as f:
        keys = set(f.keys())
        header = json.loads(f.metadata()["lowbit"])
    assert "state/emb.weight" in keys
    if recipe == "head_float":
        assert "state/head.weight" not in keys and header["tied"] == {"head.weight": "emb.weight"}
    else:
        assert header["tied"] == {} and "quant/head/0/codes" in keys
        want_axis = 0 if "per_channel" in recipe else None
        assert header["layers"]["head"]["weight"]["channel_axis"] == want_axis
    # saving the loaded model again writes the same file
    save_packed(loaded, tmp_path / "t2.lowbit")
    assert (tmp_path / "t2.lowbit").read_bytes() == (tmp_path / "t.lowbit").read_bytes()


def test_version_1_files_still_load(packed_file: Path, tmp_path: Path) -> None:
    def v1(h: dict) -> None:
        h["version"] = 1
        h.pop("tied")
        for e in h["layers"].values():
            if e["weight"] is not None:
                e["weight"].pop("channel_axis")

    out = _rewrite(packed_file, tmp_path / "v1.lowbit", edit_header=v1)
    a, b = load_packed(packed_file), load_packed(out)
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


class _RnnAttn(nn.Module):
    def __init__(self, rnn: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = rnn(32, 64, batch_first=True, bidirectional=True)
        self.attn = nn.MultiheadAttention(128, 4, batch_first=True)
        self.fc = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn(x)
        a, _ = self.attn(h, h, h)
        return self.fc(a.mean(1))


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_rnn_and_attention_weights_are_packed(tmp_path: Path, rnn: type[nn.RNNBase]) -> None:
    """LSTM/GRU weight_ih/hh (both directions) and MHA in_proj_weight are stored as codes: the
    file is many times smaller than the float model (it used to be 1.0x), loads bit for bit."""
    torch.manual_seed(0)
    model = lowbit.quantize(_RnnAttn(rnn), {
        "default": {"weight": {"method": "binary", "bits": 1},
                    "activation": {"method": "lsq", "bits": 4, "signed": True}},
        "rules": [{"match": "attn.out_proj", "activation": None}],
    })
    x = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(1))
    model.train()
    model(x)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    size = save_packed(model, tmp_path / "r.lowbit")
    fp32 = 4 * sum(p.numel() for p in _RnnAttn(rnn).parameters())
    assert fp32 / size > 8
    pf = read_packed(tmp_path / "r.lowbit")
    want = {f"rnn.weight_{k}_l0{d}" for k in ("ih", "hh") for d in ("", "_reverse")}
    assert want | {"attn.in_proj_weight", "attn.out_proj", "fc"} == set(pf.layers)
    assert all(pf.layers[n].weight is not None for n in want | {"attn.in_proj_weight"})
    assert "state/rnn.parametrizations.weight_hh_l0.original" not in pf.tensors
    loaded = load_packed(tmp_path / "r.lowbit", model=_RnnAttn(rnn))
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    report = report_from_file(tmp_path / "r.lowbit")
    assert {r.name for r in report.rows} == set(pf.layers)
