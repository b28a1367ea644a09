"""The flat executor's peephole fusion of a Linear layer's output quantization (``_fuse_codes``): the
quantize rows between LeNet-5's Linear layers are left out, the layers write the codes themselves,
and the output bits do not change; a float output that something else reads is kept. And the
flattening max pool before a Linear layer, which writes its codes in (h, w, c) order for that
layer's permuted weight columns (``_Val.hwc``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _runtime_models import calibrated_lenet

import lowbit
import lowbit.runtime as rt
from lowbit.models import build_model
from lowbit.runtime import executor as E
from lowbit.runtime import kernels as K
from lowbit.runtime._jit import EPI_CODES, EPI_FLOAT, EPI_RELU
from lowbit.runtime.compiler import reference_fp64

needs_vnni = pytest.mark.skipif(not K.HAS_VNNI, reason="int8 kernels need AVX-512 VNNI")


@needs_vnni
@pytest.mark.parametrize("weight", [{"method": "binary", "bits": 1}, {"method": "twn", "bits": 2}],
                         ids=["binary", "ternary"])
def test_linear_layers_write_the_next_layers_codes(weight, monkeypatch):
    q = calibrated_lenet(weight)
    x = 3 * torch.rand(7, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    progs, outs = {}, {}
    for fuse in (False, True):
        monkeypatch.setattr(E, "FUSE_CODES", fuse)
        packed = rt.compile(q, x[:2])
        progs[fuse] = packed.executor.program((1, 28, 28)).prog
        outs[fuse] = [packed(x[:b]) for b in (1, 2, 7)]
    quant = {f: sum(int(p[0]) == E.OP_QUANT for p in progs[f]) for f in (False, True)}
    assert quant == {False: 3, True: 1}  # the input's quantization stays
    fc = [int(p[20]) for p in progs[True] if p[0] == E.OP_CONV][2:]
    assert fc == [EPI_RELU | EPI_CODES, EPI_RELU | EPI_CODES, EPI_FLOAT]  # fc1, fc2 codes; fc3 the output
    for got, want in zip(outs[True], outs[False], strict=True):
        assert torch.equal(got, want)


def test_a_float_output_read_elsewhere_is_kept():
    """The float output of a Linear row that a second row also reads is not replaced by codes."""
    conv = np.zeros(E.NF, np.int64)
    conv[[0, 2, 3, 20, 21]] = [E.OP_CONV, 1, 1, EPI_RELU | EPI_FLOAT, 64]
    quant = np.zeros(E.NF, np.int64)
    quant[[0, 1, 2, 3, 4, 5, 8, 9]] = [E.OP_QUANT, 1, 64, 1, 1, 10, 128, 5]
    fused = E._fuse_codes([conv.copy(), quant.copy()], result_off=0)
    assert len(fused) == 1 and fused[0][20] == EPI_RELU | EPI_CODES
    assert (fused[0][23], fused[0][28]) == (128, 5)  # the quantize row's codes and clip formula
    gap = np.zeros(E.NF, np.int64)
    gap[[0, 1, 5]] = [E.OP_GAP, 64, 256]  # a second reader of offset 64
    kept = E._fuse_codes([conv.copy(), quant.copy(), gap], result_off=0)
    assert len(kept) == 3 and kept[0][20] == EPI_RELU | EPI_FLOAT
    assert len(E._fuse_codes([conv.copy(), quant.copy()], result_off=64)) == 2  # the program's output


@needs_vnni
@pytest.mark.parametrize("width", [0.75, 2.0], ids=["12-channel pool", "32-channel pool"])
def test_flattening_pool_writes_rows_in_hwc_order(width):
    """LeNet-5 at other widths: pool2 over 12 channels (the byte path) and 32 (whole vectors) writes
    fc1's rows in (h, w, c) order, and the output is the fake-quantized model's in float64."""
    torch.manual_seed(0)
    act = {"method": "pact", "bits": 4, "alpha_init": 3.0}
    recipe = {"default": {"weight": {"method": "twn", "bits": 2}, "activation": act}}
    q = lowbit.quantize(build_model("lenet5", width_mult=width).eval(), recipe)
    with torch.no_grad():
        q.train()(torch.rand(16, 1, 28, 28))
    q.eval()
    x = 3 * torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    packed = rt.compile(q, x[:2])
    prog = packed.executor.program((1, 28, 28)).prog
    pools = [p for p in prog if p[0] == E.OP_MAXPOOL]
    assert pools and all(int(p[17]) == 0 for p in pools)  # never PyTorch's (c, h, w) order
    assert int(pools[-1][2]) == {0.75: 12, 2.0: 32}[width]
    for b in (1, 5):
        ref = reference_fp64(q, x[:b])
        assert float((packed(x[:b]).double() - ref).abs().max() / ref.abs().max()) < 1e-6
