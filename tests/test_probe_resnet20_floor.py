"""The ResNet-20 floor probe (benchmarks/speed/probe_resnet20_floor.py): the flat program's
convolutions line up with the model's layers, and the ``vpdpbusd`` count of an int8-kernel
convolution follows from its shape (lookup convolutions have none)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed"
sys.path.insert(0, str(SPEED))
sys.path.insert(0, str(SPEED.parent))

import probe_resnet20_floor as floor  # noqa: E402

import lowbit  # noqa: E402
from lowbit.models import build_model  # noqa: E402
from lowbit.runtime import compile as rt_compile  # noqa: E402
from lowbit.runtime import executor  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("weights", ["binary", "4bit"])
def test_program_convolutions_match_the_layers_and_count_their_instructions(weights):
    torch.manual_seed(0)
    fm = build_model("resnet20").eval()
    q = lowbit.quantize(copy.deepcopy(fm), {"default": {"weight": floor.WEIGHTS[weights],
                                                        "activation": floor.ACTIVATION}}).eval()
    packed = rt_compile(q, torch.rand(2, *floor.SHAPE))
    prog = packed.executor.program(floor.SHAPE)
    convs = [row for row in prog.prog if int(row[0]) == executor.OP_CONV]
    sizes = floor.kernel_sizes(fm)
    assert len(sizes) == len(convs) == 20  # 19 convolutions and the classifier
    assert [(int(r[4]), int(r[10])) for r in convs] == [k[:2] for k in sizes]
    first = floor.int8_instructions(convs[0], sizes[0], 2)
    assert first == 2 * 32 * 32 * 1 * 3 * 3  # 3 channels: a kernel row's 9 bytes in 3 quads
    assert floor.macs(sizes[0], convs[0], 2) == 2 * 32 * 32 * 16 * 27
    fc = floor.int8_instructions(convs[-1], sizes[-1], 1)
    assert sizes[-1] == (64, 10, 1, 1) and fc == 1 * 16  # one block of 16 outputs, 64 channels
    for row, k in zip(convs[1:7], sizes[1:7], strict=True):  # stage 1: 16 -> 16, 3 x 3, 32 x 32
        if int(row[29]) == 0:
            assert floor.int8_instructions(row, k, 1) == 32 * 32 * 3 * 12
    looked_up = [r for r in convs if int(r[29]) == 4]
    assert all(floor.int8_instructions(r, k, 1) is None for r, k in zip(convs, sizes, strict=True)
               if int(r[29]) == 4)
    if weights == "4bit":
        assert not looked_up  # no lookup form for 4-bit weights
