"""The one-image call through ``executor._run_at``: the program, arenas and image geometry in one
int64 context, three ints to pass. It must equal the general path and the fifteen-argument
``_run_args`` path bit for bit, be what ``PackedModel.__call__`` runs for a cached one-image shape,
and be skipped for what the one-image path declines. Batches go from ``PackedModel.__call__``
straight to the executor's general path unless hooks are set."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from test_runtime_flat_one import _general, _packed

from lowbit.runtime import executor
from lowbit.runtime import kernels as K

pytestmark = pytest.mark.skipif(not K.HAS_VNNI, reason="int8 kernels need AVX-512 VNNI")
LENET = (1, 28, 28)


@pytest.fixture(scope="module")
def lenet():
    return _packed("lenet5", LENET)


class _Spy:
    """Counts the calls of the function it wraps."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


@pytest.mark.parametrize("name, shape", [("lenet5", LENET), ("resnet20", (3, 16, 16))])
def test_context_call_equals_general_and_old_path(name, shape, lenet):
    packed = lenet if name == "lenet5" else _packed(name, shape)
    ex = packed.executor
    packed(torch.rand(1, *shape))  # caches the one-image program
    one = ex._one[((1, *shape), threading.get_ident())]
    for _ in range(3):
        x = 3 * torch.rand(1, *shape)  # past PACT's clip: outputs that differ between inputs
        want = _general(packed, x)
        got = ex.one(x)
        assert torch.equal(got, want) and torch.equal(ex.one_args(x), want)
        out = np.full(want.numel(), np.nan, np.float32)
        executor._run_at(one[3], x.data_ptr(), out.ctypes.data)
        assert np.array_equal(out, want.numpy().reshape(-1))


def test_packed_call_runs_the_context_call(lenet, monkeypatch):
    x = torch.rand(1, *LENET)
    lenet(x)
    spy = _Spy(executor._run_at)
    monkeypatch.setattr(executor, "_run_at", spy)
    y = lenet(x)
    assert spy.calls == 1 and torch.equal(y, _general(lenet, x))
    # what the one-image path declines never reaches the context call, and gives the same values
    assert torch.equal(lenet(x.double()), y)
    assert torch.equal(lenet(x.clone().requires_grad_(True)), y)
    wide = torch.rand(1, 1, 28, 56)[..., ::2]
    assert torch.equal(lenet(wide), _general(lenet, wide.contiguous()))
    x2 = torch.cat([x, x])
    assert torch.equal(lenet(x2), torch.cat([y, y]))
    assert spy.calls == 1
    # another thread has no context of its own yet: the general path first, the context call after
    outs = []
    t = threading.Thread(target=lambda: outs.extend([lenet(x), lenet(x)]))
    t.start()
    t.join()
    assert all(torch.equal(o, y) for o in outs) and spy.calls == 2


def test_context_holds_the_program_and_arenas(lenet):
    ex = lenet.executor
    x = torch.rand(1, *LENET)
    lenet(x)
    prog, fa, ca, addr, _, _, keep, chw = ex._one[(x.shape, threading.get_ident())]
    cx = keep[0]
    assert all(any(k is a for k in keep) for a in (prog.prog, prog.aux, prog.w8, prog.sc, prog.oinfo))
    assert addr == cx.ctypes.data and cx.dtype == np.int64 and cx.size == executor.CX_LEN
    assert cx[executor.CX_PROG] == prog.prog.ctypes.data and cx[executor.CX_ROWS] == prog.prog.shape[0]
    assert cx[executor.CX_W8] == prog.w8.ctypes.data and cx[executor.CX_NW8] == prog.w8.size
    assert cx[executor.CX_FA] == fa.ctypes.data and cx[executor.CX_NCA] == ca.size
    assert tuple(cx[executor.CX_C : executor.CX_W + 1]) == chw == LENET
    assert cx[executor.CX_NOUT] == prog.out_numel and cx[executor.CX_CHUNK] == prog.chunk
    with pytest.raises(ValueError, match="C-contiguous"):
        executor._context(prog, fa[::2], ca, chw)


def test_batches_skip_module_call_but_not_hooks(lenet, monkeypatch):
    """A batch goes from ``PackedModel.__call__`` straight to the executor's general path (not
    through ``forward``), with the same values; with a hook set it goes through ``forward``."""
    calls = []
    fwd = lenet.forward
    monkeypatch.setattr(lenet, "forward", lambda *a, **k: calls.append(1) or fwd(*a, **k))
    x = 3 * torch.rand(8, *LENET)
    y = lenet(x)
    assert calls == [] and torch.equal(y, _general(lenet, x))
    assert torch.equal(y[2:3], lenet(x[2:3].clone()))
    seen = []
    h = lenet.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        assert torch.equal(lenet(x), y) and calls == [1] and len(seen) == 1
    finally:
        h.remove()
    # a numpy batch still goes through forward (which converts it)
    assert torch.equal(lenet(x.numpy()), y) and calls == [1, 1]
