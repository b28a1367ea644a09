"""A/B: the cost of the runtime's input checks on the batch-1 call.

A is the current code: ``PackedModel.forward``'s entry check (``_entry``), the chain path's dtype
test, ``PackedConv2d.forward``'s rank/channel check. B is the same models with the functions of the
commit before the checks (``--base``, read from git and defined in the same modules), so both run
in one process, interleaved call block by call block. Models (LeNet-5 at 28x28, an MLP): ``m``
(lenet5-w1a4: conv1 in PyTorch, the packed layers module by module), ``m_all`` (lenet5-w1a4-all:
conv1 bit-serial, module by module), ``flat`` (every input quantizer fused: the flat executor's
one-image path, whose code did not change: a control), ``chain`` (a 3-layer 512-wide MLP: the
chain path). Reported: median over rounds of the per-call time, and A/B.

    python benchmarks/speed/ab_input_checks.py [--rounds 21] [--calls 200]
"""

from __future__ import annotations

import argparse
import ast
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import ROOT, run_meta, write_results

import lowbit
import lowbit.runtime as rt
from lowbit.models import build_model
from lowbit.runtime import compiler as C
from lowbit.runtime import layers as L


def _old_methods(commit: str, path: str, cls: str, names: tuple[str, ...], base: type,
                 namespace: dict) -> type:
    """A subclass of ``base`` whose methods ``names`` are those of ``cls`` at ``commit``, defined in
    ``namespace`` (their module's), in a class body so that ``super()`` works."""
    src = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    tree = ast.parse(src)
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    fns = [n for n in node.body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert len(fns) == len(names), names
    body = "\n".join(textwrap.indent(textwrap.dedent(ast.get_source_segment(src, f)), "    ") for f in fns)
    code = f"class Old{cls}(_Base):\n{body}\n"
    ns = dict(namespace, _Base=base)
    exec(compile(code, f"<{commit}:{path}>", "exec"), ns)
    return ns[f"Old{cls}"]


def _models(base: str) -> dict[str, tuple]:
    """name -> (A model, B model, input)."""
    old_conv = _old_methods(base, "src/lowbit/runtime/layers.py", "PackedConv2d", ("forward",),
                            L.PackedConv2d, vars(L)).forward
    OldPackedModel = _old_methods(base, "src/lowbit/runtime/compiler.py", "PackedModel",
                                  ("__call__", "forward"), C.PackedModel, vars(C))

    def lenet(recipe):
        torch.manual_seed(0)
        r = lowbit.load_recipe(recipe) if isinstance(recipe, str) else recipe
        return lowbit.quantize(build_model("lenet5"), r).eval()

    def mlp():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                              nn.Linear(512, 512))
        recipe = {"default": {"weight": {"method": "twn", "bits": 2},
                              "activation": {"method": "pact", "bits": 8}}}
        return lowbit.quantize(model, recipe).eval()

    flat = {"default": {"weight": {"method": "binary", "bits": 1},
                        "activation": {"method": "pact", "bits": 4, "alpha_init": 3.0}}}
    g = torch.Generator().manual_seed(1)
    img = torch.randn(1, 1, 28, 28, generator=g)
    specs = {"m": (lambda: lenet("recipes/lenet5-w1a4.yaml"), img),
             "m_all": (lambda: lenet("recipes/lenet5-w1a4-all.yaml"), img),
             "flat": (lambda: lenet(flat), img),
             "chain": (mlp, torch.rand(1, 512, generator=g))}
    out = {}
    for name, (make, x) in specs.items():
        a = rt.compile(make(), torch.cat([x, x]))
        new_conv = L.PackedConv2d.forward
        L.PackedConv2d.forward = old_conv  # bound into the graph at compile time
        try:
            b = rt.compile(make(), torch.cat([x, x]))
        finally:
            L.PackedConv2d.forward = new_conv
        b.__class__ = OldPackedModel
        ya, yb = a(x), b(x)
        assert torch.equal(ya, yb), name
        out[name] = (a, b, x)
    return out


def _time(f, x, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        f(x)
    return (time.perf_counter() - t0) / calls


def _micro(models: dict) -> dict[str, float]:
    """Nanoseconds of each added check alone on the batch-1 input (timeit, best of 7)."""
    import timeit

    x = models["m"][2]
    conv = models["m_all"][0].packed_layers()["conv1"]
    pm = models["m"][0]
    stmts = {"chain dtype test": ("x.dtype is torch.float32", {"x": x, "torch": torch}),
             "PackedConv2d entry check": (
                 "type(x) is not Codes and ((s := x.shape), len(s) != 4 or s[1] != conv.in_channels)",
                 {"x": x, "Codes": L.Codes, "conv": conv}),
             "PackedModel._entry (float32)": ("pm._entry(x)", {"x": x, "pm": pm})}
    out = {}
    for name, (stmt, g) in stmts.items():
        t = timeit.Timer(stmt, globals=g)
        out[name] = min(t.repeat(7, 20000)) / 20000 * 1e9
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--base", default="f49ea3f~1", help="the commit before the checks (B)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(1)
    models = _models(args.base)
    times: dict[str, dict[str, list[float]]] = {n: {"A": [], "B": []} for n in models}
    for a, b, x in models.values():  # warm both
        _time(a, x, 50), _time(b, x, 50)
    for r in range(args.rounds):
        for name, (a, b, x) in models.items():
            order = (("A", a), ("B", b)) if r % 2 == 0 else (("B", b), ("A", a))
            for label, f in order:
                times[name][label].append(_time(f, x, args.calls))
    micro = _micro(models)
    rows = []
    for name, t in times.items():
        ma, mb = statistics.median(t["A"]), statistics.median(t["B"])
        ratios = [x / y for x, y in zip(t["A"], t["B"], strict=True)]
        rows.append({"model": name, "A_us": ma * 1e6, "B_us": mb * 1e6, "A_over_B": ma / mb,
                     "A_over_B_per_round_median": statistics.median(ratios),
                     "A_over_B_per_round_min": min(ratios), "A_over_B_per_round_max": max(ratios)})
    # seed 0: the models' weights; 1: their inputs
    meta = run_meta(__file__, argv, t0, seeds=[0, 1], base=args.base)
    md = ["# Input checks: batch-1 call, A (with checks) vs B (before), interleaved", "",
          "One process, one thread, under load (a training campaign on both cores at nice 10): "
          "only the ratios count. A/B of the medians, and the median, min and max of the per-round "
          "ratios.", "",
          f"`{meta['command']}`, {args.rounds} rounds x {args.calls} calls", "",
          "| model | A (us) | B (us) | A/B | per-round A/B median [min, max] |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['A_us']:.2f} | {r['B_us']:.2f} | {r['A_over_B']:.3f} | "
                  f"{r['A_over_B_per_round_median']:.3f} [{r['A_over_B_per_round_min']:.3f}, "
                  f"{r['A_over_B_per_round_max']:.3f}] |")
    md += ["", "Each check alone (timeit, best of 7 x 20000, ns):", ""]
    md += [f"- {k}: {v:.0f} ns" for k, v in micro.items()]
    payload = {"meta": meta, "rows": rows, "check_ns": micro,
               "times_s": times}
    write_results(args.out, "ab_input_checks", payload, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
