"""A ResNet-20 (half width: 8/16/32 channels) any-width, any-precision supernet on CIFAR-10 on one
CPU core, at nice 19 on a shared machine: trained once (sandwich rule, and Delayed epsilon-Shrinking
at equal epochs) against separately trained models of the same configurations; accuracy, weight
bytes, BOPs and packed-runtime latency per sub-net.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/serve/supernet_resnet20.py train sandwich des
    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/serve/supernet_resnet20.py train alone
    OMP_NUM_THREADS=1 python benchmarks/serve/supernet_resnet20.py report
    OMP_NUM_THREADS=1 python benchmarks/serve/supernet_resnet20.py train sandwich --smoke  # a dry run

``--setup cifar`` (results ``supernet_resnet20_cifar``, work ``runs/supernet_r20_cifar``) is the
trained one: ResNet-20 at width 1.0 initialised from the campaign's float model (``--init``), a
bit-width supernet {2, 4, 8} (W/A), the campaign's validation split, the whole test set::

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/serve/supernet_resnet20.py train sandwich alone-b2 \\
        --setup cifar --epochs 3 --subset 30000
    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/serve/supernet_resnet20.py train des alone-b4 alone-b8 \\
        --setup cifar --epochs 3 --subset 30000
    OMP_NUM_THREADS=1 python benchmarks/serve/supernet_resnet20.py report --setup cifar --subset 30000

``--setup cifar-alr`` gives PACT's clip its own learning rate (1e-2) and ``--setup cifar-l2`` adds PACT's L2
penalty on the clips to that (weight 2e-4, as the claims campaign's PACT recipes); each report sets its
sub-nets beside the setup it changes one thing of::

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/serve/supernet_resnet20.py train sandwich alone-b2 \
        alone-b4 alone-b8 --setup cifar-l2 --epochs 3 --subset 30000
    OMP_NUM_THREADS=1 python benchmarks/serve/supernet_resnet20.py report --setup cifar-l2 --subset 30000

``seeds --beside BASE`` sets a setup's seeds beside a base setup's runs of the same seeds (the same float
models and data order), subtracted seed by seed, e.g. ``seeds --setup cifar-l2 --beside cifar --epochs 3
--subset 30000 --seeds 0 1 2`` after ``train ... --setup cifar-l2 --seed N``.

``--seed N`` trains the same runs from the campaign's seed-N float model, with seed N's data order
and sandwich draws (the training images stay the same), in ``<work>-seedN`` (seed 0: ``<work>``);
``seeds`` gathers them into ``<stem>_seeds.{json,md,png}`` (mean +- std over seeds, differences taken
seed by seed)::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/serve/supernet_resnet20.py train sandwich des alone \\
        --setup cifar --epochs 3 --subset 30000 --seed N        # N = 0, 1, 2
    python benchmarks/serve/supernet_resnet20.py seeds --setup cifar --epochs 3 --subset 30000 --seeds 0 1 2

``--setup cifar-wb`` (results ``supernet_resnet20_cifar_wb``) is the same with widths: every stage at
0.5 or 1.0 x 2/4/8 bits (six sub-nets, the half-width ones sliced from the float model's first
channels), the half-width configurations trained alone::

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/serve/supernet_resnet20.py train sandwich alone \\
        --setup cifar-wb --epochs 3 --subset 30000
    OMP_NUM_THREADS=1 python benchmarks/serve/supernet_resnet20.py report --setup cifar-wb --subset 30000

``--setup cifar-wbo`` (results ``supernet_resnet20_cifar_wbo``) is ``cifar-wb`` with the float model's
channels sorted by importance before the supernet is built (``Supernet(order="l1")``,
:mod:`lowbit.nn.channel_order`), so that the half-width sub-nets (and the half-width configurations
trained alone) start from the channels that matter most; its report sets each sub-net beside the
``cifar-wb`` results file::

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/serve/supernet_resnet20.py train sandwich alone \\
        --setup cifar-wbo --epochs 3 --subset 30000
    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/serve/supernet_resnet20.py train des \\
        --setup cifar-wbo --epochs 3 --subset 30000
    OMP_NUM_THREADS=1 python benchmarks/serve/supernet_resnet20.py report --setup cifar-wbo --subset 30000

``--setup cifar-wbo-l2`` (results ``supernet_resnet20_cifar_wbo_l2``) is ``cifar-wbo`` with
``cifar-l2``'s activation recipe (the clip at its own learning rate, PACT's L2 penalty on it), the
half-width configurations trained alone with it too; its full-width sub-nets are set beside
``cifar-l2``'s runs alone::

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/serve/supernet_resnet20.py train sandwich alone \
        --setup cifar-wbo-l2 --epochs 3 --subset 30000
    OMP_NUM_THREADS=1 python benchmarks/serve/supernet_resnet20.py report --setup cifar-wbo-l2 --subset 30000

``--setup cifar-nu`` (results ``supernet_resnet20_cifar_nu``) has non-uniform widths: ``cifar-wbo``'s
ordered channels and recipe, all sub-nets at 4 bits, uniform widths 0.5 / 0.75 / 1.0 and one width
per stage, ``up-b4`` (0.5 / 0.75 / 1.0 for stages 1 / 2 / 3) and ``down-b4`` (1.0 / 0.75 / 0.5); every
configuration but the full width is trained alone too::

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/serve/supernet_resnet20.py train sandwich alone \
        --setup cifar-nu --epochs 3 --subset 30000
    OMP_NUM_THREADS=1 python benchmarks/serve/supernet_resnet20.py report --setup cifar-nu --subset 30000

Sub-nets (DoReFa weights, PACT activations, stem and classifier float, BatchNorm per sub-net):
uniform widths 0.5 and 1.0 of every stage x 2/4/8-bit weights and activations, and one
non-uniform sub-net (stage widths 0.5 / 0.75 / 1.0, 4 bits). A stage's width covers its residual
group (the stem for stage 1), as the supernet's channel groups require.

Budget (what nice 19 gets of a shared 2-core machine at load average 15-20, about 1 CPU-second per
minute per process): ResNet-20 at ``width_mult=0.5``; ``--subset`` (2,500) random training images of
the CIFAR-10 JPEG copy (``--data-dir``), ``--val`` (500) of them held out for selection (never
trained on), the rest trained on for ``--epochs`` (2) epochs (batch 64, SGD momentum 0.9, lr 0.05,
cosine, weight decay 5e-4, crop+flip); seed 0, single run. The supernets train with the sandwich
rule (largest, smallest and one random sub-net per step, in-place distillation), ``des`` the same
with Delayed epsilon-Shrinking (warmup 0.25); ``alone`` trains the largest, the smallest and the
non-uniform middle configuration each as its own network (plain cross entropy), same optimizer and
epochs. Which supernet variant is served is chosen on mean selection-validation accuracy;
``--test-n`` (1,000) random images of the test set are read once per model, when its training ends.

``report`` writes the chosen supernet as one packed supernet file (``runs/serve_r20/resnet20.supernet``),
loads every sub-net from it (stored codes, no latent weights), and measures per sub-net: weight
bytes and BOPs (:func:`lowbit.export.report.model_report` of the sub-net), and packed-runtime
latency at batch 1/8/32 (the fastest of 5 rounds over all sub-nets x 3 runs, one thread: PyTorch's
and the packed kernels'). Writes
``benchmarks/results/serve_resnet20.{json,md}``. Each training is a Trainer run directory under
``--work``; a killed run resumes from its last epoch.

The ``cifar`` setup: every sub-net at width 1.0 (the float model's channels) with 2/4/8-bit DoReFa
weights and PACT activations (``alpha_init`` 10, as the campaign), stem and classifier float, one
BatchNorm per sub-net, all initialised from the float ResNet-20 of the CIFAR-10 claims campaign
(``runs/cifar10-claims/cpu/float/seed0/best.safetensors``). Widths are left out of it: a half-width
slice of a network trained at full width starts far behind (``cifar-wb`` measures it: after 3 epochs
its half-width sub-nets were 15-17 points below the same configurations trained alone at 4 and 8
bits; ``cifar-wbo``, with the channels ordered first, 7-8 points). Data: the campaign's split (the
last 5,000 training images held out for selection; the float model never trained on them),
``--subset`` random images of the other 45,000 trained on (0: all), the whole test set read once per
model at the end. Recipe (every run the same): Adam lr 1e-3,
cosine, no weight decay, batch 128, bf16 autocast (quantizers in fp32), ``--epochs`` epochs, seed 0.
After every epoch each sub-net is evaluated on the validation split; ``best.safetensors`` is the
epoch with the best mean validation accuracy over the run's sub-nets (:class:`SubnetVal`).
``alone-<name>`` trains one configuration alone with the same recipe (a one-sub-net supernet: the
same quantizers, BatchNorm and code path; plain cross entropy).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lowbit._io import atomic_write_text
from lowbit.data import load_dataset
from lowbit.models import build_model
from lowbit.nn.supernet import Supernet
from lowbit.progress import RichProgress
from lowbit.train import TrainConfig, Trainer, evaluate, load_checkpoint, load_weights
from lowbit.train.methods import PACTL2
from lowbit.train.sandwich import DelayedShrinking, SandwichLoss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_meta, save_png, write_results

STAGES = {"layer1.*": 0.5, "layer2.*": 0.75, "layer3.*": 1.0}
SHAPE = (3, 32, 32)
FLOAT_INIT = "runs/cifar10-claims/cpu/float/seed0/best.safetensors"


@dataclass(frozen=True)
class Setup:
    """What a setup fixes: the model, the sub-nets, the recipe and where its results go."""

    model: dict[str, Any]
    subnets: list[dict[str, Any]]
    alone: list[str]
    stem: str
    work: str
    defaults: dict[str, Any]  # argparse defaults of this setup
    train: dict[str, Any]  # TrainConfig options
    batch_size: int
    activation: dict[str, Any] | None = None
    select_on_val: bool = False  # evaluate every sub-net per epoch; best.safetensors on mean val
    order: str | None = None  # Supernet(order=...): "l1" sorts the float model's channels first
    base: str | None = None  # the setup this one changes one thing of (each sub-net set beside it)
    base_what: str = ""  # how the base setup differs from this one
    pact_l2: float = 0.0  # PACT's L2 penalty on the clip levels (lowbit.train.methods.PACTL2), 0: none


SETUPS = {
    "tiny": Setup(
        model={"name": "resnet20", "kwargs": {"width_mult": 0.5}},  # 8/16/32 channels: the CPU budget
        subnets=[{"name": f"w{w}-b{b}", "width": w, "bits": b} for w in (0.5, 1.0) for b in (2, 4, 8)]
        + [{"name": "stages-b4", "width": STAGES, "bits": 4}],
        alone=["w1.0-b8", "w0.5-b2", "stages-b4"], stem="serve_resnet20", work="runs/serve_r20",
        defaults={"epochs": 2, "subset": 2500, "val": 500, "test_n": 1000, "init": None},
        train={"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}, batch_size=64),
    "cifar": Setup(
        model={"name": "resnet20", "kwargs": {}},
        subnets=[{"name": f"b{b}", "width": 1.0, "bits": b} for b in (2, 4, 8)],
        alone=["b2", "b4", "b8"], stem="supernet_resnet20_cifar", work="runs/supernet_r20_cifar",
        defaults={"epochs": 3, "subset": 0, "val": 5000, "test_n": 10000, "init": FLOAT_INIT},
        train={"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "precision": "bf16"}, batch_size=128,
        activation={"method": "pact", "alpha_init": 10.0}, select_on_val=True),
}
# the cifar setup with PACT's clip at its own learning rate (alpha_lr, as the claims campaign's
# pact-w2a2-alr arm): at the model's Adam rate the clip stays near its starting 10, where 2-bit codes
# round most positive activations to zero (benchmarks/results/probe_pact_init.md)
SETUPS["cifar-alr"] = replace(
    SETUPS["cifar"], activation={"method": "pact", "alpha_init": 10.0, "alpha_lr": 1e-2},
    stem="supernet_resnet20_cifar_alr", work="runs/supernet_r20_cifar_alr", base="cifar",
    base_what="with the clip at the model's learning rate")
# the cifar-alr setup with PACT's L2 penalty on the clips (weight 2e-4, as the claims campaign's PACT
# recipes): without it the 2-bit clips stay at 8-10 while the campaign's W2A2 ones fall to 3-6
SETUPS["cifar-l2"] = replace(
    SETUPS["cifar-alr"], pact_l2=2e-4, stem="supernet_resnet20_cifar_l2", work="runs/supernet_r20_cifar_l2",
    base="cifar-alr", base_what="without PACT's L2 penalty on the clips")
# widths x bits on CIFAR-10: the cifar setup with every stage at width 0.5 or 1.0 (the half-width
# sub-nets slice the float model's first channels of each group); trained alone: the half-width ones
# (the full-width ones are the cifar setup's alone runs, the same configurations and recipe)
SETUPS["cifar-wb"] = replace(
    SETUPS["cifar"],
    subnets=[{"name": f"w{w}-b{b}", "width": w, "bits": b} for w in (0.5, 1.0) for b in (2, 4, 8)],
    alone=["w0.5-b2", "w0.5-b4", "w0.5-b8"], stem="supernet_resnet20_cifar_wb",
    work="runs/supernet_r20_cifar_wb")
# the same with the float model's channels sorted by importance first (lowbit.nn.channel_order): the
# half-width sub-nets start from the channels that matter most, option-A shortcuts' copied channels
# in the same place at both widths
SETUPS["cifar-wbo"] = replace(SETUPS["cifar-wb"], order="l1", base="cifar-wb",
                              base_what="without the channel ordering",
                              stem="supernet_resnet20_cifar_wbo", work="runs/supernet_r20_cifar_wbo")
# cifar-wbo with cifar-l2's activation recipe (the clip at its own learning rate, PACT's L2 penalty
# on the clips), its half-width configurations trained alone with it too
SETUPS["cifar-wbo-l2"] = replace(
    SETUPS["cifar-wbo"], activation=SETUPS["cifar-l2"].activation, pact_l2=SETUPS["cifar-l2"].pact_l2,
    base="cifar-wbo", base_what="with the clip at the model's learning rate and no L2 penalty on it",
    stem="supernet_resnet20_cifar_wbo_l2", work="runs/supernet_r20_cifar_wbo_l2")
# non-uniform widths: one width per stage (0.5 / 0.75 / 1.0 up the network and the reverse) beside the
# uniform 0.5, 0.75 and 1.0, all at 4 bits, the channels ordered first; every configuration but the
# full width also trained alone
NU_STAGES = {"up": (0.5, 0.75, 1.0), "down": (1.0, 0.75, 0.5)}
SETUPS["cifar-nu"] = replace(
    SETUPS["cifar-wbo"], base=None, base_what="", stem="supernet_resnet20_cifar_nu",
    work="runs/supernet_r20_cifar_nu",
    subnets=[{"name": f"w{w}-b4", "width": w, "bits": 4} for w in (0.5, 0.75, 1.0)]
    + [{"name": f"{k}-b4", "width": {f"layer{i + 1}.*": w for i, w in enumerate(ws)}, "bits": 4}
       for k, ws in NU_STAGES.items()],
    alone=["up-b4", "down-b4", "w0.5-b4", "w0.75-b4"])


def build(setup: Setup, subnets: list[dict[str, Any]], init: str | None = None) -> Supernet:
    """The supernet of ``subnets`` around the setup's float model (its weights from ``init``)."""
    torch.manual_seed(0)
    model = build_model(setup.model["name"], **setup.model["kwargs"])
    if init:
        load_weights(model, init)  # float weights go in before the layers become switchable
    return Supernet(model, subnets, SHAPE, activation=setup.activation, order=setup.order)


