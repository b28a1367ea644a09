"""Every buffer an AMX tile of the int8 convolutions is loaded from or stored to starts on a 64-byte
cache line (tiles whose rows straddle two lines ran at less than half speed): the code images, the
packed weight tiles and tile configurations, the parked int32 sums, and the flat executor's arenas
and weight array with every region in them. Addresses are checked on many allocations of varied
sizes, so that a buffer left to the allocator's 16-byte alignment is caught."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lowbit
import lowbit.runtime as rt
from lowbit.models import build_model
from lowbit.runtime import _amx, executor
from lowbit.runtime import kernels as K
from lowbit.runtime import kernels_int8 as k8

LINE = 64
SIZES = [1, 3, 17, 64, 100, 1000, 4097, 20000, 300000]


def _on_line(a: np.ndarray, off: int = 0) -> bool:
    return (a.ctypes.data + off) % LINE == 0


def test_code_images_on_lines():
    keep = []  # live arrays of odd sizes, so the heap is in many states
    for i, n in enumerate(SIZES):
        keep.append(np.empty(n + 5 * i, np.uint8))
        x = np.random.default_rng(i).random((2, 3 + i % 3, 5 + i, 4 + (n % 7)), dtype=np.float32)
        xq = k8.int8_quantize(x, (1, 1), 1.0, 3.0, 0)
        assert _on_line(xq), (n, xq.ctypes.data % LINE)
        assert xq.size == 2 * (x.shape[1] + 2) * (x.shape[2] + 2) * x.shape[3] + k8.INT8_SLACK


def test_accumulator_tiles_on_lines():
    keep = []
    for n in SIZES:
        keep.append(np.empty(n, np.uint8))
        acc = k8.amx_acc()
        assert acc.dtype == np.int32 and acc.size == 1024
        assert _on_line(acc), acc.ctypes.data % LINE


@pytest.mark.parametrize("O,KH,KW,C", [(16, 3, 3, 3), (20, 3, 3, 16), (64, 3, 3, 32), (40, 1, 1, 64),
                                       (8, 5, 5, 1)])
def test_amx_weight_tiles_on_lines(O, KH, KW, C):
    w_int = np.random.default_rng(O + C).integers(-8, 8, (O, KH, KW, C))
    ref = np.ascontiguousarray(w_int)
    for n in SIZES:
        junk = np.empty(n, np.uint8)  # noqa: F841 (shifts the heap)
        w, kc, nck, nbt = k8.pack_amx_weights(ref)
        assert w.dtype == np.int8 and w.size == KH * nck * nbt * kc * 16
        # tile (k, b) starts at byte (k*nbt + b)*kc*16; its rows are 64 bytes apart
        assert all(_on_line(w, (k * nbt + b) * kc * 16) for k in range(KH * nck) for b in range(nbt))
    # the aligned copy holds the same layout as the plain transpose
    kc, nck = k8.amx_chunks(KW, C)
    flat = np.zeros((nbt * 16, KH, nck * kc), np.int8)
    flat[:O, :, : KW * C] = ref.reshape(O, KH, KW * C)
    want = flat.reshape(nbt, 16, KH, nck, kc // 4, 4).transpose(2, 3, 0, 4, 1, 5).reshape(-1)
    assert np.array_equal(w, want)


def _resnet(width_mult: float) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model("resnet20", width_mult=width_mult).eval()
    act = {"method": "pact", "bits": 4, "alpha_init": 3.0}
    return lowbit.quantize(m, {"default": {"weight": {"method": "twn", "bits": 2}, "activation": act}}).eval()


@pytest.mark.skipif(not K.HAS_VNNI, reason="the flat executor's int8 kernels need AVX-512 VNNI")
@pytest.mark.parametrize("width_mult", [0.5, 1.0])
def test_flat_program_buffers_on_lines(width_mult, monkeypatch):
    """Planned as on an AMX machine (planning only packs NumPy arrays; nothing runs on tiles here):
    the weight array, each layer's weight tiles and tile configuration, the arenas and every code
    image region in them start on lines; then the arenas of a real call (on whatever the CPU has)."""
    monkeypatch.setattr(_amx, "amx_enabled", lambda: True)
    model = _resnet(width_mult)
    shape = (3, 16, 16)
    packed = rt.compile(model, torch.rand(2, *shape))
    assert packed.executor is not None
    for n in (1, 3):
        prog = executor.plan(packed.executor.gm, shape, n)
        convs = prog.prog[prog.prog[:, 0] == executor.OP_CONV]
        amx = convs[convs[:, 29] == 1]
        assert len(amx) == len(convs) - 1  # all but the classifier
        assert _on_line(prog.w8)
        for p in convs:
            assert p[15] % LINE == 0  # weight tiles (AMX) / weight vectors (VNNI)
            assert p[1] % LINE == 0  # the input code image
            assert p[23] % LINE == 0  # the next layer's code image
        for p in amx:
            assert p[30] % LINE == 0  # ldtilecfg block
        for _ in range(4):
            fa, ca = prog.arenas()
            assert _on_line(fa) and _on_line(ca)
            assert not fa.any() and not ca.any()
            assert fa.size == prog.fa_size and ca.size == prog.ca_size
    monkeypatch.undo()
    packed = rt.compile(model, torch.rand(2, *shape))
    packed(torch.rand(2, *shape))
    arenas = packed.executor._local.arenas
    assert arenas and all(_on_line(fa) and _on_line(ca) for fa, ca in arenas.values())
