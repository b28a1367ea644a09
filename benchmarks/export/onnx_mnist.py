"""ONNX export on the real MNIST test set: how often onnxruntime's predictions agree with the
PyTorch fake-quantized model's, and which layers export losslessly as integers.

    python benchmarks/export/onnx_mnist.py runs/repro-val/mnist/s0/lenet5-w1a4 \
        runs/repro-val/mnist/s0/lenet5-w1a4-all runs/repro-val/mnist/s0/twn-w2 \
        runs/repro-val/mnist/s0/lsq-w4a4

Each argument is a run directory written by ``lowbit train`` (its best checkpoint is used); the ones
above are the reproduction suite's seed-0 runs, made by
``python benchmarks/repro/run_mnist.py --datasets mnist --methods lenet5-w1a4 lenet5-w1a4-all twn-w2
lsq-w4a4``. Writes ``benchmarks/results/onnx_mnist.{md,json}`` with the run's provenance.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from lowbit.experiment import load_run
from lowbit.export import export_onnx
from lowbit.export.onnx_export import run_onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_meta, write_results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--opset", type=int, default=21)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    t0 = time.time()
    rows, seeds = [], set()
    for run in a.runs:
        model, data, config = load_run(run)
        seeds.add(int(config["train"]["seed"]))  # the result is the trained runs': record their seeds
        model.eval()
        xs, ys = [], []
        for x, y in data.test:
            xs.append(x)
            ys.append(y)
        x, y = torch.cat(xs), torch.cat(ys)
        with torch.no_grad():
            ref = torch.cat([model(x[i:i + 1000]) for i in range(0, len(x), 1000)])
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "m.onnx"
            report = export_onnx(model, path, tuple(data.in_shape), opset=a.opset)
            got = np.concatenate([run_onnx(path, x[i:i + 1000].numpy()) for i in range(0, len(x), 1000)])
        got_t = torch.from_numpy(got)
        agree = (got_t.argmax(1) == ref.argmax(1)).float().mean().item()
        rows.append({
            "run": run, "recipe": (config.get("recipe") or {}).get("name", ""),
            "n": len(x), "agreement": agree,
            "torch_acc": (ref.argmax(1) == y).float().mean().item(),
            "onnx_acc": (got_t.argmax(1) == y).float().mean().item(),
            "max_abs_logit_diff": (got_t - ref).abs().max().item(),
            "layers": report.to_dict()["rows"],
        })
        print(f"{run}: agreement {agree:.4%}, max |logit diff| {rows[-1]['max_abs_logit_diff']:.2e}",
              flush=True)
    meta = run_meta(__file__, argv, t0, seeds=sorted(seeds), opset=a.opset,
                    onnxruntime=onnxruntime.__version__)
    git = meta["git"]
    md = ["# ONNX export on the MNIST test set", "",
          f"Command: `{meta['command']}` — commit {str(git['commit'])[:12]}"
          f"{' (dirty tree)' if git['dirty'] else ''}, torch {meta['torch']}, onnxruntime "
          f"{meta['onnxruntime']} (CPU, exact MatMulNBits session option), opset {a.opset}, total wall time "
          f"{meta['wall_time_s']:.0f} s. Agreement = share of the 10,000 test images where onnxruntime's "
          "top-1 class equals the PyTorch fake-quantized model's.", "",
          "| run | recipe | agreement | PyTorch acc | ONNX acc | max abs logit diff |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| `{r['run']}` | {r['recipe']} | {r['agreement']:.2%} | {r['torch_acc']:.2%} | "
                  f"{r['onnx_acc']:.2%} | {r['max_abs_logit_diff']:.1e} |")
    md += ["", "Per layer: weight method/bits -> ONNX weight type (lossless = integer codes + "
           "DequantizeLinear reproduce the weight; widened = exported as float weights), activation.", ""]
    for r in rows:
        md.append(f"- `{r['run']}`: " + "; ".join(
            f"{lay['name']} {lay['w_method']}/{lay['w_bits']} -> {lay['onnx_weight']}"
            f"{' lossless' if lay['lossless'] else ' widened' if lay['widened'] else ''}"
            f", act {lay['onnx_activation']}" for lay in r["layers"]))
    write_results(a.out, "onnx_mnist", {"meta": meta, "rows": rows}, "\n".join(md))
    return 0

if __name__ == "__main__":
    sys.exit(main())
