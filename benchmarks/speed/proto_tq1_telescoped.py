"""Prototype tiles for the 1.6-bit ternary GEMV (``runtime/kernels_tq1.py``), timed in cache against
the library's 1.6-bit and 2-bit tiles; not used by the runtime.

    python benchmarks/speed/proto_tq1_telescoped.py

The library's tile sums, per trit ``i`` of a byte, ``S_i = u_i . x_i`` and ``S'_i = u_{i+1} . x_i``
(``u_{i+1} = 3 u_i mod 256``) and ends with ``E = sum_i (3 S_i - S'_i) / 256``: two ``vpdpbusd``
per 64 weights and row (``profile_tq1_rows.md``). Two prototypes:

- ``split``: the same sums spread over twice the registers (trit ``i`` into register ``i % 2``):
  tests whether the dependency chains of the accumulators, not the instruction count, limit it;
- ``telescoped``: the terms regrouped by ``u_i``: ``256 E = u_0.(3 x_0) + sum_{i=1..4} u_i.(3 x_i -
  x_{i-1}) + u_5.(-x_4)``, six ``vpdpbusd`` per five trits (1.2 per 64 weights and row) on
  activation combinations prepared once per row. They must be signed bytes: with codes ``a`` of at
  most 6 bits and ``x = a - 32`` they lie in [-127, 125]; the epilogue's ``F`` becomes
  ``32 * sum f``. Two accumulators per output block (trit ``i`` into ``i % 2``).

Each case is one N x N ternary layer called back to back (weights in L2 / L3), the numba loop
alone on prepared codes (6-bit codes, so that every variant applies), 1 and 2 rows, one thread,
interleaved (``harness.time_interleaved``); every variant's output is checked bit for bit against
the 2-bit GEMV's. Writes benchmarks/results/proto_tq1_telescoped.{json,md}. Single run, seed 0.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from common import ROOT, run_meta, write_results
from harness import time_interleaved
from llvmlite import ir
from numba.core import cgutils

from lowbit.runtime import kernels_gemv as KV
from lowbit.runtime import kernels_tq1 as KT
from lowbit.runtime._jit import _V16I32, _vpdpbusd, kernel
from lowbit.runtime._llvm_args import broadcast_quad, i64
from lowbit.runtime.kernels_gemv import few_row_tile, tile_loads
from lowbit.runtime.kernels_tq1 import GROUP, _opaque


def _acc(builder, R, OB, n):
    zero = ir.Constant(_V16I32, [0] * 16)
    return [[[cgutils.alloca_once_value(builder, zero) for _ in range(n)] for _ in range(OB)]
            for _ in range(R)]


def _total(builder, regs):
    s = builder.load(regs[0])
    for reg in regs[1:]:
        s = builder.add(s, builder.load(reg))
    return s


def split_tile(R: int, OB: int):
    """The library's product with S and S' each over 2 registers."""

    def product(builder, rows, blks, ws, nG):
        s, s1 = _acc(builder, R, OB, 2), _acc(builder, R, OB, 2)
        with cgutils.for_range(builder, nG) as loop:
            g = loop.index
            u = tile_loads(builder, blks, g, ws)
            xq = builder.mul(g, i64(GROUP))
            for i in range(5):
                un = [builder.add(_opaque(builder, builder.add(v, v)), v) for v in u]
                for r in range(R):
                    av = broadcast_quad(builder, rows[r], builder.add(xq, i64(4 * i)))
                    for k in range(OB):
                        a0, a1 = s[r][k][i % 2], s1[r][k][i % 2]
                        builder.store(_vpdpbusd(builder, builder.load(a0), u[k], av), a0)
                        builder.store(_vpdpbusd(builder, builder.load(a1), un[k], av), a1)
                u = un

        def sums(r, k):
            three = builder.mul(_total(builder, s[r][k]), ir.Constant(_V16I32, [3] * 16))
            return builder.ashr(builder.sub(three, _total(builder, s1[r][k])), ir.Constant(_V16I32, [8] * 16))

        return sums

    return few_row_tile(R, OB, product)


def telescoped_tile(R: int, OB: int):
    """Six products per group against the prepared combinations (24 bytes a group and row)."""

    def product(builder, rows, blks, ws, nG):
        acc = _acc(builder, R, OB, 2)
        with cgutils.for_range(builder, nG) as loop:
            g = loop.index
            u = tile_loads(builder, blks, g, ws)
            xq = builder.mul(g, i64(24))
            for i in range(6):
                for r in range(R):
                    av = broadcast_quad(builder, rows[r], builder.add(xq, i64(4 * i)))
                    for k in range(OB):
                        a0 = acc[r][k][i % 2]
                        builder.store(_vpdpbusd(builder, builder.load(a0), u[k], av), a0)
                if i < 5:
                    u = [builder.add(_opaque(builder, builder.add(v, v)), v) for v in u]

        def sums(r, k):
            return builder.ashr(_total(builder, acc[r][k]), ir.Constant(_V16I32, [8] * 16))

        return sums

    return few_row_tile(R, OB, product)


_S = (split_tile(1, 4), split_tile(1, 1), split_tile(2, 2), split_tile(2, 1))
_T = (telescoped_tile(1, 4), telescoped_tile(1, 1), telescoped_tile(2, 2), telescoped_tile(2, 1))
_s14, _s11, _s22, _s21 = _S
_t14, _t11, _t22, _t21 = _T


@kernel
def _part(variant, codes, A, off, nG, F, w, coef, relu, out, k_lo, k_hi):
    """kernels_tq1._part on a prototype tile (variant 0: split, 1: telescoped)."""
    M, xs = codes.shape
    O = out.shape[1]
    cs = coef.shape[1]
    xf, cf, of = codes.reshape(-1), coef.reshape(-1), out.reshape(-1)
    ws = nG * 64
    k = k_lo
    while k < k_hi:
        wb, o0 = k * ws, 16 * k
        step = 4 if M == 1 else 2
        if k + step > k_hi:
            step = 1
        if variant == 0:
            if M == 1 and step == 4:
                _s14(xf, 0, xs, w, wb, ws, nG, A, 0, M, F, off, cf, cs, o0, relu, of, O)
            elif M == 1:
                _s11(xf, 0, xs, w, wb, ws, nG, A, 0, M, F, off, cf, cs, o0, relu, of, O)
            elif step == 2:
                _s22(xf, 0, xs, w, wb, ws, nG, A, 0, M, F, off, cf, cs, o0, relu, of, O)
            else:
                _s21(xf, 0, xs, w, wb, ws, nG, A, 0, M, F, off, cf, cs, o0, relu, of, O)
        else:
            if M == 1 and step == 4:
                _t14(xf, 0, xs, w, wb, ws, nG, A, 0, M, F, off, cf, cs, o0, relu, of, O)
            elif M == 1:
                _t11(xf, 0, xs, w, wb, ws, nG, A, 0, M, F, off, cf, cs, o0, relu, of, O)
            elif step == 2:
                _t22(xf, 0, xs, w, wb, ws, nG, A, 0, M, F, off, cf, cs, o0, relu, of, O)
            else:
                _t21(xf, 0, xs, w, wb, ws, nG, A, 0, M, F, off, cf, cs, o0, relu, of, O)
        k += step


def telescoped_codes(a: np.ndarray, nG: int) -> np.ndarray:
    """(M, 24*nG) int8 of codes ``a`` <= 63: per group ``3x_0, 3x_i - x_{i-1} (i = 1..4), -x_4``."""
    M, K = a.shape
    x = np.zeros((M, nG * GROUP), np.int64)
    x[:, :K] = a.astype(np.int64) - 32
    x = x.reshape(M, nG, 5, 4)
    y = np.empty((M, nG, 6, 4), np.int64)
    y[:, :, 0] = 3 * x[:, :, 0]
    y[:, :, 1:5] = 3 * x[:, :, 1:5] - x[:, :, 0:4]
    y[:, :, 5] = -x[:, :, 4]
    assert np.abs(y).max() <= 127
    return y.reshape(M, nG * 24).astype(np.int8)


def _case(rng: np.random.Generator, N: int, M: int, q: np.ndarray) -> dict:
    """One layer and row count: the four loops timed side by side, outputs checked."""
    codes_mode = np.array([0.0, 0.0], np.float32)
    gw2 = KV.GemvWeights(q)
    gw = KT.tq1_weights(KV.GemvWeights(q), q, min_weights=0)
    tq, nb, off = gw.tq1, gw.F.shape[0] // 16, gw.off
    coef = KV.gemv_coef(rng.standard_normal(N), rng.random(N), rng.standard_normal(N) * 1e-3, gw)
    F32 = (gw.F // 4).astype(np.int32)  # 32 * sum f (x = a - 32)
    a = rng.integers(0, 64, size=(M, N))
    c2, A2 = KV._codes(a.astype(np.float32), 1, codes_mode, gw2.geo)
    cq, Aq = KT._codes(a.astype(np.float32), 1, codes_mode, tq.nG)
    ct = telescoped_codes(a, tq.nG)
    outs = {k: np.empty((M, N), np.float32) for k in ("2-bit", "1.6-bit", "split", "telescoped")}
    fns = {
        "2-bit": lambda: KV._part(c2, A2, gw2.geo, gw2.F, gw2.w, coef, False, outs["2-bit"], 0, nb),
        "1.6-bit": lambda: KT._part(cq, Aq, off, tq.nG, gw.F, tq.w, coef, False, outs["1.6-bit"], 0, nb),
        "split": lambda: _part(0, cq, Aq, off, tq.nG, gw.F, tq.w, coef, False, outs["split"], 0, nb),
        "telescoped": lambda: _part(1, ct, Aq, off, tq.nG, F32, tq.w, coef, False, outs["telescoped"], 0, nb),
    }
    for f in fns.values():
        f()
    ref = outs["2-bit"].view(np.uint32)
    same = {k: bool(np.array_equal(o.view(np.uint32), ref)) for k, o in outs.items()}
    t = time_interleaved(fns, max_rounds=3000, budget_s=3.0)
    base = t["2-bit"]["median_s"]
    return {"N": N, "rows": M, "bit_identical": same, "rounds": t["2-bit"]["rounds"],
            "ms": {k: v["median_s"] * 1e3 for k, v in t.items()},
            "speed_vs_2bit": {k: base / v["median_s"] for k, v in t.items()}}


def main() -> None:
    t0 = time.time()
    rng = np.random.default_rng(0)
    rows = []
    for N in (1024, 2048):
        q = rng.choice([-1, 0, 1], size=(N, N))
        for M in (1, 2):
            rows.append(_case(rng, N, M, q))
            print(rows[-1], flush=True)
    meta = run_meta(__file__, [], t0, seeds=[0])
    names = ("2-bit", "1.6-bit", "split", "telescoped")
    md = ["# Prototype 1.6-bit tiles in cache (speed relative to the 2-bit GEMV, median)", "",
          f"`{meta['command']}`; git {meta['git']}; one thread, single run, interleaved on the machine as it "
          "was (ratios only). 6-bit activation codes; every output checked bit for bit against the 2-bit "
          "GEMV's.", "",
          "| N | rows | " + " | ".join(names) + " | same bits |", "|---" * (len(names) + 3) + "|"]
    for r in rows:
        cells = " | ".join(f"{r['speed_vs_2bit'][k]:.2f}x ({r['ms'][k]:.4f} ms)" for k in names)
        md.append(f"| {r['N']} | {r['rows']} | {cells} | {all(r['bit_identical'].values())} |")
    write_results(ROOT / "benchmarks" / "results", "proto_tq1_telescoped", {"meta": meta, "rows": rows},
                  "\n".join(md))


if __name__ == "__main__":
    main()