def get_data(setup: Setup, a: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(train, val, test) loaders. ``cifar``: the campaign's split (``val_size="auto"``, the last
    5,000 training images), then ``--subset`` of the rest; ``tiny``: ``--val`` held out of a
    ``--subset`` pool."""
    if setup.select_on_val:
        data = load_dataset("cifar10", data_dir=a.data_dir, batch_size=setup.batch_size, test_batch_size=500,
                            seed=0, val_size="auto")
        train, val = data.train, data.val
        if a.val < val.num_samples:
            val = val.subset(a.val, seed=0)
        if a.subset and a.subset < train.num_samples:
            train = train.subset(a.subset, seed=0)
    else:
        data = load_dataset("cifar10", data_dir=a.data_dir, batch_size=setup.batch_size, test_batch_size=500,
                            seed=0)
        val, train = data.train.subset(a.subset, seed=0).split(a.val, seed=0)
    test = data.test if a.test_n >= data.test.num_samples else data.test.subset(a.test_n, seed=0)
    return train, val.replace(augment=None, shuffle=False), test


def accuracies(sn: Supernet, loader: Any) -> dict[str, float]:
    out = {}
    for n in sn.names:
        sn.set_subnet(n)
        out[n] = float(evaluate(sn, loader)["acc"])
    return out


class SubnetVal:
    """Trainer callback: after each epoch, every sub-net's validation accuracy (``val_acc/<name>``)
    and their mean as ``val_acc``, which the Trainer selects ``best.safetensors`` on."""

    def __init__(self, val: Any) -> None:
        self.val = val

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        sn = trainer.model
        active = sn.subnet
        accs = accuracies(sn, self.val)
        sn.set_subnet(active)
        metrics.update({f"val_acc/{n}": v for n, v in accs.items()})
        metrics["val_acc"] = sum(accs.values()) / len(accs)


def train_one(setup: Setup, name: str, a: argparse.Namespace, data: tuple[Any, Any, Any]) -> dict[str, Any]:
    """One training (a supernet variant or one configuration alone), resumable; its result JSON."""
    run = Path(a.work) / name
    done = run / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    train, val, test = data
    alone = name.startswith("alone-")
    subs = [next(s for s in setup.subnets if s["name"] == name[len("alone-"):])] if alone else setup.subnets
    sn = build(setup, subs, a.init)
    cfg = TrainConfig(epochs=a.epochs, schedule="cosine", seed=a.seed, tensorboard=False,
                      batch_size=setup.batch_size, **setup.train)
    loss, callbacks = None, []
    if not alone:
        sched = DelayedShrinking(a.epochs * len(train), warmup=0.25) if name == "des" else None
        loss = SandwichLoss(n_random=1, seed=a.seed, schedule=sched)
        callbacks = [loss]
    if setup.select_on_val:
        callbacks.append(SubnetVal(val))
    t0 = time.time()
    regs = [PACTL2(setup.pact_l2)] if setup.pact_l2 else []
    tr = Trainer(sn, train, None, cfg, run, loss_fn=loss, callbacks=callbacks, eval_split="val",
                 regularizers=regs, progress=RichProgress())  # bars on a terminal, a line per epoch on stderr
    tr.fit(resume=True)
    train_s = time.time() - t0
    if setup.select_on_val:  # the epoch with the best mean validation accuracy, then the test set once
        load_checkpoint(run / "best.safetensors", sn)
    sn.eval()
    res = {"name": name, "seed": a.seed, "init": a.init, "epochs": a.epochs,
           "train_s_last_session": round(train_s, 1),
           "best_epoch": tr.best_epoch if setup.select_on_val else a.epochs,
           "epoch_s": [round(h["epoch_time_s"], 1) for h in tr.history],
           "val": accuracies(sn, val), "test": accuracies(sn, test)}
    atomic_write_text(done, json.dumps(res, indent=1) + "\n")
    return res


def packed_agreement(sn: Supernet, engines: Any, setup: Setup, a: argparse.Namespace,
                     n_images: int = 1000) -> dict[str, dict[str, float]]:
    """Per sub-net, on ``n_images`` validation images (not the test set): the accuracy of the packed
    runtime's sub-net (loaded from the file) and of the fake-quantized supernet, and how often their
    top-1 classes agree."""
    _, val, _ = get_data(setup, argparse.Namespace(**{**vars(a), "val": n_images}))
    out = activation_stats(sn, val)
    with torch.inference_mode():
        for n in sn.names:
            hit_p = hit_q = same = total = 0
            for x, y in val:
                p, q = engines.run(x, n).argmax(1), sn.run(x, n).argmax(1)
                hit_p += int((p == y).sum())
                hit_q += int((q == y).sum())
                same += int((p == q).sum())
                total += y.numel()
            out[n] |= {"packed_val_acc": hit_p / total, "fakequant_val_acc": hit_q / total,
                      "packed_top1_agree": same / total, "agree_images": total}
    return out


def activation_stats(sn: Supernet, val: Any) -> dict[str, dict[str, float]]:
    """Per sub-net: the learned PACT clip levels (min / mean / max over layers) and the share of the
    quantized layers' positive inputs that round to zero (below half a quantization step) on ``val``."""
    from lowbit.nn.supernet import _SwitchLayer

    counts: dict[str, list[int]] = {}

    def hook(m: Any, args: Any) -> None:
        key = str(sn.plan(sn.subnet).spec.a_bits)
        if key not in m.aq:
            return
        x, step = args[0].detach().float(), float(m.aq[key].alpha) / (2 ** int(key) - 1)
        c = counts.setdefault(sn.subnet, [0, 0])
        c[0] += int((x > 0).sum())
        c[1] += int(((x > 0) & (x < step / 2)).sum())

    layers = [m for m in sn.modules() if isinstance(m, _SwitchLayer) and len(m.aq)]
    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        with torch.inference_mode():
            for n in sn.names:
                sn.set_subnet(n)
                for x, _ in val:
                    sn(x)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n in sn.names:
        key = str(sn.plan(n).spec.a_bits)
        al = [float(m.aq[key].alpha.detach()) for m in layers if key in m.aq]
        c = counts.get(n, [0, 0])
        out[n] = {"pact_alpha_min": min(al, default=math.nan), "pact_alpha_mean": sum(al) / max(1, len(al)),
                  "pact_alpha_max": max(al, default=math.nan), "act_zeroed": c[1] / max(1, c[0])}
    return out


