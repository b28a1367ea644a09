"""How close ResNet-20's packed convolutions run to this core's int8 instruction rate, and what that
rate allows against the best FP32 (the runtime's ResNet-20 targets: 4x at batch 1, 5x at batch 32).

    python benchmarks/speed/probe_resnet20_floor.py --out benchmarks/results/epyc_zen4

Per weight kind (binary, ternary, 4-bit; 4-bit PACT activations) and batch (1, 32), one thread:

- the flat executor's operations, timed with the time-stamp counter (``profile_flat.time_ops``);
- per int8-kernel convolution the ``vpdpbusd`` instructions it must issue (16 output channels x 4
  input bytes each; a kernel row's ``KW*C`` bytes padded to a multiple of 4, output channels to
  16) against the core's ``vpdpbusd`` rate measured in this run (``bench_issue_rates.measure``:
  register operands, 12 independent chains, no loads, no epilogue): the share of that rate the
  layer reaches, epilogue and loads included;
- a floor: every int8-kernel convolution at that rate with nothing else to do, every other
  operation (table-lookup convolutions, quantize, pooling) as measured;
- onnxruntime FP32 and the packed model side by side (interleaved turns, ``harness.time_interleaved``),
  onnxruntime being the faster FP32 on this machine for ResNet-20 at every batch (``speed.md``);
- the ratio the floor would reach against onnxruntime FP32 beside the measured one.

A target above the floor's ratio cannot be met by the int8 kernel, however it is tuned: only fewer
instructions per product (table lookup: ``kernels_lut_conv``) can. Writes
``<out>/probe_resnet20_floor.{json,md}``; single run, random weights and batch-norm statistics.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_issue_rates import HOST_VNNI, measure
from common import run_meta, write_results
from harness import export_onnx, in_ms, ort_session, time_interleaved
from profile_flat import ACTIVATION, WEIGHTS, _randomize_bn, describe, time_ops

import lowbit
from lowbit.models import build_model
from lowbit.runtime import compile as rt_compile
from lowbit.runtime import executor

SHAPE = (3, 32, 32)
TARGETS = {1: 4.0, 32: 5.0}  # best-FP32 ratio aimed at, per batch


def kernel_sizes(model: torch.nn.Module) -> list[tuple[int, int, int, int]]:
    """(C, O, KH, KW) of the model's convolutions and linear layers (1 x 1) in module order: the
    order of the flat program's convolutions."""
    out = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            out.append((m.in_channels, m.out_channels, *m.kernel_size))
        elif isinstance(m, torch.nn.Linear):
            out.append((m.in_features, m.out_features, 1, 1))
    return out


def int8_instructions(row: np.ndarray, k: tuple[int, int, int, int], batch: int) -> int | None:
    """``vpdpbusd`` instructions an int8-kernel convolution (kernel sizes ``k``) issues for ``batch``
    images (None: not an int8-kernel convolution)."""
    if int(row[0]) != executor.OP_CONV or int(row[29]) != 0:
        return None
    C, O, KH, KW = k
    OH, OW = int(row[5]), int(row[6])
    return batch * OH * OW * math.ceil(O / 16) * KH * math.ceil(KW * C / 4)


def macs(k: tuple[int, int, int, int], row: np.ndarray, batch: int) -> int:
    """Multiply-adds of a convolution's real channels."""
    C, O, KH, KW = k
    return batch * int(row[5]) * int(row[6]) * O * KH * KW * C


def probe(fm: torch.nn.Module, ort: Any, weights: str, batches: list[int], rate: float, calls: int,
          budget_s: float, seed: int) -> list[dict]:
    """The rows of one weight kind: ``fm`` (the float model) quantized and packed, timed beside ``ort``
    (its onnxruntime FP32 session) at each batch."""
    q = lowbit.quantize(copy.deepcopy(fm), {"default": {"weight": WEIGHTS[weights],
                                                        "activation": ACTIVATION}}).eval()
    gen = torch.Generator().manual_seed(seed)
    packed = rt_compile(q, torch.rand(2, *SHAPE, generator=gen))
    prog = packed.executor.program(SHAPE)
    convs = [i for i, row in enumerate(prog.prog) if int(row[0]) == executor.OP_CONV]
    sizes = kernel_sizes(fm)
    if len(sizes) != len(convs) or any((int(prog.prog[i][4]), int(prog.prog[i][10])) != k[:2]
                                       for i, k in zip(convs, sizes, strict=True)):
        raise SystemExit("the flat program's convolutions do not match the model's layers in order")
    ksize = dict(zip(convs, sizes, strict=True))
    out = []
    for b in batches:
        x = torch.rand(b, *SHAPE, generator=gen)
        xn = x.numpy()
        wall_us, per_op, _ = time_ops(packed, prog, x, calls)
        t = in_ms(time_interleaved({"ort-fp32": lambda xn=xn: ort(xn), "lowbit": lambda x=x: packed(x)},
                                   max_rounds=400, budget_s=budget_s, turns=True))
        layers, floor_us, int8_us, int8_instr = [], 0.0, 0.0, 0
        for i, row in enumerate(prog.prog):
            k = ksize.get(i)
            n = None if k is None else int8_instructions(row, k, b)
            us = float(per_op[i])
            at_rate = None if n is None else n / rate * 1e6
            floor_us += us if at_rate is None else at_rate
            if n is not None:
                int8_us += us
                int8_instr += n
            layers.append({"op": i, "what": describe(row), "us": us,
                           "macs": None if k is None else macs(k, row, b),
                           "vpdpbusd": n, "us_at_rate": at_rate,
                           "share_of_rate": None if n is None else at_rate / us})
        ops_us = float(per_op.sum())
        ort_ms, ours_ms = t["ort-fp32"]["median_ms"], t["lowbit"]["median_ms"]
        out.append({"weights": weights, "batch": b, "wall_us": wall_us, "ops_us": ops_us,
                    "floor_us": floor_us, "int8_us": int8_us, "int8_us_at_rate": int8_instr / rate * 1e6,
                    "ort_fp32_ms": ort_ms, "lowbit_ms": ours_ms, "measured_ratio": ort_ms / ours_ms,
                    "floor_ratio": ort_ms / (floor_us / 1e3), "target": TARGETS.get(b),
                    "timing": t, "layers": layers})
        print(f"{weights} b{b}: ort {ort_ms:.3f} ms, lowbit {ours_ms:.3f} ms ({ort_ms / ours_ms:.2f}x); "
              f"floor {floor_us / 1e3:.3f} ms ({ort_ms / (floor_us / 1e3):.2f}x)", file=sys.stderr)
    return out


