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


@pytest.fixture(scope="module")
def torch_formulas() -> Iterator[None]:
    """A module whose subject is not the fused numba kernels (CLI commands, messages) runs the
    PyTorch formulas: numba is never loaded for it (``pytestmark = usefixtures("torch_formulas")``)."""
    from lowbit.quant import fused

    was = fused.is_enabled()
    fused.set_enabled(False)
    yield
    fused.set_enabled(was)
