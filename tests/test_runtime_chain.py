"""The one-sample call of a chain of packed layers (``PackedModel.chain``): which graphs take it,
and that it returns exactly what the module path returns."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import lowbit
from lowbit.runtime import compile as rt_compile
from lowbit.runtime import kernels_threads as KT

# wide enough that the flat executor leaves them to the GEMV (it takes small int8 layers)
N = 512
RECIPE = {"default": {"weight": {"method": "twn", "bits": 2}, "activation": {"method": "pact", "bits": 8}}}


def _packed(model: nn.Module, n: int = N):
    torch.manual_seed(0)
    lowbit.quantize(model, RECIPE)
    model.eval()
    return rt_compile(model, torch.rand(4, n))


def _module_path(pm, x):
    chain, pm.chain = pm.chain, None
    try:
        return pm(x)
    finally:
        pm.chain = chain


def _mlp(n: int = N, depth: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(n, n)] + ([nn.ReLU()] if i < depth - 1 else [])
    return nn.Sequential(*layers)


def test_mlp_is_a_chain_and_equals_the_module_path():
    pm = _packed(_mlp())
    assert pm.chain is not None and len(pm.chain) == 3  # the ReLUs fused into the layers
    assert pm.executor is None or pm.executor.program((N,)) is None
    for seed in range(3):
        x = torch.rand(1, N, generator=torch.Generator().manual_seed(seed)) * 2 - 0.5
        y, ref = pm(x), _module_path(pm, x)
        assert torch.equal(y, ref)
        assert torch.equal(y, pm.forward(x))
    x = torch.rand(5, N)  # more than one sample: the module path (threads, chunks) as before
    assert torch.equal(pm(x), _module_path(pm, x))


def test_graphs_that_are_not_a_chain():
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(N, N), nn.Linear(N, N)

        def forward(self, x):
            return self.b(self.a(x)) + x  # the input is used twice

    assert _packed(Skip()).chain is None
    assert _packed(nn.Sequential(nn.Linear(N, N), nn.Tanh(), nn.Linear(N, 8))).chain is None
    assert _packed(nn.Sequential(nn.Linear(N, N), nn.Linear(N, 8))).chain is not None


def test_chain_runs_serially_and_restores_the_thread_setting():
    pm = _packed(_mlp())
    seen = []
    first = pm.chain[0]

    def spy(x):
        seen.append(KT.num_threads())
        return first(x)

    pm.chain = (spy, *pm.chain[1:])
    before = KT.set_serial(False)
    try:
        pm(torch.rand(1, N))
        assert seen == [1]
        assert KT.set_serial(False) is False  # the caller's setting is back
    finally:
        KT.set_serial(before)


def test_hooks_and_grad_take_the_module_path():
    pm = _packed(_mlp())
    calls = []
    h = pm.register_forward_hook(lambda m, a, out: calls.append(1))
    try:
        pm(torch.rand(1, N))
    finally:
        h.remove()
    assert calls == [1]
    x = torch.rand(1, N, requires_grad=True)
    assert torch.equal(pm(x), _module_path(pm, x.detach()))


def test_a_wrong_width_is_a_clear_error():
    pm = _packed(_mlp())
    for x in (torch.rand(1, N - 1), torch.rand(1, 2 * N), torch.rand(3, N + 1)):  # chain and module paths
        what = re.escape(f"input of shape {tuple(x.shape)}") + f".*takes {N} features"
        with pytest.raises(ValueError, match=what):
            pm(x)
