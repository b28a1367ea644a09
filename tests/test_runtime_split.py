"""A batch split over threads, one part per thread through the whole model (``PackedModel.split_work``,
``compiler.SPLIT_MIN_ROWS`` / ``SPLIT_MIN_MACS``): where it is allowed, what it runs, and that the
result and the caller's thread settings do not change."""

from __future__ import annotations

import numba
import pytest
import torch
from torch import nn

import lowbit
import lowbit.runtime as rt
from lowbit.runtime import compiler
from lowbit.runtime import kernels_threads as KT

RECIPE = {"default": {"weight": {"method": "binary", "bits": 1},
                      "activation": {"method": "pact", "bits": 8, "alpha_init": 4.0}}}
two_threads = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")


class _TokenMLP(nn.Module):
    """Token-wise layers on (batch, tokens, hidden): every sample independent of the others."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x):
        return self.norm(x + self.down(torch.nn.functional.gelu(self.up(x))))


class _Mixing(_TokenMLP):
    def forward(self, x):
        y = super().forward(x)
        return y - y.mean(0, keepdim=True)  # every sample reads the others


def _packed(model: nn.Module, tokens: int = 6, hidden: int = 32):
    torch.manual_seed(0)
    q = lowbit.quantize(model, RECIPE).eval()
    return rt.compile(q, torch.randn(1, tokens, hidden))


def test_split_work_counts_rows_and_multiply_adds():
    pm = _packed(_TokenMLP())
    # 6 tokens a sample; up: 6 x 128 x 32, down: 6 x 32 x 128 multiply-adds
    assert pm.split_work == (6, 2 * 6 * 128 * 32)
    assert _packed(_Mixing()).split_work is None  # the samples are not independent


@two_threads
def test_split_batch_equals_one_thread_and_restores_settings(monkeypatch):
    pm = _packed(_TokenMLP())
    x = torch.randn(9, 6, 32)
    prev = KT.set_serial(True)
    try:
        ref = pm(x)  # one thread: never split
    finally:
        KT.set_serial(prev)
    calls = []
    real = compiler.PackedModel._forward_split

    def spy(self, x, n):
        calls.append((int(x.shape[0]), n))
        return real(self, x, n)

    monkeypatch.setattr(compiler.PackedModel, "_forward_split", spy)
    keep = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(2)
    torch.set_num_threads(2)
    try:
        pm(x)  # 4 samples a part: 24 rows, far below the thresholds
        assert calls == []
        monkeypatch.setattr(compiler, "SPLIT_MIN_ROWS", 24)
        monkeypatch.setattr(compiler, "SPLIT_MIN_MACS", 4 * 6 * 2 * 128 * 32)
        got = pm(x)
        assert calls == [(9, 2)]
        assert torch.equal(got, ref)  # parts of 5 and 4 samples, bit for bit the whole batch
        assert torch.get_num_threads() == 2 and not KT._LOCAL.__dict__.get("serial", False)
        monkeypatch.setattr(compiler, "SPLIT_MIN_ROWS", 25)  # one row short of a part
        pm(x)
        assert len(calls) == 1
    finally:
        numba.set_num_threads(keep[0])
        torch.set_num_threads(keep[1])


@two_threads
def test_split_waits_for_every_part_when_one_fails(monkeypatch):
    pm = _packed(_TokenMLP())
    monkeypatch.setattr(compiler, "SPLIT_MIN_ROWS", 1)
    monkeypatch.setattr(compiler, "SPLIT_MIN_MACS", 1)
    calls = []
    real = compiler.PackedModel._forward_split
    monkeypatch.setattr(compiler.PackedModel, "_forward_split",
                        lambda self, x, n: calls.append(n) or real(self, x, n))
    keep = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(2)
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="takes 32 features"):
            pm(torch.randn(4, 6, 31))  # the wrong hidden size fails in every part
        assert calls == [2]  # it failed inside the split
        assert torch.get_num_threads() == 2 and not KT._LOCAL.__dict__.get("serial", False)
    finally:
        numba.set_num_threads(keep[0])
        torch.set_num_threads(keep[1])
