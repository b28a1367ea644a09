"""Bad inputs to the runtime are errors that say what was wrong and what would be right: a bad
``example_input`` of ``compile`` / ``load``, a call with a non-tensor or an integer tensor, a packed
convolution given the wrong rank or channel count; floating inputs of other widths still work."""

from __future__ import annotations

import pytest
import torch
from _runtime_models import FLAT, quantized_lenet
from torch import nn

import lowbit
import lowbit.runtime as rt
from lowbit.runtime import kernels as K

X = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
DTYPE_MSG = (r"input dtype torch\.{}: the packed model takes floating-point inputs "
             r"\(float32; float16/64 are converted\)")


@pytest.fixture(scope="module")
def m() -> nn.Module:
    return quantized_lenet("recipes/lenet5-w1a4.yaml")  # conv1 stays a float layer in PyTorch


@pytest.fixture(scope="module")
def fast_m(m):
    return rt.compile(m, X)


@pytest.fixture(scope="module")
def fast_all():
    # conv1 bit-serial: module by module
    return rt.compile(quantized_lenet("recipes/lenet5-w1a4-all.yaml"), X)


@pytest.fixture(scope="module")
def fast_flat():
    if not K.HAS_VNNI:
        pytest.skip("the flat executor's int8 kernels need AVX-512 VNNI")
    pm = rt.compile(quantized_lenet(FLAT), X)
    assert pm.executor is not None and pm.executor.program((1, 28, 28)) is not None  # runs flat
    return pm


@pytest.fixture(scope="module")
def saved(m, tmp_path_factory):
    path = tmp_path_factory.mktemp("bad_input") / "m.lowbit"
    lowbit.save_packed(m, path)
    return path


# a) example_input


def test_compile_wrong_spatial_size_names_the_example(m):
    with pytest.raises(ValueError, match=r"compile: the model failed on example_input "
                       r"\(tensor \(2, 1, 32, 32\) float32\): mat1 and mat2.*"
                       r"pass one batch the model itself accepts, e\.g\. torch\.randn\(1, 1, 28, 28\)$"):
        rt.compile(m, torch.randn(2, 1, 32, 32))


def test_load_wrong_spatial_size_names_the_example(saved):
    with pytest.raises(ValueError, match=r"failed on example_input \(tensor \(1, 1, 32, 32\) float32\).*"
                       r"e\.g\. torch\.randn\(1, 1, 28, 28\)"):
        rt.load(saved, torch.randn(1, 1, 32, 32))


def test_compile_wrong_dtype_and_list_name_the_example(m):
    with pytest.raises(ValueError, match=r"failed on example_input \(tensor \(2, 1, 28, 28\) float64\): "
                       r"expected scalar type Double.*e\.g\. torch\.randn\(1, 1, 28, 28\)"):
        rt.compile(m, X.double())
    with pytest.raises(ValueError, match=r"failed on example_input "
                       r"\(list of 1: tensor \(2, 1, 28, 28\) float32\)"):
        rt.compile(m, [X])


def test_load_shape_tuple_says_a_tensor_is_expected(saved):
    with pytest.raises(TypeError, match=r"example_input is a tuple of ints \(1, 1, 28, 28\).*"
                       r"a tensor is expected, not a shape: e\.g\. torch\.randn\(1, 1, 28, 28\)"):
        rt.load(saved, (1, 1, 28, 28))


def test_example_hint_for_a_linear_model():
    model = lowbit.quantize(nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)),
                            {"default": {"weight": {"method": "binary", "bits": 1}}}).eval()
    with pytest.raises(ValueError, match=r"\(tensor \(2, 5\) float32\).*e\.g\. torch\.randn\(1, 12\)$"):
        rt.compile(model, torch.randn(2, 5))


# b) dtypes and non-tensors at the compiled model's entry


