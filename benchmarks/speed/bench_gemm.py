"""Many-row Linear speed of lowbit's packed runtime (table-lookup GEMM) against the strongest
int8 and FP32 baselines on this CPU, 1 and 2 threads, measured side by side.

Cases:

- ``mlp``: a deep MLP, ``depth`` x (Linear width x width, ReLU), every layer packed, batch
  (rows) 8 / 64 / 256;
- ``bert``: a ``transformers`` BertModel built from a config (random weights), hidden 256 and
  512, seq len 128, batch 1: every Linear of the encoder quantized (M = seq len rows per Linear).

Methods (interleaved rounds in a shuffled order, median and min over rounds; ratios within a run):
``torch-fp32``, ``ort-fp32``, ``torch-dyn-int8`` (``quantize_dynamic``, fbgemm), ``ort-dyn-int8``
(``onnxruntime.quantization.quantize_dynamic``, QInt8 weights), ``ort-qdq-int8``
(``quantize_static``, QDQ format, U8 activations / S8 weights, calibrated on the example batch),
and ``lowbit-<w>a<k>``: ``lowbit.runtime.compile`` of the model quantized with binary / TWN
ternary weights and PACT k-bit activations. Weight bytes include every runtime copy
(``PackedLinear.runtime_bytes``: bit planes, int8 copy, table-lookup codes).

    python benchmarks/speed/bench_gemm.py              # full (about 10 minutes)
    python benchmarks/speed/bench_gemm.py --quick      # smaller MLP, fewer rounds
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numba
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, run_meta, write_results

import lowbit
import lowbit.runtime as rt
from lowbit.runtime.layers import PackedLinear

log = logging.getLogger("bench_gemm")

WEIGHTS = {"w1": {"method": "binary", "bits": 1}, "w2": {"method": "twn", "bits": 2}}
# (weights, activation bits) of the lowbit variants
VARIANTS = {"mlp": [("w1", 4), ("w2", 4), ("w1", 1), ("w1", 8)], "bert": [("w1", 4), ("w2", 4), ("w2", 8)]}


def mlp(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


class Bert(nn.Module):
    """BertModel's encoder output (last hidden state) from input ids."""

    def __init__(self, hidden: int, layers: int, seq: int) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        cfg = BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, intermediate_size=4 * hidden,
                         max_position_embeddings=max(512, seq), attn_implementation="eager")
        torch.manual_seed(0)
        self.bert = BertModel(cfg, add_pooling_layer=False).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bert(inputs_embeds=x).last_hidden_state


def time_interleaved(fns: dict[str, Any], repeats: int, warmup: int = 1) -> dict[str, dict[str, float]]:
    """Median / min seconds of each callable over rounds that run every callable once, in a new
    (seeded) random order each round, so that load changes hit all methods alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    rng = random.Random(0)
    keys = list(fns)
    for _ in range(repeats):
        rng.shuffle(keys)
        for k in keys:
            c = time.process_time()
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "cpu_s": statistics.median(cpu[k])}
            for k, v in times.items()}


def torch_dynamic_int8(model: nn.Module) -> tuple[nn.Module, int]:
    """``quantize_dynamic`` of the Linear layers (fbgemm) and its weight bytes (int8 Linear weights,
    float32 everything else)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    n = 0
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            n += p.numel() + 8 if isinstance(m, nn.Linear) and name == "weight" else 4 * p.numel()
    return q, n


def quantized(model: nn.Module, w: str, abits: int, skip: tuple[str, ...] = ()) -> nn.Module:
    q = copy.deepcopy(model)
    rules = [{"match": s, "weight": None, "activation": None} for s in skip]
    lowbit.quantize(q, {"default": {"weight": WEIGHTS[w], "activation": {"method": "pact", "bits": abits}},
                        "rules": rules})
    return q.eval()


