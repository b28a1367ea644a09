"""Where the warm microseconds of a one-image packed call go, between ``model(x)`` and the kernels.

    python benchmarks/speed/profile_call_path.py [--model lenet5] [--calls 30000] [--out benchmarks/results]

Binary weights x 4-bit PACT activations (w1a4), one thread. Every step below is timed call by call,
the steps in a new random order each time (so that drift and the machine's other load reach them
alike), ``--calls`` calls each; per step the 10th percentile, median and mean of the per-call times
(nanoseconds, ``time.perf_counter_ns``, whose own cost is in every number alike). The steps peel the
call one layer at a time:

- ``model(x)``: ``PackedModel.__call__`` (hook checks) -> ``FlatExecutor.one`` -> ``_run_at``;
- ``ex.one(x)``: the look-up, checks, output tensor and the ``_run_at`` call;
- ``ex.one_args(x)``: the same through ``_run_args`` (the path before the context);
- ``_run_args`` with its fifteen arguments (eight arrays: numba's dispatcher types and unboxes each,
  and inside the interpreter every view of them counts references);
- the same fifteen arguments with the arrays re-wrapped as ``numba.carray`` (no reference counts):
  ``_run_args`` minus this is the interpreter's reference counting, this minus ``_run_at`` the
  argument typing and unboxing;
- ``_run_at`` (three ints) through numba's dispatcher, and through its compiled entry point
  (``overloads[sig].entry_point``: what skipping the dispatcher's typing would still save);
- Python pieces alone: the look-up and checks, ``x.data_ptr()``, the hook checks, an empty call.

All lowbit variants write their outputs to their own buffers and are checked equal bit for bit.
Writes ``<out>/profile_call_path_<model>.{json,md}``.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path

import numba
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_meta, write_results
from harness import CASES, make_inputs, quantized_model

from lowbit.runtime import compile as rt_compile
from lowbit.runtime import executor as E
from lowbit.runtime.executor import NF, _f32_at, _f64_at, _i8_at, _i64_at, _run, _u8_at


@numba.njit(nogil=True)
def _run_args_carrays(prog, aux, w8, sc, xaddr, C, H, W, oaddr, n_out, oinfo, fa, ca, n_img, chunk):
    """``executor._run_args`` with every array re-wrapped as a carray (no meminfo: no reference counts)."""
    p2 = numba.carray(_i64_at(prog.ctypes.data), (prog.shape[0], NF))
    a2 = numba.carray(_i64_at(aux.ctypes.data), (aux.size,))
    w2 = numba.carray(_i8_at(w8.ctypes.data), (w8.size,))
    s2 = numba.carray(_f64_at(sc.ctypes.data), (sc.size,))
    o2 = numba.carray(_i64_at(oinfo.ctypes.data), (4,))
    f2 = numba.carray(_f32_at(fa.ctypes.data), (fa.size,))
    c2 = numba.carray(_u8_at(ca.ctypes.data), (ca.size,))
    x = numba.carray(_f32_at(xaddr), (n_img, C, H, W))
    _run(p2, a2, w2, s2, x, numba.carray(_f32_at(oaddr), (n_out,)), o2, f2, c2, n_img, chunk)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="lenet5", choices=["lenet5", "resnet20"])
    ap.add_argument("--calls", type=int, default=30000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="under load (a training campaign: two one-thread processes, nice 5)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    args = ap.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    case = CASES[args.model]
    packed = rt_compile(quantized_model(case.build().eval(), "w1a4"), make_inputs(case, 2, args.seed + 1))
    ex = packed.executor
    x = make_inputs(case, 1, args.seed)
    packed(x), packed(x)  # the first call caches the one-image program
    one = ex._one[(x.shape, threading.get_ident())]
    prog, fa, ca, cxa = one[:4]
    C, H, W = one[7]
    xa = x.data_ptr()
    bufs = [np.full(prog.out_numel, np.nan, np.float32) for _ in range(5)]
    oa = [b.ctypes.data for b in bufs]

    def a15(o: int) -> tuple:
        return (prog.prog, prog.aux, prog.w8, prog.sc, xa, C, H, W, o, prog.out_numel, prog.oinfo, fa, ca, 1,
                prog.chunk)

    A, B = a15(oa[0]), a15(oa[1])
    run_at, run_args = E._run_at, E._run_args
    entry = run_at.overloads[(numba.types.int64,) * 3].entry_point
    key = (x.shape, threading.get_ident())

    def checks() -> bool:
        o = ex._one.get((x.shape, threading.get_ident()))
        return o is None or x.dtype is not torch.float32 or not x.is_cpu or x.requires_grad \
            or not x.is_contiguous()

    def hooks() -> bool:
        return bool(packed._forward_hooks or packed._forward_pre_hooks or packed._backward_hooks
                    or packed._backward_pre_hooks)

    steps = {
        "model(x)": lambda: packed(x),
        "ex.one(x)": lambda: ex.one(x),
        "ex.one_args(x) (old path)": lambda: ex.one_args(x),
        "_run_args: 15 args, arrays with meminfo": lambda: run_args(*A),
        "15 args, arrays re-wrapped as carrays": lambda: _run_args_carrays(*B),
        "_run_at: 3 ints via dispatcher": lambda: run_at(cxa, xa, oa[2]),
        "_run_at: 3 ints, compiled entry point": lambda: entry(cxa, xa, oa[3]),
        "look-up and tensor checks": checks,
        "x.data_ptr()": lambda: x.data_ptr(),
        "hook checks (PackedModel)": hooks,
        "empty lambda (timer floor)": lambda: None,
    }
    for f in steps.values():
        f()
    want = ex.one(x).numpy().reshape(-1)
    same = all(np.array_equal(b, want) for b in bufs[:4]) and torch.equal(ex.one_args(x), packed(x))
    assert key in ex._one
    times: dict[str, list[int]] = {k: [] for k in steps}
    keys = list(steps)
    rng = random.Random(args.seed)
    pc = time.perf_counter_ns
    for _ in range(args.calls):
        rng.shuffle(keys)
        for k in keys:
            f = steps[k]
            t = pc()
            f()
            times[k].append(pc() - t)
    rows = []
    for k, v in times.items():
        a = np.asarray(v, np.float64)
        rows.append({"step": k, "p10_ns": float(np.percentile(a, 10)), "median_ns": float(np.median(a)),
                     "mean_ns": float(a.mean()), "calls": len(v)})
    meta = run_meta(__file__, argv, t0, seeds=[args.seed], threads=1, variant="w1a4", note=args.note)
    md = [f"# One-image call path of {args.model} w1a4, step by step (1 thread; {args.note})", "",
          f"`{meta['command']}` at {meta['git'].get('commit', '?')[:10]}"
          f"{' (dirty)' if meta['git'].get('dirty') else ''}; {args.calls} calls per step, interleaved call "
          "by call in random order; nanoseconds per call", "",
          "| step | p10 ns | median ns | mean ns |", "|---|---|---|---|"]
    md += [f"| {r['step']} | {r['p10_ns']:.0f} | {r['median_ns']:.0f} | {r['mean_ns']:.0f} |" for r in rows]
    md += ["", f"Outputs of every lowbit step equal bit for bit: {same}."]
    write_results(args.out, f"profile_call_path_{args.model}", {"meta": meta, "rows": rows, "equal": same},
                  "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
