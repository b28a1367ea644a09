"""Packed conv nets (the flat executor) of the working tree against an older revision's, beside
onnxruntime FP32, in one process and one interleaved run: the same outputs bit for bit, the speed.

    python benchmarks/speed/ab_flat.py --base 05212a7
    python benchmarks/speed/ab_flat.py --base 05212a7 --cases resnet20:32 --budget-s 60 --no-torch

The base revision's ``executor.py``, ``kernels_int8.py`` and ``compiler.py`` are imported from git
as modules beside ``lowbit.runtime`` (the rest of the package is the working tree's); each model is
compiled by both (``compile``) from the same quantized model, and the packed models are called as
the speed benchmark calls them (``packed(x)``). Timing: one thread, methods in a new random order
each round (onnxruntime FP32, PyTorch FP32 unless ``--no-torch``, base, new), medians over the
rounds of ``--budget-s`` seconds. PyTorch's runs evict the caches between calls, as in
``bench_speed.py``. Writes benchmarks/results/<name>.{json,md} (default ``ab_flat``).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numba
import torch
from common import ROOT, run_meta, write_results
from harness import _quiet, _randomize_bn, ort_session, quantized_model, time_interleaved

from lowbit.models import build_model
from lowbit.runtime import compile as rt_compile

SHAPES = {"lenet5": (1, 28, 28), "resnet20": (3, 32, 32)}
MODULES = ("kernels_int8", "executor", "compiler")  # imported in this order from the base revision


def base_runtime(rev: str, folder: Path):
    """The base revision's ``compiler`` module (with its executor and int8 kernels)."""
    mods = {}
    for name in MODULES:
        src = subprocess.check_output(["git", "-C", str(ROOT), "show", f"{rev}:src/lowbit/runtime/{name}.py"],
                                      text=True)
        for other in mods:
            src = src.replace(f"from .{other} import", f"from ._base_{other} import")
        path = folder / f"_base_{name}.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(f"lowbit.runtime._base_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        mods[name] = mod
    return mods["compiler"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="git revision to compare against")
    p.add_argument("--cases", nargs="+", default=["resnet20:1", "lenet5:1"], help="model:batch")
    p.add_argument("--variant", default="w1a4")
    p.add_argument("--budget-s", type=float, default=40.0)
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch FP32 out of the rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="ab_flat")
    a = p.parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    base = base_runtime(a.base, tmp)
    fns, cases = {}, []
    for case in a.cases:
        model, b = case.split(":")
        B, shape = int(b), SHAPES[model]
        torch.manual_seed(a.seed)
        fm = build_model(model).eval()
        _randomize_bn(fm, a.seed)
        x = torch.rand(B, *shape, generator=torch.Generator().manual_seed(a.seed + 3)).contiguous()
        xn = x.numpy()
        path = tmp / f"{model}.onnx"
        with _quiet():
            torch.onnx.export(fm, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
        ort = ort_session(path, 1)
        q = quantized_model(fm, a.variant)
        example = torch.rand(8, *shape)
        new, old = rt_compile(q, example), base.compile(q, example)
        if not torch.equal(new(x), old(x)):
            raise SystemExit(f"{case}: outputs differ between {a.base} and the working tree")
        key = f"{model} b{B}"
        cases.append(key)
        fns[(key, "ort-fp32")] = lambda ort=ort, xn=xn: ort(xn)
        if not a.no_torch:
            def tf(fm=fm, x=x):
                with torch.inference_mode():
                    return fm(x)
            fns[(key, "torch-fp32")] = tf
        fns[(key, "base")] = lambda p=old, x=x: p(x)
        fns[(key, "new")] = lambda p=new, x=x: p(x)
    times = time_interleaved(fns, max_rounds=1 << 20, budget_s=a.budget_s, seed=a.seed)
    rows = []
    for key in cases:
        med = {m: 1e6 * v["median_s"] for (c, m), v in times.items() if c == key}
        rows.append({"case": key, "rounds": times[(key, "new")]["rounds"],
                     **{f"{m}_us": v for m, v in med.items()},
                     "base_vs_ort": med["ort-fp32"] / med["base"], "new_vs_ort": med["ort-fp32"] / med["new"],
                     "base_over_new": med["base"] / med["new"]})
    meta = run_meta(__file__, argv, t_start, seeds=[a.seed], base=a.base, variant=a.variant,
                    budget_s=a.budget_s)
    lines = [
        f"# Flat executor A/B: working tree against {a.base}, beside onnxruntime FP32 ({a.variant})",
        "",
        f"Command: `{meta['command']}`. One thread; one interleaved run (random order each round"
        f"{'' if a.no_torch else ', PyTorch FP32 included'}), medians in us; single run on a shared machine.",
        "",
        "| case | rounds | onnxruntime FP32 | base | new | base vs FP32 | new vs FP32 | base / new |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {r['case']} | {r['rounds']} | {r['ort-fp32_us']:.1f} | {r['base_us']:.1f} | "
          f"{r['new_us']:.1f} | {r['base_vs_ort']:.2f}x | {r['new_vs_ort']:.2f}x | {r['base_over_new']:.3f} |"
          for r in rows],
    ]
    write_results(a.out, a.name, {"meta": meta, "rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
