"""Where the AMX GEMM of a many-row packed Linear layer spends its time (runtime/kernels_amx.py).

    python benchmarks/speed/profile_amx_linear.py                      # 4096x4096, 16/64/256 rows
    python benchmarks/speed/profile_amx_linear.py --rows 64 --out /tmp/prof

For one 4096x4096 layer (binary, ternary and 4-bit weights) and each row count, thread CPU time
(best and median of the repeats, one thread) of: the whole ``amx_linear`` call, the quantization
of the rows into the tile layout, and a copy of the kernel's loop with parts switched off (weight
expansion only, tile products only (on the layer's first expanded slice), both, epilogue only);
the copy's full output is checked against ``amx_linear`` bit for bit. Each part is also given as
a share of the whole call. The copy's tile buffers start on 64-byte lines as the kernel's do;
"tile products, buffers 32 B past a line" runs the products with every tile 32 bytes past one.

Then the tile unit itself (``--tile-rounds`` interleaved rounds, L1-resident tiles): steps of 4
``tdpbusd`` with 0, 2 or 4 tile loads each (4: the kernel's 2 x 2 step), and the 4-load step with
its tiles 16, 32, 48 bytes past a line. A tile whose rows straddle lines loads far slower, and
NumPy and numba buffers start 0, 16 or 32 bytes past a line depending on their size and the
heap's state: that is part of why the AMX rate seemed to drift from one call to the next before
the kernel aligned its buffers. Not all of it: with aligned buffers the whole call still took
5.2 ms in one run and 10.7 ms in another minutes later (binary, 256 rows, one thread, thread CPU
time, the shared 2-core test machine under a load average of 5-8), so only ratios within one
run mean something. Writes
``<out>/profile_amx_linear.{json,md}`` (default: benchmarks/results).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import ROOT, run_meta, write_results

from lowbit._numba import jit
from lowbit.runtime import _amx
from lowbit.runtime import kernels_amx as KA
from lowbit.runtime._jit import EPI_FLOAT, EPI_RELU
from lowbit.runtime.kernels_gemv import GemvWeights

KINDS = ("binary", "ternary", "4bit")


@jit
def _parts(xq0, nk, Mp, M, w, b, nG, tab, cfg, KS, S, s0, s1, sf, flags, out, O, do_exp, do_tiles, do_epi,
           off):
    """``kernels_amx._amx_linear_range`` for 32 or more rows (2 x 2 tiles, groups of 2 blocks, the
    sums of ``S`` groups parked for one epilogue) with its three parts switched on or off, its tile
    buffers ``off`` bytes past a 64-byte line (the row codes copied there)."""
    xq = KA.aligned_u8(xq0.size + 64)[off : off + xq0.size]
    xq[:] = xq0
    nbt = (O + 15) // 16
    G = 16 // (8 // b)
    nmb = Mp // 16
    acc = KA.aligned_u8(S * Mp * 128 + 64)[off : off + S * Mp * 128].view(np.int32)
    abase = np.empty(4, np.int64)
    buf = KA.aligned_u8(KS * 2048 + 64)[off : off + KS * 2048]
    eu = np.empty(0, np.uint8)
    for n in range(min(2, nbt)):  # real weights in the buffer also when the expansion is off
        for kk in range(min(KS, nk)):
            woff = n * nG * 64 + kk * G * 64
            if b == 1:
                KA._expand1(w, woff, min(G, nG - kk * G), tab, buf, (kk * 2 + n) * 1024)
            elif b == 2:
                KA._expand2(w, woff, min(G, nG - kk * G), tab, buf, (kk * 2 + n) * 1024)
            else:
                KA._expand4(w, woff, min(G, nG - kk * G), tab, buf, (kk * 2 + n) * 1024)
    _amx.amx_config(cfg)
    ngrp = (nbt + 1) // 2
    for sg in range(0, ngrp, S):
        sg_hi = min(sg + S, ngrp)
        for grp in range(sg, sg_hi):
            b0 = 2 * grp
            NB = min(2, nbt - b0)
            cbase = (grp - sg) * Mp * 32
            for k0 in range(0, nk, KS):
                nks = min(KS, nk - k0)
                if do_exp:
                    for n in range(NB):
                        for kk in range(nks):
                            k = k0 + kk
                            woff = (b0 + n) * nG * 64 + k * G * 64
                            ngv = min(G, nG - k * G)
                            if b == 1:
                                KA._expand1(w, woff, ngv, tab, buf, (kk * NB + n) * 1024)
                            elif b == 2:
                                KA._expand2(w, woff, ngv, tab, buf, (kk * NB + n) * 1024)
                            else:
                                KA._expand4(w, woff, ngv, tab, buf, (kk * NB + n) * 1024)
                if do_tiles:
                    i = 0
                    while i < nmb:
                        abase[0] = i * nk * 1024
                        abase[1] = (i + 1) * nk * 1024
                        aco = cbase + i * 16 * 32
                        if NB == 2 and nmb - i >= 2:
                            KA._t2x2(xq, abase, k0 * 1024, nks, buf, NB * 1024, acc, aco, 128, k0 > 0)
                            i += 2
                        elif NB == 2:
                            KA._t1x2(xq, abase, k0 * 1024, nks, buf, NB * 1024, acc, aco, 128, k0 > 0)
                            i += 1
                        else:
                            KA._t1x1(xq, abase, k0 * 1024, nks, buf, NB * 1024, acc, aco, 128, k0 > 0)
                            i += 1
        if do_epi:
            c_s = sg * 32
            KA._epilogue(acc, Mp, M, 2, c_s, min(sg_hi * 32, O) - c_s, s0, s1, sf, flags, out, O, eu, 0,
                         np.float32(0.0), np.float32(0.0))
    _amx.amx_release()


_I8, _I64 = ir.IntType(8), ir.IntType(64)


def _tile_loop(nloads: int):
    """A loop of steps of 4 ``tdpbusd`` (accumulators tmm0-3, operands tmm4-7) with ``nloads``
    tile loads per step from an L1-resident KiB (4: the kernel's 2 x 2 step, in its order)."""
    order = {0: [("d", 0, 4, 6), ("d", 1, 4, 7), ("d", 3, 5, 7), ("d", 2, 5, 6)],
             2: [("l", 4), ("d", 0, 4, 6), ("d", 1, 4, 7), ("l", 5), ("d", 3, 5, 7), ("d", 2, 5, 6)],
             4: [("l", 4), ("l", 6), ("d", 0, 4, 6), ("l", 7), ("d", 1, 4, 7), ("l", 5), ("d", 3, 5, 7),
                 ("d", 2, 5, 6)]}[nloads]

    @intrinsic
    def loop(typingctx, x, n):
        sig = types.void(x, n)

        def codegen(context, builder, signature, args):
            xp = _amx._ptr(context, builder, signature.args[0], args[0], _I8)
            load = _amx._fn(builder, "llvm.x86.tileloadd64", _amx._VOID, [_I8, _I8.as_pointer(), _I64])
            dp = _amx._fn(builder, "llvm.x86.tdpbusd", _amx._VOID, [_I8, _I8, _I8])
            stride = ir.Constant(_I64, 64)

            def kib(j):
                return builder.gep(xp, [ir.Constant(_I64, 1024 * j)])

            for t in range(8):
                builder.call(load, [_amx._i8c(t), kib(t % 4), stride])
            with cgutils.for_range(builder, args[1]):
                for op in order:
                    if op[0] == "l":
                        builder.call(load, [_amx._i8c(op[1]), kib(op[1] - 4), stride])
                    else:
                        builder.call(dp, [_amx._i8c(op[1]), _amx._i8c(op[2]), _amx._i8c(op[3])])
            return context.get_dummy_value()

        return sig, codegen

    @jit
    def run(cfg, x, n):
        _amx.amx_config(cfg)
        loop(x, n)
        _amx.amx_release()

    return run


def _tile_unit(rounds: int) -> list[dict]:
    """TMAC/s of 4-product steps with 0, 2 and 4 tile loads each from tiles starting on a 64-byte
    line, and of the 4-load step with tiles 16, 32, 48 bytes past one; interleaved rounds."""
    cfg = _amx.amx_tile_config(64, 2)
    raw = KA.aligned_u8(8192)
    raw[:] = np.random.default_rng(0).integers(0, 256, 8192)
    cases = [(0, 0), (2, 0), (4, 0), (4, 16), (4, 32), (4, 48)]
    loops = {n: _tile_loop(n) for n in (0, 2, 4)}
    steps = 1 << 15
    for n, off in cases:
        loops[n](cfg, raw[off : off + 4096], 16)
    rates: dict[tuple[int, int], list[float]] = {c: [] for c in cases}
    for _ in range(rounds):
        for n, off in cases:
            t = time.thread_time()
            loops[n](cfg, raw[off : off + 4096], steps)
            rates[(n, off)].append(4 * steps * 16384 / (time.thread_time() - t) / 1e12)
    base = float(np.median(rates[(0, 0)]))
    return [{"loads_per_4_products": n, "line_offset": off, "best_tmac_s": round(max(v), 3),
             "median_tmac_s": round(float(np.median(v)), 3),
             "median_of_no_loads": round(float(np.median(v)) / base, 3)} for (n, off), v in rates.items()]


def _time(fn, repeats: int) -> dict[str, float]:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.thread_time()
        fn()
        ts.append(time.thread_time() - t)
    return {"best_ms": min(ts) * 1e3, "median_ms": float(np.median(ts)) * 1e3}


def _profile(x, aw, s0, s1, ref, args, repeats: int, parts: bool) -> dict[str, dict[str, float]]:
    """Times of the whole call, the row quantization and (``parts``: 32 rows or more, where the
    copy runs the kernel's tiles) the copy with parts switched off."""
    out = {"whole amx_linear": _time(lambda: KA.amx_linear(x, 0, 3.0, 5.0, aw, s0, s1, True, ref), repeats),
           "quantize rows": _time(lambda: KA.amx_rows(x, 0, 3.0, 5.0), repeats)}
    if parts:
        for name, sw in (("expand weights", (1, 0, 0, 0)), ("tile products", (0, 1, 0, 0)),
                         ("tile products, buffers 32 B past a line", (0, 1, 0, 32)),
                         ("expand + products", (1, 1, 0, 0)), ("epilogue", (0, 0, 1, 0))):
            out[name] = _time(lambda sw=sw: _parts(*args, *sw), repeats)
    return out


def _weights(kind: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(plane integers q, folded int8 weights) of a random n x n layer, as layers.fold_integers gives them."""
    if kind == "binary":
        q = rng.integers(0, 2, (n, n))
        return q, 2 * q - 1
    if kind == "ternary":
        q = rng.integers(-1, 2, (n, n))
        return q, q
    q = rng.integers(0, 16, (n, n))
    return q, 2 * q - 15


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--size", type=int, default=4096, help="K = O of the layer")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--tile-rounds", type=int, default=7, help="rounds of the tile-unit loops (0: skip)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    if not _amx.amx_enabled():
        print("AMX-INT8 is not available here (CPU, OS or plain path): nothing to profile")
        return 1
    t0 = time.time()
    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    cfg = _amx.amx_tile_config(64, 2)
    rows: list[dict] = []
    n = a.size
    for kind in a.kinds:
        q, w = _weights(kind, n, rng)
        gw = GemvWeights(q)
        aw = KA.amx_linear_weights(gw, q, w, 1.0)
        s0, s1 = KA.amx_coeffs(aw, np.ones(n), 0.1, 0.0, np.ones(n), rng.normal(size=n))
        KS = KA.SLICE_KIB // 2
        sf = KA._zeros(3 * (n + 64))
        for M in a.rows:
            x = rng.uniform(-1, 3, (M, n)).astype(np.float32)
            xq = KA.amx_rows(x, 0, 3.0, 5.0)
            Mp = -(-M // 16) * 16
            out = np.empty((M, n), np.float32)
            ref = np.empty((M, n), np.float32)
            KA.amx_linear(x, 0, 3.0, 5.0, aw, s0, s1, True, ref)
            S = KA.epilogue_groups(Mp, 2)
            args = (xq, aw.nk, Mp, M, gw.w, gw.b, gw.nG, aw.tab, cfg, KS, S, s0, s1, sf, EPI_FLOAT | EPI_RELU,
                    out.reshape(-1), n)
            _parts(*args, 1, 1, 1, 0)
            if Mp >= 32 and not np.array_equal(out, ref):
                raise RuntimeError(f"the profiled copy differs from amx_linear ({kind}, {M} rows)")
            parts = _profile(x, aw, s0, s1, ref, args, a.repeats, Mp >= 32)
            whole = parts["whole amx_linear"]["best_ms"]
            macs = M * n * n
            for part, t in parts.items():
                r = {"kind": kind, "rows": M, "part": part, **{k: round(v, 4) for k, v in t.items()},
                     "of_whole": round(t["best_ms"] / whole, 3)}
                if part == "whole amx_linear" or part.startswith("tile products"):
                    r["tmac_s"] = round(macs / (t["best_ms"] / 1e3) / 1e12, 3)
                rows.append(r)
                print(f"{kind} {M} rows {part}: {t['best_ms']:.3f} ms best, {t['median_ms']:.3f} median",
                      flush=True)
    tile = _tile_unit(a.tile_rounds) if a.tile_rounds > 0 else []
    meta = run_meta(__file__, argv, t0, seeds=[0])
    payload = {"meta": meta, "size": n, "slice_kib": KA.SLICE_KIB, "rows": rows, "tile_unit": tile}
    g = meta["git"] if isinstance(meta["git"], dict) else {}
    git = f"{str(g.get('commit', '?'))[:10]}{' (dirty tree)' if g.get('dirty') else ''}"
    md = ["# AMX GEMM of a packed Linear layer: where the time goes", "",
          f"Command: `{meta['command']}`; git {git}; one thread, thread CPU time, best / median of "
          f"{a.repeats} (single run on a shared machine).", "",
          "| weights | rows | part | best ms | median ms | TMAC/s | of the whole call |",
          "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['kind']} | {r['rows']} | {r['part']} | {r['best_ms']:.3f} | {r['median_ms']:.3f} | "
                  f"{r.get('tmac_s', '')} | {100 * r['of_whole']:.0f}% |")
    if tile:
        md += ["", f"Tile unit: steps of 4 `tdpbusd` on L1-resident tiles, {a.tile_rounds} interleaved "
               "rounds (thread CPU time; the 4-load step is the kernel's 2 x 2 step).", "",
               "| tile loads per 4 products | tiles start this many bytes past a 64-byte line | "
               "best TMAC/s | median TMAC/s | median / no loads |", "|---:|---:|---:|---:|---:|"]
        md += [f"| {r['loads_per_4_products']} | {r['line_offset']} | {r['best_tmac_s']} | "
               f"{r['median_tmac_s']} | {r['median_of_no_loads']} |" for r in tile]
    write_results(a.out, "profile_amx_linear", payload, "\n".join(md))
    print(f"wrote {Path(a.out) / 'profile_amx_linear.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
