"""Probe: where PACT's clip level starts, and what it does to the float ResNet-20 before any training.

    python benchmarks/cifar10/probe_pact_init.py --out benchmarks/results     # ~1 min

The claims campaign's PACT rows (``recipes/cifar10/pact-w2a2.yaml``, ``recipes/pact-w4a4.yaml``:
DoReFa weights, PACT activations, ``alpha_init`` 10 as in the PACT paper, first and last layer
float) fine-tune the campaign's float ResNet-20 for 5 epochs with Adam at lr 1e-3. This probe
quantizes that float model (seed 0) with the same recipes and ``alpha_init`` from ``--alphas``,
re-estimates the BatchNorm statistics on ``--calib`` training images (DoReFa rescales the weights)
and, without training, reads ``--images`` images of the campaign's validation split: the fake-quantized
model's accuracy, the share of the PACT layers' positive inputs that round to zero (below half a
step ``alpha / (2^bits - 1)``), and the inputs' 99.9th percentile (what a clip level has to cover).
A clip far above the inputs leaves most of the 2^bits - 1 levels unused. The test set is not read.
Writes ``<out>/probe_pact_init.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from channel_order_slices import recalibrate
from common import run_meta, write_results

FLOAT = "runs/cifar10-claims/cpu/float/seed0/best.safetensors"
RECIPES = {2: "recipes/cifar10/pact-w2a2.yaml", 4: "recipes/pact-w4a4.yaml"}


def measure(bits: int, alpha: float, images: torch.Tensor, labels: torch.Tensor,
            calib: torch.Tensor) -> dict[str, float]:
    from lowbit.models import build_model
    from lowbit.nn.quantize import quantize
    from lowbit.quant.pact import PACTActivation
    from lowbit.recipe import load_recipe
    from lowbit.train import load_weights

    model = build_model("resnet20")
    load_weights(model, FLOAT)
    d = load_recipe(RECIPES[bits]).to_dict()
    d["default"]["activation"]["alpha_init"] = alpha
    quantize(model, d)
    # BatchNorm statistics of the quantized model (DoReFa rescales the weights: the float model's
    # statistics no longer fit), as the first steps of a fine-tune would re-estimate them
    recalibrate(model, [(calib[i:i + 250], None) for i in range(0, len(calib), 250)])
    acts = [m for m in model.modules() if isinstance(m, PACTActivation)]
    seen = {"pos": 0, "zero": 0}
    inputs: list[torch.Tensor] = []

    def hook(m: PACTActivation, args: tuple) -> None:
        x = args[0].detach().float()
        step = float(m.alpha.abs()) / (2**m.bits - 1)
        seen["pos"] += int((x > 0).sum())
        seen["zero"] += int(((x > 0) & (x < step / 2)).sum())
        g = torch.Generator().manual_seed(0)
        inputs.append(x.flatten()[torch.randperm(x.numel(), generator=g)[:4096]])

    handles = [m.register_forward_pre_hook(hook) for m in acts]
    try:
        with torch.inference_mode():
            pred = torch.cat([model(images[i:i + 250]).argmax(1) for i in range(0, len(images), 250)])
    finally:
        for h in handles:
            h.remove()
    sample = torch.cat(inputs)
    return {"acc": float((pred == labels).float().mean()), "zeroed": seen["zero"] / max(1, seen["pos"]),
            "p999": float(torch.quantile(sample, 0.999)), "layers": len(acts)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--alphas", type=float, nargs="+", default=[10.0, 6.0, 4.0, 2.0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--calib", type=int, default=2000, help="training images for the BatchNorm statistics")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    from lowbit.data import load_dataset

    t0 = time.time()
    torch.set_num_threads(1)
    data = load_dataset("cifar10", data_dir=a.data_dir, batch_size=250, test_batch_size=250, seed=0,
                        val_size="auto")
    val = data.val.subset(a.images, seed=0).replace(augment=None, shuffle=False)
    xs, ys = zip(*val, strict=True)
    images, labels = torch.cat(xs), torch.cat(ys)
    cx = [x for x, _ in data.train.subset(a.calib, seed=1).replace(augment=None, shuffle=False)]
    calib = torch.cat(cx)
    rows = [{"bits": b, "alpha_init": al, **measure(b, al, images, labels, calib)}
            for b in RECIPES for al in a.alphas]
    meta = run_meta(__file__, argv, t0, seeds=[0], images=a.images, init=FLOAT, recipes=RECIPES)
    md = ["# PACT's starting clip level on the float ResNet-20 (no training)", "",
          f"Command: `{meta['command']}`; commit {meta['git'].get('commit', '?')[:10]}; the campaign's float "
          f"ResNet-20 of seed 0, quantized with the campaign's PACT recipes at each `alpha_init`, read on "
          f"{a.images:,} images of the campaign's validation split (the CIFAR-10 JPEG copy); no training: "
          f"BatchNorm statistics re-estimated on {a.calib:,} training images. "
          "zeroed: the share of the PACT layers' positive inputs below half a step (they become 0); p99.9: "
          "the 99.9th percentile of their inputs (a sample of 4,096 per layer and batch).", "",
          "| W/A bits | alpha_init | fake-quant val acc | positive inputs zeroed | inputs' p99.9 |",
          "|---|---:|---:|---:|---:|"]
    md += [f"| {r['bits']}/{r['bits']} | {r['alpha_init']:g} | {100 * r['acc']:.1f}% | "
           f"{100 * r['zeroed']:.1f}% | {r['p999']:.2f} |" for r in rows]
    write_results(a.out, "probe_pact_init", {"meta": meta, "rows": rows}, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
