"""The model families of ``tests/clients`` through the whole chain, with the numbers behind the
README's compatibility table: quantized weights, loss before/after 8 training steps, packed file
size against float32, layers the runtime packs and its error, integer weights in the ONNX file
and a plain onnxruntime session's error and top-1 agreement (exactly tied logits, frequent
with ternary weights and 4-bit codes, count as agreeing whichever one is picked).

    OMP_NUM_THREADS=1 python benchmarks/export/clients.py

Tiny configs with random weights (seed 0), so the numbers say what works, not how accurate a
trained model is. Writes ``benchmarks/results/clients.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests" / "clients")]

from common import run_meta, write_results  # noqa: E402
from test_clients import FAMILIES, Trained, _flat, _main, top1_agreement  # noqa: E402

import lowbit.runtime as rt  # noqa: E402
from lowbit.export import export_onnx, save_packed  # noqa: E402


def measure(name: str, tmp: Path) -> dict:
    t = Trained(FAMILIES[name])
    row: dict = {"family": name, "quantized_weights": t.n_quantized, "loss_before": t.loss0,
                 "loss_after": t.loss1}
    fp32 = 4 * sum(p.numel() for p in t.fam.build().parameters())
    row["file_bytes"] = save_packed(t.model, tmp / f"{name}.lowbit")
    row["fp32_bytes"] = fp32
    packed = rt.compile(t.model, t.kw)
    row["compile_packed"] = sum(r.kind == "packed" for r in packed.layers)
    row["compile_layers"] = len(packed.layers)
    row["compile_max_rel_diff"] = packed.max_rel_diff
    path = tmp / f"{name}.onnx"
    try:
        rep = export_onnx(t.model, path, kwargs=t.kw)
    except Exception as e:  # recorded, not hidden
        row["onnx_error"] = f"{type(e).__name__}: {e}"
        return row
    row["onnx_int_weights"] = sum(r.onnx_weight.startswith(("int", "uint")) for r in rep.rows)
    row["onnx_quantized_weights"] = sum(r.w_method not in ("float", "-") for r in rep.rows)
    outs = ort.InferenceSession(str(path)).run(None, {k: v.numpy() for k, v in t.kw.items()})
    refs = [r.detach().numpy() for r in _flat(t.ref)]
    row["onnx_max_rel_err"] = max(float(np.abs(o - r).max() / max(np.abs(r).max(), 1e-12))
                                  for o, r in zip(outs, refs, strict=True))
    row["onnx_top1_agreement"] = top1_agreement(outs[0], _main(t.ref).numpy())
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Model families through quantize -> train -> pack -> compile -> ONNX",
        "",
        f"`{meta['command']}` (single run, seed 0, tiny configs with random weights)",
        "",
        "| family | quantized weights | loss 0 -> 8 steps | file / fp32 | packed layers (compile) | "
        "compile rel. diff | ONNX int weights | ONNX rel. err (plain ORT) | top-1 agree |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        onnx = ("error: " + r["onnx_error"][:60], "-", "-") if "onnx_error" in r else (
            f"{r['onnx_int_weights']}/{r['onnx_quantized_weights']}", f"{r['onnx_max_rel_err']:.1e}",
            f"{100 * r['onnx_top1_agreement']:.0f}%")
        lines.append(
            f"| {r['family']} | {r['quantized_weights']} | {r['loss_before']:.3g} -> {r['loss_after']:.3g} | "
            f"{r['file_bytes']} / {r['fp32_bytes']} B | {r['compile_packed']}/{r['compile_layers']} | "
            f"{r['compile_max_rel_diff']:.1e} | {onnx[0]} | {onnx[1]} | {onnx[2]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        rows = [measure(name, Path(d)) for name in FAMILIES]
    meta = run_meta(__file__, argv, t0, seeds=[0])
    write_results(a.out, "clients", {"meta": meta, "rows": rows}, markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
