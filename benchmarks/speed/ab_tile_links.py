"""A/B of the Linear -> Linear code-tile links (``compiler._link_tiles``): the deep MLP with every
packed Linear layer handing the next one its codes in the AMX tile layout, against the same
compiled model with the links switched off (float outputs, each layer quantizing its input).

    python benchmarks/speed/ab_tile_links.py [--variants w1a4 w2a4 w1a1] [--batches 16 64 256]
        [--threads 1] [--budget-s 6] [--out DIR]

8 x ``Linear(4096, 4096)`` with ReLU between (``harness.deep_mlp``), one compiled model per
variant; both arms time the same model (the links toggled per call) through
``harness.time_interleaved(turns=True)``. Outputs are checked equal bit for bit. Writes
``<out>/ab_tile_links.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_meta, write_results
from harness import deep_mlp, in_ms, machine_info, quantized_model, set_threads, time_interleaved

from lowbit.runtime import compile as rt_compile

RESULTS = Path(__file__).resolve().parents[1] / "results"


def unlinked(pm):
    """``pm``'s call with its tile links off (float outputs between the layers), same model."""
    layers = list(pm.packed_layers().values())
    targets = [m.tile_target for m in layers]

    def call(x: torch.Tensor) -> torch.Tensor:
        for m in layers:
            m.tile_target = None
        try:
            return pm(x)
        finally:
            for m, t in zip(layers, targets, strict=True):
                m.tile_target = t

    return call


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=["w1a4", "w2a4", "w1a1"])
    p.add_argument("--batches", nargs="+", type=int, default=[16, 64, 256])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget-s", type=float, default=6.0)
    p.add_argument("--note", default="")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    t0 = time.time()
    load_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
    set_threads(a.threads)
    torch.manual_seed(0)
    fmodel = deep_mlp(4096, 8).eval()
    rows: list[dict[str, Any]] = []
    for v in a.variants:
        pm = rt_compile(quantized_model(fmodel, v), torch.rand(16, 4096), check=False)
        links = sum(m.tile_target is not None for m in pm.packed_layers().values())
        old = unlinked(pm)
        for b in a.batches:
            x = torch.rand(b, 4096, generator=torch.Generator().manual_seed(b))
            if not torch.equal(pm(x), old(x)):
                raise SystemExit(f"{v} batch {b}: linked and unlinked outputs differ")
            fns = {"linked": lambda x=x, pm=pm: pm(x), "unlinked": lambda x=x, old=old: old(x)}
            tm = in_ms(time_interleaved(fns,
                                        max_rounds=400, budget_s=a.budget_s, turns=True))
            rows.append({"variant": v, "batch": b, "threads": a.threads, "links": links,
                         "kernel": pm.layers[0].detail, **{f"{k}_{s}": t[s] for k, t in tm.items()
                                                          for s in ("median_ms", "min_ms", "rounds")}})
            print(f"{v} b{b}: linked {tm['linked']['median_ms']:.3f} ms, unlinked "
                  f"{tm['unlinked']['median_ms']:.3f} ms", flush=True)
    load_end = " ".join(f"{v:.2f}" for v in os.getloadavg())
    meta = run_meta(__file__, argv, t0, seeds=[0], machine_info=machine_info(), load_start=load_start,
                    load_end=load_end, note=a.note)
    md = [
        "# Linear -> Linear code-tile links on the deep MLP (8 x 4096^2)",
        "",
        f"Machine: {meta['machine_info'].get('cpu', '?')}; load average at start {load_start}, at end "
        f"{load_end}. {a.note}",
        f"Command: `{meta['command']}`; commit {meta['git'].get('commit', '?')[:10]}"
        f"{' (dirty tree)' if meta['git'].get('dirty') else ''}; single run; {a.threads} thread(s); "
        "interleaved turns (settle, 2 ms of untimed calls, the timed call). Outputs equal bit for bit.",
        "",
        "`linked`: each layer's AMX epilogue writes the next layer's codes in its tile layout; "
        "`unlinked`: the same model with the links off (float output, the next layer quantizes it).",
        "",
        "| variant | batch | links | linked ms (best) | unlinked ms (best) | unlinked / linked |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        md.append(f"| {r['variant']} | {r['batch']} | {r['links']} | {r['linked_median_ms']:.3f} "
                  f"({r['linked_min_ms']:.3f}) | {r['unlinked_median_ms']:.3f} "
                  f"({r['unlinked_min_ms']:.3f}) | "
                  f"{r['unlinked_median_ms'] / r['linked_median_ms']:.3f}x |")
    md += ["", "Layers: " + "; ".join(sorted({f"{r['variant']}: {r['kernel']}" for r in rows}))]
    write_results(a.out, "ab_tile_links", {"meta": meta, "rows": rows}, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
