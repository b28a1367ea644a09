"""``runtime.compile`` time of the deep 4096-wide MLP, the working tree against an older revision,
in one process.

    python benchmarks/speed/ab_compile.py --base 6f66a56                 # binary and ternary
    python benchmarks/speed/ab_compile.py --base 6f66a56 --variants w2a8 --rounds 2

The model is ``harness.deep_mlp(4096, 8)`` (8 x ``Linear(4096, 4096)``, ReLU between), quantized
by ``harness.quantized_model`` (``w1a8``: binary weights, 8-bit PACT activations; ``w2a8``: TWN
ternary), compiled with ``check=False`` on one sample (as ``bench_gemv.py`` does). The base
revision's ``src/lowbit/runtime`` is imported beside the working tree's (``ab_kernels.load_base``).
Rounds: one untimed compile per package and variant (numba's cache loads), then per round every
(variant, package) pair once in a new random order, on one thread; median and min per pair and
the ratio new / base. Also records what each package's first layer holds (``describe``,
``runtime_bytes``). Writes benchmarks/results/<name>.{json,md} (default ``ab_compile``).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="git revision whose runtime is the baseline")
    p.add_argument("--variants", nargs="+", default=["w1a8", "w2a8"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--out", default=None)
    p.add_argument("--name", default="ab_compile")
    a = p.parse_args(argv)
    t0 = time.time()

    import torch
    from ab_kernels import load_base
    from common import ROOT, run_meta, write_results
    from harness import deep_mlp, quantized_model

    torch.set_num_threads(1)
    base_rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", a.base], capture_output=True,
                              text=True, check=True).stdout.strip()
    pkgs = {"base": load_base(a.base, ROOT, Path(tempfile.mkdtemp(prefix="lowbit_ab_"))),
            "new": "lowbit.runtime"}
    compilers = {k: importlib.import_module(f"{v}.compiler").compile for k, v in pkgs.items()}
    torch.manual_seed(0)
    fmodel = deep_mlp(4096, a.depth).eval()
    x = torch.rand(1, 4096)
    models = {v: quantized_model(fmodel, v) for v in a.variants}
    held: dict[str, dict] = {}
    for v, qm in models.items():  # untimed: numba's cache loads, first-touch of the weights
        for k, comp in compilers.items():
            pm = comp(qm, x, check=False)
            layer = next(iter(pm.packed_layers().values()))
            held[f"{v} {k}"] = {"describe": layer.describe(), "runtime_bytes": int(layer.runtime_bytes),
                                "lut": layer.lut is not None}
            del pm, layer
            gc.collect()
    times: dict[str, list[float]] = {key: [] for key in held}
    rng = random.Random(0)
    keys = list(held)
    for r in range(a.rounds):
        rng.shuffle(keys)
        for key in keys:
            v, k = key.split()
            t = time.perf_counter()
            pm = compilers[k](models[v], x, check=False)
            times[key].append(time.perf_counter() - t)
            del pm
            gc.collect()
        done = ", ".join(f"{key} {times[key][-1]:.2f} s" for key in sorted(times))
        print(f"round {r}: {done}", flush=True)
    rows = []
    for v in a.variants:
        b, n = times[f"{v} base"], times[f"{v} new"]
        mb, mn = statistics.median(b), statistics.median(n)
        rows.append({"variant": v, "base_median_s": mb, "new_median_s": mn, "base_min_s": min(b),
                     "new_min_s": min(n), "ratio_median": mn / mb, "ratio_min": min(n) / min(b),
                     "base_times_s": b, "new_times_s": n, "base_layer": held[f"{v} base"],
                     "new_layer": held[f"{v} new"]})
        print(f"{v}: new/base median {rows[-1]['ratio_median']:.3f}, min {rows[-1]['ratio_min']:.3f}")
    meta = run_meta(__file__, argv, t0, seeds=[0], base=base_rev, depth=a.depth, rounds=a.rounds)
    md = [f"# runtime.compile of {a.depth} x Linear(4096, 4096): the working tree against {base_rev}", "",
          f"`{meta['command']}`; git {meta['git']}; one thread; {a.rounds} interleaved rounds on the machine "
          "as it was (ratios only)", "",
          "| variant | base median s | new median s | new/base median | new/base min | base layer bytes | "
          "new layer bytes | new layer |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bl, nl = r["base_layer"], r["new_layer"]
        md.append(f"| {r['variant']} | {r['base_median_s']:.2f} | {r['new_median_s']:.2f} | "
                  f"{r['ratio_median']:.3f} | {r['ratio_min']:.3f} | {bl['runtime_bytes']:,} | "
                  f"{nl['runtime_bytes']:,} | {nl['describe']} |")
    out = a.out or ROOT / "benchmarks" / "results"
    write_results(out, a.name, {"meta": meta, "rows": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
