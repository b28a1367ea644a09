"""Batch 1, one thread, the speed harness's protocol: this checkout's flat executor and a base commit's,
on the same packed model, timed in turns beside onnxruntime FP32 and PyTorch FP32.

    python benchmarks/speed/ab_b1_turns.py [--base 350d853] [--models resnet20 lenet5]
        [--variants w1a4 w2a4 w4a4] [--rounds 200] [--block-s 4] [--note ...] [--out benchmarks/results]

The models, variants, inputs and baselines are built as ``bench_speed.py`` builds them (``harness``);
each block is ``harness.time_interleaved(turns=True)``: per turn a settle, untimed calls for
``harness.TURN_WARM_S``, then the timed call. The base arm is the base commit's ``FlatExecutor``
(``ab_flat_one.load_base``) on the packed model's graph, the new arm this checkout's executor of the
same model; both are called directly (one image: their one-image paths). Outputs of the two arms are
checked equal bit for bit. Writes ``<out>/ab_b1_turns.{json,md}``: per model and variant the medians,
best FP32 / lowbit for each arm, and base / new.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numba
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_flat_one import BASE, load_base
from common import run_meta, write_results
from harness import CASES, _infer, _quiet, make_inputs, ort_session, quantized_model, time_interleaved

from lowbit.runtime import compile as rt_compile


def _block(name: str, variant: str, fmodel, ort, base_mod, args) -> list[dict[str, Any]]:
    case = CASES[name]
    q = quantized_model(fmodel, variant)
    packed = rt_compile(q, make_inputs(case, 2, args.seed + 1))
    new = packed.executor
    if new is None:
        raise SystemExit(f"{name}: not run by the flat executor")
    old = base_mod.FlatExecutor(new.gm)
    x = make_inputs(case, 1, args.seed).contiguous()
    xn = x.numpy()
    for ex in (new, old):  # the first call makes the program and the one-image entry
        ex(x), ex(x)
    same = all(torch.equal(new(xi), old(xi)) for xi in (x, 3 * x, x + 1))
    fns = {
        f"lowbit-{variant} new": lambda: new(x),
        f"lowbit-{variant} base": lambda: old(x),
        "ort-fp32": lambda: ort(xn),
        "torch-fp32": lambda: _infer(fmodel, x),
    }
    tm = time_interleaved(fns, args.rounds, args.block_s, seed=args.seed + 1, turns=True)
    return [{"model": name, "variant": variant, "method": k, "median_ms": v["median_s"] * 1e3,
             "min_ms": v["min_s"] * 1e3, "p90_ms": v["p90_s"] * 1e3, "rounds": v["rounds"],
             "outputs_equal_new_base": same} for k, v in tm.items()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=BASE)
    ap.add_argument("--models", nargs="+", default=["resnet20", "lenet5"], choices=["resnet20", "lenet5"])
    ap.add_argument("--variants", nargs="+", default=["w1a4", "w2a4", "w4a4"])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--block-s", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="under load (a training campaign: two one-thread processes, nice 10)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    args = ap.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        base_mod = load_base(args.base, Path(d))
        for name in args.models:
            case = CASES[name]
            torch.manual_seed(args.seed)
            fmodel = case.build().eval()
            onnx = Path(d) / f"{name}.onnx"
            with _quiet():  # the FP32 export of ``harness.export_onnx``
                torch.onnx.export(fmodel, (make_inputs(case, 2, args.seed + 1),), str(onnx), dynamo=False,
                                  input_names=["x"], output_names=["y"],
                                  dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
            ort = ort_session(onnx, 1)
            for variant in args.variants:
                rows += _block(name, variant, fmodel, ort, base_mod, args)
                print(*(f"{r['method']} {r['median_ms']:.4f}" for r in rows[-4:]), sep="; ", flush=True)
    meta = run_meta(__file__, argv, t0, seeds=[args.seed], threads=1, batch=1, base=args.base, note=args.note)
    md = [f"# Batch 1, one thread, in turns: this checkout's flat executor against {args.base}'s", "",
          f"`{meta['command']}` at {meta['git'].get('commit', '?')[:10]}"
          f"{' (dirty)' if meta['git'].get('dirty') else ''}; {args.note}.", "",
          "| model | variant | method | min ms | median ms | p90 ms | best FP32 / this | base / new |",
          "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        blk = {x["method"]: x for x in rows if x["model"] == r["model"] and x["variant"] == r["variant"]}
        best = min(blk["ort-fp32"]["median_ms"], blk["torch-fp32"]["median_ms"])
        ab = ""
        if r["method"].endswith(" new"):
            ab = f"{blk[r['method'][:-4] + ' base']['median_ms'] / r['median_ms']:.3f}x"
        md.append(f"| {r['model']} | {r['variant']} | {r['method']} | {r['min_ms']:.4f} | "
                  f"{r['median_ms']:.4f} | {r['p90_ms']:.4f} | {best / r['median_ms']:.2f}x | {ab} |")
    same = all(r["outputs_equal_new_base"] for r in rows)
    md += ["", "Ratios of medians within a block; best FP32 = the faster of onnxruntime and PyTorch in the "
           "block.",
           f"Outputs of the two arms equal bit for bit: {same}."]
    write_results(args.out, "ab_b1_turns", {"meta": meta, "rows": rows}, "\n".join(md))
    print("\n".join(md))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
