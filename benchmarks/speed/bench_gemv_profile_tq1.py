"""Where the batch-1 time of the deep ternary MLP goes with the 1.6-bit GEMV (``runtime/kernels_tq1.py``).

    py-spy record -f raw -o /tmp/tq1_raw.txt --native -r 200 -- \\
        python benchmarks/speed/bench_gemv_profile_tq1.py run       # ~2 minutes, one thread
    python benchmarks/speed/bench_gemv_profile_tq1.py summarize /tmp/tq1_raw.txt

``run``: 8 x ``Linear(4096, 4096)`` + ReLU, TWN ternary weights x 8-bit PACT codes (``w2a8`` of
``harness.py``), compiled, called 300 times at batch 1 on one thread; every other call follows a
320 MB read that evicts the caches (``cold``: the weights come from DRAM), the others follow the
previous call (``warm``). It prints both medians. ``summarize``: the py-spy samples taken inside
the model calls, split into the 1.6-bit GEMV's numba loop (input codes, tiles, epilogue) and
everything else (the Python and PyTorch around it); writes benchmarks/results/gemv_tq1_profile.{json,md}.
Single run, seed 0.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import ROOT, run_meta, write_results

CALLS = 300
#: the line of :func:`run` that calls the model (py-spy frames name it)
_CALL_TAG = "model call"


def run() -> None:
    import numba
    from harness import deep_mlp, quantized_model

    from lowbit.runtime import compile as rt_compile

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    torch.manual_seed(0)
    pm = rt_compile(quantized_model(deep_mlp(4096, 8).eval(), "w2a8"), torch.rand(1, 4096), check=False)
    x = torch.rand(1, 4096)
    print(next(iter(pm.packed_layers().values())).describe(), flush=True)
    big = np.ones(80_000_000, np.float32)
    t = []
    for i in range(CALLS):
        if i % 2:
            big.sum()  # evict: the next call reads the weights from DRAM
        t0 = time.perf_counter()
        pm(x)  # model call
        t.append(time.perf_counter() - t0)
    ts = np.array(t)
    print(f"cold median {np.median(ts[1::2]) * 1e3:.3f} ms (min {ts[1::2].min() * 1e3:.3f}), "
          f"warm median {np.median(ts[2::2]) * 1e3:.3f} ms (min {ts[2::2].min() * 1e3:.3f})")


def summarize(raw: Path) -> dict:
    """Samples inside the model calls (frames through the ``pm(x)`` line of :func:`run`)."""
    lines = Path(__file__).read_text().splitlines()
    call_line = next(i + 1 for i, s in enumerate(lines) if s.strip().endswith(f"# {_CALL_TAG}"))
    tag = f"{Path(__file__).name}:{call_line}"
    cats: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if tag not in stack:
            continue
        total += int(n)
        if "_serial" in stack or "kernels_tq1" in stack:
            cats["1.6-bit GEMV (numba loop: input codes, tiles, epilogue)"] += int(n)
        else:
            leaf = re.sub(r" \(.*", "", stack.split(";")[-1])
            cats[f"other: {leaf}"] += int(n)
    return {"samples": total, "parts": [{"part": k, "samples": v, "share": v / max(total, 1)}
                                        for k, v in cats.most_common()]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run")
    s = sub.add_parser("summarize")
    s.add_argument("raw", type=Path, help="py-spy raw output of the run")
    s.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    if a.cmd == "run":
        run()
        return
    t0 = time.time()
    res = summarize(a.raw)
    meta = run_meta(__file__, argv, t0, seeds=[0])
    md = ["# Deep ternary MLP (8 x 4096^2, w2a8), batch 1, one thread: py-spy samples in the model calls", "",
          f"Command: `py-spy record -f raw --native -r 200 -- python {Path(__file__).relative_to(ROOT)} "
          "run`, "
          f"then `{meta['command']}`; single run. {res['samples']} samples inside the calls.", "",
          "| part | samples | share |", "|---|---:|---:|"]
    md += [f"| {r['part']} | {r['samples']} | {100 * r['share']:.1f}% |" for r in res["parts"][:12]]
    write_results(a.out, "gemv_tq1_profile", {"meta": meta, **res}, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
