"""SinReQ and WaveQ on MNIST LeNet-5: do sinusoidal regularizers make weights quantization-ready?

    python benchmarks/repro/sinreq_mnist.py                    # ~4 min on one core
    python benchmarks/repro/sinreq_mnist.py --bits 3 --weights 1000 --waveq 100 --epochs 5

From the shared float LeNet-5 of the reproduction suite (``runs/repro-val/mnist/s0/fp``, trained here
with its settings if missing), each row fine-tunes the float model for ``--epochs`` epochs (Adam,
``--lr``, cosine) with no regularizer, with SinReQ (``grid: max`` at ``b`` bits: the grid of
the ``uniform`` weight quantizer) or with WaveQ (learned bits, ``grid: max``), then quantizes the
weights of conv2, fc1 and fc2 *after* training (``uniform``, ``scale: max``, no fine-tuning,
first and last layer float) and measures test accuracy. The gap between the float and the
post-training-quantized accuracy is what the regularizer is meant to close. Writes
``benchmarks/results/sinreq_mnist.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

import lowbit
from lowbit.data import load_dataset
from lowbit.models import build_model
from lowbit.train import TrainConfig, Trainer, evaluate, load_weights
from lowbit.train.sinreq import SinReQ, WaveQ

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_meta, write_results
from run_mnist import fp_run

LAYERS = ["conv2", "fc1", "fc2"]


def ptq(model: torch.nn.Module, bits: dict[str, int]) -> torch.nn.Module:
    """A copy of the float ``model`` with the weights of ``LAYERS`` quantized (uniform, max)."""
    q = copy.deepcopy(model)
    rules = [{"match": n, "weight": {"method": "uniform", "bits": b}} for n, b in bits.items()]
    return lowbit.quantize(q, {"default": {"weight": None}, "rules": rules}).eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    p.add_argument("--weights", type=float, nargs="+", default=[100.0, 1000.0, 10000.0],
                   help="SinReQ lambdas")
    p.add_argument("--waveq", type=float, nargs="+", default=[30.0, 100.0, 300.0, 1000.0],
                   help="WaveQ beta_weights")
    p.add_argument("--waveq-weight", type=float, default=1000.0, help="WaveQ lambda")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the fine-tune")
    p.add_argument("--runs-dir", default="runs/repro-val")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t_start = time.time()

    _, _, fp_dir = fp_run("mnist", Path(a.runs_dir), 10, 1.0, seed=0)  # trained once, reused after
    data = load_dataset("mnist", batch_size=128, seed=0)
    cfg = TrainConfig(epochs=a.epochs, optimizer="adam", lr=a.lr, schedule="cosine", weight_decay=0.0,
                      seed=0, tensorboard=False)

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        model = build_model("lenet5")
        load_weights(model, fp_dir / "best.safetensors")
        return model

    def finetune(model: torch.nn.Module, regs: list[Any], cbs: list[Any]) -> tuple[float, float]:
        t0 = time.perf_counter()
        Trainer(model, data.train, None, cfg, regularizers=regs, callbacks=cbs).fit()
        return evaluate(model, data.test)["acc"], time.perf_counter() - t0

    rows: list[dict[str, Any]] = []

    def record(method: str, option: str, model: torch.nn.Module, acc: float, secs: float,
               bits: dict[str, int]) -> None:
        qacc = evaluate(ptq(model, bits), data.test)["acc"]
        rows.append({"method": method, "option": option, "bits": bits, "float_acc": acc, "ptq_acc": qacc,
                     "train_s": round(secs, 1)})
        print(f"{method:8s} {option:28s} bits {bits} float {100 * acc:.2f}% -> PTQ {100 * qacc:.2f}% "
              f"({secs:.0f}s)", flush=True)

    model = fresh()
    acc, secs = finetune(model, [], [])
    for b in a.bits:
        record("none", "-", model, acc, secs, dict.fromkeys(LAYERS, b))
    for b in a.bits:
        for lam in a.weights:
            model = fresh()
            acc, secs = finetune(model, [SinReQ(model, weight=lam, bits=b, grid="max", layers=LAYERS)], [])
            record("sinreq", f"lambda {lam:g}", model, acc, secs, dict.fromkeys(LAYERS, b))
    for bw in a.waveq:
        model = fresh()
        wq = WaveQ(model, weight=a.waveq_weight, beta_weight=bw, init_bits=4.0, min_bits=2, max_bits=8,
                   grid="max", layers=LAYERS)
        acc, secs = finetune(model, [wq], [wq])
        record("waveq", f"lambda {a.waveq_weight:g}, beta_weight {bw:g}", model, acc, secs, wq.learned_bits())

    meta = run_meta(__file__, argv, t_start, seeds=[0], epochs=a.epochs, lr=a.lr, threads=a.threads)
    write_results(a.out, "sinreq_mnist", {"meta": meta, "rows": rows}, render(meta, rows))
    return 0


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "# SinReQ and WaveQ on MNIST LeNet-5: float fine-tune, then post-training quantization",
        "",
        f"Command: `{meta['command']}` — torch {meta['torch']}, {meta['threads']} thread(s), total wall "
        f"time {meta['wall_time_s']:.0f} s. Each row fine-tunes the shared float LeNet-5 "
        f"(`runs/repro-val/mnist/s0/fp`) for {meta['epochs']} epochs (Adam, lr {meta['lr']:g}, cosine) "
        "with the "
        "regularizer named, then quantizes the weights of conv2, fc1 and fc2 with the `uniform` "
        "quantizer (`scale: max`, per tensor) without any further training; conv1 and fc3 stay float, "
        "activations float. One run per row (seed 0).",
        "",
        "| regularizer | setting | weight bits (conv2, fc1, fc2) | float acc | acc after PTQ | PTQ drop (pp) "
        "| fine-tune (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bits = ", ".join(str(b) for b in r["bits"].values())
        lines.append(f"| {r['method']} | {r['option']} | {bits} | {100 * r['float_acc']:.2f}% | "
                     f"{100 * r['ptq_acc']:.2f}% | {100 * (r['float_acc'] - r['ptq_acc']):+.2f} | "
                     f"{r['train_s']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
