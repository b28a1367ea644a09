"""The GEMV / 1.6-bit / table-lookup kernels of the working tree against those of an older revision,
in one process: the same machine code, the same outputs bit for bit, the same speed.

    python benchmarks/speed/ab_kernels.py --base 05212a7          # asm, outputs and timing
    python benchmarks/speed/ab_kernels.py --base 05212a7 --no-asm # timing only (uses the cache)

The base revision's ``src/lowbit/runtime`` is extracted (``git archive``) into a temporary folder
and imported as the package ``lowbit._rt_base`` beside ``lowbit.runtime`` (both share the rest of
``lowbit``). For a refactor of the code that builds the kernels' LLVM IR:

- ``asm``: every numba kernel that inlines a changed tile (``kernels_gemv._part`` /
  ``_gemv_serial``, ``kernels_tq1._part`` / ``_serial``, ``kernels_gemm._lut_avx_range`` /
  ``_lut_tables_avx``) is compiled by both packages for the same argument types and its assembly
  compared line by line, symbol names (which carry the package name) taken out. Needs the numba
  disk cache off (numba cannot show the assembly of cached code): the script sets
  ``LOWBIT_NUMBA_CACHE=0`` itself unless ``--no-asm``.
- ``outputs``: each case is run by both on the same inputs; the float32 outputs compared as bits.
- ``timing``: one thread, ``harness.time_interleaved`` (base and new take turns in a random order
  each round), the median and min ratio new / base per case.

Writes benchmarks/results/<name>.{json,md} (default ``ab_kernels``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KERNELS = {"kernels_gemv": ("_part", "_gemv_serial"), "kernels_tq1": ("_part", "_serial"),
           "kernels_gemm": ("_lut_avx_range", "_lut_tables_avx")}


def load_base(rev: str, root: Path, tmp: Path) -> str:
    """Extract ``src/lowbit/runtime`` at ``rev`` under ``tmp`` and register it as ``lowbit._rt_base``."""
    import lowbit

    tar = tmp / "rt.tar"
    with open(tar, "wb") as f:
        subprocess.run(["git", "-C", str(root), "archive", rev, "src/lowbit/runtime"], stdout=f, check=True)
    with tarfile.open(tar) as t:
        t.extractall(tmp, filter="data")
    name = "lowbit._rt_base"
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(tmp / "src/lowbit/runtime")]
    pkg.__package__ = name
    sys.modules[name] = pkg
    lowbit._rt_base = pkg
    return name


def norm_asm(asm: str) -> list[str]:
    """Assembly lines without symbol names, file names and debug directives."""
    out = []
    for line in asm.splitlines():
        line = re.sub(r"_ZN\S*?(?=[\s,@)]|$)", "SYM", line).strip()
        if not line or line.startswith((".file", ".loc", ".ident", "#", '.size\t".const.')):
            continue
        out.append(line)
    return out


def cases(np, mods: dict):
    """(name, run(mods) -> float32 output) per case; ``mods(name)`` gives a package's module."""
    rng = np.random.default_rng(0)
    out = []

    def gemv_case(levels, M, N, tq1=False):
        q = rng.choice(levels, size=(N, N))
        x = rng.random((M, N), dtype=np.float32)
        s0, s1, s2 = rng.standard_normal(N), rng.random(N), rng.standard_normal(N) * 1e-3
        prepared = {}

        def run(pkg):
            if pkg not in prepared:
                KV, KT = mods(pkg, "kernels_gemv"), mods(pkg, "kernels_tq1")
                gw = KV.GemvWeights(q)
                if tq1:
                    KT.tq1_weights(gw, q, min_weights=0)
                prepared[pkg] = (KV, gw, np.array([1.0, 255.0], np.float32), KV.gemv_coef(s0, s1, s2, gw))
            KV, gw, qp, coef = prepared[pkg]
            o = np.empty((M, N), np.float32)
            KV.gemv_run(x, 0, qp, gw, coef, True, o)
            return o

        return run

    def lut_case(levels, M, N, ka):
        w = rng.choice(levels, size=(N, N))
        x = rng.integers(0, 1 << ka, size=(M, N)).astype(np.float32)
        s0, s1 = rng.standard_normal(N), rng.random(N)
        prepared = {}

        def run(pkg):
            KG = mods(pkg, "kernels_gemm")
            if pkg not in prepared:
                lv, cb = KG.lut_levels(w)
                prepared[pkg] = (lv, cb, KG.lut_pack_weights(w, lv, cb))
            lv, cb, wq = prepared[pkg]
            T = KG.lut_tables(x, lv, cb)
            return KG.lut_gemm(T, wq, N, s0, s1, True)

        return run

    out.append(("gemv binary 1x4096^2", gemv_case([-1, 1], 1, 4096)))
    out.append(("gemv ternary 2-bit 1x4096^2", gemv_case([-1, 0, 1], 1, 4096)))
    out.append(("gemv ternary 1.6-bit 1x4096^2", gemv_case([-1, 0, 1], 1, 4096, tq1=True)))
    out.append(("gemv ternary 1.6-bit 2x2048^2", gemv_case([-1, 0, 1], 2, 2048, tq1=True)))
    out.append(("gemv 4-bit 4x2048^2", gemv_case(list(range(-8, 8)), 4, 2048)))
    out.append(("lut binary a4 64x1024^2", lut_case([-1, 1], 64, 1024, 4)))
    out.append(("lut ternary a4 64x1024^2", lut_case([-1, 0, 1], 64, 1024, 4)))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="git revision whose runtime is the baseline")
    p.add_argument("--no-asm", action="store_true", help="skip the assembly comparison")
    p.add_argument("--budget", type=float, default=4.0, help="seconds of timed rounds per case")
    p.add_argument("--out", default=None)
    p.add_argument("--name", default="ab_kernels")
    a = p.parse_args(argv)
    if not a.no_asm:
        os.environ["LOWBIT_NUMBA_CACHE"] = "0"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    t0 = time.time()

    import numpy as np
    from common import ROOT, run_meta, write_results
    from harness import time_interleaved

    import lowbit  # noqa: F401

    base_rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", a.base], capture_output=True,
                              text=True, check=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="lowbit_ab_"))
    base_pkg = load_base(a.base, ROOT, tmp)
    pkgs = {"base": base_pkg, "new": "lowbit.runtime"}

    def mods(pkg: str, mod: str):
        return importlib.import_module(f"{pkgs[pkg]}.{mod}")

    rows = []
    for name, run in cases(np, mods):
        ob, on = run("base"), run("new")
        same = ob.shape == on.shape and np.array_equal(ob.view(np.uint32), on.view(np.uint32))
        fns = {"base": lambda r=run: r("base"), "new": lambda r=run: r("new")}
        t = time_interleaved(fns, max_rounds=2000, budget_s=a.budget)
        rows.append({"case": name, "bit_identical": bool(same), "base_med_ms": t["base"]["median_s"] * 1e3,
                     "new_med_ms": t["new"]["median_s"] * 1e3, "base_min_ms": t["base"]["min_s"] * 1e3,
                     "new_min_ms": t["new"]["min_s"] * 1e3,
                     "ratio_med": t["new"]["median_s"] / t["base"]["median_s"],
                     "ratio_min": t["new"]["min_s"] / t["base"]["min_s"], "rounds": t["new"]["rounds"]})
        r = rows[-1]
        print(f"{name}: identical={same} new/base median {r['ratio_med']:.3f} min {r['ratio_min']:.3f}")

    asm = []
    if not a.no_asm:
        for mod, fns in KERNELS.items():
            for fn in fns:
                db, dn = getattr(mods("base", mod), fn), getattr(mods("new", mod), fn)
                for sig in db.signatures:
                    if sig not in dn.signatures:
                        asm.append({"kernel": f"{mod}.{fn}", "sig": str(sig), "lines": 0, "identical": False})
                        continue
                    xb, xn = norm_asm(db.inspect_asm(sig)), norm_asm(dn.inspect_asm(sig))
                    asm.append({"kernel": f"{mod}.{fn}", "sig": str(sig), "lines": len(xn),
                                "identical": xb == xn})
                    print(f"asm {mod}.{fn}: {len(xb)} / {len(xn)} lines, identical={xb == xn}")

    meta = run_meta(__file__, argv, t0, seeds=[0], base=base_rev)  # the inputs' and the turn order's
    md = [f"# Kernels of the working tree against {base_rev}", "",
          f"`{meta['command']}`; git {meta['git']}; one thread; timings interleaved on the machine as it was "
          "(ratios only)", "",
          "| case | bit identical | base median ms | new median ms | new/base median | new/base min |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['case']} | {r['bit_identical']} | {r['base_med_ms']:.3f} | {r['new_med_ms']:.3f} | "
                  f"{r['ratio_med']:.3f} | {r['ratio_min']:.3f} |")
    if asm:
        md += ["", "| kernel (numba signature) | asm lines | identical machine code |", "|---|---|---|"]
        md += [f"| {r['kernel']} `{r['sig']}` | {r['lines']} | {r['identical']} |" for r in asm]
    write_results(a.out or ROOT / "benchmarks" / "results", a.name, {"meta": meta, "rows": rows, "asm": asm},
                  "\n".join(md))


if __name__ == "__main__":
    main()
