"""NaN and infinity in the packed runtime: a non-finite input is an error on every call path (the
fake-quantized model's output on it is NaN; the packed kernels would turn it into a code), a model
with non-finite parameters or buffers is refused by ``compile``, the accuracy check reports a NaN
output as an infinite difference; float16 / bfloat16 models answer in their dtype."""

from __future__ import annotations

import math

import pytest
import torch
from _runtime_models import FLAT, quantized_lenet
from torch import nn

import lowbit
import lowbit.runtime as rt
from lowbit.models.mlp import MLP
from lowbit.runtime import compiler as C
from lowbit.runtime import kernels as K

G = torch.Generator().manual_seed(0)
IMG = torch.randn(8, 1, 28, 28, generator=G)
VEC = torch.randn(8, 16, generator=G)
WIDE = torch.rand(8, 512, generator=G)
MSG = r"^input holds NaN or infinity \({} of {} values\); the packed model takes finite values only "

def _mlp() -> nn.Module:
    torch.manual_seed(0)
    m = MLP(num_classes=5, in_features=16, hidden=(32, 32))
    recipe = {"default": {"weight": {"method": "uniform", "bits": 2},
                          "activation": {"method": "pact", "bits": 4}}}
    return lowbit.quantize(m, recipe).eval()


def _wide() -> nn.Module:
    torch.manual_seed(0)
    n = 512  # wide enough that the flat executor leaves it to the GEMV: a chain
    model = nn.Sequential(nn.Linear(n, n), nn.ReLU(), nn.Linear(n, n))
    recipe = {"default": {"weight": {"method": "twn", "bits": 2},
                          "activation": {"method": "pact", "bits": 8}}}
    return lowbit.quantize(model, recipe).eval()


def _flat():
    if not K.HAS_VNNI:
        pytest.skip("the flat executor's int8 kernels need AVX-512 VNNI")
    m = quantized_lenet(FLAT)
    pm = rt.compile(m, IMG[:2])
    assert pm.executor is not None and pm.executor.program((1, 28, 28)) is not None  # runs flat
    return m, pm, IMG


def _lenet_modules():
    m = quantized_lenet("recipes/lenet5-w1a4.yaml")  # conv1 in PyTorch: the packed layers module by module
    return m, rt.compile(m, IMG[:2]), IMG


def _unfused():
    m = quantized_lenet(FLAT)
    pm = rt.compile(m, IMG[:2], fuse=False)
    assert pm.executor is None
    return m, pm, IMG


def _small_mlp():
    m = _mlp()
    return m, rt.compile(m, VEC), VEC


def _chain():
    m = _wide()
    pm = rt.compile(m, WIDE[:4])
    assert pm.chain is not None
    return m, pm, WIDE


def _no_example():
    """No example_input: no entry dtype check; the flat executor's and the layers' paths remain."""
    m = quantized_lenet(FLAT)
    return m, rt.compile(m), IMG


CASES = {"flat": _flat, "lenet_modules": _lenet_modules, "unfused": _unfused, "mlp": _small_mlp,
         "chain": _chain, "no_example": _no_example}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    return CASES[request.param]()


