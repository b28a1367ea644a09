"""ONNX export on the real MNIST test set: how often onnxruntime's predictions agree with the
PyTorch fake-quantized model's, and which layers export losslessly as integers.

    python benchmarks/export/onnx_mnist.py runs/repro/mnist/lenet5-w1a4 runs/repro/mnist/twn-w2 ...

Each argument is a run directory written by ``lowbit train`` (its best checkpoint is used).
Writes ``benchmarks/results/onnx_mnist.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from lowbit.experiment import load_run
from lowbit.export import export_onnx
from lowbit.export.onnx_export import run_onnx


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--opset", type=int, default=21)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    rows = []
    for run in a.runs:
        model, data, config = load_run(run)
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
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/export/onnx_mnist.py " + " ".join(argv or sys.argv[1:])
    result = {"command": cmd, "opset": a.opset, "rows": rows}
    (out / "onnx_mnist.json").write_text(json.dumps(result, indent=1))
    md = ["# ONNX export on the MNIST test set", "",
          f"Command: `{cmd}` (opset {a.opset}, onnxruntime CPU, exact MatMulNBits session option). "
          "Agreement = share of the 10,000 test images where onnxruntime's top-1 class equals the "
          "PyTorch fake-quantized model's.", "",
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
    (out / "onnx_mnist.md").write_text("\n".join(md) + "\n")
    return 0



if __name__ == "__main__":
    sys.exit(main())
