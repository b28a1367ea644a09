"""The one-image path of the flat executor (``FlatExecutor.one``, ``PackedModel.__call__``): a cached
program read straight from the tensor's memory. Its output equals the general path bit for bit; it
is taken only where it applies (one image of a shape this thread has run, float32, contiguous, no
hooks), and every other input still gives the same result through the general path."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
import lowbit.runtime as rt
from lowbit.models import build_model
from lowbit.runtime import kernels as K

needs_vnni = pytest.mark.skipif(not K.HAS_VNNI, reason="int8 kernels need AVX-512 VNNI")
ACT = {"method": "pact", "bits": 4, "alpha_init": 3.0}


def _packed(name: str, shape: tuple[int, ...]):
    torch.manual_seed(0)
    m = build_model(name).eval()
    q = lowbit.quantize(m, {"default": {"weight": {"method": "binary", "bits": 1}, "activation": ACT}}).eval()
    return rt.compile(q, torch.rand(2, *shape))


def _general(packed, x: torch.Tensor) -> torch.Tensor:
    """The output through the general path (no one-image cache)."""
    ex = packed.executor
    saved = dict(ex._one)
    ex._one.clear()
    try:
        return ex._call(x)
    finally:
        ex._one.update(saved)


@needs_vnni
@pytest.mark.parametrize("name, shape", [("lenet5", (1, 28, 28)), ("resnet20", (3, 16, 16))])
def test_one_image_path_equals_general_path(name, shape):
    packed = _packed(name, shape)
    ex = packed.executor
    x = 3 * torch.rand(1, *shape)  # inputs past PACT's clip (3): outputs that differ between inputs
    assert ex.one(x) is None  # nothing cached for this thread yet
    first = packed(x)  # the general path, which caches the program for one image
    assert (x.shape, threading.get_ident()) in ex._one
    for _ in range(3):
        xi = 3 * torch.rand(1, *shape)
        got = ex.one(xi)
        assert got is not None and got.shape == first.shape
        assert torch.equal(got, _general(packed, xi)) and torch.equal(packed(xi), got)
    # outputs are fresh tensors, not a buffer the next call overwrites
    a, b = packed(x), packed(3 * torch.rand(1, *shape))
    assert torch.equal(a, first) and not torch.equal(a, b)


@needs_vnni
def test_one_image_path_declines_what_it_does_not_apply_to():
    shape = (1, 28, 28)
    packed = _packed("lenet5", shape)
    ex = packed.executor
    x = torch.rand(1, *shape)
    want = packed(x)
    # float64, a non-contiguous view, a tensor that requires grad: the general path, same values
    assert ex.one(x.double()) is None and torch.equal(packed(x.double()), want)
    wide = torch.rand(1, 1, 28, 56)[..., ::2]
    assert not wide.is_contiguous() and ex.one(wide) is None
    assert torch.equal(packed(wide), packed(wide.contiguous()))
    xg = x.clone().requires_grad_(True)
    assert ex.one(xg) is None and torch.equal(packed(xg), want)
    # another thread has no cached program: it runs the general path, then its own
    outs = []
    t = threading.Thread(target=lambda: outs.extend([ex.one(x), packed(x), ex.one(x)]))
    t.start()
    t.join()
    assert outs[0] is None and torch.equal(outs[1], want) and torch.equal(outs[2], want)
    # a forward hook on the packed model is called (the direct path steps aside)
    seen = []
    h = packed.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        assert torch.equal(packed(x), want) and len(seen) == 1
    finally:
        h.remove()
    # a batch of two goes through forward (its thread policy), equal to two single images
    x2 = torch.rand(2, *shape)
    assert torch.equal(packed(x2), torch.cat([packed(x2[:1]), packed(x2[1:])]))


@needs_vnni
def test_one_image_path_on_rows():
    """A model on flat rows (a Linear stack: input (1, K)) takes the path with its (K, 1, 1) image."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    q = lowbit.quantize(m, {"default": {"weight": {"method": "binary", "bits": 1}, "activation": ACT}}).eval()
    packed = rt.compile(q, torch.rand(2, 64))
    if packed.executor is None or packed.executor.program((64,)) is None:
        pytest.skip("this Linear stack does not run flat here")
    x = torch.rand(1, 64)
    first = packed(x)
    got = packed.executor.one(x)
    assert got is not None and got.shape == (1, 8) and torch.equal(got, first)
    assert np.array_equal(_general(packed, x).numpy(), got.numpy())


@needs_vnni
def test_one_image_outputs_survive_block_refills(monkeypatch):
    """Outputs are views of blocks of a few images each: every one keeps its own values across
    many calls and refills, equal to the general path's."""
    from lowbit.runtime import executor

    shape = (1, 28, 28)
    packed = _packed("lenet5", shape)
    monkeypatch.setattr(executor, "OUT_BLOCK_BYTES", 3 * 4 * 10)  # 3 outputs of 10 floats a block
    xs = [3 * torch.rand(1, *shape) for _ in range(8)]
    packed(xs[0])  # caches the program for one image
    got = [packed(x) for x in xs]
    want = [_general(packed, x) for x in xs]
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert len({g.data_ptr() for g in got}) == len(got)  # no two outputs share memory
    assert got[0].untyped_storage().data_ptr() != got[3].untyped_storage().data_ptr()  # another block