def float_init(init: str | None) -> dict[str, Any]:
    """Validation and test accuracy of the float model a run starts from (its run's result.json)."""
    res = Path(init).parent / "result.json" if init else None
    if res is None or not res.exists():
        return {}
    r = json.loads(res.read_text())
    h = hashlib.sha256(Path(init).read_bytes()).hexdigest()[:16] if Path(init).exists() else None
    return {"val_acc": r.get("best_acc"), "test_acc": r.get("test_acc"), "sha256": h}


def same_init(ref: dict[str, Any], fl: dict[str, Any]) -> bool:
    """Whether a results file's runs started from the float model ``fl`` (:func:`float_init`): the same
    SHA-256 where both have one, else the same accuracies (older files)."""
    old = ref.get("float_init") or {}
    if old.get("sha256") and fl.get("sha256"):
        return old["sha256"] == fl["sha256"]
    return bool(old) and all(old.get(k) == fl.get(k) for k in ("val_acc", "test_acc"))


def data_sizes(a: argparse.Namespace) -> dict[str, int]:
    """Images trained on, selected on and tested on (``cifar``: CIFAR-10's 50,000 / 10,000 with the
    campaign's 5,000 validation images)."""
    if SETUPS[a.setup].select_on_val:  # the cifar setups: the campaign split
        rest = 50_000 - 5_000
        return {"train_images": a.subset if 0 < a.subset < rest else rest, "val_images": min(a.val, 5_000),
                "test_images": min(a.test_n, 10_000)}
    return {"train_images": a.subset - a.val, "val_images": a.val, "test_images": a.test_n}


def load_trained(setup: Setup, name: str, a: argparse.Namespace) -> Supernet:
    sn = build(setup, setup.subnets)
    ckpt = "best.safetensors" if setup.select_on_val else "checkpoint.safetensors"
    load_checkpoint(Path(a.work) / name / ckpt, sn)
    return sn.eval()


def _has_widths(setup: Setup) -> bool:
    return any(s.get("width", 1.0) != 1.0 for s in setup.subnets)