def _bad(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, int]:
    x = x.clone()
    if kind == "all_nan":
        x.fill_(float("nan"))
        return x, x.numel()
    flat = x.view(-1)
    flat[flat.numel() // 2] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[kind]
    if kind == "nan":
        flat[0] = float("nan")
        return x, 2
    return x, 1


@pytest.mark.parametrize("kind", ["nan", "inf", "-inf", "all_nan"])
@pytest.mark.parametrize("batch", [1, 8])
def test_nonfinite_input_is_refused(case, batch, kind):
    _, pm, x = case
    x = x[:batch].contiguous()
    want = pm(x)  # (batch 1: the second call takes the one-image path)
    assert torch.equal(pm(x), want)
    bad, n = _bad(x, kind)
    with pytest.raises(ValueError, match=MSG.format(n, x.numel())):
        pm(bad)
    with pytest.raises(ValueError, match=MSG.format(n, x.numel())):
        pm(bad.numpy())
    assert torch.equal(pm(x), want)  # a refused call leaves the model as it was


@pytest.mark.parametrize("batch", [1, 8])
def test_nonfinite_input_refused_in_other_dtypes(case, batch):
    _, pm, x = case
    bad, n = _bad(x[:batch].contiguous(), "nan")
    for b in (bad.double(), bad.half(), bad.transpose(0, -1)):  # converted, and not contiguous
        with pytest.raises(ValueError, match=MSG.format(n, bad.numel())):
            pm(b)


def test_finite_inputs_unchanged(case):
    """Finite inputs, large and tiny ones included, give what the fake-quantized model gives."""
    m, pm, x = case
    for xs in (x, x[:1], x * 1e30, x * 1e-30):
        xs = xs.contiguous()
        with torch.no_grad():
            ref, got = m(xs), pm(xs)
        assert torch.isfinite(got).all()
        assert float((got - ref).abs().max()) <= 1e-4 * max(float(ref.abs().max()), 1e-30)


def test_flat_executor_refuses_nonfinite_itself():
    _, pm, x = _flat()
    ex = pm.executor
    one = x[:1].contiguous()
    want = ex(one)
    assert torch.equal(ex(one), want) and torch.equal(ex.one_args(one), want)  # as before the check
    for b, n in (_bad(one, "nan"), _bad(x, "inf")):
        with pytest.raises(ValueError, match=MSG.format(n, b.numel())):
            ex(b)
    assert torch.equal(ex(one), want)


@pytest.mark.parametrize("tensor", ["weight", "bias", "alpha"])
def test_compile_refuses_nonfinite_parameters(tensor):
    m = _mlp()
    with torch.no_grad():
        if tensor == "weight":
            m.fc2.parametrizations.weight.original[2, 5] = float("nan")
            name = r"parametrizations\.weight\.original"
        elif tensor == "bias":
            m.fc2.bias[0] = float("inf")
            name = "bias"
        else:
            m.fc2.input_quantizer.alpha.fill_(float("nan"))
            name = r"input_quantizer\.alpha"
    with pytest.raises(ValueError, match=rf"^compile: layer 'fc2': {name} holds NaN or infinity \(1 of "):
        rt.compile(m, VEC)
    with pytest.raises(ValueError, match=r"layer 'fc2'"):  # without an example too
        rt.compile(m)


def test_compile_refuses_nonfinite_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3))
    m = lowbit.quantize(model, FLAT).eval()
    rt.compile(m, IMG[:2])  # finite: fine
    m[1].running_var[3] = float("nan")
    with pytest.raises(ValueError, match=r"^compile: layer '1': running_var holds NaN or infinity \(1 of 8"):
        rt.compile(m, IMG[:2])


def test_measure_counts_nan_as_infinite():
    pm = rt.compile(_mlp(), VEC)
    ref = torch.randn(4, 5, generator=G)
    C._measure(pm, ref, ref.clone())
    assert pm.max_abs_diff == 0.0
    nan = ref.clone()
    nan[1, 2] = float("nan")
    for r, g in ((nan, ref), (ref, nan), (nan, nan)):
        C._measure(pm, r, g)
        assert pm.max_abs_diff == math.inf and pm.max_rel_diff == math.inf
    inf = ref.clone()
    inf[0, 0] = float("inf")
    C._measure(pm, inf, inf.clone())  # equal infinities do not differ
    assert pm.max_abs_diff == 0.0
    C._measure(pm, inf, ref)
    assert pm.max_abs_diff == math.inf


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("make", ["mlp", "lenet"])
def test_half_models_answer_in_their_dtype(make, dtype):
    m = (_mlp() if make == "mlp" else quantized_lenet(FLAT)).to(dtype)
    x = (VEC if make == "mlp" else IMG).to(dtype)
    pm = rt.compile(m, x)
    for xs in (x, x[:1], x[:1]):
        with torch.no_grad():
            ref, got = m(xs), pm(xs)
        assert got.dtype == dtype == ref.dtype
        assert float((got.float() - ref.float()).abs().max()) <= 2e-2 * float(ref.float().abs().max())
    assert pm(x.float()).dtype == dtype
