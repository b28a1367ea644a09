"""Speed benchmark harness: lowbit's packed runtime against the strongest FP32 and int8 baselines
this CPU has, measured side by side in one process (not part of the library: it ships with the
source checkout; ``benchmarks/speed/bench_speed.py`` and ``lowbit bench speed`` call
:func:`run_speed_benchmark`).

Baselines, per case:

- ``torch-fp32``: the float model in PyTorch eager (``torch.inference_mode``);
- ``ort-fp32``: the float model exported with ``torch.onnx.export`` (TorchScript exporter,
  opset 17) in onnxruntime (MLAS kernels);
- ``torch-dyn-int8``: ``torch.ao.quantization.quantize_dynamic`` (Linear layers only);
- ``ort-dyn-int8``: onnxruntime ``quantize_dynamic`` (QInt8 weights);
- ``ort-qdq-int8``: onnxruntime ``quantize_static`` in QDQ format, per-channel QInt8 weights,
  QUInt8 activations, MinMax calibration on random inputs of the same distribution.

``best FP32`` / ``best int8`` are chosen per row in ``speed_report.py``. The lowbit rows are
``lowbit.runtime.compile`` of the model quantized with a variant of :data:`VARIANTS` (weights x
activation quantizer on every quantizable layer), so the benchmark measures whatever the runtime
does today. Weights are random (speed does not depend on training); BatchNorm statistics are
randomised so that folding is exercised.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

BENCH = Path(__file__).resolve().parents[1]
for _p in (str(BENCH), str(Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from common import git_state, machine, versions  # noqa: E402
from common import write_results as write_result_pair  # noqa: E402
from speed_report import add_ratios, evaluate_targets, plot, read_gemv, to_markdown  # noqa: E402

from lowbit._io import atomic_write_text  # noqa: E402

log = logging.getLogger(__name__)

RESULTS = BENCH / "results"

# ----------------------------------------------------------------------------------------------
# variants and cases
# ----------------------------------------------------------------------------------------------

BINARY = {"method": "binary", "bits": 1}
TERNARY = {"method": "twn", "bits": 2}
FOUR_BIT = {"method": "dorefa", "bits": 4}


def _pact(bits: int, signed: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"method": "pact", "bits": bits, "alpha_init": 4.0 if signed else 3.0}
    if signed:
        spec["signed"] = True
    return spec


#: name -> (weight spec, activation spec, description)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "w1a8": (BINARY, _pact(8), "binary weights (+-mean magnitude) x 8-bit PACT activations"),
    "w1a4": (BINARY, _pact(4), "binary weights x 4-bit PACT activations"),
    "w2a8": (TERNARY, _pact(8), "TWN ternary weights x 8-bit PACT activations"),
    "w2a4": (TERNARY, _pact(4), "TWN ternary weights x 4-bit PACT activations"),
    "w4a8": (FOUR_BIT, _pact(8), "DoReFa 4-bit weights x 8-bit PACT activations"),
    "w4a4": (FOUR_BIT, _pact(4), "DoReFa 4-bit weights x 4-bit PACT activations"),
    "w1a1": (BINARY, _pact(1), "binary weights x 1-bit PACT activations (codes {0, 1}: AND-popcount)"),
    "w1a8s": (BINARY, _pact(8, True), "binary weights x signed 8-bit PACT activations (transformer)"),
    "w2a8s": (TERNARY, _pact(8, True), "TWN ternary weights x signed 8-bit PACT activations (transformer)"),
}


def deep_mlp(width: int, depth: int) -> nn.Sequential:
    """``depth`` Linear ``width x width`` layers with ReLU between them."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(width, width))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class BertEncoder(nn.Module):
    """A ``transformers.BertModel`` (random weights) on float embeddings ``(B, S, hidden)``: its
    Linear layers are quantized, attention and LayerNorm stay in PyTorch; the float input lets the
    same module run in float64 for the exactness check and export to ONNX as is."""

    def __init__(self, hidden: int, layers: int = 4, seq: int = 64) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        cfg = BertConfig(
            vocab_size=2,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=max(1, hidden // 64),
            intermediate_size=4 * hidden,
            max_position_embeddings=max(seq, 8),
            attn_implementation="eager",
        )
        self.bert = BertModel(cfg, add_pooling_layer=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.bert(inputs_embeds=x).last_hidden_state


def _zoo(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from lowbit.models import build_model

        return build_model(name)

    return build


@dataclass(frozen=True)
class Case:
    label: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one sample
    variants: tuple[str, ...]
    batches: tuple[int, ...]
    input_kind: str = "uniform"  # uniform [0, 1) or normal


MLP_VARIANTS = ("w1a8", "w1a4", "w2a8", "w2a4", "w4a8", "w4a4", "w1a1")
CONV_VARIANTS = ("w1a4", "w2a4", "w4a4")
BERT_VARIANTS = ("w1a8s", "w2a8s")

CASES: dict[str, Case] = {
    "mlp": Case(
        "MLP 8 x Linear 4096x4096", lambda: deep_mlp(4096, 8), (4096,), MLP_VARIANTS, (1, 8, 64, 256)
    ),
    "lenet5": Case("LeNet-5 (28x28)", _zoo("lenet5"), (1, 28, 28), CONV_VARIANTS, (1, 8, 64, 256)),
    "resnet20": Case(
        "ResNet-20 (CIFAR 32x32)", _zoo("resnet20"), (3, 32, 32), CONV_VARIANTS, (1, 8, 32, 64, 256)
    ),
    "bert256": Case(
        "BERT encoder: hidden 256, 4 layers, 4 heads, seq 64",
        lambda: BertEncoder(256),
        (64, 256),
        BERT_VARIANTS,
        (1, 8),
        "normal",
    ),
    "bert512": Case(
        "BERT encoder: hidden 512, 4 layers, 8 heads, seq 64",
        lambda: BertEncoder(512),
        (64, 512),
        BERT_VARIANTS,
        (1, 8),
        "normal",
    ),
}

#: ``--quick``: small models of the same kinds (seconds; for tests), few rounds
QUICK_CASES: dict[str, Case] = {
    "mlp-quick": Case(
        "MLP 3 x Linear 256x256 (quick)", lambda: deep_mlp(256, 3), (256,), ("w1a4", "w1a1"), (1, 8)
    ),
    "lenet5": Case("LeNet-5 (28x28)", _zoo("lenet5"), (1, 28, 28), ("w1a4",), (1, 8)),
    "bert-quick": Case(
        "BERT encoder: hidden 64, 1 layer, seq 16 (quick)",
        lambda: BertEncoder(64, 1, 16),
        (16, 64),
        ("w2a8s",),
        (1, 8),
        "normal",
    ),
}


def make_inputs(case: Case, batch: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, *case.input_shape)
    return torch.randn(shape, generator=g) if case.input_kind == "normal" else torch.rand(shape, generator=g)


def float_case(case: Case, n_inputs: int, seed: int = 0) -> tuple[nn.Module, Tensor]:
    """The float model of ``case`` built under ``seed`` (eval mode, its BatchNorm statistics
    randomized, :func:`_randomize_bn`) and ``n_inputs`` inputs: what every speed benchmark times."""
    torch.manual_seed(seed)
    fmodel = case.build().eval()
    _randomize_bn(fmodel, seed)
    return fmodel, make_inputs(case, n_inputs, seed)


# ----------------------------------------------------------------------------------------------
# machine, threads, timing
# ----------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["simd"] = [
                    f
                    for f in (
                        "avx2",
                        "avx512f",
                        "avx512_vpopcntdq",
                        "avx512_vnni",
                        "avx512_bitalg",
                        "avx512_vbmi",
                        "avx_vnni",
                        "amx_int8",
                    )
                    if f in flags
                ]
                break
    for mod in ("numpy", "numba", "onnx", "onnxruntime", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    with contextlib.suppress(OSError):
        info["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    return info


def set_threads(n: int) -> None:
    """The same thread count for PyTorch and the runtime's numba kernels (onnxruntime sessions
    are made per thread count)."""
    torch.set_num_threads(n)
    with contextlib.suppress(Exception):
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def _other_threads(name: str) -> list[str] | None:
    """The ``/proc/self/task/<tid>/<name>`` texts of every thread of this process but the calling
    one (a thread that ends meanwhile is left out); None without ``/proc``."""
    me = threading.get_native_id()
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    out = []
    for tid in tids:
        if int(tid) != me:
            with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/{name}") as f:
                out.append(f.read())
    return out


def others_cpu_s() -> float | None:
    """CPU seconds used so far by every thread of this process but the calling one
    (``/proc/self/task/*/schedstat``, exact for running threads too); None without ``/proc``."""
    texts = _other_threads("schedstat")
    if texts is None:
        return None
    ns = 0
    for t in texts:
        with contextlib.suppress(ValueError, IndexError):
            ns += int(t.split()[0])
    return ns * 1e-9


# Settle: the calling thread sleeps in windows of SETTLE_WINDOW_S until one window in which the
# process's other threads used at most SETTLE_IDLE of it, at most SETTLE_MAX_S. After a 2-thread
# call, onnxruntime's intra-op pool spun about one core for 30-45 ms and PyTorch's OpenMP workers up
# to ~10 ms; nothing spun after any 1-thread call nor after lowbit's (threads_contamination.md).
SETTLE_WINDOW_S = 0.004
SETTLE_IDLE = 0.05
SETTLE_MAX_S = 0.3

# A turn's untimed calls run for at least TURN_WARM_S (at least one call): after another method's
# call, caches hold its data. After a sleep the core runs the next calls slowly for a while, which
# more untimed calls do not fully undo on a quiet machine: LeNet-5's batch-1 calls timed 2.1-2.2x
# their plain-loop medians with one untimed call and still 1.6-1.75x after 2-10 ms of them
# (benchmarks/results/turn_warmup.md, benchmarks/speed/probe_turn_warmup.py); hence the turns'
# settle (settle_running) runs the method instead of sleeping.
TURN_WARM_S = 0.002


def running_tids() -> set[str] | None:
    """The thread ids of this process but the calling one that are running or runnable (state ``R``
    in ``/proc/self/task/*/stat``; a spinning pool thread is); None without ``/proc``."""
    me = threading.get_native_id()
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    out = set()
    for tid in tids:
        if int(tid) != me:
            with contextlib.suppress(OSError, IndexError), open(f"/proc/self/task/{tid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "R":  # the state follows the (command name)
                    out.add(tid)
    return out


def others_running() -> int | None:
    """How many threads of this process but the calling one are running or runnable
    (:func:`running_tids`); None without ``/proc``."""
    tids = running_tids()
    return None if tids is None else len(tids)


def settle_running(
    call: Callable[[], Any],
    clock: Callable[[], float] = time.perf_counter,
    running: Callable[[], set[str] | None] | None = None,
) -> float:
    """Settle without sleeping: when other threads of this process are running (the pool another
    runtime's call left spinning), run ``call`` untimed until every one of those threads has
    stopped running, checked every ``SETTLE_WINDOW_S``, at most ``SETTLE_MAX_S``; returns the
    seconds it ran (0, no call, when nothing ran). The core stays busy, so the timed call does not
    pay for a sleep (after a sleep the core ran the next calls slowly for a while,
    ``turn_warmup.md``); the method's own threads, started by these calls, are not waited for
    unless they are the very threads that were spinning (a pool two methods share)."""
    running = running_tids if running is None else running
    left = running()
    if not left:
        return 0.0
    t0 = t_chk = clock()
    while True:
        call()
        t = clock()
        if t - t0 >= SETTLE_MAX_S:
            return t - t0
        if t - t_chk >= SETTLE_WINDOW_S:
            now = running()
            if now is None or not (left & now):
                return t - t0
            t_chk = t


def settle(
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
    others: Callable[[], float | None] = others_cpu_s,
    running: Callable[[], int | None] = others_running,
) -> float:
    """Wait until the other threads of this process are idle (the pools another runtime's call left
    spinning have parked); returns the seconds waited. When no other thread is running it returns at
    once, without sleeping: after a sleep the core ran the next calls slowly for a while, even after
    2-10 ms of untimed calls on a quiet machine (benchmarks/results/turn_warmup.md), so a sleep where
    nothing spins (1 thread; after lowbit's calls) would only slow the timed call. Without ``/proc``:
    one ``SETTLE_MAX_S`` sleep."""
    t0 = clock()
    if running() == 0:
        return 0.0
    c0 = others()
    if c0 is None:
        sleep(SETTLE_MAX_S)
        return clock() - t0
    t_prev = t0
    while True:
        sleep(SETTLE_WINDOW_S)
        c, t = others(), clock()
        if c is None or c - c0 <= SETTLE_IDLE * (t - t_prev) or t - t0 >= SETTLE_MAX_S:
            return t - t0
        c0, t_prev = c, t


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    max_rounds: int,
    budget_s: float = 6.0,
    min_rounds: int = 3,
    seed: int = 0,
    *,
    turns: bool = False,
    clock: Callable[[], float] = time.perf_counter,
    settle_fn: Callable[[], float] | None = None,
    warm_s: float = TURN_WARM_S,
) -> dict[str, dict[str, float]]:
    """Median / min / p90 seconds of each callable over interleaved rounds.

    Two warm-up rounds (one when a round takes over a second) are not timed; the faster of them sets
    the number of rounds, ``budget_s / round time`` within ``[min_rounds, max_rounds]`` (from the
    second alone, a LeNet-5 block at batch 1 once got 3 rounds where 15 fitted). Each round
    runs the methods in a new (seeded) random order, so that drift reaches every method alike.

    ``turns=False``: one timed call per method per round, so a method pays for what the one before
    left behind (cold caches; another runtime's threads still spinning). ``turns=True`` (methods of
    different runtimes): each method's turn is a settle, untimed calls for ``warm_s`` (at least
    one), then the timed call: a method is timed as a user's loop would run it alone, with warm
    caches and no other runtime spinning; a round then costs two calls of each method and ``warm_s``
    per method (the budget counts them; the settles come on top and are returned as ``settle_s``,
    the total over the block). The settle is :func:`settle_running` (untimed calls of the method
    until the threads spinning at the turn's start have stopped; no sleep), or ``settle_fn()``
    when given (:func:`settle` sleeps instead).
    ``clock`` times the calls (a fake clock in tests)."""
    per_round = 2 if turns else 1
    t = clock()
    for f in fns.values():
        f()
    t_round = clock() - t
    if t_round < 1.0:
        t = clock()
        for f in fns.values():
            f()
        t_round = min(t_round, clock() - t)
    warm_round = len(fns) * warm_s if turns else 0.0
    rounds = max(min_rounds, min(max_rounds, int(budget_s / max(per_round * t_round + warm_round, 1e-9))))
    times: dict[str, list[float]] = {k: [] for k in fns}
    settled = 0.0
    keys = list(fns)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(keys)
        for k in keys:
            f = fns[k]
            if turns:
                settled += settle_running(f, clock) if settle_fn is None else settle_fn()
                t_w = clock()
                f()  # untimed: the turn's first calls warm the core and caches after the settle's sleep
                while clock() - t_w < warm_s:
                    f()
            t0 = clock()
            f()
            times[k].append(clock() - t0)
    out = {
        k: {
            "median_s": statistics.median(v),
            "min_s": min(v),
            "p90_s": float(np.percentile(v, 90)),
            "rounds": len(v),
        }
        for k, v in times.items()
    }
    if turns:
        for d in out.values():
            d["settle_s"] = settled
    return out


# ----------------------------------------------------------------------------------------------
# baselines
# ----------------------------------------------------------------------------------------------


def in_ms(timing: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """:func:`time_interleaved`'s result with every ``*_s`` entry as ``*_ms`` in milliseconds."""
    return {k: {(n[:-2] + "_ms" if n.endswith("_s") else n): (v * 1e3 if n.endswith("_s") else v)
                for n, v in d.items()} for k, d in timing.items()}


def bert_rows_main(file: str, name: str, measure: Callable[[str, str, int], dict[str, Any]],
                   to_markdown: Callable[[list[dict[str, Any]], dict[str, Any]], str],
                   argv: list[str] | None = None) -> None:
    """The command line of a per-(case, variant) study (BERT cases by default, any of :data:`CASES`):
    rows of ``measure(case, variant, rounds)``, provenance with the load average at start and end,
    ``benchmarks/results/<name>``."""
    import argparse

    from common import run_meta, write_results

    ap = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["bert256", "bert512"], choices=list(CASES))
    ap.add_argument("--variants", nargs="+", default=["w1a8s", "w2a8s"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "results"))
    args = ap.parse_args(argv)
    t0 = time.time()
    load = lambda: " ".join(f"{v:.2f}" for v in os.getloadavg())  # noqa: E731
    load_start = load()
    rows = [measure(c, v, args.rounds) for c in args.cases for v in args.variants]
    meta = run_meta(file, argv, t0, seeds=[0], load_start=load_start, load_end=load())
    write_results(args.out, name, {"meta": meta, "rows": rows}, to_markdown(rows, meta))
    print(f"wrote {Path(args.out) / (name + '.md')}")


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_((torch.rand(m.num_features, generator=g) - 0.5) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def float_weight_bytes(model: nn.Module) -> int:
    return sum(4 * p.numel() for p in model.parameters())


def torch_dynamic_int8(model: nn.Module) -> tuple[nn.Module, int]:
    """quantize_dynamic (Linear only) and its weight bytes (int8 Linear weights, fp32 rest)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    nbytes = 0
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            is_w = isinstance(m, nn.Linear) and name == "weight"
            nbytes += p.numel() + 8 if is_w else 4 * p.numel()  # int8 + per-tensor scale / zero point
    return q, nbytes


@contextlib.contextmanager
def _quiet():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


PRE_PROCESS_MAX_BYTES = 64 << 20


class _Calibration:
    """onnxruntime ``CalibrationDataReader`` over a list of input batches."""

    def __init__(self, batches: Sequence[np.ndarray]) -> None:
        self._it = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {"x": x}

    def rewind(self) -> None:  # (not needed by MinMax; present for newer readers)
        pass


def export_onnx(
    model: nn.Module, example: Tensor, calib: Sequence[np.ndarray], workdir: Path
) -> tuple[dict[str, Path], dict[str, str]]:
    """FP32, dynamic int8 and static QDQ int8 ONNX files of ``model`` -> (paths, why-missing)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    paths: dict[str, Path] = {}
    missing: dict[str, str] = {}
    fp32 = workdir / "fp32.onnx"
    with _quiet():
        torch.onnx.export(
            model,
            (example,),
            str(fp32),
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            opset_version=17,
        )
    paths["ort-fp32"] = fp32
    try:
        with _quiet():
            quantize_dynamic(str(fp32), str(workdir / "dyn.onnx"), weight_type=QuantType.QInt8)
        paths["ort-dyn-int8"] = workdir / "dyn.onnx"
    except Exception as e:
        missing["ort-dyn-int8"] = f"quantize_dynamic failed: {e}"
    src = fp32
    # pre-processing (shape inference, graph optimisation) makes ResNet-20's QDQ model ~3x faster;
    # on the 537 MB MLP it changed nothing measurable and costs ~7 s of CPU, so large files skip it
    if fp32.stat().st_size <= PRE_PROCESS_MAX_BYTES:
        try:
            from onnxruntime.quantization import quant_pre_process

            with _quiet():
                quant_pre_process(str(fp32), str(workdir / "pre.onnx"))
            src = workdir / "pre.onnx"
        except Exception as e:  # pre-processing is an optimisation; quantize the export itself
            log.info("quant_pre_process failed (%s); static quantization of the plain export", e)
    try:
        with _quiet():
            quantize_static(
                str(src),
                str(workdir / "qdq.onnx"),
                _Calibration(calib),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        paths["ort-qdq-int8"] = workdir / "qdq.onnx"
    except Exception as e:
        missing["ort-qdq-int8"] = f"quantize_static failed: {e}"
    return paths, missing


def ort_session(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})[0]


# ----------------------------------------------------------------------------------------------
# lowbit
# ----------------------------------------------------------------------------------------------


def mlp_int8_baselines(fm: nn.Module, width: int, seed: int, onnx_dir: Path, threads: int = 1
                       ) -> tuple[Callable[[Tensor], dict[str, Callable[[], Any]]], dict[str, str]]:
    """The int8 baselines of a float MLP ``fm`` of ``width`` inputs as the A/B scripts time them
    beside lowbit (onnxruntime sessions on ``threads`` threads; PyTorch runs on its own thread count,
    ``set_threads``): PyTorch dynamic int8 and onnxruntime dynamic / static QDQ int8
    (exported into ``onnx_dir``, or the files an earlier run with the same seed left there).
    Returns ``(calls, missing)``: ``calls(x)`` the baselines' calls on the input ``x``, ``missing``
    the exports that failed and why."""
    names = {"ort-dyn-int8": onnx_dir / "dyn.onnx", "ort-qdq-int8": onnx_dir / "qdq.onnx"}
    if all(p.exists() for p in names.values()):
        paths, missing = names, {}
    else:
        g = torch.Generator().manual_seed(seed + 1)
        calib = [torch.rand(8, width, generator=g).numpy() for _ in range(4)]
        paths, missing = export_onnx(fm, torch.rand(8, width), calib, onnx_dir)
    sessions = {k: ort_session(paths[k], threads) for k in names if k in paths}
    dyn, _ = torch_dynamic_int8(fm)

    def calls(x: Tensor) -> dict[str, Callable[[], Any]]:
        def torch_int8() -> Any:
            with torch.inference_mode():
                return dyn(x)

        xn = x.numpy()
        return {"torch-dyn-int8": torch_int8, **{k: (lambda s=s: s(xn)) for k, s in sessions.items()}}

    return calls, missing


def block_ms(timing: dict[str, dict[str, float]], ours: Sequence[str]
             ) -> tuple[dict[str, float], dict[str, float], str, float, float]:
    """Of one interleaved block: (median ms, fastest-round ms of every method, the best baseline
    (the fastest median of the methods not in ``ours``), its median ms, the fastest round of any
    baseline in ms)."""
    med = {k: 1e3 * v["median_s"] for k, v in timing.items()}
    low = {k: 1e3 * v["min_s"] for k, v in timing.items()}
    base = {k: v for k, v in med.items() if k not in ours}
    best = min(base, key=base.get)
    return med, low, best, base[best], min(low[k] for k in base)


def quantized_model(model: nn.Module, variant: str) -> nn.Module:
    import lowbit

    w, a, _ = VARIANTS[variant]
    q = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (unsigned quantizers on signed inputs warn; speed is what counts)
        lowbit.quantize(q, {"default": {"weight": w, "activation": a}})
    return q.eval()


def held_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of every numpy array and tensor reachable from ``obj`` through containers, dataclasses
    and runtime objects (each buffer once): what a packed layer keeps in memory, its bit planes,
    int8-expanded weights and caches alike. Other ``nn.Module``s (quantizers) are not followed."""
    seen = set() if seen is None else seen
    if isinstance(obj, np.ndarray):
        base = obj
        while isinstance(base.base, np.ndarray):
            base = base.base
        key = base.__array_interface__["data"][0]
        if key in seen:
            return 0
        seen.add(key)
        return int(base.nbytes)
    if isinstance(obj, Tensor):
        st = obj.untyped_storage()
        if st.data_ptr() in seen:
            return 0
        seen.add(st.data_ptr())
        return int(st.nbytes())
    if id(obj) in seen:
        return 0
    if isinstance(obj, dict):
        seen.add(id(obj))
        return sum(held_bytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple | set | frozenset):
        seen.add(id(obj))
        return sum(held_bytes(v, seen) for v in obj)
    is_runtime = type(obj).__module__.startswith("lowbit.runtime")
    if isinstance(obj, nn.Module) and not is_runtime:
        return 0
    if is_runtime and hasattr(obj, "__dict__"):
        seen.add(id(obj))
        return sum(held_bytes(v, seen) for v in vars(obj).values())
    return 0


def memory_bytes(packed: Any) -> dict[str, int]:
    """``{"in_memory", "int8_copy"}`` bytes of a compiled model: every array its packed layers hold
    (:func:`held_bytes`) plus the float parameters and buffers left in PyTorch; ``int8_copy`` is the
    int8-expanded weights (``layer.i8``) alone."""
    seen: set[int] = set()
    total = 0
    int8 = 0
    for layer in packed.packed_layers().values():
        total += held_bytes(vars(layer), seen)
        i8 = getattr(layer, "i8", None)
        if i8 is not None:
            int8 += held_bytes(i8, set())
    for p in list(packed.module.parameters()) + list(packed.module.buffers()):
        if p.is_floating_point():
            total += held_bytes(p, seen)
    return {"in_memory": total, "int8_copy": int8}


def kernel_summary(packed: Any) -> str:
    """How many layers run which packed kernel, and how many stay in PyTorch."""
    c = Counter(r.detail if r.kind == "packed" else "PyTorch" for r in packed.layers)
    return ", ".join(f"{n} x {d}" for d, n in c.items())


def rel_diff(got: Any, ref: Tensor | None) -> float | None:
    if ref is None or not isinstance(got, Tensor):
        return None
    return float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


# the float64 reference runs on the first 64 inputs; a larger batch is checked on its first 64
# outputs (computed in the whole batch): the reference of 256 ResNet-20 images costs ~5 s of CPU
CHECK_SAMPLES = 64


@dataclass
class LowbitEngine:
    packed: Any
    ref64: Tensor | None  # float64 reference output on the first CHECK_SAMPLES inputs
    meta: dict[str, Any]


def build_lowbit(fmodel: nn.Module, variant: str, example: Tensor, x_all: Tensor) -> LowbitEngine:
    from lowbit.runtime import compile as rt_compile
    from lowbit.runtime.compiler import reference_fp64

    t = time.perf_counter()
    qm = quantized_model(fmodel, variant)
    quantize_s = time.perf_counter() - t
    t = time.perf_counter()
    packed = rt_compile(qm, example)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    try:
        ref = reference_fp64(qm, x_all[:CHECK_SAMPLES])
        ref = ref if isinstance(ref, Tensor) else None
    except Exception as e:  # a model that cannot run in float64: no exactness check
        log.warning("speed: no float64 reference for %s (%s)", variant, e)
        ref = None
    ref_s = time.perf_counter() - t
    log.info(
        "speed: lowbit-%s: quantize %.1f s, compile %.1f s, float64 reference %.1f s",
        variant,
        quantize_s,
        compile_s,
        ref_s,
    )
    mem = memory_bytes(packed)
    n_packed = sum(r.kind == "packed" for r in packed.layers)
    meta = {
        "weight_bytes": int(packed.weight_bytes()),
        "weight_bytes_in_memory": mem["in_memory"],
        "int8_copy_bytes": mem["int8_copy"],
        "compile_s": compile_s,
        "setup_s": {"quantize": quantize_s, "compile": compile_s, "reference_fp64": ref_s},
        "batch_chunk": int(packed.batch_chunk),
        "packed_layers": f"{n_packed}/{len(packed.layers)}",
        "note": VARIANTS[variant][2],
    }
    _release(qm, packed)
    return LowbitEngine(packed, ref, meta)


def _release(qm: nn.Module, packed: Any) -> None:
    """Free the quantized model: ``del`` and ``gc.collect()`` leave it alive (its latent weights,
    537 MB for the MLP, stay reachable through the parametrized class's injected property), so
    its parametrizations are removed. Only when every layer is packed: the compiled copy's layers
    left in PyTorch would share that class."""
    if any(r.kind != "packed" for r in packed.layers):
        return
    from torch.nn.utils import parametrize

    for mod in list(qm.modules()):
        if parametrize.is_parametrized(mod):
            for name in list(mod.parametrizations.keys()):
                parametrize.remove_parametrizations(mod, name, leave_parametrized=False)


def _infer(model: nn.Module, x: Tensor) -> Any:
    with torch.inference_mode():
        return model(x)


# ----------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------


def _time_block(
    name: str,
    case: Case,
    batch: int,
    t: int,
    x_all: Tensor,
    fmodel: nn.Module,
    dyn: nn.Module,
    sessions: dict[str, Callable[[np.ndarray], np.ndarray]],
    engines: dict[str, LowbitEngine],
    meta: dict[str, dict[str, Any]],
    repeats: int,
    block_s: float,
    seed: int,
) -> list[dict[str, Any]]:
    """The rows of one (case, batch, thread count) block: every method timed interleaved."""
    x = x_all[:batch].contiguous()
    xn = x.numpy()
    fns: dict[str, Callable[[], Any]] = {
        "torch-fp32": lambda: _infer(fmodel, x),
        "torch-dyn-int8": lambda: _infer(dyn, x),
    }
    for m, run in sessions.items():
        fns[m] = lambda run=run: run(xn)
    for v, e in engines.items():
        fns[f"lowbit-{v}"] = lambda p=e.packed: p(x)
    # turns: every method timed as if it ran alone (no other runtime's pool still spinning)
    timing = time_interleaved(
        fns, repeats if batch < 64 else max(3, repeats // 3), block_s, seed=seed + batch, turns=True
    )
    log.info("speed: %s batch %d, %d thread(s): settles took %.2f s", name, batch, t,
             next(iter(timing.values()))["settle_s"])
    rows = []
    for k, tm in timing.items():
        row = {
            "threads": t,
            "model": name,
            "model_label": case.label,
            "batch": batch,
            "method": k,
            "median_ms": tm["median_s"] * 1e3,
            "min_ms": tm["min_s"] * 1e3,
            "p90_ms": tm["p90_s"] * 1e3,
            "rounds": tm["rounds"],
            "throughput_per_s": batch / tm["median_s"],
        }
        if k.startswith("lowbit-"):
            e = engines[k.removeprefix("lowbit-")]
            n = min(batch, CHECK_SAMPLES)
            got, ref = e.packed(x)[:n], None if e.ref64 is None else e.ref64[:n]
            row.update(e.meta, max_rel_diff_vs_fakequant_fp64=rel_diff(got, ref))
        else:
            row.update(meta[k])
        rows.append(row)
    return rows


def run_case(
    name: str,
    case: Case,
    threads: Sequence[int],
    batches: Sequence[int],
    variants: Sequence[str],
    repeats: int,
    block_s: float,
    seed: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of one case (every batch x thread count x method) and its info (setup time, kernels)."""
    t0, c0 = time.perf_counter(), time.process_time()
    set_threads(max(threads))
    fmodel, x_all = float_case(case, max(batches), seed)
    example = x_all[: min(8, len(x_all))]
    calib = [make_inputs(case, 8, seed + 1000 + i).numpy() for i in range(4)]
    info: dict[str, Any] = {"label": case.label, "kernels": {}, "missing": {}}
    meta: dict[str, dict[str, Any]] = {
        "torch-fp32": {
            "weight_bytes": float_weight_bytes(fmodel),
            "weight_bytes_in_memory": float_weight_bytes(fmodel),
            "note": "PyTorch FP32",
        }
    }
    t_build = time.perf_counter() - t0
    dyn, dyn_bytes = torch_dynamic_int8(fmodel)
    meta["torch-dyn-int8"] = {
        "weight_bytes": dyn_bytes,
        "weight_bytes_in_memory": dyn_bytes,
        "note": "quantize_dynamic: Linear int8, conv FP32",
    }
    with tempfile.TemporaryDirectory() as td:
        try:
            paths, info["missing"] = export_onnx(fmodel, example, calib, Path(td))
        except Exception as e:
            log.warning("speed: onnx export of %s failed (%s); no onnxruntime baselines", name, e)
            paths, info["missing"] = {}, {"ort-*": f"torch.onnx.export failed: {e}"}
        for m, p in paths.items():
            meta[m] = {
                "weight_bytes": p.stat().st_size,
                "weight_bytes_in_memory": None,
                "note": "onnx file size",
            }
        info["setup_detail_s"] = {"build": t_build, "baselines": time.perf_counter() - t0 - t_build}
        log.info(
            "speed: %s: model %.1f s, PyTorch int8 + onnx exports %.1f s",
            name,
            *info["setup_detail_s"].values(),
        )
        # one variant after the other: torch.fx tracing (inside compile) patches nn.Module calls
        # process-wide, so two compiles on two threads break each other
        engines = {v: build_lowbit(fmodel, v, example, x_all) for v in variants}
        info["kernels"] = {v: kernel_summary(e.packed) for v, e in engines.items()}
        gc.collect()
        info["setup_s"] = time.perf_counter() - t0
        info["setup_cpu_s"] = time.process_time() - c0
        log.info("speed: %s set up in %.0f s (%.0f s CPU)", name, info["setup_s"], info["setup_cpu_s"])
        rows: list[dict[str, Any]] = []
        # one thread count at a time: onnxruntime fixes its threads per session, and the MLP's
        # sessions for both counts would hold ~2 GB
        for t in threads:
            set_threads(t)
            sessions = {m: ort_session(p, t) for m, p in paths.items()}
            for batch in batches:
                rows += _time_block(
                    name, case, batch, t, x_all, fmodel, dyn, sessions, engines, meta, repeats, block_s, seed
                )
                log.info(
                    "speed: %s batch %d, %d thread(s) (%.0f s elapsed)",
                    name,
                    batch,
                    t,
                    time.perf_counter() - t0,
                )
            del sessions
            gc.collect()
    info["total_s"] = time.perf_counter() - t0
    info["total_cpu_s"] = time.process_time() - c0
    return rows, info


def run_speed_benchmark(
    cases: Sequence[str] | None = None,
    threads: int | Sequence[int] = (1, 2),
    batches: Sequence[int] | None = None,
    variants: Sequence[str] | None = None,
    repeats: int = 15,
    block_s: float = 3.0,
    out_dir: str | os.PathLike | None = None,
    quick: bool = False,
    resume: bool = False,
    seed: int = 0,
    command: str | None = None,
    gemv_json: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Time every case x batch x thread count x method; write ``speed.{json,md,png}`` into
    ``out_dir`` (when given) and return the payload (``rows``, ``targets``, ``cases``, ...).

    ``cases``: keys of :data:`CASES` (``quick``: of :data:`QUICK_CASES`, small models, 3 rounds);
    ``batches`` / ``variants``: restrict each case's own lists; ``repeats``: at most this many
    rounds per block (a third at batch >= 64), ``block_s`` the time budget that sets the rounds.
    ``resume``: reuse the cases a killed run with the same settings finished
    (``speed.partial.json`` in ``out_dir``). ``gemv_json``: the GEMV benchmark's results (default
    ``gemv.json`` beside the output) for the 2048^2 GEMV target.
    """
    table = QUICK_CASES if quick else CASES
    cases = list(cases or table)
    bad = [c for c in cases if c not in table]
    if bad:
        raise ValueError(f"unknown case(s) {bad}; allowed: {', '.join(table)}")
    if quick:
        repeats = min(repeats, 3)
        block_s = min(block_s, 0.5)
    threads = [threads] if isinstance(threads, int) else [int(t) for t in threads]
    config = {
        "cases": cases,
        "threads": threads,
        "batches": list(batches or []),
        "variants": list(variants or []),
        "repeats": repeats,
        "block_s": block_s,
        "quick": quick,
        "seed": seed,
        # rows resume only under the code that timed them (a tree changed since: all rerun)
        "git": git_state(BENCH.parent),
    }
    out = Path(out_dir) if out_dir is not None else None
    partial = out / "speed.partial.json" if out is not None else None
    done: dict[str, Any] = {}
    if resume and partial is not None and partial.is_file():
        state = json.loads(partial.read_text())
        if state.get("config") == config:
            done = state["cases"]
            log.info("speed: resuming, %s already done", ", ".join(done) or "nothing")
        else:
            log.warning("speed: %s was taken with other settings or code: starting again", partial)
    t0 = time.perf_counter()
    info = machine_info()
    rows: list[dict[str, Any]] = []
    case_info: dict[str, Any] = {}
    for name in cases:
        if name in done:
            rows += done[name]["rows"]
            case_info[name] = done[name]["info"]
            continue
        c = table[name]
        bs = [b for b in c.batches if not batches or b in batches]
        vs = [v for v in c.variants if not variants or v in variants]
        if not bs:
            continue
        r, ci = run_case(name, c, threads, bs, vs, repeats, block_s, seed)
        rows += r
        case_info[name] = ci
        done[name] = {"rows": r, "info": ci}
        gc.collect()
        if partial is not None:
            atomic_write_text(partial, json.dumps({"config": config, "cases": done}, default=float))
    set_threads(1)
    info["loadavg_end"] = machine_info().get("loadavg")
    add_ratios(rows)
    gpath = Path(gemv_json) if gemv_json is not None else (out or RESULTS) / "gemv.json"
    gemv = read_gemv(gpath)
    used = {v for c in cases for v in table[c].variants if not variants or v in variants}
    payload = {
        "meta": {
            "command": command or "lowbit bench speed" + (" --quick" if quick else ""),
            "git": git_state(BENCH.parent),
            "machine": machine(),
            "versions": versions(),
            "seeds": [seed],
        },
        "machine_info": info,
        "config": config,
        "quick": quick,
        "seed": seed,
        "variants": {v: VARIANTS[v][2] for v in VARIANTS if v in used},
        "cases": case_info,
        "gemv": gemv,
        "targets": evaluate_targets(rows, gemv),
        "rows": rows,
    }
    # (resumed cases count with the time they took in the run that measured them)
    payload["total_s"] = sum(ci.get("total_s", 0.0) for ci in case_info.values())
    payload["wall_s"] = time.perf_counter() - t0
    payload["meta"]["wall_time_s"] = round(payload["wall_s"], 1)  # this process's (resumed: not the cases')
    if out is not None:
        write_results(payload, out)
        if partial is not None and partial.is_file():
            partial.unlink()
    return payload


def write_results(payload: dict[str, Any], out: Path) -> None:
    """speed.json, speed.md and speed.png in ``out`` (each written atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    write_result_pair(out, "speed", payload, to_markdown(payload))
    plot(payload["rows"], out / "speed.png")