def bits_twin(setup: Setup) -> str | None:
    """The bit-width setup (no widths) training with ``setup``'s recipe: its activation quantizer,
    clip penalty, optimizer and batch (``cifar`` for ``cifar-wb``, ``cifar-l2`` for ``cifar-wbo-l2``)."""
    return next((name for name, s in SETUPS.items() if s.select_on_val and not _has_widths(s)
                 and (s.activation, s.pact_l2, s.train, s.batch_size)
                 == (setup.activation, setup.pact_l2, setup.train, setup.batch_size)), None)


def full_width_alone(setup: Setup, out: Path, fl: dict[str, Any]) -> dict[str, Any]:
    """For a widths x bits setup: the full-width configurations trained alone, as the bit-width setup
    with its recipe (:func:`bits_twin`) recorded them in its results file (same initialisation ``fl``,
    recipe and data)."""
    twin = bits_twin(setup)
    ref = out / f"{SETUPS[twin].stem}.json" if twin else None
    if not _has_widths(setup) or not setup.select_on_val or ref is None or not ref.exists():
        return {}
    r = json.loads(ref.read_text())
    if not same_init(r, fl):  # another float model: not the same starting point
        return {}
    rows = {f"w1.0-{x['name']}": {"val": x["alone_val"], "test": x["alone_test"]} for x in r["rows"]
            if "alone_test" in x}
    return {"full_width_alone": {"file": ref.name, "git": r.get("git", {}).get("commit"), "rows": rows}}


def base_runs(setup: Setup, out: Path, fl: dict[str, Any]) -> dict[str, Any]:
    """For a setup that changes one thing of another (``Setup.base``: the channel ordering, PACT's
    clip rate): that setup's per sub-net test accuracy in its supernets and alone, as its results
    file recorded them (same float model ``fl`` and data, another run)."""
    ref = out / f"{SETUPS[setup.base].stem}.json" if setup.base else None
    if ref is None or not ref.exists():
        return {}
    r = json.loads(ref.read_text())
    if not same_init(r, fl):
        return {}
    keys = ("sandwich_test", "des_test", "alone_test")
    rows = {x["name"]: {k: x[k] for k in keys if k in x} for x in r["rows"]}
    return {"base": {"file": ref.name, "git": r.get("git", {}).get("commit"), "rows": rows,
                     "what": setup.base_what}}


def fastest_ms(fn: Any, x: torch.Tensor, repeats: int) -> float:
    ts = []
    with torch.inference_mode():
        fn(x)
        for _ in range(repeats):
            t = time.perf_counter()
            fn(x)
            ts.append(1e3 * (time.perf_counter() - t))
    return min(ts)


def report(setup: Setup, a: argparse.Namespace, argv: list[str] | None, t0: float) -> None:
    from lowbit.export.report import model_report
    from lowbit.export.supernet_file import load_supernet_file, save_supernet_file
    from lowbit.serve import SubnetEngines

    work = Path(a.work)
    res = {v: json.loads((work / v / "result.json").read_text()) for v in ("sandwich", "des")
           if (work / v / "result.json").exists()}
    alone = {n: json.loads((work / f"alone-{n}" / "result.json").read_text()) for n in setup.alone
             if (work / f"alone-{n}" / "result.json").exists()}
    if res:
        best: str | None = max(res, key=lambda v: sum(res[v]["val"].values()))
        sn = load_trained(setup, best, a)
        for n in sn.names:
            sn.info[n] = {"val_acc": res[best]["val"][n], "test_acc": res[best]["test"][n]}
    else:  # no supernet finished training: sizes, BOPs and latency of the initial weights only
        best, sn = None, build(setup, setup.subnets, a.init).eval()
    path = work / "resnet20.supernet"
    sizes = save_supernet_file(sn, path, model_spec=setup.model)
    # from the stored codes, on one thread (without threads=1 the kernels split batches over the cores)
    engines = SubnetEngines(load_supernet_file(path), "packed", threads=1)
    g = torch.Generator().manual_seed(0)
    xs = {b: torch.randn((b, *SHAPE), generator=g) for b in (1, 8, 32)}
    lat: dict[str, dict[str, float]] = {n: {} for n in sn.names}
    for _ in range(5):
        for n in sn.names:
            for b, x in xs.items():
                t = fastest_ms(lambda x, n=n: engines.run(x, n), x, 3)
                lat[n][f"packed_b{b}_ms"] = min(t, lat[n].get(f"packed_b{b}_ms", math.inf))
    agree = packed_agreement(sn, engines, setup, a) if setup.select_on_val else {}
    rows = []
    for n in sn.names:
        rep = model_report(sn.extract(n), SHAPE)
        row = {"name": n, **sn.cost(n), **lat[n], "runtime": engines.runtime[n],
               "packed_max_abs_diff": engines.max_abs_diff.get(n),
               "weight_bytes": rep.file_bytes, "report_bops": rep.total_bops,
               **{f"{v}_val": res[v]["val"][n] for v in res}, **{f"{v}_test": res[v]["test"][n] for v in res}}
        if n in alone:
            row.update({"alone_val": alone[n]["val"][n], "alone_test": alone[n]["test"][n]})
        rows.append({**row, **agree.get(n, {})})
    runs = {v: {k: r[k] for k in ("best_epoch", "epoch_s") if k in r}
            for v, r in {**res, **{f"alone-{n}": x for n, x in alone.items()}}.items()}
    fl = float_init(a.init)
    payload = {**run_meta(__file__, argv, t0, seeds=[a.seed], epochs=a.epochs, subset=a.subset, val=a.val,
                          test_n=a.test_n, model=setup.model, subnets=setup.subnets, chosen_variant=best,
                          setup=a.setup, init=a.init, float_init=fl, **data_sizes(a),
                          train=setup.train, batch_size=setup.batch_size, activation=setup.activation,
                          pact_l2=setup.pact_l2,
                          runs=runs, latency_threads=1, **({"load": a.load_note} if a.load_note else {}),
                          **({"latency_load": a.latency_note} if a.latency_note else {}),
                          order=setup.order, **full_width_alone(setup, Path(a.out), fl),
                          **base_runs(setup, Path(a.out), fl)),
               "file": sizes, "rows": rows}
    if setup.select_on_val:
        write_results(a.out, setup.stem, payload, markdown_cifar(payload, list(res)))
        plot(payload, list(res), Path(a.out) / f"{setup.stem}.png")
    else:
        write_results(a.out, setup.stem, payload, markdown(payload, list(res)))


