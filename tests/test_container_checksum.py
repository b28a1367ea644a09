"""The container's checksum: a damaged data section is a FormatError, files without one still read."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save as st_save

import lowbit
from lowbit.export.container import CHECKSUM_KEY, read_container, serialize
from lowbit.export.errors import FormatError
from lowbit.models import build_model


def test_a_flipped_data_byte_is_a_format_error(tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet5")
    lowbit.quantize(model, lowbit.Recipe.from_yaml("recipes/lenet5-w1a4.yaml"))
    model.eval()
    path = tmp_path / "m.lowbit"
    lowbit.save_packed(model, path)
    data = bytearray(path.read_bytes())
    lowbit.load_packed(path)  # intact: loads
    n = int.from_bytes(data[:8], "little")
    for at in (8 + n, len(data) - 1, 8 + n + (len(data) - 8 - n) // 2):  # first, last, middle data byte
        bad = bytearray(data)
        bad[at] ^= 0x10
        (tmp_path / "bad.lowbit").write_bytes(bytes(bad))
        with pytest.raises(FormatError, match="does not match the checksum"):
            lowbit.load_packed(tmp_path / "bad.lowbit")


def test_the_checksum_is_kept_out_of_the_metadata_and_old_files_read_unchecked():
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.uint8)}
    data = serialize(tensors, {"k": "v"})
    got, meta = read_container(data)
    assert meta == {"k": "v"} and all(torch.equal(got[k], tensors[k]) for k in tensors)
    old = st_save(tensors, metadata={"k": "v"})  # another writer: no checksum
    got, meta = read_container(old)
    assert meta == {"k": "v"} and torch.equal(got["a"], tensors["a"])
    with pytest.raises(ValueError, match=CHECKSUM_KEY):
        serialize(tensors, {CHECKSUM_KEY: "0"})
