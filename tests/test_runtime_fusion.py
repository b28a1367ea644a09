"""The flat executor's peephole fusion of a Linear layer's output quantization (``_fuse_codes``): the
quantize rows between LeNet-5's Linear layers are left out, the layers write the codes themselves,
and the output bits do not change; a float output that something else reads is kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _runtime_models import calibrated_lenet

import lowbit.runtime as rt
from lowbit.runtime import executor as E
from lowbit.runtime import kernels as K
from lowbit.runtime._jit import EPI_CODES, EPI_FLOAT, EPI_RELU

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