def to_markdown(rows: list[dict], rate: float, meta: dict) -> str:
    lines = [
        "# ResNet-20: the packed convolutions against the core's int8 rate, and the ratio it allows",
        "",
        f"Command: `{meta['command']}`; git {meta['git'].get('commit', '?')[:10]}"
        f"{' (dirty tree)' if meta['git'].get('dirty') else ''}; CPU: "
        f"{meta['machine'].get('cpu', '?')}; one "
        f"thread; single run (random weights and batch-norm statistics; 4-bit PACT activations).",
        "",
        f"`vpdpbusd` rate measured in this run: {rate / 1e9:.2f} G/s ({64 * rate / 1e9:.0f} G int8 "
        "products/s; register operands, 12 chains). **Floor**: every int8-kernel convolution at that "
        "rate with no epilogue and no loads, the other operations (table-lookup convolutions, "
        "quantize, pooling) as timed. **Measured**: onnxruntime FP32 (the best FP32 here) and the "
        "packed model timed side by side in interleaved turns, medians. Per-operation times: the "
        "time-stamp counter over the fastest quarter of the calls (`profile_flat.py`).",
        "",
        "| weights | batch | onnxruntime FP32 ms | packed ms | measured vs best FP32 "
        "| int8 convs: share of the rate | floor ms | floor vs best FP32 | target "
        "| reachable on the int8 kernel |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        share = r["int8_us_at_rate"] / r["int8_us"] if r["int8_us"] else float("nan")
        tgt = r["target"]
        ok = "-" if tgt is None else ("yes" if r["floor_ratio"] >= tgt else "**no**")
        lines.append(f"| {r['weights']} | {r['batch']} | {r['ort_fp32_ms']:.3f} | {r['lowbit_ms']:.3f} | "
                     f"{r['measured_ratio']:.2f}x | {share:.0%} | {r['floor_us'] / 1e3:.3f} | "
                     f"{r['floor_ratio']:.2f}x | {'-' if tgt is None else f'{tgt:g}x'} | {ok} |")
    lines += ["", "Per operation (us; share = time at the `vpdpbusd` rate / time measured):", ""]
    for r in rows:
        lines += [f"### {r['weights']}, batch {r['batch']} (operations {r['ops_us']:.1f} us, call "
                  f"{r['wall_us']:.1f} us)", "", "| # | operation | us | vpdpbusd | us at the rate | share |",
                  "|---:|---|---:|---:|---:|---:|"]
        for L in r["layers"]:
            n = "-" if L["vpdpbusd"] is None else f"{L['vpdpbusd']:,}"
            at = "-" if L["us_at_rate"] is None else f"{L['us_at_rate']:.1f}"
            sh = "-" if L["share_of_rate"] is None else f"{L['share_of_rate']:.0%}"
            lines.append(f"| {L['op']} | {L['what']} | {L['us']:.1f} | {n} | {at} | {sh} |")
        lines.append("")
    lines.append("Flags: 1 ReLU, 2 float output, 4 residual, 8 next layer's codes, 16 float32 epilogue "
                 "(the others take the float64 one).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", nargs="+", default=["binary", "ternary", "4bit"], choices=list(WEIGHTS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--calls", type=int, default=200, help="timed calls of the profile (fastest quarter kept)")
    p.add_argument("--budget-s", type=float, default=6.0, help="seconds of interleaved timing per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    a = p.parse_args(argv)
    if any(b < 1 for b in a.batches):
        p.error(f"--batches must be >= 1, got {a.batches}")
    if not HOST_VNNI:
        print("needs AVX-512 VNNI: the int8 kernels' rate cannot be measured here")
        return 1
    t0 = time.time()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    rate = measure("vpdpbusd", 2_000_000, 5)
    torch.manual_seed(a.seed)  # one float model (weights from the seed) for every weight kind
    fm = build_model("resnet20").eval()
    _randomize_bn(fm, a.seed)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        paths, _ = export_onnx(fm, torch.rand(1, *SHAPE), [torch.rand(8, *SHAPE).numpy()], Path(d))
        ort = ort_session(paths["ort-fp32"], threads=1)
        for w in a.weights:
            rows += probe(fm, ort, w, a.batches, rate, a.calls, a.budget_s, a.seed)
    meta = run_meta(__file__, argv, t0, seeds=[a.seed], threads=1, vpdpbusd_per_s=rate)
    write_results(a.out, "probe_resnet20_floor", {"meta": meta, "rows": rows}, to_markdown(rows, rate, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
