"""A/B of the int8 (VNNI) convolution tiles: the working tree's against a git revision's, in one process.

    python benchmarks/speed/ab_conv_tiles.py --base HEAD~1
    python benchmarks/speed/ab_conv_tiles.py --base HEAD --cases resnet20:32 --out /tmp/ab

The flat executor's program loop (``executor._run``) is compiled twice: as it is, and with the
``_int8_conv_range`` of revision ``--base`` built on that revision's ``_jit`` tiles (``vnni_tile``).
Both run the same packed model (ResNet-20, LeNet-5, 4-bit PACT activations; one thread) and must
give the same output bit for bit; they are timed in interleaved rounds (``harness.time_interleaved``),
so the machine's drift reaches both alike. Ratio = base median / tree median (> 1: the tree is
faster). Writes ``<out>/<name>.{json,md}`` (default: benchmarks/results/ab_conv_tiles).
"""

from __future__ import annotations

import argparse
import ast
import copy
import functools
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_conv import ACTIVATION, MODELS, WEIGHTS, _randomize_bn
from common import run_meta, write_results
from harness import time_interleaved

import lowbit
from lowbit.models import build_model
from lowbit.runtime import _jit, executor, kernels_int8
from lowbit.runtime import compile as rt_compile

ROOT = Path(__file__).resolve().parents[2]


def _git_show(rev: str, path: str) -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"git show {rev}:{path} failed: {r.stderr.strip()}")
    return r.stdout


def _function_source(module_src: str, name: str) -> str:
    """The source of top-level function ``name`` (decorators included) in ``module_src``."""
    for node in ast.parse(module_src).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            return "\n".join(module_src.splitlines()[first - 1 : node.end_lineno]) + "\n"
    raise SystemExit(f"no function {name} in that revision")


def base_run(rev: str):
    """``executor._run`` calling revision ``rev``'s ``_int8_conv_range`` and tiles."""
    jit_src = _git_show(rev, "src/lowbit/runtime/_jit.py")
    spec = importlib.util.spec_from_loader("lowbit.runtime._jit_base", loader=None)
    jit_base = importlib.util.module_from_spec(spec)
    jit_base.__package__, jit_base.__file__ = "lowbit.runtime", _jit.__file__
    exec(compile(jit_src, "_jit_base.py", "exec"), jit_base.__dict__)
    ns = dict(vars(kernels_int8))
    ns.update({k: v for k, v in vars(jit_base).items() if k.startswith(("vnni_tile_", "vnni_row_", "VNNI_"))})
    conv_src = _function_source(_git_show(rev, "src/lowbit/runtime/kernels_int8.py"), "_int8_conv_range")
    exec(compile(conv_src, "kernels_int8_base.py", "exec"), ns)
    ens = dict(vars(executor))
    ens["_int8_conv_range"] = ns["_int8_conv_range"]
    run_src = _function_source(_git_show("HEAD", "src/lowbit/runtime/executor.py"), "_run")
    if run_src != _function_source((ROOT / "src/lowbit/runtime/executor.py").read_text(), "_run"):
        raise SystemExit("executor._run differs between HEAD and the tree: this A/B compares tiles only")
    exec(compile(run_src, "executor_base.py", "exec"), ens)
    return ens["_run"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="HEAD", help="git revision whose tiles are the baseline")
    p.add_argument("--cases", nargs="+", default=["resnet20:1", "resnet20:32", "lenet5:1", "lenet5:8"],
                   help="model:batch")
    p.add_argument("--weights", nargs="+", default=["ternary", "binary"], choices=list(WEIGHTS))
    p.add_argument("--budget", type=float, default=8.0, help="seconds of timing per block")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    p.add_argument("--name", default="ab_conv_tiles", help="file stem of the results")
    p.add_argument("--note", default="", help="what else ran on the machine (goes into the file)")
    args = p.parse_args(argv)
    t_start = time.time()
    load0 = os.getloadavg()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    base = base_run(args.base)
    base_sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.base], capture_output=True,
                              text=True).stdout.strip()
    rows = []
    for case in args.cases:
        model, batch = case.split(":")
        label, shape = MODELS[model]
        for wname in args.weights:
            torch.manual_seed(args.seed)
            fm = build_model(model).eval()
            _randomize_bn(fm, args.seed)
            recipe = {"default": {"weight": WEIGHTS[wname], "activation": ACTIVATION}}
            q = lowbit.quantize(copy.deepcopy(fm), recipe).eval()
            packed = rt_compile(q, torch.rand(2, *shape, generator=torch.Generator().manual_seed(args.seed)))
            prog = packed.executor.program(tuple(shape))
            B = int(batch)
            x = torch.rand(B, *shape, generator=torch.Generator().manual_seed(args.seed + 1)).numpy()
            fa, ca = prog.arenas()
            outs = {k: np.empty(B * prog.out_numel, np.float32) for k in ("base", "tree")}

            args_of = {k: (prog.prog, prog.aux, prog.w8, prog.sc, x, o, prog.oinfo, fa, ca, B, prog.chunk)
                       for k, o in outs.items()}
            fns = {"base": functools.partial(base, *args_of["base"]),
                   "tree": functools.partial(executor._run, *args_of["tree"])}
            for f in fns.values():
                f()
            if not np.array_equal(outs["base"], outs["tree"]):
                raise SystemExit(f"{case} {wname}: the two programs' outputs differ")
            t = time_interleaved(fns, max_rounds=2000, budget_s=args.budget, min_rounds=20, seed=args.seed)
            b, n = t["base"]["median_s"], t["tree"]["median_s"]
            rows.append({"model": label, "batch": B, "weights": wname, "base_ms": b * 1e3, "tree_ms": n * 1e3,
                         "base_min_ms": t["base"]["min_s"] * 1e3, "tree_min_ms": t["tree"]["min_s"] * 1e3,
                         "ratio": b / n, "rounds": t["tree"]["rounds"]})
            print(f"{label} b{B} {wname}: base {b * 1e3:.3f} ms, tree {n * 1e3:.3f} ms, {b / n:.2f}x",
                  flush=True)
    meta = run_meta(__file__, argv, t_start, seeds=[args.seed])
    md = [
        f"# A/B: int8 convolution tiles, working tree vs {args.base} ({base_sha[:12]})",
        "",
        f"Command: `{meta['command']}`. One thread, interleaved rounds, medians (min in brackets); "
        "outputs equal bit for bit. Ratio = base / tree (> 1: the tree is faster). Load average at the "
        f"start: {' '.join(f'{v:.2f}' for v in load0)}, at the end: "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}." + (f" {args.note}" if args.note else ""),
        "",
        "| model | batch | weights | base ms | tree ms | ratio |",
        "|---|---:|---|---:|---:|---:|",
    ]
    md += [f"| {r['model']} | {r['batch']} | {r['weights']} | {r['base_ms']:.3f} ({r['base_min_ms']:.3f}) | "
           f"{r['tree_ms']:.3f} ({r['tree_min_ms']:.3f}) | {r['ratio']:.2f}x |" for r in rows]
    payload = {"meta": meta, "base": args.base, "base_sha": base_sha, "rows": rows}
    write_results(args.out, args.name, payload, "\n".join(md))


if __name__ == "__main__":
    main()
