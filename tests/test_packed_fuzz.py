"""Fuzzing load_packed: thousands of mutated .lowbit files either raise FormatError with a
specific message (never another exception, never the "internal error" catch-all) or, when the
mutation hit a byte that does not matter (a float of the state, a valid code), load into a
model that still runs."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.export import FormatError, load_packed, save_packed
from lowbit.export.container import read_container, serialize
from lowbit.models import build_model

SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow], "derandomize": True}


def _make_file() -> tuple[bytes, torch.Tensor]:
    """The file's bytes and the saved model's output on X."""
    torch.manual_seed(0)
    model = build_model("mlp", in_features=12, hidden=(10,), num_classes=3, bn=True)
    recipe = {
        "default": {
            "weight": {"method": "twn", "bits": 2, "per_channel": True},
            "activation": {"method": "pact", "bits": 4},
        },
        "rules": [
            {"match": "@first", "activation": None},
            {"match": "@last", "weight": {"method": "dorefa", "bits": 3}},
        ],
    }
    lowbit.quantize(model, recipe)
    model.eval()
    with torch.no_grad():
        out = model(X)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.lowbit"
        save_packed(model, p)
        return p.read_bytes(), out


X = torch.randn(2, 12, generator=torch.Generator().manual_seed(1))
GOOD, GOOD_OUT = _make_file()
_DIR = tempfile.mkdtemp(prefix="lowbit-fuzz-")
atexit.register(shutil.rmtree, _DIR, True)


def _check(data: bytes) -> None:
    path = os.path.join(_DIR, "f.lowbit")
    with open(path, "wb") as f:
        f.write(data)
    try:
        model = load_packed(path)
    except FormatError as e:
        msg = str(e)
        assert msg and "internal error" not in msg, msg
        return
    # a don't-care byte: the model must still be a working module
    assert isinstance(model, torch.nn.Module)
    with torch.no_grad():
        out = model(torch.randn(2, 12))
    assert out.shape == (2, 3)


def test_good_file_loads() -> None:
    _check(GOOD)
    with torch.no_grad():  # the unmutated file computes the saved model, bit for bit
        assert torch.equal(load_packed(os.path.join(_DIR, "f.lowbit"))(X), GOOD_OUT)


@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(1, 255)), min_size=1, max_size=6))
@settings(max_examples=1500, **SETTINGS)
def test_byte_flips(flips: list[tuple[int, int]]) -> None:
    data = bytearray(GOOD)
    for pos, xor in flips:
        data[pos] ^= xor
    _check(bytes(data))


# flips concentrated in the headers (length field + JSON), where most of the structure is
_HEADER_END = 8 + int.from_bytes(GOOD[:8], "little")


@given(st.lists(st.tuples(st.integers(0, _HEADER_END - 1), st.integers(1, 255)), min_size=1, max_size=3))
@settings(max_examples=700, **SETTINGS)
def test_header_byte_flips(flips: list[tuple[int, int]]) -> None:
    data = bytearray(GOOD)
    for pos, xor in flips:
        data[pos] ^= xor
    _check(bytes(data))


@given(st.integers(0, len(GOOD) - 1))
@settings(max_examples=300, **SETTINGS)
def test_truncations(n: int) -> None:
    _check(GOOD[:n])


@given(st.integers(0, len(GOOD)), st.binary(min_size=1, max_size=16))
@settings(max_examples=300, **SETTINGS)
def test_insertions(pos: int, blob: bytes) -> None:
    _check(GOOD[:pos] + blob + GOOD[pos:])


# ---- structured edits: valid containers whose lowbit header JSON is edited ---------------------
TENSORS, META = read_container(GOOD)
HEADER = json.loads(META["lowbit"])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(["bits", "radix", "float32", "uint8", "twn", "lowbit", "mlp"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=10,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


PATHS = [p for p in _paths(HEADER) if p]


def _edit(header, path, op, value):
    h = json.loads(json.dumps(header))
    parent = h
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    if op == "delete" and isinstance(parent, dict):
        del parent[last]
    elif op == "delete" and isinstance(parent, list):
        parent.pop(last)
    elif op == "add" and isinstance(parent, dict):
        parent[f"{last}_x"] = value
    elif op == "int" and isinstance(parent[last], int) and not isinstance(parent[last], bool):
        parent[last] = parent[last] + (value if isinstance(value, int) else 1)
    else:
        parent[last] = value
    return h


@given(st.sampled_from(PATHS), st.sampled_from(["set", "delete", "add", "int"]), json_values)
@settings(max_examples=1200, **SETTINGS)
def test_header_json_edits(path, op, value) -> None:
    header = _edit(HEADER, path, op, value)
    meta = dict(META, lowbit=json.dumps(header))
    _check(serialize(TENSORS, meta))


@given(
    st.sampled_from(sorted(TENSORS)),
    st.sampled_from(["dtype", "shape", "drop", "grow", "rename"]),
    st.integers(0, 5),
)
@settings(max_examples=300, **SETTINGS)
def test_tensor_edits(name, op, k) -> None:
    tensors = dict(TENSORS)
    t = tensors[name]
    if op == "dtype":
        dtypes = [torch.float32, torch.float64, torch.float16, torch.uint8, torch.int8, torch.int64]
        tensors[name] = t.to(dtypes[k % len(dtypes)])
    elif op == "shape":
        tensors[name] = t.reshape(-1) if t.dim() != 1 else t.reshape(1, -1)
    elif op == "drop":
        del tensors[name]
    elif op == "grow":
        tensors[name] = (
            torch.cat([t.reshape(-1), t.reshape(-1)[: k + 1]]) if t.numel() else torch.zeros(k + 1)
        )
    else:
        tensors[name + str(k)] = tensors.pop(name)
    _check(serialize(tensors, META))


@pytest.mark.parametrize("text", ["", "null", "[]", "{}", '{"format": "lowbit"}', "{" * 100000, '"x"'])
def test_degenerate_headers(text: str) -> None:
    _check(serialize(TENSORS, dict(META, lowbit=text)))