@pytest.mark.parametrize("which", ["fast_m", "fast_all", "fast_flat"])
def test_float16_and_float64_give_the_float32_output(which, request):
    pm = request.getfixturevalue(which)
    for x in (X, X[:1]):  # the general path and the one-image path
        ref = pm(x)
        assert torch.equal(pm(x.double()), ref)  # float32 -> float64 -> float32 is exact
        xh = x.half()
        assert torch.equal(pm(xh), pm(xh.float()))


@pytest.mark.parametrize("which", ["fast_m", "fast_all", "fast_flat"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_integer_inputs_are_an_error(which, dtype, request):
    pm = request.getfixturevalue(which)
    pm(X[:1])  # the one-image path is warm: an integer input must not take it either
    for x in (X, X[:1]):
        with pytest.raises(ValueError, match=DTYPE_MSG.format(str(dtype).removeprefix("torch."))):
            pm((x * 50).to(dtype))
    with pytest.raises(ValueError, match=DTYPE_MSG.format("int64")):
        pm((X * 50).long().numpy())


@pytest.mark.parametrize("which", ["fast_m", "fast_all", "fast_flat"])
def test_non_tensor_is_a_type_error(which, request):
    pm = request.getfixturevalue(which)
    with pytest.raises(TypeError, match=r"^expected a torch\.Tensor, got list$"):
        pm(X.tolist())
    assert torch.equal(pm(X.numpy()), pm(X))  # an array is taken as a tensor, as before


def test_flat_executor_rejects_integers_itself(fast_flat):
    """The executor's own entry: also without the model's entry check (no example_input)."""
    ex = fast_flat.executor
    y = fast_flat(X)
    assert torch.equal(ex(X.double()), y)
    with pytest.raises(ValueError, match=DTYPE_MSG.format("uint8")):
        ex((X * 50).to(torch.uint8))
    saved, fast_flat.input_dtype = fast_flat.input_dtype, None
    try:
        with pytest.raises(ValueError, match=DTYPE_MSG.format("int64")):
            fast_flat((X * 50).long())
        assert torch.equal(fast_flat(X.double()), y)
    finally:
        fast_flat.input_dtype = saved


def test_chain_rejects_integers_and_converts_floats():
    torch.manual_seed(0)
    n = 512  # wide enough that the flat executor leaves it to the GEMV: a chain
    model = nn.Sequential(nn.Linear(n, n), nn.ReLU(), nn.Linear(n, n))
    recipe = {"default": {"weight": {"method": "twn", "bits": 2},
                          "activation": {"method": "pact", "bits": 8}}}
    pm = rt.compile(lowbit.quantize(model, recipe).eval(), torch.rand(4, n))
    assert pm.chain is not None
    x = torch.rand(1, n)
    assert torch.equal(pm(x.double()), pm(x))
    with pytest.raises(ValueError, match=DTYPE_MSG.format("int64")):
        pm((x * 4).long())


# c) packed convolutions: rank and channels


@pytest.mark.parametrize("shape", [(2, 3, 28, 28), (1, 3, 28, 28), (1, 28, 28), (2, 784)])
@pytest.mark.parametrize("which", ["fast_all", "fast_flat"])
def test_packed_conv_wrong_shape(which, shape, request):
    pm = request.getfixturevalue(which)
    msg = rf"^conv1: an input of shape \({', '.join(map(str, shape))}\); this Conv2d takes \(N, 1, H, W\)$"
    with pytest.raises(ValueError, match=msg):
        pm(torch.randn(*shape))
    conv = pm.packed_layers()["conv1"]
    with pytest.raises(ValueError, match=msg):  # the module itself, without the executor
        conv(torch.randn(*shape))


def test_packed_conv_unfused_module_path(fast_flat):
    pm = rt.compile(quantized_lenet(FLAT), X, fuse=False)  # int8 conv modules, no executor
    assert pm.executor is None
    assert float((pm(X) - fast_flat(X)).abs().max()) < 1e-4 * float(fast_flat(X).abs().max())
    with pytest.raises(ValueError, match=r"^conv1: an input of shape \(2, 3, 28, 28\)"):
        pm(torch.randn(2, 3, 28, 28))
