"""Where a flat-executed conv net spends its time: cycles per program operation.

    python benchmarks/speed/profile_flat.py --model resnet20 --weights binary --batch 1
    python benchmarks/speed/profile_flat.py --model lenet5 --batch 1 --out /tmp/prof

py-spy (``--native``) sees the packed model's call as one block of JIT code without symbols: at
batch 1 about three quarters of a ResNet-20 call is inside ``executor._run``. This script runs a
copy of ``_run`` with the time-stamp counter read around every operation (``rdtsc``), checks that
the copy's output equals the packed model's bit for bit, and reports per operation the median over
the least disturbed quarter of the calls (the machine is shared), in microseconds at the counter's
measured rate. One thread. Writes ``<out>/profile_flat.{json,md}`` (default: benchmarks/results).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_conv import ACTIVATION, MODELS, WEIGHTS, _randomize_bn
from common import run_meta, write_results

import lowbit
from lowbit.models import build_model
from lowbit.runtime import compile as rt_compile
from lowbit.runtime import executor

OPS = {executor.OP_QUANT: "quantize", executor.OP_CONV: "conv", executor.OP_SUBSAMPLE: "subsample",
       executor.OP_CPAD: "channel pad", executor.OP_MAXPOOL: "max pool", executor.OP_GAP: "avg pool"}


@intrinsic
def _rdtsc(typingctx):
    sig = types.int64()

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(64), [])
        fn = builder.module.declare_intrinsic("llvm.readcyclecounter", fnty=fnty)
        return builder.call(fn, [])

    return sig, codegen


def timed_interpreter():
    """``executor._run`` with ``cyc[i] += cycles of operation i`` (one more argument)."""
    src = inspect.getsource(executor._run.py_func)
    edits = [
        ("@kernel\ndef _run(prog, aux, w8, sc, x, out, oinfo, fa, ca, n_img, chunk):",
         "def _trun(prog, aux, w8, sc, x, out, oinfo, fa, ca, n_img, chunk, cyc):"),
        ("            p = prog[i]\n", "            p = prog[i]\n            t0 = _rdtsc()\n"),
        ("        # the result:", "            cyc[i] += _rdtsc() - t0\n        # the result:"),
    ]
    for old, new in edits:
        if old not in src:
            raise RuntimeError(f"executor._run changed; update profile_flat.py (missing {old!r})")
        src = src.replace(old, new, 1)
    ns = dict(vars(executor))
    ns["_rdtsc"] = _rdtsc
    exec(compile(src, executor.__file__, "exec"), ns)
    return numba.njit(nogil=True, boundscheck=False)(ns["_trun"])


@numba.njit
def _counter() -> int:
    return _rdtsc()


def _counter_ghz() -> float:
    """The time-stamp counter's rate (cycles per ns), over 0.2 s of wall time."""
    _counter()
    t0, c0 = time.perf_counter_ns(), _counter()
    time.sleep(0.2)
    t1, c1 = time.perf_counter_ns(), _counter()
    return (c1 - c0) / (t1 - t0)


def describe(row: np.ndarray) -> str:
    op = int(row[0])
    name = OPS.get(op, str(op))
    if op == executor.OP_CONV:
        C, OH, OW, sh = (int(v) for v in row[4:8])
        O = int(row[10])
        kind = {1: "amx", 2: "lanes", 3: "lanes+pool", 4: "lut"}.get(int(row[29]), "vnni")
        name += f" {C}->{O} {OH}x{OW} s{sh} {kind} flags={int(row[20])}"
    return name


