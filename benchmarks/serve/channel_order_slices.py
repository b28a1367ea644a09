"""How good is a narrow slice of a trained float ResNet-20 before any supernet training, under each
channel layout? The question behind ``Supernet(order="l1")`` (:mod:`lowbit.nn.channel_order`).

For the campaign's float ResNet-20 (CIFAR-10, JPEG copy) and each layout, the sub-net keeping the
first 25 / 50 / 75% of every channel group (float weights, not quantized) is evaluated on validation
images as sliced ("raw") and after its BatchNorm statistics are re-estimated on training images
("recal": running mean and variance reset and averaged over ``--calib`` images; no weight moves).
Layouts:

- ``centred``: the model as trained; an option-A shortcut centres its copied channels in each
  width (the supernet's behaviour for a model with the shortcut's default ``front``);
- ``fixed``: no reordering, the shortcut's copied channels kept at the full width's offset;
- ``l1``: channels sorted by importance, copied channels at the full width's offset (``order="l1"``);
- ``l1-first``: channels sorted by importance, copied channels moved to the front (``front=0``).

    python benchmarks/serve/channel_order_slices.py

Writes ``benchmarks/results/channel_order_slices.{json,md}``. No training, no randomness beyond the
fixed image subsets (seeds 0 and 1): one run is the result.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_meta, write_results

from lowbit.data import load_dataset
from lowbit.models import build_model
from lowbit.models.resnet import PadShortcut
from lowbit.nn.channel_order import order_channels
from lowbit.nn.supernet import Supernet
from lowbit.train import evaluate, load_weights

LAYOUTS = ("centred", "fixed", "l1", "l1-first")
WIDTHS = (0.25, 0.5, 0.75)
SHAPE = (3, 32, 32)


def laid_out(init: str, layout: str) -> nn.Module:
    """The float model in ``layout`` (same function in every layout)."""
    m = build_model("resnet20")
    load_weights(m, init)
    m.eval()
    if layout == "fixed":
        for mod in m.modules():
            if isinstance(mod, PadShortcut):
                mod.front = (mod.out_channels - mod.in_channels) // 2
    elif layout in ("l1", "l1-first"):
        order_channels(m, SHAPE, shortcut="keep" if layout == "l1" else "first")
    return m


@torch.no_grad()
def recalibrate(m: nn.Module, calib: Any) -> nn.Module:
    """BatchNorm running statistics re-estimated as a plain average over ``calib``."""
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None
    m.train()
    for x, _ in calib:
        m(x)
    return m.eval()


def markdown(p: dict[str, Any]) -> str:
    head = ["layout", "full width", *[f"x{w} raw / recal" for w in WIDTHS]]
    lines = [
        "# Narrow slices of the float ResNet-20 before supernet training, per channel layout", "",
        f"`{p['command']}`; the campaign's float ResNet-20 (`{p['init']}`), CIFAR-10 JPEG copy; "
        f"{p['val_images']:,} validation images (the campaign's held-out split), BatchNorm statistics "
        f"re-estimated on {p['calib_images']:,} training images for `recal`; float weights, nothing "
        f"trained; one run (deterministic given the image subsets); torch {p['torch']}, "
        f"{p['wall_time_s']:.0f} s.", "",
        "A sub-net keeps the first channels of every channel group (the stem's output included, the ten "
        "classes never). "
        "`centred`: the model as trained, option-A shortcuts centring their copied channels in each "
        "width; `fixed`: the copied channels at the full width's offset; `l1`: every group sorted by "
        "the L1 norm of the weights producing it, copied channels at the full width's offset "
        "(`Supernet(order=\"l1\")`); `l1-first`: sorted, copied channels moved to the front.", "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lay in LAYOUTS:
        r = p["rows"][lay]
        cells = [f"`{lay}`", f"{100 * r['full']:.2f}%"]
        cells += [f"{100 * r[f'x{w}_raw']:.2f}% / {100 * r[f'x{w}_recal']:.2f}%" for w in WIDTHS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", default="runs/cifar10-claims/cpu/float/seed0/best.safetensors",
                   help="the float ResNet-20 checkpoint (the CIFAR-10 campaign's)")
    p.add_argument("--val", type=int, default=2000, help="validation images")
    p.add_argument("--calib", type=int, default=2560, help="training images for the BatchNorm statistics")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    if not Path(a.init).exists():
        p.error(f"--init {a.init} does not exist; train the float model first (python "
                "benchmarks/cifar10/claims.py --budget cpu) or give a float ResNet-20 checkpoint")
    t0 = time.time()
    data = load_dataset("cifar10", data_dir=a.data_dir, batch_size=128, test_batch_size=500, seed=0,
                        val_size="auto")
    val = data.val.subset(a.val, seed=0).replace(augment=None, shuffle=False)
    calib = data.train.subset(a.calib, seed=1).replace(augment=None, shuffle=False)
    rows: dict[str, dict[str, float]] = {}
    for lay in LAYOUTS:
        m = laid_out(a.init, lay)
        row = {"full": float(evaluate(m, val)["acc"])}
        sn = Supernet(m, [{"name": f"x{w}", "width": w} for w in (*WIDTHS, 1.0)], SHAPE)
        for w in WIDTHS:
            s = sn.sliced(f"x{w}")
            row[f"x{w}_raw"] = float(evaluate(s, val)["acc"])
            row[f"x{w}_recal"] = float(evaluate(recalibrate(s, calib), val)["acc"])
        rows[lay] = row
        print(lay, {k: round(v, 4) for k, v in row.items()}, flush=True)
    payload = {**run_meta(__file__, argv, t0, seeds=[0, 1], init=a.init, val_images=val.num_samples,
                          calib_images=calib.num_samples), "rows": rows}
    write_results(a.out, "channel_order_slices", payload, markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