def markdown(p: dict[str, Any], variants: list[str]) -> str:
    head = ["sub-net", "W/A bits", "weight bytes", "BOPs", "packed ms b1 / b8 / b32"]
    head += [f"{v} val / test" for v in variants] + ["alone val / test"]
    f = p["file"]
    lines = [
        "# ResNet-20 (x0.5) any-width, any-precision supernet (CIFAR-10, tiny CPU budget)", "",
        f"`{p['command']}`; single run, seed 0; {p['subset'] - p['val']} training images (random subset "
        f"of the CIFAR-10 JPEG copy), {p['val']} held-out training images for selection, {p['test_n']} "
        f"random test images read once per model; {p['epochs']} epochs for every model; ResNet-20 at "
        f"width_mult 0.5 (8/16/32 channels); torch {p['torch']}. At this budget (what nice 19 got of a "
        "shared 2-core machine at load average 15-20) every model is far from converged: the table shows "
        "the machinery and the costs; accuracy differences of a few points are within the noise of a "
        "single run on 1,000 test images (binomial std about 1.5 points).", "",
        "Accuracy of each sub-net switched inside one supernet (sandwich rule with in-place distillation, "
        "and with Delayed epsilon-Shrinking at equal epochs) against the same configuration trained "
        "alone. " + (f"The served file holds the `{p['chosen_variant']}` supernet (higher mean "
                     "selection-validation accuracy). " if p["chosen_variant"] else
                     "NO supernet finished training within the budget: the file holds the initial "
                     "weights; sizes, BOPs and latency are still those of every sub-net. ") +
        "Weight bytes and BOPs: `model_report` of the sub-net (stem and "
        "classifier float). "
        "Latency: the sub-net loaded from the supernet file (stored codes) in the packed runtime, the "
        "fastest of 15 runs in 5 rounds over all sub-nets, " + _threads(p) + ", on a shared 2-core machine.",
        "",
        f"Supernet file: {f['file_bytes']:,} bytes holding every sub-net's codes "
        f"({f['stored_tensor_bytes']:,} tensor bytes stored once; {f['subnet_tensor_bytes']:,} if each "
        "sub-net were stored separately); "
        f"the largest sub-net alone: {f['largest_subnet_bytes']:,} bytes; the latent float weights and "
        f"per-sub-net state of the trainable supernet: {f['latent_bytes']:,} bytes.", "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in p["rows"]:
        sub = next(s for s in p["subnets"] if s["name"] == r["name"])
        cells = [r["name"], f"{sub['bits']}/{sub['bits']}", f"{r['weight_bytes']:,}",
                 f"{r['report_bops']:,}", _latencies(r)]
        cells += [f"{100 * r[f'{v}_val']:.2f}% / {100 * r[f'{v}_test']:.2f}%" for v in variants]
        cells.append(f"{100 * r['alone_val']:.2f}% / {100 * r['alone_test']:.2f}%" if "alone_test" in r
                     else "not trained")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _threads(p: dict[str, Any]) -> str:
    """The threads the latency columns ran on (reports before ``latency_threads`` left the packed
    kernels at their default: every core, batches of 8 and 32 split over both)."""
    if p.get("latency_threads") == 1:
        return "one thread"
    return ("one PyTorch thread and the packed kernels on their default 2 threads (batches split over both "
            "cores)")


def _latencies(r: dict[str, Any]) -> str:
    return f"{r['packed_b1_ms']:.2f} / {r['packed_b8_ms']:.2f} / {r['packed_b32_ms']:.2f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _wlabel(width: float | dict[str, float]) -> str:
    """A sub-net's width as the tables print it: ``0.5``, or per stage ``0.5 / 0.75 / 1.0``."""
    return " / ".join(str(w) for w in width.values()) if isinstance(width, dict) else str(width)


def _sandwich_rule(rows: list[dict[str, Any]], variants: list[str]) -> str:
    """What ``sandwich`` (and ``des``) trained each step, the largest and smallest by BOPs."""
    by = sorted(rows, key=lambda r: r["report_bops"])
    rule = (f"`sandwich`: every step the largest sub-net ({by[-1]['name']}), the smallest "
            f"({by[0]['name']}) and one of the other {len(by) - 2} drawn at random, the smaller ones "
            "distilled in place from the largest; ")
    if "des" in variants:
        rule += ("`des`: the same with Delayed epsilon-Shrinking (the largest alone for the first 25% of the "
                 "steps, then the others join from the most to the least expensive by BOPs); ")
    return rule


def _act(p: dict[str, Any]) -> str:
    """The activation quantizer's settings in words."""
    a = p.get("activation") or {}
    txt = f"alpha_init {a.get('alpha_init', 10.0):g}"
    txt += f", the clip at its own learning rate {a['alpha_lr']:g}" if a.get("alpha_lr") else ""
    return txt + (f", L2 penalty {p['pact_l2']:g} on the clips" if p.get("pact_l2") else "")


def markdown_cifar(p: dict[str, Any], variants: list[str]) -> str:
    """The ``cifar`` setup's table: per sub-net accuracy in each supernet and alone, costs, latency."""
    f, rows, fl = p["file"], p["rows"], p.get("float_init") or {}
    runs = p.get("runs") or {}
    alone_done = [r for r in rows if "alone_test" in r]
    n_train = p.get("train_images")
    widths = sorted({_wlabel(s.get("width", 1.0)) for s in p["subnets"]})
    head = ["sub-net", *(["width"] if len(widths) > 1 else []), "W/A bits", "weight bytes", "BOPs",
            "packed ms b1 / b8 / b32"]
    head += [f"{v} val / test" for v in variants] + ["alone val / test"]
    head += [f"{v} - alone (test, pp)" for v in variants]
    head += ["packed runtime val acc (top-1 = fake-quant)"]
    staged = [s for s in p["subnets"] if isinstance(s.get("width"), dict)]
    if staged:
        bits = sorted({s["bits"] for s in p["subnets"]})
        uni = sorted({s["width"] for s in p["subnets"] if not isinstance(s.get("width"), dict)})
        title = (f"any-width supernet (uniform and per-stage widths, {'/'.join(map(str, bits))}-bit W/A)")
        how = ("the float model's channels first sorted by importance, `order_channels`: the L1 norm of the "
               "weights producing each channel" if p.get("order") else
               "the float model's channels as they are")
        shared = ("Sub-nets share one set of latent weights: uniform widths " + " / ".join(map(str, uni))
                  + " of every stage and per-stage widths " + "; ".join(
                      f"{s['name']} {_wlabel(s['width'])}" for s in staged)
                  + " (stages 1 / 2 / 3, the stem with stage 1; a sub-net at width r keeps the first r of "
                  f"the channels of each residual group and block, {how}), DoReFa weights and PACT "
                  f"activations ({_act(p)}) at {' / '.join(map(str, bits))} bits; stem and classifier "
                  "float (their channels sliced with their group), one BatchNorm per sub-net. ")
        rule = _sandwich_rule(rows, variants)
    elif len(widths) > 1:
        title = "any-width, any-precision supernet (widths 0.5 / 1.0 x 2/4/8-bit W/A)"
        how = ("the float model's channels first sorted by importance, `order_channels`: the L1 norm of the "
               "weights producing each channel, option-A shortcuts' copied channels at the same offset at "
               "both widths" if p.get("order") else
               "sliced from the float model as it is: its channels are not reordered")
        shared = ("Sub-nets share one set of latent weights: every stage at width 0.5 or 1.0 (a half-width "
                  f"sub-net keeps the first half of the channels of each residual group and block, {how}), "
                  "and DoReFa weights and "
                  f"PACT activations ({_act(p)}) at 2, 4 or 8 bits; stem and classifier float (their "
                  "channels sliced with their group), one BatchNorm per sub-net. ")
        rule = ("`sandwich`: every step the largest sub-net (w1.0-b8), the smallest (w0.5-b2) and one of "
                "the other four drawn at random, the smaller ones distilled in place from the largest; "
                "`des`: the same with Delayed epsilon-Shrinking (the largest alone for the first 25% of "
                "the steps, then the others join from the most to the least expensive by BOPs, one every "
                "7.5% of the steps: the smallest from 55%); ")
    else:
        title = "any-precision supernet (2/4/8-bit W/A)"
        shared = ("Sub-nets share one set of latent weights at width 1.0 and differ in bits: DoReFa weights "
                  f"and PACT activations ({_act(p)}) at 2, 4 or 8 bits, stem and classifier float, one "
                  "BatchNorm per sub-net. ")
        rule = ("`sandwich`: every step the 8-bit, the 2-bit and the 4-bit sub-net (the sandwich rule with "
                "one random middle sub-net, which with three choices is always the 4-bit one), the smaller "
                "ones distilled in place from the 8-bit one; `des`: the same with Delayed epsilon-Shrinking "
                "(8-bit alone for the first 25% of the steps, the 4-bit one joins then, the 2-bit one at "
                "43.75%); ")
    lines = [
        f"# ResNet-20 CIFAR-10 {title} trained from the float model", "",
        f"`{p['command']}` (after the `train` commands in the script's docstring); **single run (n=1), "
        f"seed 0**; the CIFAR-10 JPEG copy (close to, not identical with, the original images); "
        f"{n_train:,} training images, the campaign's validation split ({p['val_images']:,} held-out "
        f"training images: the float model never trained on them) for selecting each run's epoch, the "
        f"whole test set ({p['test_images']:,} images) read once per model, after training; torch "
        f"{p['torch']}.", "",
        f"Budget: {p['epochs']} epochs for every model (supernets and alone alike), one thread per run at "
        "nice 5 on a shared 2-core machine (" + p.get("load", "two campaign runs beside it") + "), bf16 "
        "autocast (quantizers in fp32). Epoch times (s): "
        + "; ".join(f"{k} {', '.join(f'{t:.0f}' for t in v.get('epoch_s', []))} (best epoch "
                    f"{v.get('best_epoch')})" for k, v in runs.items()) + ".", "",
        f"Every model starts from the float ResNet-20 of the claims campaign (`{p['init']}`: "
        f"{_pct(fl.get('val_acc'))} validation, {_pct(fl.get('test_acc'))} test; 20 epochs). " + shared
        + "Recipe (every run): Adam lr 1e-3, cosine, no weight decay, batch 128. " + rule
        + "`alone`: that configuration as its "
        "own network (a one-sub-net supernet, plain cross entropy). Each run keeps the epoch with the "
        "best mean validation accuracy over its sub-nets. Binomial std of one test accuracy near 85% on "
        "10,000 images: 0.36 pp; a difference under about 1 pp in one run is noise.", "",
        (f"Served file: the `{p['chosen_variant']}` supernet (higher mean validation accuracy). "
         if p["chosen_variant"] else "NO supernet finished training: the file holds the initial weights. ")
        + "Weight bytes and BOPs: `model_report` of the sub-net. Latency: each sub-net loaded from the one "
        "supernet file (stored codes) in the packed runtime, the fastest of 15 runs in 5 rounds over all "
        "sub-nets, " + _threads(p) + ", " + p.get("latency_load", "under the load above")
        + " (ratios between rows are what counts). Packed runtime "
        f"val acc: the served sub-net (from the file) on {rows[0].get('agree_images', 0):,} random "
        "validation images, and in brackets how often its top-1 class equals the fake-quantized "
        "supernet's (the test set is not read again).", "",
        f"Supernet file: {f['file_bytes']:,} bytes holding every sub-net's codes "
        f"({f['stored_tensor_bytes']:,} tensor bytes stored once; {f['subnet_tensor_bytes']:,} if each "
        f"sub-net were stored separately); the largest sub-net alone: {f['largest_subnet_bytes']:,} bytes; "
        f"the latent float weights and per-sub-net state: {f['latent_bytes']:,} bytes.", "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sub = next(s for s in p["subnets"] if s["name"] == r["name"])
        width = [_wlabel(sub.get("width", 1.0))] if len(widths) > 1 else []
        cells = [r["name"], *width, f"{sub['bits']}/{sub['bits']}", f"{r['weight_bytes']:,}",
                 f"{r['report_bops']:,}", _latencies(r)]
        cells += [f"{_pct(r[f'{v}_val'])} / {_pct(r[f'{v}_test'])}" for v in variants]
        cells.append(f"{_pct(r['alone_val'])} / {_pct(r['alone_test'])}" if "alone_test" in r
                     else "not trained")
        cells += [f"{100 * (r[f'{v}_test'] - r['alone_test']):+.2f}" if "alone_test" in r else "-"
                  for v in variants]
        cells.append(f"{_pct(r['packed_val_acc'])} ({_pct(r['packed_top1_agree'])})" if "packed_val_acc" in r
                     else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if variants and alone_done:
        lines += [""]
        for v in variants:
            d = [100 * (r[f"{v}_test"] - r["alone_test"]) for r in alone_done]
            lines.append(f"- `{v}` minus alone, test accuracy, mean over the {len(d)} sub-nets trained "
                         f"alone: {sum(d) / len(d):+.2f} pp (per sub-net " + ", ".join(f"{x:+.2f}" for x in d)
                         + ").")
    if rows and "act_zeroed" in rows[0]:
        per = [f"{r['name']} {r['pact_alpha_min']:.2f} / {r['pact_alpha_mean']:.2f} / "
               f"{r['pact_alpha_max']:.2f}, {100 * r['act_zeroed']:.1f}%" for r in rows]
        k = rows[0]["agree_images"]
        lines.append(f"- Activation quantizers of the served supernet, on the same {k:,} validation images: "
                     "learned PACT clip levels (min / mean / max over layers) and the share of positive "
                     "inputs rounded to zero: " + "; ".join(per) + ".")
    fw = p.get("full_width_alone")
    if fw and fw["rows"]:
        d = [f"{n} {_pct(x['test'])} test (in `{v}` {_pct(r[f'{v}_test'])}, "
             f"{100 * (r[f'{v}_test'] - x['test']):+.2f} pp)"
             for n, x in fw["rows"].items() for r in rows if r["name"] == n for v in variants[:1]]
        lines.append(f"- The full-width configurations trained alone (from `{fw['file']}`, git "
                     f"{str(fw['git'])[:10]}: the same initialisation, recipe and data, another run): "
                     + "; ".join(d) + ".")
    un = p.get("base") or p.get("unordered")  # (files before the base setups: "unordered")
    if un and un["rows"]:
        cols = [("sandwich", "sandwich_test"), ("des", "des_test"), ("alone", "alone_test")]
        d = []
        for r in rows:
            x = un["rows"].get(r["name"], {})
            parts = [f"{lab} {_pct(r.get(k))} vs {_pct(x[k])} ({100 * (r[k] - x[k]):+.2f} pp)"
                     for lab, k in cols if k in x and k in r]
            if parts:
                d.append(f"{r['name']} " + ", ".join(parts))
        what = un.get("what", "without the channel ordering")
        lines.append(f"- Against the same setup {what} (from `{un['file']}`, git {str(un['git'])[:10]}: the "
                     "same initialisation and data, another run), test accuracy here vs there: "
                     + "; ".join(d) + ".")
    if set(variants) == {"sandwich", "des"}:
        d = [100 * (r["des_test"] - r["sandwich_test"]) for r in rows]
        lines.append(f"- `des` minus `sandwich` at equal epochs, test accuracy, mean over sub-nets: "
                     f"{sum(d) / len(d):+.2f} pp (per sub-net " + ", ".join(f"{x:+.2f}" for x in d) + ").")
    return "\n".join(lines) + "\n"


def plot(p: dict[str, Any], variants: list[str], path: Path) -> None:
    """Test accuracy per sub-net (each supernet variant and alone, the float model as a line) and
    packed-runtime latency per sub-net and batch size."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = p["rows"]
    names = [r["name"] for r in rows]
    cols = [*variants, "alone"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    w = 0.8 / len(cols)
    for j, c in enumerate(cols):
        ys = [100 * r.get(f"{c}_test", math.nan) for r in rows]
        ax.bar([i + (j - (len(cols) - 1) / 2) * w for i in range(len(rows))], ys, w, label=c)
    fl = (p.get("float_init") or {}).get("test_acc")
    if fl is not None:
        ax.axhline(100 * fl, color="k", ls="--", lw=1, label="float init")
    seen = [100 * r[f"{c}_test"] for r in rows for c in cols if f"{c}_test" in r]
    seen += [100 * fl] if fl is not None else []
    if seen:
        ax.set_ylim(max(0.0, min(seen) - 5), min(100.0, max(seen) + 3))
    ax.set_xticks(range(len(rows)), names)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"CIFAR-10, {p['epochs']} epochs from float, n=1")
    ax.legend(fontsize=8)
    for b in (1, 8, 32):
        bx.plot(names, [r[f"packed_b{b}_ms"] for r in rows], "o-", label=f"batch {b}")
    bx.set_yscale("log")
    one = p.get("latency_threads") == 1
    bx.set_ylabel(f"packed runtime latency (ms, {'one thread' if one else '2 kernel threads'})")
    bx.set_title("every sub-net from the one supernet file")
    bx.legend(fontsize=8)
    for a_ in (ax, bx):
        a_.grid(alpha=0.3)
    save_png(fig, path)


# ------------------------------------------------------------------------------------------ seeds
def seed_paths(work: str, init: str | None, seed: int) -> tuple[str, str | None]:
    """(work directory, float checkpoint) of ``seed``: seed 0 keeps ``work``, seed N works in
    ``<work>-seedN``; the default float model becomes the campaign's seed-N one (an explicit
    ``--init`` stays what it is); ``"none"``: random weights."""
    if init == "none":
        init = None
    if seed and init == FLOAT_INIT:
        init = FLOAT_INIT.replace("/seed0/", f"/seed{seed}/")
    return (f"{work}-seed{seed}" if seed else work), init


def _mean_std(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else math.nan,
            "n": len(xs)}


def _ms(d: dict[str, float] | None, scale: float = 100.0, signed: bool = False) -> str:
    if not d:
        return "-"
    sign = "+" if signed else ""
    if d["n"] < 2:
        return f"{scale * d['mean']:{sign}.2f} (n=1)"
    return f"{scale * d['mean']:{sign}.2f} ± {scale * d['std']:.2f} (n={d['n']})"


def seed_runs(setup: Setup, work: str, alone: list[str] | None = None) -> dict[str, Any]:
    """The finished runs (result.json) of one seed's work directory: the supernet variants and the
    configurations trained alone."""
    got = {}
    for run in ("sandwich", "des", *(f"alone-{n}" for n in (setup.alone if alone is None else alone))):
        f = Path(work) / run / "result.json"
        if f.exists():
            got[run] = json.loads(f.read_text())
    return got


def twin_alone(twin: str, init: str | None, seed: int, got: dict[str, Any]) -> dict[str, Any]:
    """One seed's full-width configurations trained alone, for a widths x bits setup whose runs are
    ``got``: the runs alone of its bit-width twin (:func:`bits_twin`) of that seed that started from
    the same float model, renamed ``alone-w1.0-<name>``."""
    starts = {r.get("init") for r in got.values()}
    if len(starts) != 1:
        return {}
    out = {}
    for run, r in seed_runs(SETUPS[twin], seed_paths(SETUPS[twin].work, init, seed)[0]).items():
        if run.startswith("alone-") and r.get("init") in starts:
            n, w = run[len("alone-"):], f"w1.0-{run[len('alone-'):]}"
            out[f"alone-{w}"] = {**r, "val": {w: r["val"][n]}, "test": {w: r["test"][n]}}
    return out


def differences_to(name: str, other: str) -> list[str]:
    """How setup ``other`` differs from setup ``name``, one entry per step down ``name``'s chain of
    base setups (each ``base_what``); raises ValueError where ``other`` is not on that chain."""
    steps, cur = [], name
    while cur != other:
        s = SETUPS[cur]
        if s.base is None:
            raise ValueError(f"--beside {other}: not a base setup of {name} (its chain of bases ends at "
                             f"{cur}); set a setup beside one it changes a thing of")
        steps.append(s.base_what)
        cur = s.base
    return steps


def seeds_table(setup: Setup, a: argparse.Namespace, argv: list[str] | None, t0: float) -> None:
    """The setup's runs over ``--seeds`` (each trained with ``train ... --seed N``): per sub-net the test
    accuracy in each supernet variant and alone, mean +- std over seeds, and the seed-by-seed
    differences (variant minus alone, ``des`` minus ``sandwich``). Writes ``<stem>_seeds.{json,md,png}``."""
    beside = getattr(a, "beside", None)
    steps = differences_to(a.setup, beside) if beside else []
    twin = bits_twin(setup) if _has_widths(setup) else None
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in a.seeds:
        work, init = seed_paths(a.work, a.init, seed)
        got = seed_runs(setup, work)
        if got and twin:  # full width trained alone: the bit-width setup with this recipe
            got.update(twin_alone(twin, a.init, seed, got))
        if got:
            per_seed[seed] = {"work": work, "init": init, "float_init": float_init(init), "runs": got}
            if beside:  # the same seed's runs of the other setup (same float model and data order)
                bwork = seed_paths(SETUPS[beside].work, a.init, seed)[0]
                bruns = seed_runs(SETUPS[beside], bwork, setup.alone)
                starts = {r.get("init") for r in [*got.values(), *bruns.values()]}
                if len(starts) > 1:
                    raise SystemExit(f"seed {seed}: the runs in {work} and {bwork} started from different "
                                     f"float models ({sorted(map(str, starts))}); a paired difference "
                                     "needs one")
                per_seed[seed]["beside"] = {"work": bwork, "runs": bruns}
    if not per_seed:
        raise SystemExit(f"no finished runs of --setup {a.setup} for seeds {a.seeds} under {a.work}[-seedN]; "
                         "train them first (see the docstring)")
    names = [s["name"] for s in setup.subnets]
    variants = [v for v in ("sandwich", "des") if any(v in x["runs"] for x in per_seed.values())]

    def test(x: dict[str, Any], run: str, n: str) -> float | None:
        r = x["runs"].get(run)
        return None if r is None or n not in r["test"] else r["test"][n]

    rows = []
    for n in names:
        row: dict[str, Any] = {"name": n}
        for v in [*variants, "alone"]:
            run = f"alone-{n}" if v == "alone" else v
            xs = [t for x in per_seed.values() if (t := test(x, run, n)) is not None]
            row[f"{v}_test"] = _mean_std(xs) if xs else None
        for v in variants:
            d = [tv - ta for x in per_seed.values()
                 if (tv := test(x, v, n)) is not None and (ta := test(x, f"alone-{n}", n)) is not None]
            row[f"{v}_minus_alone"] = _mean_std(d) if d else None
        if set(variants) == {"sandwich", "des"}:
            d = [td - ts for x in per_seed.values()
                 if (td := test(x, "des", n)) is not None and (ts := test(x, "sandwich", n)) is not None]
            row["des_minus_sandwich"] = _mean_std(d) if d else None
        if beside:  # this setup minus the other, seed by seed
            for v in [*variants, "alone"]:
                run = f"alone-{n}" if v == "alone" else v
                d = [t - tb for x in per_seed.values()
                     if (t := test(x, run, n)) is not None and (tb := test(x["beside"], run, n)) is not None]
                row[f"{v}_minus_beside"] = _mean_std(d) if d else None
        rows.append(row)
    # the sub-nets trained alone (at full width from the twin, where it has them for every seed)
    alone_names = [n for n in names
                   if n in setup.alone or all(f"alone-{n}" in x["runs"] for x in per_seed.values())]
    summary = {}  # per seed, the mean over sub-nets, then mean +- std over seeds
    for v in variants:
        per = []
        for x in per_seed.values():
            d = [tv - ta for n in alone_names
                 if (tv := test(x, v, n)) is not None and (ta := test(x, f"alone-{n}", n)) is not None]
            if len(d) == len(alone_names):
                per.append(sum(d) / len(d))
        summary[f"{v}_minus_alone"] = _mean_std(per) if per else None
    if set(variants) == {"sandwich", "des"}:
        per = []
        for x in per_seed.values():
            d = [td - ts for n in names
                 if (td := test(x, "des", n)) is not None and (ts := test(x, "sandwich", n)) is not None]
            if len(d) == len(names):
                per.append(sum(d) / len(d))
        summary["des_minus_sandwich"] = _mean_std(per) if per else None
    fl = [x["float_init"]["test_acc"] for x in per_seed.values()
          if x["float_init"].get("test_acc") is not None]
    keep = ("val", "test", "best_epoch", "epoch_s")
    payload = {**run_meta(__file__, argv, t0, seeds=sorted(per_seed), setup=a.setup, epochs=a.epochs,
                          **data_sizes(a), subnets=setup.subnets, alone=setup.alone, variants=variants,
                          train=setup.train, batch_size=setup.batch_size, activation=setup.activation,
                          pact_l2=setup.pact_l2,
                          order=setup.order, float_test=_mean_std(fl) if fl else None,
                          beside=beside, beside_differs=steps, full_width_alone_from=twin,
                          per_seed={s: {k: x[k] for k in ("work", "init", "float_init")} | {
                              "runs": {r: {k: v[k] for k in keep if k in v} for r, v in x["runs"].items()}}
                              | ({"beside_work": x["beside"]["work"]} if beside else {})
                              for s, x in per_seed.items()}),
               "rows": rows, "summary": summary}
    stem = f"{setup.stem}_seeds"
    write_results(a.out, stem, payload, markdown_seeds(payload))
    plot_seeds(payload, Path(a.out) / f"{stem}.png")


def markdown_seeds(p: dict[str, Any]) -> str:
    variants, rows = p["variants"], p["rows"]
    seeds = p["seeds"]
    head = ["sub-net", *(f"{v} test (%)" for v in variants), "alone test (%)",
            *(f"{v} - alone (pp)" for v in variants)]
    if "des_minus_sandwich" in p["summary"]:
        head.append("des - sandwich (pp)")
    beside = p.get("beside")
    if beside:
        head += [f"{v} - {beside} (pp)" for v in [*variants, "alone"]]
    inits = "; ".join(f"seed {s}: `{x['init']}` ({_pct(x['float_init'].get('test_acc'))} test)"
                      for s, x in p["per_seed"].items())
    lines = [
        f"# ResNet-20 CIFAR-10 supernet ({p['setup']}) over seeds {', '.join(map(str, seeds))}", "",
        f"`{p['command']}`, gathering the runs of `python benchmarks/serve/supernet_resnet20.py train "
        f"sandwich des alone --setup {p['setup']} --epochs {p['epochs']} --subset {p['train_images']} "
        "--seed N` "
        f"(without `des` where the setup has none). {p['epochs']} epoch(s) for every model, "
        f"{p['train_images']:,} training images (the same for every seed), the campaign's validation split "
        f"({p['val_images']:,} images) selecting each run's epoch, the whole test set "
        f"({p['test_images']:,} images) read once per model; the CIFAR-10 JPEG copy. A seed fixes the float "
        "model the runs start from (the campaign's float ResNet-20 of that seed), the data order and the "
        f"sandwich rule's draws. Float models: {inits}.", "",
        "Cells: mean ± std over seeds (n); differences are taken seed by seed, then averaged. Weight "
        "bytes, BOPs and packed-runtime latency of the sub-nets (the same for every seed: the same "
        f"architecture and bits): the setup's single-run report, [`{SETUPS[p['setup']].stem}.md`]"
        f"({SETUPS[p['setup']].stem}.md).", "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], *(_ms(r[f"{v}_test"]) for v in variants), _ms(r["alone_test"]),
                 *(_ms(r[f"{v}_minus_alone"], signed=True) for v in variants)]
        if "des_minus_sandwich" in p["summary"]:
            cells.append(_ms(r.get("des_minus_sandwich"), signed=True))
        if beside:
            cells += [_ms(r.get(f"{v}_minus_beside"), signed=True) for v in [*variants, "alone"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    twin = p.get("full_width_alone_from")
    if twin and any(r.get("alone_test") for r in rows if r["name"].startswith("w1.0-")):
        lines.append(f"- Full width trained alone: `{twin}`'s runs alone of the same seeds (the bit-width "
                     "setup with this recipe; the same float models and data).")
    if beside:
        lines.append(f"- `{beside}` (its runs of the same seeds: the same float models, data order and "
                     f"draws) differs from `{p['setup']}` in this: " + "; ".join(p["beside_differs"]) + ".")
    for k, v in p["summary"].items():
        what = {"sandwich_minus_alone": "`sandwich` minus alone", "des_minus_alone": "`des` minus alone",
                "des_minus_sandwich": "`des` minus `sandwich` at equal epochs"}[k]
        over = "the sub-nets trained alone" if k.endswith("alone") else "every sub-net"
        lines.append(f"- {what}, test accuracy, each seed's mean over {over}: {_ms(v, signed=True)} pp.")
    if p.get("float_test"):
        lines.append(f"- The float models: {_ms(p['float_test'])}% test.")
    return "\n".join(lines) + "\n"


def plot_seeds(p: dict[str, Any], path: Path) -> None:
    """Test accuracy per sub-net: each variant's mean with its std as an error bar, every seed a dot."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows, cols = p["rows"], [*p["variants"], "alone"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    w = 0.8 / len(cols)
    for j, c in enumerate(cols):
        xs = [i + (j - (len(cols) - 1) / 2) * w for i in range(len(rows))]
        ms = [100 * r[f"{c}_test"]["mean"] if r[f"{c}_test"] else math.nan for r in rows]
        sd = [100 * r[f"{c}_test"]["std"] if r[f"{c}_test"] and r[f"{c}_test"]["n"] > 1 else 0.0
              for r in rows]
        ax.bar(xs, ms, w, yerr=sd, capsize=3, label=c, alpha=0.8)
        for i, r in enumerate(rows):
            run = f"alone-{r['name']}" if c == "alone" else c
            ys = [100 * x["runs"][run]["test"][r["name"]] for x in p["per_seed"].values()
                  if run in x["runs"] and r["name"] in x["runs"][run]["test"]]
            ax.plot([xs[i]] * len(ys), ys, "k.", ms=4)
    seen = [100 * r[f"{c}_test"]["mean"] for r in rows for c in cols if r[f"{c}_test"]]
    if seen:
        ax.set_ylim(max(0.0, min(seen) - 8), min(100.0, max(seen) + 3))
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"CIFAR-10 supernet ({p['setup']}), {p['epochs']} epochs from float, "
                 f"seeds {', '.join(map(str, p['seeds']))}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    save_png(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["train", "report", "seeds"],
                   help="seeds: the table over --seeds' runs (mean +- std), after train and report per seed")
    p.add_argument("which", nargs="*", default=[], help="train: sandwich, des, alone")
    p.add_argument("--setup", choices=sorted(SETUPS), default="tiny",
                   help="tiny: the x0.5 width+bits table (serve_resnet20); cifar: the trained bit-width "
                   "supernet from the float model (supernet_resnet20_cifar); cifar-wb: widths 0.5/1.0 x "
                   "bits from the float model (supernet_resnet20_cifar_wb); cifar-wbo: the same with the "
                   "float model's channels sorted by importance first (supernet_resnet20_cifar_wbo); "
                   "cifar-nu: uniform and per-stage widths at 4 bits, ordered (supernet_resnet20_cifar_nu)")
    p.add_argument("--epochs", type=int, help="default: tiny 2, cifar 3")
    p.add_argument("--subset", type=int, help="training images (tiny: the pool incl. --val, default 2500; "
                   "cifar: of the 45,000 left after the campaign's validation split, default 0 = all)")
    p.add_argument("--val", type=int, help="validation images (tiny: held out of the pool, default 500; "
                   "cifar: of the campaign's 5,000, default all)")
    p.add_argument("--test-n", type=int, help="random test images (10000: all; default tiny 1000, cifar all)")
    p.add_argument("--init", help="float checkpoint the supernet starts from (default: tiny none, cifar "
                   f"{FLOAT_INIT}); 'none' for random weights")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--work", help="run directories (default: tiny runs/serve_r20, cifar "
                   "runs/supernet_r20_cifar)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--seed", type=int, default=0,
                   help="the float model (campaign seed N), the data order and the sandwich draws; the "
                   "training images are the same for every seed. Seed N > 0 works in <work>-seedN")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds: the seeds to gather")
    p.add_argument("--beside", choices=sorted(SETUPS),
                   help="seeds: also this base setup's runs of the same seeds, subtracted seed by seed")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs")
    p.add_argument("--load-note", help="report: what ran beside the training runs (goes in the results)")
    p.add_argument("--latency-note", help="report: what ran beside the latency measurement (default: the "
                   "training runs' load)")
    a = p.parse_args(argv)
    setup = SETUPS[a.setup]
    if a.seed < 0:
        p.error(f"--seed must be >= 0, got {a.seed}")
    for k, v in {**setup.defaults, "work": setup.work}.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.smoke:
        a.subset, a.val, a.epochs, a.test_n, a.work = 256, 64, 1, 256, a.work + "_smoke"
    if a.phase == "seeds":
        if a.beside:
            try:
                differences_to(a.setup, a.beside)
            except ValueError as e:
                p.error(str(e))
        seeds_table(setup, a, argv, time.time())
        return 0
    a.work, a.init = seed_paths(a.work, a.init, a.seed)
    torch.set_num_threads(1)
    t0 = time.time()
    Path(a.work).mkdir(parents=True, exist_ok=True)
    if a.phase == "report":
        report(setup, a, argv, t0)
        return 0
    data = get_data(setup, a)
    names: list[str] = []
    for w in a.which:
        names += [f"alone-{n}" for n in setup.alone] if w == "alone" else [w]
    for n in names:
        r = train_one(setup, n, a, data)
        print(n, json.dumps({k: r[k] for k in ("val", "test")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
