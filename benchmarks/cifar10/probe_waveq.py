"""Probe: why WaveQ's learned bit-widths come out equal in every ResNet-20 layer (the claims campaign).

    python benchmarks/cifar10/probe_waveq.py --out benchmarks/results     # ~10 min on one core

In the CIFAR-10 claims campaign (``claims.py``, budget ``cpu``) WaveQ learned the same bits in every
layer in all three seeds (continuous bit-widths between 3.14 and 3.48, all rounding to 3), so its
"learned against fixed bits" check compares one recipe with itself. This probe trains WaveQ from
the campaign's float ResNet-20 (seed 0) on ``--subset`` training images for ``--epochs`` epochs in
each of four settings (``lowbit.train.sinreq.WaveQ``, grid ``max``, the middle 18 layers, bits from 4):
the campaign's (``lambda_w`` 1000, ``lambda_beta`` 100, ``beta`` at the model's learning rate), one
where ``beta`` has its own rate (``beta_lr``) and a smaller ``lambda_beta``, whose balance point sits
near 4 bits for weights off the grid, and that one again with ``lambda_w`` rising from 0 over the
first half of the steps (``ramp``; also with ``lambda_beta`` 40), so that the bits move before the
weights reach the grid. For each layer it reports the learned ``beta``,
the mean ``sin^2`` term ``S_l`` at that ``beta`` on the final weights, and the balance point
``beta* = log2(lambda_w ln2 S_l / lambda_beta)`` where the amplitude's pull (``1/2^beta``) and the
bit charge (``lambda_beta``) cancel. ``beta`` far above ``beta*`` while ``S_l`` is near 0 means the
weights sit on the grid and the sine term's dependence on the grid step holds ``beta`` in a local
minimum (moving ``beta`` moves the grid off the weights). The validation split is the campaign's
(its accuracy is reported; the run's test accuracy, read once at its end as in every run, is not).
Writes ``<out>/probe_waveq.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from claims import layer_sizes
from common import run_meta, save_png, write_results

FLOAT = "runs/cifar10-claims/cpu/float/seed0/best.safetensors"
SETTINGS = {  # name: (lambda_w, lambda_beta, beta_lr, ramp)
    "campaign": (1000.0, 100.0, None, 0.0),
    "beta_lr": (1000.0, 20.0, 0.02, 0.0),
    # the sine weight rising over the first half of the run: the bits move before the weights snap
    "ramp": (1000.0, 20.0, 0.02, 0.5),
    "ramp_lb40": (1000.0, 40.0, 0.02, 0.5),
}


def layer_terms(model: torch.nn.Module, beta: dict[str, float]) -> dict[str, float]:
    """Per layer, the mean sin^2 term on the final weights at the learned ``beta`` (grid ``max``)."""
    from lowbit.nn.quantize import quantizable_layers
    from lowbit.train.sinreq import grid_factor, layer_grid, sin_penalty

    layers = quantizable_layers(model)
    out = {}
    for name, b in beta.items():
        w = layers[name].weight.detach().float()
        step = layer_grid(layers[name], w, "max") / grid_factor(b, "max")
        out[name] = float(sin_penalty(w, step, 0.0))  # bits 0: the mean sin^2 itself
    return out


def plot(rows: dict[str, dict], path: Path) -> None:
    """The learned (continuous) bit-width of every layer, one line per setting, the rounding
    boundaries dotted."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.0))
    for name, r in rows.items():
        names = list(r["beta"])
        ax.plot(range(len(names)), [r["beta"][n] for n in names], "o-", ms=4, label=name)
    for edge in (2.5, 3.5, 4.5):
        ax.axhline(edge, color="grey", ls=":", lw=1)
    ax.set_xticks(range(len(names)), [n.replace(".conv", ".c") for n in names], rotation=60, fontsize=7)
    ax.set_ylabel("learned beta (bits before rounding)")
    ax.set_title("WaveQ on ResNet-20 / CIFAR-10: learned bit-width per layer (dotted: rounding edges)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    save_png(fig, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--subset", type=int, default=12800, help="training images")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--work", default="runs/probe_waveq")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    from safetensors.torch import load_file

    from lowbit.experiment import RunSpec, train_run
    from lowbit.models import build_model

    t0 = time.time()
    torch.set_num_threads(1)
    middle = list(layer_sizes())[1:-1]
    rows = {}
    for name, (lw, lb, blr, ramp) in SETTINGS.items():
        method = {"name": "waveq", "weight": lw, "beta_weight": lb, "init_bits": 4.0, "min_bits": 2,
                  "max_bits": 8, "grid": "max", "layers": middle, "beta_lr": blr}
        if ramp:
            method["ramp"] = ramp
        recipe = {"name": f"waveq-{name}", "default": {"weight": None}, "rules": [], "methods": [method],
                  "train": {"optimizer": "adam", "lr": 1.0e-3, "schedule": "cosine", "weight_decay": 0.0}}
        out = Path(a.work) / name
        train = {"epochs": a.epochs, "tensorboard": False, "precision": "bf16", "seed": 0}
        r = train_run(RunSpec(model="resnet20", dataset="cifar10", data_dir=a.data_dir, recipe=recipe,
                              init=FLOAT, out=str(out), train_subset=a.subset, val_size="auto", device="cpu",
                              train=train), resume=True)
        learned = json.loads((out / "waveq_bits.json").read_text())
        model = build_model("resnet20")
        sd = load_file(str(out / "checkpoint.safetensors"))
        model.load_state_dict({k[len("model/"):]: v for k, v in sd.items() if k.startswith("model/")})
        S = layer_terms(model, learned["beta"])
        star = {n: math.log2(max(lw * math.log(2) * s / lb, 1e-12)) for n, s in S.items()}
        hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        rows[name] = {"lambda_w": lw, "lambda_beta": lb, "beta_lr": blr, "ramp": ramp,
                      "best_val_acc": r.best_acc,
                      "beta": learned["beta"], "bits": learned["bits"], "S": S, "beta_star": star,
                      "reg_per_epoch": [h.get("reg/waveq") for h in hist if "reg/waveq" in h],
                      "beta_mean_per_epoch": [h["waveq/beta_mean"] for h in hist if "waveq/beta_mean" in h]}
        print(name, json.dumps({k: rows[name][k] for k in ("best_val_acc", "bits")}), flush=True)
    meta = run_meta(__file__, argv, t0, seeds=[0], subset=a.subset, epochs=a.epochs, init=FLOAT)
    md = ["# WaveQ's learned bit-widths on ResNet-20 / CIFAR-10: where they go, and why", "",
          f"Command: `{meta['command']}`; commit {meta['git'].get('commit', '?')[:10]}; single run per "
          f"setting (seed 0); {a.subset:,} training images of the CIFAR-10 JPEG copy, {a.epochs} epochs from "
          "the campaign's float ResNet-20 (seed 0), Adam lr 1e-3 cosine, bf16 autocast, one thread; WaveQ on "
          "the 18 middle layers, grid `max`, bits from 4 in [2, 8]. S = mean sin^2 term at the learned beta "
          "on the final weights (1/2 for weights spread over the grid, 0 on it); beta* = log2(lambda_w ln2 S "
          "/ lambda_beta), the balance point of the amplitude against the bit charge.", ""]
    for name, r in rows.items():
        b = list(r["beta"].values())
        s = list(r["S"].values())
        st = list(r["beta_star"].values())
        rate = r["beta_lr"] if r["beta_lr"] else "the model's (1e-3)"
        ramp = (f"; lambda_w rising from 0 over the first {r['ramp']:.0%} of the steps" if r.get("ramp")
                else "")
        md += [f"## `{name}`: lambda_w {r['lambda_w']:g}, lambda_beta {r['lambda_beta']:g}, beta's learning "
               f"rate {rate}{ramp}", "",
               f"- learned beta {min(b):.2f}-{max(b):.2f} (rounded bits: {sorted(set(r['bits'].values()))}); "
               f"S {min(s):.4f}-{max(s):.4f}; beta* {min(st):.2f}-{max(st):.2f}; best validation accuracy "
               f"{100 * r['best_val_acc']:.2f}%.",
               "- regularizer per epoch: " + ", ".join(f"{v:.1f}" for v in r["reg_per_epoch"])
               + f" (of which lambda_beta * sum beta at the end: {r['lambda_beta'] * sum(b):.1f}); mean beta "
               "per epoch: " + ", ".join(f"{v:.3f}" for v in r["beta_mean_per_epoch"]) + ".", "",
               "| layer | beta | S | beta* |", "|---|---:|---:|---:|"]
        md += [f"| {n} | {r['beta'][n]:.3f} | {r['S'][n]:.4f} | {r['beta_star'][n]:.2f} |" for n in r["beta"]]
        md.append("")
    md.insert(2, "![learned bit-width per layer and setting](probe_waveq.png)\n")
    write_results(a.out, "probe_waveq", {"meta": meta, "settings": rows}, "\n".join(md))
    plot(rows, Path(a.out) / "probe_waveq.png")
    print("\n".join(md))


if __name__ == "__main__":
    main()