def time_ops(packed, prog, x: torch.Tensor, calls: int) -> tuple[float, np.ndarray, float]:
    """(wall us of a call, us per program operation, the counter's GHz): medians over the fastest
    quarter of ``calls`` calls of the timed copy of the interpreter, which must reproduce
    ``packed(x)`` bit for bit. One thread."""
    run = timed_interpreter()
    fa, ca = prog.arenas()
    batch = x.shape[0]
    xn = x.numpy()
    out = np.empty(batch * prog.out_numel, np.float32)
    cyc = np.zeros(prog.prog.shape[0], np.int64)
    call = (prog.prog, prog.aux, prog.w8, prog.sc, xn, out, prog.oinfo, fa, ca, batch, prog.chunk)
    run(*call, cyc)
    if not np.array_equal(out, packed(x).numpy().reshape(-1)):
        raise SystemExit("the timed copy of the interpreter does not reproduce the packed model")
    samples = []
    for _ in range(calls):
        cyc[:] = 0
        t = time.perf_counter_ns()
        run(*call, cyc)
        samples.append((time.perf_counter_ns() - t, cyc.copy()))
    samples.sort(key=lambda s: s[0])
    keep = samples[: max(1, len(samples) // 4)]
    wall_ns = float(np.median([s[0] for s in keep]))
    per_op = np.median(np.stack([s[1] for s in keep]), axis=0)
    ghz = _counter_ghz()
    return wall_ns / 1e3, per_op / ghz / 1e3, ghz


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", choices=list(MODELS))
    p.add_argument("--weights", default="binary", choices=list(WEIGHTS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    p.add_argument("--suffix", default="", help="appended to the name profile_flat_<model>_b<batch>")
    args = p.parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    torch.manual_seed(args.seed)
    label, shape = MODELS[args.model]
    fm = build_model(args.model).eval()
    _randomize_bn(fm, args.seed)
    recipe = {"default": {"weight": WEIGHTS[args.weights], "activation": ACTIVATION}}
    q = lowbit.quantize(copy.deepcopy(fm), recipe).eval()
    packed = rt_compile(q, torch.rand(2, *shape, generator=torch.Generator().manual_seed(args.seed)))
    prog = packed.executor.program(tuple(shape)) if packed.executor is not None else None
    if prog is None:
        raise SystemExit(f"{args.model} does not run in the flat executor")
    x = torch.rand(args.batch, *shape, generator=torch.Generator().manual_seed(args.seed + 1))
    wall_us, per_op_us, ghz = time_ops(packed, prog, x, args.calls)
    rows = [{"op": i, "what": describe(r), "us": float(per_op_us[i])}
            for i, r in enumerate(prog.prog)]
    by_kind: dict[str, float] = {}
    for r, row in zip(rows, prog.prog, strict=True):
        k = OPS.get(int(row[0]), "?") + (f" flags={int(row[20])}" if row[0] == executor.OP_CONV else "")
        by_kind[k] = by_kind.get(k, 0.0) + r["us"]
    meta = run_meta(__file__, argv, t_start, seeds=[args.seed], model=args.model, weights=args.weights,
                    batch=args.batch, calls=args.calls, chunk=prog.chunk, tsc_ghz=round(ghz, 3))
    lines = [
        f"# Flat executor profile: {label}, {args.weights} weights x 4-bit PACT, batch {args.batch}",
        "",
        f"Command: `{meta['command']}`. One thread; {args.calls} calls, per operation the median over the "
        f"fastest quarter of the calls (time-stamp counter at {ghz:.2f} GHz); program chunk {prog.chunk}.",
        f"Call (wall, same quarter): {wall_us:.1f} us; operations: "
        f"{sum(r['us'] for r in rows):.1f} us.",
        "Flags: 1 ReLU, 2 float output, 4 residual, 8 next layer's codes, 16 float32 epilogue.",
        "",
        "| # | operation | us |",
        "|---:|---|---:|",
        *[f"| {r['op']} | {r['what']} | {r['us']:.2f} |" for r in rows],
        "",
        "| kind | us |",
        "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])],
    ]
    stem = f"profile_flat_{args.model}_b{args.batch}{args.suffix}"
    write_results(args.out, stem, {"meta": meta, "wall_us": wall_us, "ops": rows, "by_kind": by_kind},
                  "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
