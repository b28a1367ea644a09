"""Issue rates of the AVX-512 instructions the runtime's many-row kernels are built from, on this CPU:
``vpdpbusd`` (the int8 kernels: 64 multiply-adds each), ``vpermb`` (the table lookups of
``kernels_gemm``: 128 ternary or 256 binary multiply-adds per lookup), the pair the lookup GEMM
issues (``vpermb`` then ``vpdpbusd``), and ``vpermt2b`` (a 128-byte table: 192 ternary
multiply-adds per lookup with 3-weight groups).

    python benchmarks/speed/bench_issue_rates.py --out benchmarks/results/no_amx

Each loop keeps 12 independent chains (no chain waits on its own latency), operands in registers,
and one vector add per iteration to change the lookup indices (so the lookups are not hoisted out
of the loop); ``vpermb`` and ``vpermt2b`` results go into a ``vpaddd``. Best of 5 runs of 2 million
iterations, one thread. The ratios answer the kernel question: int8 products per cycle
(``vpdpbusd`` rate x 64) against lookup products (``vpermb`` rate x 128 for ternary, x 256 for binary).
Writes <out>/issue_rates.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ROOT, run_meta, write_results
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from lowbit.runtime._jit import _I32, _V16I32, _V64I8, HOST_VNNI, _vpdpbusd
from lowbit.runtime.kernels_gemm import _vpermb

CHAINS = 12
KINDS = ("vpdpbusd", "vpermb", "vpermb+vpdpbusd", "vpermt2b")


def _vpermt2b(builder: ir.IRBuilder, lo, idx, hi):
    fnty = ir.FunctionType(_V64I8, [_V64I8, _V64I8, _V64I8])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpermi2var.qi.512")
    return builder.call(fn, [lo, idx, hi])


def _loop(kind: str):
    @intrinsic
    def loop(typingctx, n):
        sig = types.int64(n)

        def codegen(context, builder, signature, args):
            ones = ir.Constant(_V64I8, [1] * 64)
            step = ir.Constant(_V64I8, [1] * 64)
            accs = [cgutils.alloca_once_value(builder, ir.Constant(_V16I32, [k] * 16)) for k in range(CHAINS)]
            tabs = [ir.Constant(_V64I8, [(7 * k + j) % 100 for j in range(64)]) for k in range(CHAINS)]
            idxp = cgutils.alloca_once_value(builder, ir.Constant(_V64I8, list(range(64))))
            with cgutils.for_range(builder, args[0]):
                idx = builder.add(builder.load(idxp), step)
                builder.store(idx, idxp)
                for k in range(CHAINS):
                    acc = builder.load(accs[k])
                    if kind == "vpdpbusd":
                        new = _vpdpbusd(builder, acc, ones, idx)
                    elif kind == "vpermb":
                        new = builder.add(acc, builder.bitcast(_vpermb(builder, tabs[k], idx), _V16I32))
                    elif kind == "vpermb+vpdpbusd":
                        new = _vpdpbusd(builder, acc, ones, _vpermb(builder, tabs[k], idx))
                    else:
                        look = _vpermt2b(builder, tabs[k], idx, tabs[(k + 1) % CHAINS])
                        new = builder.add(acc, builder.bitcast(look, _V16I32))
                    builder.store(new, accs[k])
            s = builder.load(accs[0])
            for k in range(1, CHAINS):
                s = builder.add(s, builder.load(accs[k]))
            return builder.sext(builder.extract_element(s, ir.Constant(_I32, 0)), ir.IntType(64))

        return sig, codegen

    @njit(cache=False)
    def run(n):
        return loop(n)

    return run


def measure(kind: str, n: int, repeats: int) -> float:
    """Instructions of ``kind`` (per chain step) issued per second, best of ``repeats``."""
    run = _loop(kind)
    run(10)
    best = min(_timed(run, n) for _ in range(repeats))
    return n * CHAINS / best


def _timed(run, n: int) -> float:
    t0 = time.perf_counter()
    run(n)
    return time.perf_counter() - t0


def to_markdown(rates: dict[str, float], meta: dict) -> str:
    per = {k: v / rates["vpermb"] for k, v in rates.items()}
    int8 = rates["vpdpbusd"] * 64
    lines = [
        "# Issue rates of the many-row kernels' AVX-512 instructions",
        "",
        f"Command: `{meta['command']}`; git {meta['git'].get('commit', '?')[:10]}; CPU: "
        f"{meta['machine'].get('cpu', '?')}; one thread, {CHAINS} independent chains, best of "
        f"{meta['repeats']} runs of {meta['iterations']:,} iterations; {meta['load']}.",
        "",
        "| instruction (per chain step) | G per second | relative to `vpermb` |",
        "|---|---:|---:|",
        *[f"| `{k}` | {v / 1e9:.2f} | {per[k]:.2f} |" for k, v in rates.items()],
        "",
        f"Products per second: int8 (`vpdpbusd` x 64) {int8 / 1e9:.0f} G; ternary lookups (`vpermb` x 128) "
        f"{rates['vpermb'] * 128 / 1e9:.0f} G; binary lookups (x 256) {rates['vpermb'] * 256 / 1e9:.0f} G; "
        f"3-weight ternary lookups (`vpermt2b` x 192) {rates['vpermt2b'] * 192 / 1e9:.0f} G.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=2_000_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "no_amx"))
    a = p.parse_args(argv)
    if not HOST_VNNI:
        print("needs AVX-512 VNNI (and VBMI): nothing to measure here")
        return 1
    t0 = time.time()
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    rates = {k: measure(k, a.iterations, a.repeats) for k in KINDS}
    for k, v in rates.items():
        print(f"{k}: {v / 1e9:.2f} G/s")
    meta = run_meta(__file__, argv, t0, seeds=[0], iterations=a.iterations, repeats=a.repeats,
                    load=f"load average {load} at start")
    write_results(a.out, "issue_rates", {"meta": meta, "rates_per_s": rates,
                                         "products_per_s": {"int8": rates["vpdpbusd"] * 64,
                                                            "ternary_lookup": rates["vpermb"] * 128,
                                                            "binary_lookup": rates["vpermb"] * 256,
                                                            "ternary3_lookup": rates["vpermt2b"] * 192}},
                  to_markdown(rates, meta))
    print(f"wrote {Path(a.out) / 'issue_rates.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