def onnx_sessions(model: nn.Module, example: torch.Tensor, threads: int, workdir: Path) -> dict[str, Any]:
    """ORT FP32, dynamic int8 and static QDQ int8 sessions: name -> (run, bytes)."""
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    fp32 = workdir / "fp32.onnx"
    dyn = workdir / "dyn.onnx"
    qdq = workdir / "qdq.onnx"
    xn = example.numpy()
    if not fp32.exists():
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(fp32), dynamo=False, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                              opset_version=17)
            quantize_dynamic(str(fp32), str(dyn), weight_type=QuantType.QInt8)

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self.done = False

                def get_next(self):
                    if self.done:
                        return None
                    self.done = True
                    return {"x": xn}

            quantize_static(str(fp32), str(qdq), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    out = {}
    for name, path in (("ort-fp32", fp32), ("ort-dyn-int8", dyn), ("ort-qdq-int8", qdq)):
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        out[name] = (lambda s: (lambda x: s.run(None, {"x": x})[0]))(sess), path.stat().st_size
    return out


def lowbit_bytes(packed: nn.Module, model: nn.Module) -> int:
    """Runtime bytes of the packed layers plus float32 bytes of every parameter left in PyTorch."""
    n = 0
    packed_names = set()
    for m in packed.modules():
        if isinstance(m, PackedLinear):
            n += m.runtime_bytes
            packed_names.add(m.layer_name)
    for name, m in model.named_modules():
        if name in packed_names:
            continue
        n += sum(4 * p.numel() for p in m.parameters(recurse=False))
    return n


_TQ: dict[int, tuple[nn.Module, int]] = {}


def run_case(case: str, label: str, model: nn.Module, x: torch.Tensor, threads: int, repeats: int,
             workdir: Path, packed: dict[str, nn.Module], rows: int) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    fns: dict[str, Any] = {}
    nbytes: dict[str, int] = {}
    xn = x.numpy()
    fns["torch-fp32"] = lambda: model(x)
    nbytes["torch-fp32"] = sum(4 * p.numel() for p in model.parameters())
    tq, nbytes["torch-dyn-int8"] = _TQ.get(id(model)) or _TQ.setdefault(id(model), torch_dynamic_int8(model))
    fns["torch-dyn-int8"] = lambda: tq(x)
    for name, (run, size) in onnx_sessions(model, x, threads, workdir).items():
        fns[name] = (lambda r: (lambda: r(xn)))(run)
        nbytes[name] = size
    for name, pm in packed.items():
        fns[name] = (lambda p: (lambda: p(x)))(pm)
        nbytes[name] = lowbit_bytes(pm, model)
    with torch.inference_mode():
        times = time_interleaved(fns, repeats, warmup=1)
    int8 = [k for k in ("torch-dyn-int8", "ort-dyn-int8", "ort-qdq-int8") if k in times]
    fp32 = [k for k in ("torch-fp32", "ort-fp32") if k in times]
    best_int8 = min(int8, key=lambda k: times[k]["median_s"])
    best_fp32 = min(fp32, key=lambda k: times[k]["median_s"])
    best_int8_cpu = min(int8, key=lambda k: times[k]["cpu_s"])
    best_fp32_cpu = min(fp32, key=lambda k: times[k]["cpu_s"])
    rows_out = []
    for name, t in times.items():
        rows_out.append({
            "case": case, "label": label, "threads": threads, "rows": rows, "method": name,
            "median_ms": 1e3 * t["median_s"], "min_ms": 1e3 * t["min_s"], "weight_bytes": nbytes[name],
            "best_int8": best_int8, "vs_best_int8": times[best_int8]["median_s"] / t["median_s"],
            "best_fp32": best_fp32, "vs_best_fp32": times[best_fp32]["median_s"] / t["median_s"],
            "vs_torch_fp32": times["torch-fp32"]["median_s"] / t["median_s"],
            "cpu_ms": 1e3 * t["cpu_s"], "vs_best_int8_cpu": times[best_int8_cpu]["cpu_s"] / t["cpu_s"],
            "vs_best_fp32_cpu": times[best_fp32_cpu]["cpu_s"] / t["cpu_s"], "best_int8_cpu": best_int8_cpu,
        })
    return rows_out


def compile_variants(model: nn.Module, case: str, x: torch.Tensor, skip: tuple[str, ...] = ()
                     ) -> dict[str, nn.Module]:
    out = {}
    for w, ab in VARIANTS[case]:
        q = quantized(model, w, ab, skip)
        pm = rt.compile(q, x)
        kinds = {m.kernel_name() for m in pm.modules() if isinstance(m, PackedLinear)}
        log.info("%s lowbit-%sa%d: max rel diff %.2e, kernels %s", case, w, ab, pm.max_rel_diff, kinds)
        out[f"lowbit-{w}a{ab}"] = pm
    return out


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# Many-row Linear speed: lowbit table-lookup GEMM vs int8 / FP32 baselines", "",
             f"Command: `{meta['command']}`. Machine: {meta['machine'].get('cpu', '')}. Interleaved rounds, "
             "median ms (min in brackets); ratios = baseline time / method time within the same run "
             "(> 1: faster than the baseline). CPU ms: the process's CPU time per call (median), "
             "which a loaded machine inflates less than wall time; with 2 threads it sums both "
             "threads. Single run; the machine is shared (load average "
             f"{meta.get('loadavg', '?')}).", ""]
    key = lambda r: (r["case"], r["label"], r["rows"], r["threads"])  # noqa: E731
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    for (_case, label, m, th), rs in groups.items():
        lines += [f"## {label}, {m} rows, {th} thread{'s' if th > 1 else ''}", "",
                  "| method | median ms (min) | vs best int8 | vs best FP32 | vs torch FP32 | CPU ms | "
                  "vs best int8 (CPU) | vs best FP32 (CPU) | weight MB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rs, key=lambda r: r["median_ms"]):
            mb = r["weight_bytes"] / 2**20
            lines.append(f"| {r['method']} | {r['median_ms']:.2f} ({r['min_ms']:.2f}) | "
                         f"{r['vs_best_int8']:.2f}x | {r['vs_best_fp32']:.2f}x | {r['vs_torch_fp32']:.2f}x | "
                         f"{r['cpu_ms']:.2f} | "
                         f"{r['vs_best_int8_cpu']:.2f}x | {r['vs_best_fp32_cpu']:.2f}x | {mb:.1f} |")
        lines.append(f"\nbest int8: {rs[0]['best_int8']} (by CPU time: {rs[0]['best_int8_cpu']}), "
                     f"best FP32: {rs[0]['best_fp32']}\n")
    # thread scaling
    lines += ["## Thread scaling (1-thread median / 2-thread median)", "",
              "| case | rows | method | speed-up |", "|---|---|---|---|"]
    by = {(r["label"], r["rows"], r["method"], r["threads"]): r for r in rows}
    for (label, m, meth, th), r in by.items():
        if th == 1 and (label, m, meth, 2) in by:
            up = r["median_ms"] / by[(label, m, meth, 2)]["median_ms"]
            lines.append(f"| {label} | {m} | {meth} | {up:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2-layer MLP, 3 rounds (smoke run)")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cases", nargs="+", default=["mlp", "bert"])
    ap.add_argument("--bert-hidden", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--stem", default="gemm")
    ap.add_argument("--render", action="store_true", help="rewrite the Markdown from the JSON (no timing)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.render:
        payload = json.loads((Path(args.out) / f"{args.stem}.json").read_text())
        write_results(args.out, args.stem, payload, markdown(payload["rows"], payload["meta"]))
        return 0
    if args.quick:
        args.depth, args.repeats = 2, 3
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if "mlp" in args.cases:
            torch.manual_seed(0)
            model = mlp(args.width, args.depth)
            label = f"MLP {args.depth} x Linear {args.width}x{args.width}"
            packed = compile_variants(model, "mlp", torch.randn(8, args.width))
            for b in args.batches:
                x = torch.randn(b, args.width)
                for th in args.threads:
                    wd = Path(tmp) / f"mlp{th}"
                    wd.mkdir(exist_ok=True)
                    rows += run_case("mlp", label, model, x, th, args.repeats, wd, packed, b)
                    log.info("%s batch %d threads %d done", label, b, th)
        if "bert" in args.cases:
            for h in args.bert_hidden:
                model = Bert(h, 4, args.seq)
                x = torch.randn(1, args.seq, h)
                label = f"BERT encoder hidden {h}, 4 layers, seq {args.seq}, batch 1"
                packed = compile_variants(model, "bert", x)
                for th in args.threads:
                    wd = Path(tmp) / f"bert{h}_{th}"
                    wd.mkdir(exist_ok=True)
                    rows += run_case("bert", label, model, x, th, args.repeats, wd, packed, args.seq)
                    log.info("%s threads %d done", label, th)
    meta = run_meta(__file__, argv, t0, seeds=[0])  # weights and inputs follow torch.manual_seed(0)
    with contextlib.suppress(OSError):
        meta["loadavg"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    write_results(args.out, args.stem, {"meta": meta, "rows": rows}, markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
