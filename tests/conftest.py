"""Shared test fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models: intra-op threads only cost time (a lot on a shared, loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """The runtime kernels on 1 or 2 numba threads, with the parallel split forced on for small
    work (``kernels_threads.PARALLEL_MIN_WORK``). A module whose kernels have split thresholds of
    their own overrides it with a fixture of the same name that takes this one and sets them too."""
    import numba

    from lowbit.runtime import kernels_threads

    old = numba.get_num_threads()
    numba.set_num_threads(min(request.param, numba.config.NUMBA_NUM_THREADS))
    monkeypatch.setattr(kernels_threads, "PARALLEL_MIN_WORK", 1)
    yield request.param
    numba.set_num_threads(old)


@pytest.fixture(scope="module")
def torch_formulas() -> Iterator[None]:
    """A module whose subject is not the fused numba kernels (CLI commands, messages) runs the
    PyTorch formulas: numba is never loaded for it (``pytestmark = usefixtures("torch_formulas")``)."""
    from lowbit.quant import fused

    was = fused.is_enabled()
    fused.set_enabled(False)
    yield
    fused.set_enabled(was)
