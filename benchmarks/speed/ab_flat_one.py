"""A/B of the flat executor's one-image call: this checkout's runtime against the runtime of a base
commit, both in one process on the same compiled model, calls interleaved.

    python benchmarks/speed/ab_flat_one.py [--base 350d853] [--models resnet20 lenet5]
        [--weights binary ternary 4bit] [--rounds 30] [--calls 20] [--out benchmarks/results]

The base arm is the base commit's ``executor.py``, ``kernels_int8.py`` and ``kernels_pool.py`` (the
files of the batch-1 path that this work changes), loaded from git into a temporary package whose
other imports resolve to this checkout's ``lowbit.runtime``; its ``FlatExecutor`` is built on the
packed model's graph, so both arms run the same layers, weights and codes. Each round runs the arms
in a new (seeded) random order, each arm ``--calls`` timed calls in a row (the first after the other
arm's calls, as the harness's turns), batch 1, one thread. Outputs are checked equal bit for bit.
Reports per arm the median and the fastest call over all rounds and the ratio of medians (base /
new). Writes ``<out>/ab_flat_one.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numba
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_conv import ACTIVATION, MODELS, WEIGHTS, _randomize_bn
from common import ROOT, run_meta, write_results

import lowbit
from lowbit.models import build_model
from lowbit.runtime import compile as rt_compile

BASE = "350d853"
FILES = ("kernels_int8", "kernels_pool", "executor")  # in this order: executor imports the others


def load_base(commit: str, workdir: Path) -> types.ModuleType:
    """The base commit's ``executor`` module (with its own ``kernels_int8``) as ``lowbit_base_rt``."""
    pkg = workdir / "lowbit_base_rt"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in FILES:
        src = subprocess.run(["git", "show", f"{commit}:src/lowbit/runtime/{name}.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        for other in FILES:  # the base copies import each other, everything else from this checkout
            src = src.replace(f"from .{other} import", f"from lowbit_base_rt.{other} import")
        src = src.replace("from . import", "from lowbit.runtime import")
        src = src.replace("from .", "from lowbit.runtime.")
        (pkg / f"{name}.py").write_text(src)
    mods = {}
    for name in ("__init__", *FILES):
        full = "lowbit_base_rt" if name == "__init__" else f"lowbit_base_rt.{name}"
        spec = importlib.util.spec_from_file_location(full, pkg / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[full] = mod
        spec.loader.exec_module(mod)
        mods[name] = mod
    return mods["executor"]


def arms(model: str, weights: str, base_ex: types.ModuleType, seed: int = 0):
    torch.manual_seed(seed)
    _, shape = MODELS[model]
    fm = build_model(model).eval()
    _randomize_bn(fm, seed)
    recipe = {"default": {"weight": WEIGHTS[weights], "activation": ACTIVATION}}
    q = lowbit.quantize(copy.deepcopy(fm), recipe).eval()
    packed = rt_compile(q, torch.rand(2, *shape, generator=torch.Generator().manual_seed(seed)))
    if packed.executor is None:
        raise SystemExit(f"{model} does not run in the flat executor")
    new = packed.executor
    old = base_ex.FlatExecutor(new.gm)
    x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(seed + 1))
    for ex in (new, old):  # the first call makes the program, arenas and one-image entry
        ex(x)
        ex(x)
    return {"base": lambda: old(x), "new": lambda: new(x)}


def time_arms(fns: dict, rounds: int, calls: int, seed: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    rng = random.Random(seed)
    clock = time.perf_counter
    for _ in range(rounds):
        rng.shuffle(keys)
        for k in keys:
            f = fns[k]
            ts = times[k]
            for _ in range(calls):
                t0 = clock()
                f()
                ts.append(clock() - t0)
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=BASE)
    p.add_argument("--models", nargs="+", default=["resnet20", "lenet5"], choices=list(MODELS))
    p.add_argument("--weights", nargs="+", default=["binary", "ternary", "4bit"], choices=list(WEIGHTS))
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="the machine's state, written into the report")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    args = p.parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base_ex = load_base(args.base, Path(tmp))
        for model in args.models:
            for weights in args.weights:
                fns = arms(model, weights, base_ex, args.seed)
                ya, yb = fns["base"](), fns["new"]()
                if not torch.equal(ya, yb):
                    raise SystemExit(f"{model}/{weights}: outputs differ between the arms")
                t = time_arms(fns, args.rounds, args.calls, args.seed)
                row = {"model": model, "weights": weights, "equal": True}
                for k, v in t.items():
                    row[f"{k}_median_us"] = statistics.median(v) * 1e6
                    row[f"{k}_min_us"] = min(v) * 1e6
                row["speedup_median"] = row["base_median_us"] / row["new_median_us"]
                row["speedup_min"] = row["base_min_us"] / row["new_min_us"]
                rows.append(row)
                print(f"{model} {weights}: base {row['base_median_us']:.1f} us, "
                      f"new {row['new_median_us']:.1f} us (x{row['speedup_median']:.3f}); "
                      f"min {row['base_min_us']:.1f} / {row['new_min_us']:.1f}", flush=True)
    meta = run_meta(__file__, argv, t_start, seeds=[args.seed], base=args.base, rounds=args.rounds,
                    calls=args.calls, note=args.note)
    lines = [
        "# Flat executor, one image: this checkout against the base commit's runtime",
        "",
        f"Command: `{meta['command']}`; base {args.base}, new = commit {meta['git'].get('commit', '?')[:10]}"
        f"{' (dirty)' if meta['git'].get('dirty') else ''}. {args.note}".rstrip(),
        "",
        f"One thread, batch 1, binary/ternary/4-bit weights x 4-bit PACT. {args.rounds} rounds, arms in a "
        f"random order per round, {args.calls} timed calls per arm per round; outputs equal bit for bit.",
        "",
        "| model | weights | base median us | new median us | base / new (median) | base min us "
        "| new min us |",
        "|---|---|---:|---:|---:|---:|---:|",
        *[f"| {r['model']} | {r['weights']} | {r['base_median_us']:.1f} | {r['new_median_us']:.1f} | "
          f"{r['speedup_median']:.3f}x | {r['base_min_us']:.1f} | {r['new_min_us']:.1f} |" for r in rows],
    ]
    write_results(args.out, "ab_flat_one", {"meta": meta, "rows": rows}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
