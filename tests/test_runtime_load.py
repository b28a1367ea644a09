"""lowbit.runtime.load: packed inference built from a .lowbit file's stored codes equals the
runtime compiled from the original model (bit for bit) and the fake-quantized model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lowbit
import lowbit.runtime as rt
from lowbit.export.packed import read_packed
from lowbit.runtime.compiler import reference_fp64
from lowbit.runtime.layers import decompose_weight


def _zoo(wm: dict, act: dict | None) -> torch.nn.Module:
    from lowbit.models import build_model

    torch.manual_seed(0)
    model = build_model("lenet5")
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    recipe = {"default": {"weight": wm, "activation": act}}
    return lowbit.quantize(model, recipe).eval()


CASES = [
    ({"method": "binary", "bits": 1}, {"method": "pact", "bits": 4, "alpha_init": 3.0}),
    ({"method": "twn", "bits": 2}, {"method": "dorefa", "bits": 2}),
    ({"method": "dorefa", "bits": 4}, {"method": "pact", "bits": 3, "alpha_init": 2.0}),
    ({"method": "binary", "bits": 1, "per_channel": True}, None),
]


@pytest.mark.parametrize("wm,act", CASES, ids=lambda d: str(d and d["method"]))
def test_load_equals_compile_and_fake_quant(tmp_path, wm, act):
    model = _zoo(wm, act)
    path = tmp_path / "m.lowbit"
    lowbit.save_packed(model, path)
    loaded = rt.load(path)  # no example input: built from the file alone
    x = torch.rand(5, 1, 28, 28)
    compiled = rt.compile(model, x, batch_chunk=0)
    assert {r.name: r.kind for r in loaded.layers} == {r.name: r.kind for r in compiled.layers}
    assert all(r.kind == "packed" for r in loaded.layers if r.name != "fc3" or act is not None)
    with torch.no_grad():
        ref = model(x)
    got = loaded(x)
    if act is not None:  # same codes, same integer kernels: equal to the compiled original, bit for bit
        assert torch.equal(got, compiled(x))
    else:  # float activations: sums of float inputs (batch-norm folding may differ without an example)
        torch.testing.assert_close(got, compiled(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    if act is None:
        return
    # the integer arithmetic equals the exactly decoded float64 model
    ref64 = reference_fp64(model, x)
    assert float((got.double() - ref64).abs().max() / ref64.abs().max()) < 1e-6


def test_load_uses_the_stored_codes(tmp_path):
    """The packed planes are those of the file's codes, also where the quantizer is a fixed point
    on the decoded weight (DoReFa's preimage), so nothing is re-quantized."""
    model = _zoo({"method": "dorefa", "bits": 4}, {"method": "pact", "bits": 4, "alpha_init": 3.0})
    path = tmp_path / "m.lowbit"
    lowbit.save_packed(model, path)
    pf = read_packed(path)
    loaded = rt.load(path)
    layers = loaded.packed_layers()
    assert set(layers) == {n for n, r in pf.layers.items() if r.encoded is not None}
    for name, pm in layers.items():
        enc = pf.layers[name].encoded
        if enc.codes.dim() == 4:  # convolutions: reduction order (ki, kj, c)
            enc = type(enc)(enc.codes.permute(0, 2, 3, 1), enc.levels, enc.scale, enc.bits)
        assert np.array_equal(pm.wp.W, decompose_weight(enc).W), name


def test_load_with_example_measures(tmp_path):
    model = _zoo({"method": "twn", "bits": 2}, {"method": "pact", "bits": 4, "alpha_init": 3.0})
    path = tmp_path / "m.lowbit"
    lowbit.save_packed(model, path)
    x = torch.rand(3, 1, 28, 28)
    loaded = rt.load(path, x)
    assert loaded.max_rel_diff < 1e-4
    fresh = lowbit.models.build_model("lenet5")
    assert torch.equal(rt.load(path, model=fresh)(x), rt.load(path)(x))


def test_one_definition_of_codes(tmp_path):
    """save_packed, the packed layers and the float64 reference all take a layer's codes from
    encode_weight: with the stored codes frozen and the latent weight overwritten by noise, the
    model, the compiled runtime and reference_fp64 still compute the stored codes."""
    from lowbit.export.packed import encode_weight, load_packed
    from lowbit.runtime.load import freeze_stored_weights

    model = _zoo({"method": "twn", "bits": 2}, {"method": "pact", "bits": 4, "alpha_init": 3.0})
    path = tmp_path / "m.lowbit"
    lowbit.save_packed(model, path)
    loaded = freeze_stored_weights(load_packed(path), path)
    with torch.no_grad():
        for m in loaded.modules():
            if hasattr(m, "parametrizations"):
                m.parametrizations.weight.original.normal_()
    pf = read_packed(path)
    for name, rec in pf.layers.items():
        if rec.encoded is not None:
            assert torch.equal(encode_weight(loaded.get_submodule(name)).codes, rec.encoded.codes)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(loaded(x), ref, rtol=0, atol=0)
    ref64 = reference_fp64(loaded, x)
    got = rt.compile(loaded, x)(x)
    assert float((got.double() - ref64).abs().max() / ref64.abs().max()) < 1e-6
    assert torch.equal(got, rt.load(path)(x))
