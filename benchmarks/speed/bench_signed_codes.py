"""Signed activation codes: the quantizer's signed code spec (one ``kernels_codes`` pass, ActSpec
mode 2) against calling its ``encode`` at every layer (mode 1, what signed grids did before), on
the same compiled model, with float PyTorch beside them.

    python benchmarks/speed/bench_signed_codes.py                  # bert256, bert512; w1a8s, w2a8s
    python benchmarks/speed/bench_signed_codes.py --cases bert256 --rounds 10

The BERT cases and variants of ``bench_speed.py`` (``harness.CASES``: binary / TWN ternary weights
x signed 8-bit PACT activations, seq 64, seed 0) at batch 1 on 1 thread; the three methods take
turns in a new random order each round (``harness.time_interleaved``); ratios are medians of the
same run. Both modes give the same output (checked: max abs difference 0). Single run on the shared
2-core machine (load average recorded). Writes benchmarks/results/signed_codes.{json,md} through
``benchmarks/common.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numba
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from harness import CASES, bert_rows_main, in_ms, make_inputs, quantized_model, time_interleaved  # noqa: E402

from lowbit.runtime import compile as rt_compile  # noqa: E402


def measure(case: str, variant: str, rounds: int) -> dict[str, Any]:
    c = CASES[case]
    torch.manual_seed(0)
    fm = c.build().eval()
    x = make_inputs(c, 1, 0)
    packed = rt_compile(quantized_model(fm, variant), x)
    layers = list(packed.packed_layers().values())
    if not all(m.act.mode == 2 for m in layers):
        raise RuntimeError(f"{case}/{variant}: not every packed layer has the signed code spec")

    def run(mode: int):
        def f() -> torch.Tensor:
            for m in layers:
                m.act.mode = mode
            with torch.inference_mode():
                return packed(x)

        return f

    def fp32() -> None:
        with torch.inference_mode():
            fm(x)

    same = float((run(2)() - run(1)()).abs().max())
    r = time_interleaved({"signed spec": run(2), "encode": run(1), "torch-fp32": fp32}, rounds,
                         budget_s=60.0, min_rounds=rounds)
    for m in layers:
        m.act.mode = 2
    ms = in_ms(r)
    spec, enc, f = (ms[k]["median_ms"] for k in ("signed spec", "encode", "torch-fp32"))
    out = {"case": case, "variant": variant, "ms": ms, "max_abs_diff_spec_vs_encode": same,
           "spec_vs_encode": enc / spec, "spec_vs_fp32": f / spec, "encode_vs_fp32": f / enc}
    print(case, variant, f"spec {enc / spec:.2f}x encode; vs fp32 spec {f / spec:.2f}x, "
          f"encode {f / enc:.2f}x", flush=True)
    return out


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Signed activation codes: code spec vs encode (batch 1, 1 thread)",
        "",
        f"Command: `{meta['command']}`; git {meta['git'].get('commit', '?')}"
        f"{' (dirty tree)' if meta['git'].get('dirty') else ''}; load average at start / end: "
        f"{meta['load_start']} / {meta['load_end']}; single run (shared 2-core machine).",
        "",
        "Medians (ms) of interleaved rounds. `signed spec`: the quantizer's `runtime_codes_spec` "
        "(one codes pass per layer); `encode`: the quantizer's torch `encode` per layer (as before).",
        "",
        "| case | variant | signed spec | encode | torch-fp32 | spec vs encode | spec vs fp32 "
        "| encode vs fp32 | max abs diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms = r["ms"]
        lines.append(
            f"| {r['case']} | {r['variant']} | {ms['signed spec']['median_ms']:.2f} "
            f"| {ms['encode']['median_ms']:.2f} "
            f"| {ms['torch-fp32']['median_ms']:.2f} | {r['spec_vs_encode']:.2f}x | {r['spec_vs_fp32']:.2f}x "
            f"| {r['encode_vs_fp32']:.2f}x | {r['max_abs_diff_spec_vs_encode']:.1g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    bert_rows_main(__file__, "signed_codes", measure, to_markdown, argv)


if __name__ == "__main__":
    main()
