"""A/B of the packed runtime's one-sample call of a chain of packed Linear layers:
``PackedModel.chain`` (the layers' bound forwards in a row, straight from ``PackedModel.__call__``)
against the path before it (``nn.Module.__call__``, ``forward``, the one-thread guard, inference
mode and the ``GraphModule``), with the GEMV kernel alone and the best FP32 and int8 baselines of
one layer beside them.

    python benchmarks/speed/ab_chain_call.py [--sizes 1024 2048 4096] [--budget-s 6] [--out DIR]

One ``Linear(N, N)`` (TWN ternary weights x 8-bit PACT activations, as ``bench_gemv.py``'s
ternary row) and the deep MLP (8 x ``Linear(4096, 4096)``, w1a4), batch 1, one thread. Each block
times every method through ``harness.time_interleaved(turns=True)``: per turn a settle, untimed
calls for 2 ms, then the timed call. The outputs of the two arms are checked equal bit for bit.
Writes ``<out>/ab_chain_call.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemv import Baselines
from common import run_meta, write_results
from harness import deep_mlp, in_ms, machine_info, quantized_model, set_threads, time_interleaved

from lowbit.runtime import compile as rt_compile
from lowbit.runtime import kernels_gemv as KV
from lowbit.runtime.compiler import PackedModel
from lowbit.runtime.layers import PackedLinear

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _old(pm: PackedModel):
    """The call without the chain: what ``PackedModel.__call__`` did before it."""
    chain = pm.chain

    def call(x: torch.Tensor) -> torch.Tensor:
        pm.chain = None
        try:
            return pm(x)
        finally:
            pm.chain = chain

    return call


def measure(name: str, fmodel: nn.Module, variant: str, x: torch.Tensor, budget_s: float,
            workdir: Path, baselines: bool) -> dict[str, Any]:
    pm = rt_compile(quantized_model(fmodel, variant), x, check=False)
    if pm.chain is None:
        raise SystemExit(f"{name}: the compiled model is not a chain of packed layers")
    old = _old(pm)
    y_new, y_old = pm(x), old(x)
    if not torch.equal(y_new, y_old):
        raise SystemExit(f"{name}: the chain's output differs from the module path's")
    fns = {"chain": lambda: pm(x), "module path": lambda: old(x)}
    if len(pm.chain) == 1:
        lin = next(m for m in pm.packed_layers().values() if isinstance(m, PackedLinear))
        _, qp, coef = lin._gemv_static()
        xa, out = x.numpy(), np.empty((1, lin.out_features), np.float32)
        fns["kernel alone"] = lambda: KV.gemv_run(xa, 0, qp, lin.gemv, coef, False, out)
    if baselines:
        calib = [torch.rand(8, x.shape[1]).numpy() for _ in range(4)]
        base = Baselines(fmodel, x, calib, workdir)
        fns.update(base.fns(1))
    timing = in_ms(time_interleaved(fns, max_rounds=2000, budget_s=budget_s, turns=True))
    return {"case": name, "variant": variant, "layers": len(pm.chain), "kernel": pm.layers[0].detail,
            "timing": timing}


def markdown(rows: list[dict], meta: dict) -> str:
    m = meta["machine_info"]
    lines = [
        "# One-sample call of a chain of packed Linear layers: chain vs module path",
        "",
        f"Machine: {m.get('cpu', '?')} ({m.get('logical_cpus', '?')} logical CPUs); load average at "
        f"start {meta['load_start']}, at end {meta['load_end']}. {meta.get('note') or ''}",
        f"Command: `{meta['command']}`; commit {meta['git'].get('commit', '?')[:10]}"
        f"{' (dirty tree)' if meta['git'].get('dirty') else ''}; single run (one process; interleaved "
        "turns: settle, 2 ms of untimed calls, one timed call; median and best over the turns).",
        "",
        "`chain`: `PackedModel.__call__` runs the packed layers' bound forwards in a row on the "
        "calling thread; `module path`: the same model through `nn.Module.__call__`, `forward`, the "
        "one-thread guard, inference mode and the GraphModule (the call before the chain). Outputs "
        "equal bit for bit. `kernel alone`: the GEMV on NumPy arrays with the layer's cached "
        "arguments. Baselines as in `bench_gemv.py` (one layer, one thread).",
        "",
        "| case | method | median ms | best ms | rounds |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        for k, t in sorted(r["timing"].items(), key=lambda kv: kv[1]["median_ms"]):
            lines.append(f"| {r['case']} | {k} | {t['median_ms']:.4f} | {t['min_ms']:.4f} | {t['rounds']} |")
    lines += ["", "| case | module path / chain (median) | chain ms | saved ms |", "|---|---:|---:|---:|"]
    for r in rows:
        t = r["timing"]
        c, o = t["chain"]["median_ms"], t["module path"]["median_ms"]
        lines.append(f"| {r['case']} | {o / c:.2f}x | {c:.4f} | {o - c:.4f} |")
    lines += ["", "Packed layers: " + "; ".join(f"{r['case']}: {r['layers']} x {r['kernel']}" for r in rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048, 4096])
    p.add_argument("--budget-s", type=float, default=6.0, help="seconds per block")
    p.add_argument("--no-mlp", action="store_true", help="skip the 8 x 4096 MLP")
    p.add_argument("--note", default="", help="a sentence for the report (e.g. the machine's state)")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    t0 = time.time()
    load_start = " ".join(f"{v:.2f}" for v in __import__("os").getloadavg())
    set_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as td:
        for n in a.sizes:
            torch.manual_seed(n)
            rows.append(measure(f"Linear {n}x{n}", nn.Sequential(nn.Linear(n, n)).eval(), "w2a8",
                                torch.rand(1, n), a.budget_s, Path(td), True))
            print(f"Linear {n} done", flush=True)
        if not a.no_mlp:
            torch.manual_seed(0)
            rows.append(measure("MLP 8 x 4096", deep_mlp(4096, 8).eval(), "w1a4", torch.rand(1, 4096),
                                a.budget_s, Path(td), False))
    load_end = " ".join(f"{v:.2f}" for v in __import__("os").getloadavg())
    meta = run_meta(__file__, argv, t0, seeds=[0], machine_info=machine_info(), load_start=load_start,
                    load_end=load_end, note=a.note)
    write_results(a.out, "ab_chain_call", {"meta": meta, "rows": rows}, markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
