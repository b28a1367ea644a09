"""A/B of the packed runtime's call path: ``FlatExecutor.one`` (``_run_at``: the program, arenas and
geometry in one int64 context, three ints to pass) against the path before it
(``FlatExecutor.one_args``: ``_run_args``, fifteen arguments, eight of them reference-counted
arrays), with onnxruntime FP32 and PyTorch FP32 beside them, built as ``bench_speed.py`` builds them.

    python benchmarks/speed/ab_call_path.py [--rounds 300] [--block-s 3] [--out benchmarks/results]

LeNet-5 and ResNet-20, binary weights x 4-bit PACT activations (w1a4), batch 1 and 8, one thread.
Each block times every method through ``harness.time_interleaved(turns=True)``: per turn a settle,
one untimed call of the method, then the timed call. Batch 8 runs the executor's general path in
both arms, the new one straight from ``PackedModel.__call__``, the old one through
``nn.Module.__call__`` and ``forward``. Outputs of the two arms are checked equal bit for bit. Writes
``<out>/ab_call_path.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_meta, write_results
from harness import CASES, _infer, _quiet, make_inputs, ort_session, quantized_model, time_interleaved
from torch.nn.modules import module as _tm

from lowbit.runtime import compile as rt_compile
from lowbit.runtime.compiler import PackedModel

VARIANT = "w1a4"


class _OldPath(PackedModel):
    """``PackedModel.__call__`` as it was: the same checks, then ``FlatExecutor.one_args``; anything
    else through ``nn.Module.__call__`` and ``forward``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ex = self.executor
        if (ex is not None and len(args) == 1 and not kwargs and type(args[0]) is torch.Tensor
                and not (self._forward_hooks or self._forward_pre_hooks or self._backward_hooks
                         or self._backward_pre_hooks or _tm._global_forward_hooks
                         or _tm._global_forward_pre_hooks or _tm._global_backward_hooks
                         or _tm._global_backward_pre_hooks)):
            y = ex.one_args(args[0])
            if y is not None:
                return y
        return torch.nn.Module.__call__(self, *args, **kwargs)


def ort_fp32(model: torch.nn.Module, example: torch.Tensor, workdir: Path):
    """onnxruntime FP32 on one thread, the export ``harness.export_onnx`` makes."""
    path = workdir / "fp32.onnx"
    with _quiet():
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
    return ort_session(path, 1)


def _block(name: str, batch: int, case, fmodel, new, old, ort, args) -> list[dict[str, Any]]:
    """The rows of one (model, batch): the methods timed interleaved, in turns."""
    x = make_inputs(case, batch, args.seed).contiguous()
    xn = x.numpy()
    new(x), new(x)  # the first call caches the one-image program
    same = all(torch.equal(new(xi), old(xi)) for xi in (x, 3 * x, x + 1))
    fns = {
        "lowbit-w1a4 new path": lambda: new(x),
        "lowbit-w1a4 old path": lambda: old(x),
        "ort-fp32": lambda: ort(xn),
        "torch-fp32": lambda: _infer(fmodel, x),
    }
    tm = time_interleaved(fns, args.rounds, args.block_s, seed=args.seed + batch, turns=True)
    return [{"model": name, "batch": batch, "method": k, "median_ms": v["median_s"] * 1e3,
             "min_ms": v["min_s"] * 1e3, "p90_ms": v["p90_s"] * 1e3, "rounds": v["rounds"],
             "outputs_equal_new_old": same} for k, v in tm.items()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["lenet5", "resnet20"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--block-s", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="under load (a training campaign: two one-thread processes, nice 5)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    args = ap.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        case = CASES[name]
        torch.manual_seed(args.seed)
        fmodel = case.build().eval()
        q = quantized_model(fmodel, VARIANT)
        example = make_inputs(case, 2, args.seed + 1)
        new = rt_compile(q, example)
        old = copy.copy(new)  # the same packed graph and executor, the old call path
        old.__class__ = _OldPath
        with tempfile.TemporaryDirectory() as d:
            ort = ort_fp32(fmodel, example, Path(d))
            for batch in args.batches:
                rows += _block(name, batch, case, fmodel, new, old, ort, args)
    meta = run_meta(__file__, argv, t0, seeds=[args.seed], threads=1, variant=VARIANT, note=args.note)
    md = [f"# One-image call path A/B (w1a4, 1 thread; {args.note})", "",
          f"`{meta['command']}` at {meta['git'].get('commit', '?')[:10]}"
          f"{' (dirty)' if meta['git'].get('dirty') else ''}", "",
          "| model | batch | method | min ms | median ms | p90 ms | best FP32 / this | old / new |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        blk = {x["method"]: x for x in rows if x["model"] == r["model"] and x["batch"] == r["batch"]}
        best = min(blk["ort-fp32"]["median_ms"], blk["torch-fp32"]["median_ms"])
        ab = (f"{blk['lowbit-w1a4 old path']['median_ms'] / r['median_ms']:.2f}x"
              if r["method"] == "lowbit-w1a4 new path" else "")
        md.append(f"| {r['model']} | {r['batch']} | {r['method']} | {r['min_ms']:.4f} | "
                  f"{r['median_ms']:.4f} | {r['p90_ms']:.4f} | {best / r['median_ms']:.2f}x | {ab} |")
    same = all(r["outputs_equal_new_old"] for r in rows)
    md += ["", "Ratios of medians; best FP32 = the faster of onnxruntime and PyTorch in the block.",
           f"Outputs of the two paths equal bit for bit: {same}."]
    write_results(args.out, "ab_call_path", {"meta": meta, "rows": rows}, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
