"""Post-training multipoint quantization of LeNet-5 on MNIST and Fashion-MNIST (no training).

    python benchmarks/repro/multipoint_mnist.py                 # ~3 min on one core
    python benchmarks/repro/multipoint_mnist.py --datasets mnist --bits 2 --budgets 1 1.5

From the reproduction suite's float LeNet-5 of each dataset (``runs/repro-val/<dataset>/s0/fp``, trained
with its settings if missing), conv2, fc1 and fc2 get ``--bits``-bit weights without any training
(conv1, fc3 and all activations stay float). Rows: the plain ``uniform`` quantizer (max scale, per
channel); multipoint with one point per channel; and multipoint with ``budget`` points per
channel on average, the extra points placed by calibrated output error (512 training images) or,
as a control, on randomly chosen channels. Size counts ``bits`` per weight per point actually
used. Writes ``benchmarks/results/multipoint_mnist.{md,json}``.
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
from lowbit.nn.quantize import weight_quantizer
from lowbit.ptq import calibration_batches, multipoint_ptq
from lowbit.train import evaluate, load_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_meta, write_results
from run_mnist import commit_text, fp_run

LAYERS = ("conv2", "fc1", "fc2")


def weight_bits(model: torch.nn.Module) -> tuple[int, int]:
    """(bits stored for the quantized layers' weights, their weight count): bits x points used."""
    stored = count = 0
    for name, layer in lowbit.quantized_layers(model).items():
        if name not in LAYERS:
            continue
        q = weight_quantizer(layer)
        per_channel = layer.weight[0].numel()
        points = q.counts.sum().item() if hasattr(q, "counts") else layer.weight.shape[0]
        stored += int(points) * per_channel * q.bits
        count += layer.weight.numel()
    return stored, count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--budgets", type=float, nargs="+", default=[1.25, 1.5, 2.0])
    p.add_argument("--calib", type=int, default=512, help="calibration images from the training set")
    p.add_argument("--runs-dir", default="runs/repro-val")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    fps = {}
    for ds in a.datasets:
        _, _, fp_dir = fp_run(ds, Path(a.runs_dir), 10, 1.0, seed=0)
        data = load_dataset(ds, batch_size=256, seed=0)

        def fresh(fp_dir: Path = fp_dir) -> torch.nn.Module:
            m = build_model("lenet5")
            load_weights(m, fp_dir / "best.safetensors")
            return m.eval()

        float_acc = evaluate(fresh(), data.test)["acc"]
        fps[ds] = float_acc
        calib = calibration_batches(data.train, a.calib)

        def add(ds: str, bits: int, method: str, budget: float, model: torch.nn.Module, float_acc: float,
                test: Any = data.test) -> None:
            acc = evaluate(model, test)["acc"]
            stored, count = weight_bits(model)
            rows.append({"dataset": ds, "bits": bits, "method": method, "budget": budget, "test_acc": acc,
                         "float_acc": float_acc, "bits_per_weight": stored / count})
            print(f"{ds:14s} W{bits} {method:28s} budget {budget:4.2f} acc {100 * acc:.2f}% "
                  f"({stored / count:.2f} bits/weight)", flush=True)

        for bits in a.bits:
            m = fresh()
            rules = [{"match": n, "weight": {"method": "uniform", "bits": bits, "per_channel": True}}
                     for n in LAYERS]
            lowbit.quantize(m, {"default": {"weight": None}, "rules": rules})
            add(ds, bits, "uniform (max, per channel)", 1.0, m, float_acc)
            points = max(2, int(max(a.budgets) + 0.999))
            m = fresh()
            multipoint_ptq(m, calib, bits=bits, budget=1.0, max_points=points)
            add(ds, bits, "multipoint, 1 point", 1.0, m, float_acc)
            for budget in a.budgets:
                m = fresh()
                multipoint_ptq(m, calib, bits=bits, budget=budget, max_points=points)
                add(ds, bits, "multipoint, output error", budget, m, float_acc)
                rnd = copy.deepcopy(m)  # same points, extra ones on random channels instead
                g = torch.Generator().manual_seed(bits)
                for layer in lowbit.quantized_layers(rnd).values():
                    q = weight_quantizer(layer)
                    extra = int(q.counts.sum()) - q.counts.numel()
                    counts = torch.ones_like(q.counts)
                    while extra > 0:
                        c = int(torch.randint(0, counts.numel(), (1,), generator=g))
                        if counts[c] < q.points:
                            counts[c] += 1
                            extra -= 1
                    q.counts = counts
                add(ds, bits, "multipoint, random channels", budget, rnd, float_acc)
    # seed 0: the float runs and the data; the random-channel control draws with its bit width as seed
    meta = run_meta(__file__, argv, t0, seeds=sorted({0, *a.bits}), calib=a.calib, fp_acc=fps)
    write_results(a.out, "multipoint_mnist", {"meta": meta, "rows": rows}, render(meta, rows))
    return 0


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    fp = ", ".join(f"{k} {100 * v:.2f}%" for k, v in meta["fp_acc"].items())
    lines = [
        "# Post-training multipoint quantization, LeNet-5 (no training)",
        "",
        f"Command: `{meta['command']}` — {commit_text(meta)}, torch {meta['torch']}, one thread, "
        f"total wall time {meta['wall_time_s']:.0f} s. Float models (the reproduction suite's "
        f"`runs/repro-val/<dataset>/s0/fp`, best checkpoint on the validation split): {fp}. "
        "conv2, fc1 and fc2 get the weight bits shown, without any training; conv1, fc3 and every "
        f"activation stay float. Extra points are placed by output error on {meta['calib']} training "
        "images (the float model's layer inputs), or on random channels as a control. Bits/weight: "
        "bits x points actually used, over the three layers' weights.",
        "",
        "| dataset | W bits | method | mean points | bits / weight | test acc | drop vs float (pp) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['bits']} | {r['method']} | {r['budget']:.2f} | "
                     f"{r['bits_per_weight']:.2f} | {100 * r['test_acc']:.2f}% | "
                     f"{100 * (r['float_acc'] - r['test_acc']):+.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
