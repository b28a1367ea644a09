"""A/B: a packed ResNet-20 with its table-lookup convolutions (``kernels_lut_conv``) against the
same model on the int8 kernel alone (``kernels_lut_conv.USE = False``), in one process.

    python benchmarks/speed/ab_lut_conv.py --out benchmarks/results/epyc_zen4   # ~2 min

Both are compiled from the same quantized model (random batch-norm statistics, as in
``bench_speed.py``) and called as the speed benchmark calls them (``packed(x)``, the flat executor);
outputs are checked equal bit for bit. Per thread count and batch, the two are called alternately
for ``--rounds`` rounds (after 3 warm-up calls each); the medians and their ratio are reported.
Writes ``<out>/ab_lut_conv.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_conv import _randomize_bn
from common import run_meta, write_results
from harness import CASES, quantized_model, set_threads

from lowbit.runtime import compile as rt_compile
from lowbit.runtime import kernels_lut_conv as KL


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=["w1a4", "w2a4"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    t0 = time.time()
    torch.manual_seed(args.seed)
    model = CASES["resnet20"].build()
    _randomize_bn(model, args.seed)
    rows = []
    for variant in args.variants:
        q = quantized_model(model, variant)
        packed = {}
        for use in (False, True):
            KL.USE = use
            packed[use] = rt_compile(q, torch.randn(2, 3, 32, 32))
        KL.USE = True
        n_lut = sum(layer.kernel_name() == "lut" for layer in packed[True].packed_layers().values())
        for threads in args.threads:
            set_threads(threads)
            for B in args.batches:
                x = torch.randn(B, 3, 32, 32)
                if not torch.equal(packed[True](x), packed[False](x)):
                    raise AssertionError(f"{variant} b{B}: the lookup convolutions changed the output")
                times: dict[bool, list[float]] = {False: [], True: []}
                for _ in range(3):
                    packed[False](x)
                    packed[True](x)
                rounds = args.rounds if B < 32 else max(10, args.rounds // 2)
                for r in range(rounds):
                    for use in ((False, True) if r % 2 else (True, False)):
                        t = time.perf_counter()
                        packed[use](x)
                        times[use].append(time.perf_counter() - t)
                int8_ms, lut_ms = (statistics.median(times[u]) * 1e3 for u in (False, True))
                rows.append({"variant": variant, "lut_layers": n_lut, "threads": threads, "batch": B,
                             "rounds": rounds, "int8_ms": int8_ms, "lut_ms": lut_ms,
                             "speedup": int8_ms / lut_ms})
                print(f"{variant} {threads}t b{B}: int8 only {int8_ms:.3f} ms, with lookup convolutions "
                      f"{lut_ms:.3f} ms: {int8_ms / lut_ms:.2f}x", flush=True)
    meta = run_meta(__file__, argv, t0, seeds=[args.seed])
    md = ["# A/B: ResNet-20 with table-lookup convolutions vs the int8 kernel alone", "",
          f"Command: `{meta['command']}`; git {meta['git']['commit'][:10]}"
          f"{' (dirty)' if meta['git'].get('dirty') else ''}; CPU: {meta['machine'].get('cpu', '?')}; "
          "flat executor, 32x32 inputs, outputs equal bit for bit; medians of alternating calls "
          "(one run).", "",
          "| variant | layers by lookup | threads | batch | int8 only ms | with lookup ms | speed-up |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['variant']} | {r['lut_layers']} | {r['threads']} | {r['batch']} | "
                  f"{r['int8_ms']:.3f} | {r['lut_ms']:.3f} | {r['speedup']:.2f}x |")
    write_results(args.out, "ab_lut_conv", {"meta": meta, "rows": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
