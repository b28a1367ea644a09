"""Linear -> Linear code-tile links (``compiler._link_tiles``, ``layers.CodeTiles``): which layers
link, that linked and unlinked models give the same outputs bit for bit at every row count and
thread count, and that the tile path really runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.runtime import compile as rt_compile
from lowbit.runtime import kernels_amx as KA
from lowbit.runtime import kernels_threads as KT
from lowbit.runtime.layers import CodeTiles

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "speed"))
import ab_tile_links  # the A/B's switch: the same model with its links off

pytestmark = pytest.mark.skipif(KA.backend() is None, reason="needs AMX-INT8 or AVX-512 VNNI (tile layouts)")

# not a multiple of 64 (the tiles' padding columns), and wide enough that the flat executor leaves the
# layers to the GEMV / AMX kernels (it takes small int8 layers)
N = 544


def _recipe(w: dict, bits: int) -> dict:
    return {"default": {"weight": w, "activation": {"method": "pact", "bits": bits}}}


BINARY_A4 = _recipe({"method": "binary", "bits": 1}, 4)
TERNARY_A8 = _recipe({"method": "twn", "bits": 2}, 8)
# a recipe whose layers run on the tiles from a few rows on: binary weights with 4-bit codes on AMX;
# without AMX their lookup tables are faster at every row count (no tiles), so 4-bit weights there
LINKED = BINARY_A4 if KA.backend() == "amx" else _recipe({"method": "dorefa", "bits": 4}, 4)


def _packed(model: nn.Module, recipe: dict, n: int = N):
    torch.manual_seed(0)
    lowbit.quantize(model, recipe)
    return rt_compile(model.eval(), torch.rand(16, n))


def _mlp(depth: int = 3, n: int = N) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(n, n)] + ([nn.ReLU()] if i < depth - 1 else [])
    return nn.Sequential(*layers)


def _unlinked(pm, x):
    return ab_tile_links.unlinked(pm)(x)


@pytest.mark.parametrize("recipe", [LINKED, TERNARY_A8], ids=["linked", "w2a8"])
def test_linked_equals_unlinked_at_every_row_count_and_thread_count(recipe):
    pm = _packed(_mlp(), recipe)
    assert pm.executor is None or pm.executor.program((N,)) is None
    layers = list(pm.packed_layers().values())
    assert [m.tile_target is not None for m in layers] == [True, True, False]  # the last one outputs floats
    assert all("tiles" in m.describe() for m in layers[:2])
    g = torch.Generator().manual_seed(1)
    for rows in (1, 7, 8, 11, 12, 16, 17, 40):
        x = torch.rand(rows, N, generator=g) * 3 - 0.5
        for serial in (True, False):
            prev = KT.set_serial(serial)
            try:
                y, ref = pm(x), _unlinked(pm, x)
            finally:
                KT.set_serial(prev)
            assert type(y) is torch.Tensor and torch.equal(y, ref), (rows, serial)


def test_the_tile_path_runs_from_the_consumers_amx_rows(monkeypatch):
    pm = _packed(_mlp(), LINKED)
    first = next(iter(pm.packed_layers().values()))
    m = first.tile_target.min_rows
    passes = []  # the float -> tile-layout quantizing passes (kernels_amx.amx_rows)
    real = KA.amx_rows
    monkeypatch.setattr(KA, "amx_rows", lambda x, *a, **k: passes.append(x.shape[0]) or real(x, *a, **k))
    pm(torch.rand(m, N))
    assert passes == [m]  # only the first layer quantizes floats: layers 2 and 3 read tiles
    passes.clear()
    _unlinked(pm, torch.rand(m, N))
    assert passes == [m, m, m]
    passes.clear()
    pm(torch.rand(m - 1, N))  # fewer rows than the consumer runs on AMX: no tiles
    assert passes == []
    out = first(torch.rand(m, N))
    assert isinstance(out, CodeTiles) and out.rows == m and out.features == N


def test_layers_that_do_not_link():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(N, N), nn.Linear(N, N), nn.Linear(N, N)

        def forward(self, x):
            h = self.a(x)
            return self.b(h) + self.c(h)  # a's output has two users

    pm = _packed(Twice(), LINKED)
    assert all(m.tile_target is None for m in pm.packed_layers().values())
    # an op between the layers that is not fused
    pm = _packed(nn.Sequential(nn.Linear(N, N), nn.Tanh(), nn.Linear(N, N)), LINKED)
    assert all(m.tile_target is None for m in pm.packed_layers().values())
    # rows with a leading token dimension (3-d input): not linked (input_ndim 3)
    seq = nn.Sequential(nn.Linear(N, N), nn.ReLU(), nn.Linear(N, N))
    torch.manual_seed(0)
    lowbit.quantize(seq, LINKED)
    pm = rt_compile(seq.eval(), torch.rand(2, 8, N))
    assert all(m.tile_target is None for m in pm.packed_layers().values())


def test_tiles_of_the_wrong_width_are_a_clear_error():
    pm = _packed(_mlp(), LINKED)
    last = list(pm.packed_layers().values())[-1]
    bad = CodeTiles(KA.code_tiles(16, N + 64), 16, N + 64)
    with pytest.raises(RuntimeError, match=f"code tiles of {N + 64} features"):
        last(bad)


def test_links_without_an_example_input_and_3d_rows_go_as_floats():
    seq = _mlp()
    torch.manual_seed(0)
    lowbit.quantize(seq, LINKED)
    pm = rt_compile(seq.eval())  # traced, no example: the input rank is unknown
    assert [m.tile_target is not None for m in pm.packed_layers().values()] == [True, True, False]
    x = torch.rand(3, 16, N)  # 48 rows with a leading dimension: floats between the layers
    y = pm(x)
    assert y.shape == (3, 16, N) and torch.equal(y, _unlinked(pm, x))
    x2 = torch.rand(40, N)
    assert torch.equal(pm(x2), _unlinked(pm, x2))
