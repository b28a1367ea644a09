"""The CIFAR-10 ResNet-20 claims campaign: each seed paper's claim re-measured where it was made.

    python benchmarks/cifar10/claims.py --budget cpu            # run or resume everything (CPU budget)
    python benchmarks/cifar10/claims.py --budget gpu            # the papers' schedules, --device cuda
    python benchmarks/cifar10/claims.py --budget cpu --only bcgd dcq --seeds 0
    python benchmarks/cifar10/claims.py --budget cpu --report-only   # tables from the run directories
    python benchmarks/cifar10/claims.py --budget gpu --unpack in.tar.gz --stop-after 500 \\
        --archive out.tar.gz                                      # one timed slice of a GPU session
    python benchmarks/cifar10/claims.py --plan                  # the jobs and their order, nothing run

:data:`CLAIMS` is the table of issue 12: one :class:`Claim` per row (the paper, its number, the
runs it needs, the checks that give verdicts). Every quantized run starts from the float
ResNet-20 of the same seed (``init="float"``) unless it says ``"scratch"``; paired claims
compare a *with* arm against a *without* arm seed by seed. :data:`BUDGETS` holds the schedules:

- ``cpu``: float ResNet-20 20 epochs (SGD, lr 0.1, momentum 0.9, weight decay 5e-4, cosine; 85.03
  ± 0.32% over 3 seeds in benchmarks/results/cifar10_claims.md), quantized fine-tunes 5 epochs
  (each recipe's optimizer) under bf16 autocast (faster per epoch on CPUs with AMX or AVX-512
  BF16; quantizers and their scales stay fp32), one thread per run, two runs side by side; 3 seeds
  for every row. The paired claims run first, claim by claim (BCGD with first/last float and with
  every layer binary, DCQ at W2 and W1, SinReQ at W3 / W4 / W5 with lambda 10 and 100 (chosen on
  validation), WPC, multipoint PTQ, WaveQ: one fine-tune that learns per-layer bits, then two, at
  the learned bits and at their weighted mean for every layer); the other rows run seed 0 before
  seeds 1 and 2. The ReLeQ search runs on seed 0 at a CPU size: 300 episodes, each measured once
  at its end (a 1-epoch bf16 fine-tune on 1,024 training images, read on 1,000 others; repeated
  assignments are cached; seed 0's 300 took 47 min with another run on the second core), then the
  assignment's 5-epoch fine-tune and the width-vs-mixed pair, trained from scratch for the float
  model's 20 epochs. The other arms of the paired claims are GPU budget only. The report's Plan
  section gives the CPU-hours at about 133 s per epoch on one idle core (:data:`REF_EPOCH_S`).
- ``gpu``: the papers' schedules: float 160 epochs (SGD, lr 0.1, weight decay 1e-4, lr / 10 at
  epochs 80 and 120, as He et al. 2016), quantized 160 epochs, 3 seeds for every row, six runs
  per GPU at once, ``--device cuda``.
- ``smoke``: 1 epoch on 512 training images, to check that every kind of run goes end to end.

Runs live under ``runs/cifar10-claims/<budget>/<run>/seed<k>`` (``lowbit train`` directories).
A finished run (``result.json``) is reused; an unfinished one resumes from its last epoch's
checkpoint, so a killed campaign resumes where it stopped. Results outlive their directories: a run
the previous report (``--out``'s JSON) holds but whose directory is not here is carried over with the
commit that measured it, and is not run again unless a job still to run starts from it (its float
model trains again); a search or WaveQ run is recorded with what its derived arms start from
(:func:`run_source`: the assignment, the learned bits), so those arms start from the record, and a
derived arm runs again when its source does. Every run records the float model it started from
(``init.json``: :func:`float_identity`); a float model trained again does not replace the float row's
record, which the recorded runs started from, and a run's drop is measured against its own float
model (:func:`float_acc`); ``--fresh`` ignores the record.
``--stop-after SECONDS`` stops the running jobs (they resume next time) and still writes the
tables and the archive. Data: the CIFAR-10 JPEG copy (``--data-dir``; close to, not identical
with, the original images).

Writes ``benchmarks/results/cifar10_claims.{md,json,png}``: per check the paper's number, ours
(mean ± std over seeds, n), the difference and a verdict (:func:`verdict`). The report reads every
budget's runs (GPU rows first, each row naming its budget and device), so CPU and GPU numbers are
never mixed in one cell.

A GPU session runs one timed slice on the device machine and brings the runs back::

    python benchmarks/cifar10/claims.py --budget gpu --data-dir DATA --unpack runs-in.tar.gz \
        --stop-after 480 --archive $OUT/runs.tar.gz --archive-slim --out $OUT

then, here, ``--budget gpu --unpack runs.tar.gz --report-only``. ``--archive-slim`` keeps what the
report and the next slice need (metrics, results, the float models, unfinished runs' checkpoints).
The data must reach the device too: the JPEG zip is 63.2 MB, close to the 64 MiB a device call
carries in all.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchmarks.common import run_meta, write_results  # noqa: E402

log = logging.getLogger("cifar10_claims")

RC = "recipes/cifar10"  # the campaign's own recipes (paths relative to the repository root)


# ----------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Arm:
    """One kind of run, trained (or quantized) once per seed under ``runs/.../<key>/seed<k>``.

    ``recipe``: a shipped recipe name, a path, or None (float); ``override`` is merged into it
    (dicts key by key, lists replaced). Strings ``{float}`` (the float run directory of the same
    seed and width) and ``{q_half}`` (half the budget's fine-tune epochs) are filled in at run time.
    ``kind``: ``train`` (lowbit.experiment.train_run), ``ptq`` (post-training, no training;
    ``ptq`` options: ``method`` rtn | multipoint, ``bits``, ``budget``) or ``releq`` (the search,
    see :func:`releq_search`). ``after``: arms of the same seed whose runs must finish first;
    ``derive`` builds the recipe (and width) from the first of them (:func:`derived_recipe`):
    ``releq`` (its assignment), ``waveq-learned`` / ``waveq-fixed`` (the learned bits / their
    weighted mean), ``width-wide`` (2-bit weights on the widest ResNet-20 within the assignment's
    weight bits). ``epochs``: ``float`` trains with the float model's epoch count."""

    key: str
    recipe: str | None = None
    override: Mapping[str, Any] = field(default_factory=dict)
    init: str = "float"  # "float" (same seed, same width) or "scratch"
    width: float = 1.0
    kind: str = "train"
    ptq: Mapping[str, Any] = field(default_factory=dict)
    after: tuple[str, ...] = ()
    derive: str | None = None
    epochs: str = "q"  # "q" (the budget's fine-tune epochs) or "float"

    @property
    def is_float(self) -> bool:
        return self.recipe is None and not self.override and self.kind == "train" and self.derive is None


@dataclass(frozen=True)
class Check:
    """One verdict. ``rule``: ``level`` (our accuracy against the paper's, %), ``drop`` (float minus
    arm, pp, against the paper's drop), ``gain`` (arm ``a`` minus arm ``b``, pp, seed by seed; the
    paper claims it is positive), ``measure`` (no verdict: ours beside the paper's number, if any).
    ``metric``: what a ``measure`` reads of the run (``test_acc`` -> its drop vs float, or a number
    the run logged, e.g. ``avg_w_bits``). ``choose``: candidates for ``arms[0]`` (a hyper-parameter
    sweep); the one with the best mean validation accuracy is used (the test set never chooses)."""

    label: str
    rule: str
    arms: tuple[str, ...]
    paper: float | None
    paper_text: str
    metric: str = "test_acc"
    choose: tuple[str, ...] = ()
    needs: str | None = None  # a run metric of arms[0] that must be above 0 (the claim's sparsity)


@dataclass(frozen=True)
class Claim:
    name: str
    row: str  # the row
    citation: str
    arms: tuple[Arm, ...]
    checks: tuple[Check, ...]
    paired: bool = False  # with vs without: 3 seeds even on the CPU budget
    search: str | None = None  # needs a search (releq): the budget's search seeds only
    departs: str = ""


def _ar(key: str, recipe: str | None, **kw: Any) -> Arm:
    return Arm(key, recipe, **kw)


FLOAT = _ar("float", None, init="scratch")
FLOAT_W2 = _ar("float-w2", None, init="scratch", width=2.0)
SINREQ_LAMBDAS = (10.0, 100.0, 1000.0)  # chosen per row on validation accuracy


def _sinreq(lam: float, grid: str) -> dict[str, Any]:
    return {"methods": [{"name": "sinreq", "weight": lam, "grid": grid}]}


def _sinreq_arms(method: str, bits: int, grid: str, width: float) -> tuple[Arm, ...]:
    rec = f"{RC}/{method}-w{bits}.yaml"
    return (_ar(f"{method}-w{bits}", rec, width=width),
            *(_ar(f"{method}-w{bits}-sinreq-l{lam:g}", rec, width=width, override=_sinreq(lam, grid))
              for lam in SINREQ_LAMBDAS))


def _sinreq_check(method: str, bits: int, paper: float, name: str) -> Check:
    wide = " (2x wide)" if method == "wrpn" else ""
    return Check(f"{name} W{bits}{wide}: with minus without SinReQ", "gain",
                 (f"{method}-w{bits}-sinreq-l{SINREQ_LAMBDAS[1]:g}", f"{method}-w{bits}"), paper,
                 f"+{paper} over {name}",
                 choose=tuple(f"{method}-w{bits}-sinreq-l{lam:g}" for lam in SINREQ_LAMBDAS))


_WAVEQ = {"default": {"weight": None}, "rules": [],
          "methods": [{"name": "waveq", "weight": 1000.0, "beta_weight": 100.0, "init_bits": 4.0,
                       "min_bits": 2, "max_bits": 8, "grid": "max", "layers": "{middle}"}],
          "train": {"optimizer": "adam", "lr": 1.0e-3, "schedule": "cosine", "weight_decay": 0.0}}
# the sine weight rising over the first half of the fine-tune, beta at its own rate, a lighter bit charge:
# the bits move before the weights reach the grid (benchmarks/results/probe_waveq.md, setting `ramp`)
_WAVEQ_RAMP = {**_WAVEQ, "methods": [{**_WAVEQ["methods"][0], "beta_weight": 20.0, "beta_lr": 0.02,
                                      "ramp": 0.5}]}
_DCQ = {"methods": [{"name": "dcq", "teacher": "{float}", "dcq_epochs": "{q_half}"}]}
_RVSM = {p: {"methods": [{"name": "rvsm", "penalty": p, "lam": 1.0e-3, "beta": 1.0}]}
         for p in ("l1", "l0", "tl1")}
_RHO0 = {"methods": [{"name": "bcgd", "rho": 0.0}]}
# PACT's clip at its own learning rate (alpha_lr), the rest of the W2A2 / W4A4 recipe unchanged
def _pact_alr(bits: int) -> dict[str, Any]:
    act = {"method": "pact", "bits": bits, "alpha_init": 10.0, "alpha_lr": 1.0e-2}
    return {"default": {"activation": act}}


CLAIMS: tuple[Claim, ...] = (
    Claim("float", "float baseline", "He et al. 2016 (91.25); TTQ's baseline 91.77 (Zhu et al. 2017)",
          (FLOAT,), (Check("ResNet-20 float test accuracy", "level", ("float",), 91.7, "≈ 91.7%"),)),
    Claim("bcgd", "BCGD", "Yin et al. 2019, blended coarse gradient descent",
          (_ar("bcgd-fl", f"{RC}/bcgd-w1a4-fl.yaml"),
           _ar("bcgd-fl-rho0", f"{RC}/bcgd-w1a4-fl.yaml", override=_RHO0),
           _ar("bcgd-all", f"{RC}/bcgd-w1a4-all.yaml"),
           _ar("bcgd-all-rho0", f"{RC}/bcgd-w1a4-all.yaml", override=_RHO0)),
          (Check("W1A4, first/last float: rho 1e-5 minus rho 0", "gain", ("bcgd-fl", "bcgd-fl-rho0"), None,
                 "blending helps at 1 bit"),
           Check("W1A4, every layer: rho 1e-5 minus rho 0", "gain", ("bcgd-all", "bcgd-all-rho0"), None,
                 "blending helps at 1 bit")),
          paired=True,
          departs="Adam fine-tune from the float model (the paper trains with its own SGD schedule)"),
    Claim("dcq", "DCQ", "Elthakeb et al. 2020 (ICML), divide-and-conquer quantization",
          tuple(a for b in (2, 1) for a in (
              _ar(f"dorefa-w{b}", f"{RC}/dorefa-w{b}.yaml"),
              _ar(f"dorefa-w{b}-dcq", f"{RC}/dorefa-w{b}.yaml", override=_DCQ))),
          tuple(Check(f"DoReFa W{b}: with minus without DCQ", "gain", (f"dorefa-w{b}-dcq", f"dorefa-w{b}"),
                      9.7, "up to +9.7") for b in (2, 1)),
          paired=True, departs="sections = stem, the three stages, head; sectioned loss for half the epochs, "
          "then whole-model KD"),
    Claim("sinreq", "SinReQ", "Elthakeb et al. 2019 (arXiv 1905.01416)",
          tuple(a for b in (4, 3, 5) for a in _sinreq_arms("dorefa", b, "dorefa", 1.0))
          + tuple(a for b in (4, 3, 5) for a in _sinreq_arms("wrpn", b, "quantizer", 2.0)),
          tuple(_sinreq_check("dorefa", b, 2.82, "DoReFa") for b in (4, 3, 5))
          + tuple(_sinreq_check("wrpn", b, 2.11, "WRPN") for b in (4, 3, 5)),
          paired=True, departs="lambda (mean over a layer's weights) chosen on validation accuracy from "
          "10/100/1000; float activations; WRPN on "
          "the 2x ResNet-20 from its own float model"),
    Claim("ternary", "TTQ, TWN, statistical ternary (+ residual expansion), TGA, LBW ternary and 4-bit",
          "Zhu et al. 2017 (TTQ); Li et al. 2016 (TWN); He, Gong & Fan 2019; He & Fan 2019 (TGA); "
          "Yin et al. 2019 (LBW)",
          (_ar("ttq", "ttq-w2"), _ar("twn", "twn-w2"), _ar("ternary-stat", "ternary-stat-w2"),
           _ar("ternary-stat-tex2", "ternary-stat-tex2-w2"), _ar("tga", "tga-w2"), _ar("lbw-w2", "lbw-w2"),
           _ar("lbw-w4", "lbw-w4")),
          (Check("TTQ drop vs float", "drop", ("ttq",), 0.64, "91.77 -> 91.13 (drop 0.64)"),
           Check("TGA minus TWN", "gain", ("tga", "twn"), None, "TGA's drop below TWN's"),
           Check("TGA minus TTQ", "gain", ("tga", "ttq"), None, "TGA's drop below TTQ's"),
           Check("statistical ternary: residual expansion minus plain", "gain",
                 ("ternary-stat-tex2", "ternary-stat"), None, "expansion helps"),
           Check("TWN drop vs float", "measure", ("twn",), None, "-"),
           Check("LBW ternary drop vs float", "measure", ("lbw-w2",), None, "-"),
           Check("LBW 4-bit drop vs float", "measure", ("lbw-w4",), None, "-")),
          departs="weights only (float activations), first and last layer float; Adam fine-tune from float"),
    Claim("waveq", "WaveQ / SINAREQ", "Elthakeb et al. 2020 (arXiv 2003.00146)",
          (_ar("waveq", None, override=_WAVEQ, kind="waveq"),
           _ar("waveq-learned", None, after=("waveq",), derive="waveq-learned"),
           _ar("waveq-fixed", None, after=("waveq",), derive="waveq-fixed"),
           _ar("waveq-ramp", None, override=_WAVEQ_RAMP, kind="waveq"),
           _ar("waveq-ramp-learned", None, after=("waveq-ramp",), derive="waveq-learned"),
           _ar("waveq-ramp-fixed", None, after=("waveq-ramp",), derive="waveq-fixed")),
          (Check("learned bits minus fixed bits at equal average bits", "gain",
                 ("waveq-learned", "waveq-fixed"), None, "its reported gain"),
           Check("learned average weight bits", "measure", ("waveq",), None, "-", metric="avg_w_bits"),
           Check("sine weight ramped: learned bits minus fixed bits at their rounded mean", "gain",
                 ("waveq-ramp-learned", "waveq-ramp-fixed"), None, "its reported gain"),
           Check("sine weight ramped: learned average weight bits", "measure", ("waveq-ramp",), None, "-",
                 metric="avg_w_bits")),
          paired=True, departs="bits learned during a float fine-tune (grid max|w|, lambda 1000, "
          "beta weight 100, not tuned), then a uniform per-channel fine-tune at those bits; range not "
          "learned; waveq-ramp: lambda rising from 0 over the first half, beta weight 20, beta's own "
          "rate 0.02"),
    Claim("releq", "ReLeQ", "Elthakeb et al. 2018/2020 (arXiv 1811.01704)",
          (_ar("releq", None, kind="releq"), _ar("releq-ft", None, after=("releq",), derive="releq")),
          (Check("the searched assignment, fine-tuned: drop vs float", "drop", ("releq-ft",), 0.3,
                 "<= 0.3 pt loss"),
           Check("average weight bits of the assignment", "measure", ("releq",), 5.0, "≈ 5 bits (CIFAR-10)",
                 metric="avg_w_bits"),
           Check("average activation bits of the assignment", "measure", ("releq",), None, "-",
                 metric="avg_a_bits")),
          search="releq", departs="searches (weight, activation) bit pairs of every layer but the first and "
          "last (so the search is not a corner case); proxy: 1-epoch fine-tunes on a training subset; "
          "CPU budget: each episode measured once, at its end (not after every layer), 300 episodes"),
    Claim("width", "width multiplier vs mixed precision", "Mishra et al. 2018 (WRPN) vs ReLeQ's assignment",
          (_ar("releq", None, kind="releq"),
           _ar("width-mixed", None, init="scratch", after=("releq",), derive="releq", epochs="float"),
           _ar("width-wide", None, init="scratch", after=("releq",), derive="width-wide", epochs="float")),
          (Check("2-bit + wider minus ReLeQ's mixed assignment, equal weight bytes", "gain",
                 ("width-wide", "width-mixed"), None, "single bit-width + width wins"),),
          search="releq", departs="both trained from scratch for the float schedule (no float model of "
          "the wide width exists); activations at the assignment's mean activation bits"),
    Claim("baselines", "PACT, LSQ, DoReFa baselines", "Choi et al. 2018; Esser et al. 2020; Zhou et al. 2016",
          (_ar("pact-w2a2", f"{RC}/pact-w2a2.yaml"), _ar("pact-w4a4", "pact-w4a4"),
           _ar("pact-w2a2-alr", f"{RC}/pact-w2a2.yaml", override=_pact_alr(2)),
           _ar("pact-w4a4-alr", "pact-w4a4", override=_pact_alr(4)),
           _ar("lsq-w2a2", "lsq-w2a2"), _ar("lsq-w4a4", "lsq-w4a4"),
           _ar("dorefa-w2a2", f"{RC}/dorefa-w2a2.yaml"),
           _ar("dorefa-w4a4", f"{RC}/dorefa-w4a4.yaml")),
          (Check("PACT W2A2", "level", ("pact-w2a2",), 88.9, "88.9"),
           Check("PACT W4A4", "level", ("pact-w4a4",), 90.8, "90.8"),
           Check("PACT W2A2, the clip at its own rate (alpha_lr 1e-2)", "level", ("pact-w2a2-alr",), 88.9,
                 "88.9"),
           Check("PACT W2A2: the clip at its own rate minus at the model's", "gain",
                 ("pact-w2a2-alr", "pact-w2a2"), None, "a learned clip beats a fixed one"),
           Check("PACT W4A4, the clip at its own rate (alpha_lr 1e-2)", "level", ("pact-w4a4-alr",), 90.8,
                 "90.8"),
           Check("PACT W4A4: the clip at its own rate minus at the model's", "gain",
                 ("pact-w4a4-alr", "pact-w4a4"), None, "a learned clip beats a fixed one"),
           Check("LSQ W2A2", "measure", ("lsq-w2a2",), None, "-"),
           Check("LSQ W4A4", "measure", ("lsq-w4a4",), None, "-"),
           Check("DoReFa W2A2", "measure", ("dorefa-w2a2",), None, "-"),
           Check("DoReFa W4A4", "measure", ("dorefa-w4a4",), None, "-")),
          departs="Adam fine-tune from the float model, first and last layer float; PACT's clip starts "
          "at 10 as in the paper and, at the model's Adam rate 1e-3, moves at most ~1e-3 per step (the "
          "paper: the weights' SGD rate); the -alr arms give it its own rate, 1e-2"),
    Claim("multipoint", "multipoint PTQ", "Liu et al. 2020 (arXiv 2002.09049)",
          tuple(a for b in (3, 4) for a in (
              _ar(f"ptq-rtn-w{b}", None, kind="ptq", ptq={"method": "rtn", "bits": b}),
              _ar(f"ptq-mp-w{b}", None, kind="ptq", ptq={"method": "multipoint", "bits": b, "budget": 1.0}),
              _ar(f"ptq-mp-w{b}-b1.25", None, kind="ptq",
                  ptq={"method": "multipoint", "bits": b, "budget": 1.25}))),
          tuple(Check(f"W{b}: multipoint minus round-to-nearest, equal bits", "gain",
                      (f"ptq-mp-w{b}", f"ptq-rtn-w{b}"), None, "beats RTN") for b in (3, 4))
          + tuple(Check(f"W{b}: multipoint 1.25 points/channel (more weight bytes) minus RTN", "gain",
                        (f"ptq-mp-w{b}-b1.25", f"ptq-rtn-w{b}"), None, "beats RTN") for b in (3, 4))
          # the extra points go to the channels with the largest output error, which sit in the
          # large layers: 1.25 points per channel can cost more bytes than RTN one bit wider
          + (Check("W3 multipoint 1.25 points/channel minus RTN W4 (compare their weight bytes)", "gain",
                   ("ptq-mp-w3-b1.25", "ptq-rtn-w4"), None, "beats RTN at equal memory"),),
          paired=True, departs="512 calibration images from the training split; first/last layer and "
          "activations float"),
    Claim("rvsm", "RVSM", "Dinh & Xin 2020 (arXiv 1901.09731)",
          (_ar("rvsm-none", f"{RC}/rvsm-a1.yaml"),
           *(_ar(f"rvsm-{p}", f"{RC}/rvsm-a1.yaml", override=_RVSM[p]) for p in ("l1", "l0", "tl1"))),
          tuple(Check(f"{p.upper()}: dense minus sparse (binarized activations)", "loss",
                      (f"rvsm-{p}", "rvsm-none"), None, "sparsity at little loss (read: <= 1 pp)",
                      needs="sparsity")
                for p in ("l1", "l0", "tl1")),
          departs="lambda 1e-3, beta 1 (not tuned); float weights, 1-bit activations on every layer but the "
          "first"),
    Claim("wpc", "WPC", "He, Fan et al. 2020 (AAAI), PE-wise structured pruning + ternarization",
          (_ar("twn-gl", f"{RC}/twn-gl.yaml",
               override={"methods": [{"name": "wpc", "lam": 1.0e-4, "group": "pe", "pe_in": 4,
                                      "wpc": False}]}),
           _ar("twn-gl-wpc", f"{RC}/twn-gl.yaml")),
          (Check("ternary + group lasso: with minus without WPC", "gain", ("twn-gl-wpc", "twn-gl"), None,
                 "structured sparsity at small loss", needs="small_groups"),),
          paired=True, departs="group lasso lambda 1e-4 on PE groups of 4 input channels (not tuned)"),
)

#: the order the paired claims run in (the rest follow in table order): the post-training claim
#: first (minutes per seed), then the fine-tunes, each claim's seeds together so that its verdict
#: is complete before the next claim starts
PRIORITY = ("float", "multipoint", "bcgd", "dcq", "sinreq", "wpc", "waveq")
#: the arms the CPU budget runs of a claim (others: GPU budget only); a missing claim: every arm
CPU_ARMS: dict[str, tuple[str, ...]] = {
    "bcgd": ("bcgd-fl", "bcgd-fl-rho0", "bcgd-all", "bcgd-all-rho0"),
    "dcq": ("dorefa-w2", "dorefa-w2-dcq", "dorefa-w1", "dorefa-w1-dcq"),  # W1: the paper's largest gain
    "sinreq": ("dorefa-w4", "dorefa-w4-sinreq-l100", "dorefa-w3", "dorefa-w3-sinreq-l100", "dorefa-w5",
               "dorefa-w5-sinreq-l100", "dorefa-w4-sinreq-l10", "dorefa-w3-sinreq-l10",
               "dorefa-w5-sinreq-l10", "dorefa-w4-sinreq-l1000", "dorefa-w3-sinreq-l1000",
               "dorefa-w5-sinreq-l1000"),
}
#: one arm per code path (overrides, placeholders, the 2x float, both PTQ methods, RVSM, WPC)
SMOKE_ARMS: dict[str, tuple[str, ...]] = {
    "bcgd": ("bcgd-fl-rho0",), "dcq": ("dorefa-w2-dcq",),
    "sinreq": ("dorefa-w4-sinreq-l100", "wrpn-w4-sinreq-l100"),
    "ternary": ("tga",), "baselines": ("pact-w2a2",), "multipoint": ("ptq-rtn-w3", "ptq-mp-w3-b1.25"),
    "rvsm": ("rvsm-tl1",), "wpc": ("twn-gl-wpc",),
}


@dataclass(frozen=True)
class Budget:
    name: str
    device: str
    float_train: Mapping[str, Any]
    q_epochs: int
    paired_seeds: tuple[int, ...]
    other_seeds: tuple[int, ...]
    jobs: int
    threads: int
    arms: Mapping[str, tuple[str, ...]] | None = None  # per claim, the arms run (None: all)
    train_subset: int | None = None
    val_size: int | str = "auto"
    #: the ReLeQ search: episodes, proxy / val images, step_rewards (a measurement per layer, or one
    #: per episode), precision of its 1-epoch fine-tunes
    releq: Mapping[str, Any] = field(default_factory=lambda: {"episodes": 100, "proxy": 4096, "val": 2000})
    search_seeds: tuple[int, ...] | None = None  # seeds of the claims that need a search (None: others')
    note: str = ""
    q_train: Mapping[str, Any] = field(default_factory=dict)  # extra train options of quantized runs


_SGD = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "tensorboard": False}
BUDGETS: dict[str, Budget] = {
    "cpu": Budget("cpu", "cpu", {**_SGD, "epochs": 20, "weight_decay": 5e-4, "schedule": "cosine"}, 5,
                  (0, 1, 2), (0, 1, 2), jobs=2, threads=1, arms=CPU_ARMS,
                  q_train={"precision": "bf16"}, search_seeds=(0,),
                  releq={"episodes": 300, "proxy": 1024, "val": 1000, "step_rewards": False,
                         "precision": "bf16"},
                  note="float 20 epochs (fp32), quantized fine-tunes 5 epochs (bf16 autocast, quantizers "
                       "in fp32), one thread per run, two runs side by side; 3 seeds for the paired claims "
                       "(their CPU arms) and for the other rows; the ReLeQ search (300 episodes, each "
                       "measured once: a 1-epoch fine-tune on 1,024 images read on 1,000 others) and the "
                       "runs built on it on seed 0 only"),
    "gpu": Budget("gpu", "cuda", {**_SGD, "epochs": 160, "weight_decay": 1e-4, "schedule": "step",
                                  "milestones": [80, 120], "channels_last": True}, 160, (0, 1, 2), (0, 1, 2),
                  jobs=6, threads=2, q_train={"channels_last": True},
                  note="the papers' schedules: float 160 epochs (step at 80/120), quantized 160 epochs; "
                       "3 seeds per row; six runs per GPU at once"),
    "smoke": Budget("smoke", "cpu", {**_SGD, "epochs": 1, "weight_decay": 5e-4, "schedule": "cosine"}, 1,
                    (0,), (0,), jobs=1, threads=1, arms=SMOKE_ARMS, train_subset=512,
                    val_size=128,
                    releq={"episodes": 1, "proxy": 128, "val": 128},
                    note="pipeline check: 1 epoch on 512 training images (numbers mean nothing)"),
}


# ----------------------------------------------------------------------------------- the jobs
@dataclass(frozen=True)
class Job:
    claim: str
    arm: Arm
    seed: int
    order: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.arm.key}/seed{self.seed}"


def claim_by_name(name: str) -> Claim:
    for c in CLAIMS:
        if c.name == name:
            return c
    raise KeyError(f"unknown claim {name!r}; allowed: {[c.name for c in CLAIMS]}")


def float_arm(width: float) -> Arm:
    return FLOAT if width == 1.0 else FLOAT_W2


def budget_arms(claim: Claim, budget: Budget) -> tuple[Arm, ...]:
    """The arms of ``claim`` that ``budget`` runs."""
    wanted = (budget.arms or {}).get(claim.name)
    return tuple(a for a in claim.arms if wanted is None or a.key in wanted)


def seeds_for(claim: Claim, budget: Budget) -> tuple[int, ...]:
    if claim.search and budget.search_seeds is not None:
        return budget.search_seeds
    return budget.paired_seeds if claim.paired or claim.name == "float" else budget.other_seeds


def plan(budget: Budget, only: Sequence[str] | None = None, seeds: Sequence[int] | None = None) -> list[Job]:
    """Every job of the campaign, in the order they start: the float models first (seed 0 first),
    then the paired claims in :data:`PRIORITY` order, claim by claim (all seeds of one claim
    before the next), then the rest seed by seed (every row's seed 0, then seed 1, then seed 2).
    A job whose float model is still training is skipped until it is done (:func:`run_campaign`),
    so the next claim's seed-0 runs fill the gap."""
    jobs: dict[str, Job] = {}
    rank = {n: i for i, n in enumerate(PRIORITY)}
    for ci, claim in enumerate(CLAIMS):
        if only and claim.name not in only and claim.name != "float":
            continue
        arms = budget_arms(claim, budget)
        for seed in seeds_for(claim, budget):
            if seeds is not None and seed not in seeds:
                continue
            for ai, arm in enumerate(arms):
                tier = 0 if arm.is_float else (1 if claim.name in rank else 2)
                order = (tier, seed if tier != 1 else 0, rank.get(claim.name, len(rank) + ci), seed, ai)
                if arm.init == "float" or arm.after:  # its float model runs whenever it does (shared)
                    dep = Job("float", float_arm(arm.width), seed, (0, seed, 0, seed, int(arm.width != 1)))
                    jobs.setdefault(dep.name, dep)
                jobs.setdefault(f"{arm.key}/seed{seed}", Job(claim.name, arm, seed, order))
    return sorted(jobs.values(), key=lambda j: j.order)


def deps(job: Job) -> list[str]:
    """The jobs (same seed) that must finish before ``job`` starts."""
    scratch = job.arm.is_float or job.arm.init == "scratch"
    out = [] if scratch else [f"{float_arm(job.arm.width).key}/seed{job.seed}"]
    return out + [f"{k}/seed{job.seed}" for k in job.arm.after]


def source_name(job: Job) -> str | None:
    """The run a derived arm builds its recipe from (``<run>/seed<k>``), None for the others."""
    return f"{job.arm.after[0]}/seed{job.seed}" if job.arm.derive else None


def run_dir(runs: Path, job: Job) -> Path:
    return runs / job.arm.key / f"seed{job.seed}"


def is_finished(path: Path) -> bool:
    return (path / "result.json").exists()


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _fill(obj: Any, ctx: Mapping[str, Any]) -> Any:
    if isinstance(obj, str) and obj in ctx:
        return ctx[obj]
    if isinstance(obj, Mapping):
        return {k: _fill(v, ctx) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_fill(v, ctx) for v in obj]
    return obj


def resolve_recipe(arm: Arm, ctx: Mapping[str, Any]) -> dict[str, Any] | None:
    """The arm's recipe as a dict, override merged and placeholders filled."""
    if arm.recipe is None and not arm.override:
        return None
    from lowbit.recipe import load_recipe

    base: dict[str, Any] = {}
    if arm.recipe is not None:
        base = load_recipe(str(ROOT / arm.recipe) if arm.recipe.startswith(RC) else arm.recipe).to_dict()
    return _fill(deep_merge(base, arm.override), ctx)


WQ = {"method": "uniform", "scale": "mse", "per_channel": True}  # the searches' weight quantizer
AQ = {"method": "pact", "alpha_init": 10.0}  # ... and activation quantizer
BITS = (2, 3, 4, 5, 6)  # ReLeQ's actions, for weights and activations
ADAM = {"optimizer": "adam", "lr": 1.0e-3, "schedule": "cosine", "weight_decay": 0.0}


def layer_sizes(width: float = 1.0) -> dict[str, int]:
    """Weight count of every quantizable layer of ResNet-20, in order."""
    from lowbit.models import build_model
    from lowbit.nn.quantize import quantizable_layers

    layers = quantizable_layers(build_model("resnet20", width_mult=width))
    return {n: m.weight.numel() for n, m in layers.items()}


def run_source(path: Path) -> dict[str, Any] | None:
    """What a derived arm needs of the finished run ``path`` (:func:`derived_recipe`), as plain
    data that the report records, so that a run's derived arms can still start once its directory
    is gone: a search's assignment and weight bits, or the bits WaveQ learned. None: nothing."""
    import yaml

    got: dict[str, Any] = {}
    if (path / "releq.json").exists():  # a search (its recipe.yaml is the best assignment)
        rel = json.loads((path / "releq.json").read_text())
        got.update({k: rel[k] for k in ("weight_bits_total", "avg_a_bits") if k in rel})
        if (path / "recipe.yaml").exists():
            got["recipe"] = yaml.safe_load((path / "recipe.yaml").read_text())
    if (path / "waveq_bits.json").exists():
        got["bits"] = json.loads((path / "waveq_bits.json").read_text())["bits"]
    return got or None


def derived_recipe(derive: str, src: Path,
                   source: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], float]:
    """(recipe, width) of an arm built from the finished run ``src`` (see :class:`Arm`), read from
    its directory or, where that is gone, from its recorded ``source`` (:func:`run_source`)."""
    got = run_source(src) if is_finished(src) else None
    got = got or dict(source or {})
    need = {"releq": "recipe", "waveq-learned": "bits", "waveq-fixed": "bits",
            "width-wide": "weight_bits_total"}
    if derive not in need:
        raise ValueError(f"unknown derive {derive!r}; allowed: {', '.join(need)}")
    if need[derive] not in got:
        raise FileNotFoundError(f"{src}: {derive!r} builds its recipe from this run, which is neither "
                                f"here nor recorded with its {need[derive]!r}; run it again (drop it from "
                                "the report, or pass --fresh)")
    if derive == "releq":
        return dict(got["recipe"]), 1.0
    if derive in ("waveq-learned", "waveq-fixed"):
        bits = got["bits"]
        if derive == "waveq-fixed":
            sizes = layer_sizes()
            mean = sum(sizes[n] * b for n, b in bits.items()) / sum(sizes[n] for n in bits)
            bits = dict.fromkeys(bits, round(mean))
        rules = [{"match": n, "weight": {**WQ, "bits": b}} for n, b in bits.items()]
        return {"name": derive, "default": {"weight": None}, "rules": rules, "train": ADAM}, 1.0
    from lowbit.models import build_model  # width-wide
    from lowbit.search import width_for_budget

    width, _ = width_for_budget(lambda m: build_model("resnet20", width_mult=m), 2,
                                got["weight_bits_total"], steps=20)
    recipe = {"name": "width-wide", "default": {"weight": {**WQ, "bits": 2},
                                                "activation": {**AQ, "bits": round(got["avg_a_bits"])}},
              "rules": [{"match": "@first", "weight": None, "activation": None},
                        {"match": "@last", "weight": None}], "train": ADAM}
    return recipe, width


def job_spec(job: Job, budget: Budget, runs: Path, data_dir: str, device: str,
             source: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything the worker needs (plain data: it crosses a process boundary). ``source``: the
    recorded :func:`run_source` of a derived arm's run, used where its directory is gone."""
    out = run_dir(runs, job)
    fdir = runs / float_arm(job.arm.width).key / f"seed{job.seed}"
    ctx = {"{float}": str(fdir), "{q_half}": max(1, budget.q_epochs // 2),
           "{middle}": list(layer_sizes())[1:-1]}
    width = job.arm.width
    if job.arm.derive:
        recipe, width = derived_recipe(job.arm.derive, runs / job.arm.after[0] / f"seed{job.seed}", source)
    else:
        recipe = resolve_recipe(job.arm, ctx)
    float_epochs = job.arm.is_float or job.arm.epochs == "float"
    train = dict(budget.float_train) if job.arm.is_float else {
        "epochs": budget.float_train["epochs"] if float_epochs else budget.q_epochs, "tensorboard": False,
        **budget.q_train}
    train["seed"] = job.seed
    spec = {"model": "resnet20", "model_kwargs": {"width_mult": width} if width != 1.0 else {},
            "dataset": "cifar10", "data_dir": data_dir, "recipe": recipe,
            "init": str(fdir / "best.safetensors") if job.arm.init == "float" else None, "out": str(out),
            "train": train, "train_subset": budget.train_subset, "val_size": budget.val_size,
            "device": device}
    starts = job.arm.init == "float" or job.arm.kind in ("ptq", "releq")
    return {"kind": job.arm.kind, "spec": spec, "ptq": dict(job.arm.ptq), "threads": budget.threads,
            "float_dir": str(fdir), "search": dict(budget.releq),
            "init_from": float_identity(fdir) if starts and not job.arm.is_float else None}


def float_identity(fdir: Path) -> dict[str, Any] | None:
    """Which float model a run starts from (``init.json`` in its directory): the float run, the first
    16 hex digits of the SHA-256 of its ``best.safetensors`` and its accuracies (%), so that a report
    compares a run with the float model it really started from, should that seed's float model be
    trained again later (a fresh machine). None where that model is not there."""
    best = fdir / "best.safetensors"
    if not best.exists() or not is_finished(fdir):
        return None
    res = json.loads((fdir / "result.json").read_text())
    return {"run": f"{fdir.parent.name}/{fdir.name}", "sha256": file_sha(best),
            "test_acc": 100 * res["test_acc"],
            "val_acc": None if res.get("best_acc") is None else 100 * res["best_acc"]}


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------- workers
def work(payload: dict[str, Any]) -> None:
    """Run one job in this (child) process; its log goes to ``<run>/campaign.log``."""
    import torch

    out = Path(payload["spec"]["out"])
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=out / "campaign.log", level=logging.INFO,
                        format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(payload["threads"])
    init = out / "init.json"
    if payload.get("init_from") and not init.exists():  # a resumed run keeps what it started from
        from lowbit.train import atomic_write_text

        atomic_write_text(init, json.dumps(payload["init_from"], indent=1))
    if payload["kind"] == "ptq":
        ptq_run(payload)
        return
    if payload["kind"] == "releq":
        releq_search(payload)
        return
    from lowbit.experiment import RunSpec, train_run

    train_run(RunSpec(**payload["spec"]), resume=True)


def ptq_run(payload: dict[str, Any]) -> dict[str, Any]:
    """Round-to-nearest (``uniform``, max scale per channel) or multipoint PTQ of the float run:
    no training; the test set read once. Writes ``result.json`` like a training run."""
    import torch

    from lowbit.experiment import load_run
    from lowbit.nn.quantize import quantize
    from lowbit.ptq import calibration_batches, multipoint_ptq
    from lowbit.train import atomic_write_text, evaluate

    t0 = time.perf_counter()
    spec, opt = payload["spec"], payload["ptq"]
    out = Path(spec["out"])
    device = "cuda" if spec["device"] == "cuda" and torch.cuda.is_available() else "cpu"
    model, data, _ = load_run(Path(payload["float_dir"]) / "best.safetensors", device)
    model.eval()
    if opt["method"] == "rtn":
        rtn = {"method": "uniform", "bits": opt["bits"], "per_channel": True}
        quantize(model, {"default": {"weight": rtn},
                         "rules": [{"match": ["@first", "@last"], "weight": None}]})
    else:
        calib = [b.to(device) for b in calibration_batches(data.train, 512)]
        multipoint_ptq(model, calib, bits=opt["bits"], budget=opt["budget"])
    val = evaluate(model, data.val, device) if data.val is not None else None
    test = evaluate(model, data.test, device)
    size = weight_size(model, tuple(data.in_shape))
    result = {"run_dir": str(out), "test_acc": test["acc"], "test_loss": test["loss"],
              "best_acc": val["acc"] if val else None, "epochs": 0, "wall_time_s": time.perf_counter() - t0,
              "size": size, "device": device, "selected_on": "no training", "ptq": opt}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps({"spec": spec, "ptq": opt}, indent=1))
    atomic_write_text(out / "result.json", json.dumps(result, indent=1))
    return result


def releq_search(payload: dict[str, Any]) -> dict[str, Any]:
    """ReLeQ (lowbit.search.releq) over (weight bits, activation bits) pairs of every layer of the
    float run but the first and last. Measurement: a 1-epoch fine-tune on ``proxy`` training images,
    read on ``val`` other training images (never the test set); its cache makes a killed search
    resume. Writes ``recipe.yaml`` (the best assignment), ``releq.json`` and ``result.json``."""
    import copy

    import torch
    import yaml

    from lowbit.experiment import load_run
    from lowbit.nn.quantize import quantizable_layers
    from lowbit.search import FineTuneEvaluator, ReLeQ
    from lowbit.train import TrainConfig, Trainer, atomic_write_text

    t0 = time.perf_counter()
    spec, opt = payload["spec"], payload["search"]
    out, seed = Path(spec["out"]), spec["train"]["seed"]
    device = "cuda" if str(spec["device"]).startswith("cuda") and torch.cuda.is_available() else "cpu"
    model, data, _ = load_run(Path(payload["float_dir"]) / "best.safetensors", device)
    held, rest = data.train.split(opt["val"], seed=seed)
    proxy = rest.subset(opt["proxy"], seed=seed)
    cfg = TrainConfig(epochs=1, optimizer="adam", lr=1e-3, schedule="constant", seed=seed, tensorboard=False,
                      precision=opt.get("precision", "fp32"))
    layers = quantizable_layers(model)
    names = list(layers)[1:-1]
    ev = FineTuneEvaluator(lambda: copy.deepcopy(model), proxy, held, cfg, dict(WQ), device=device,
                           names=names, activation=dict(AQ))
    float_val = Trainer(copy.deepcopy(model), proxy, held, cfg, device=device).evaluate()["acc"]
    search = ReLeQ(ev, [layers[n] for n in names], float_val, actions=BITS, act_actions=BITS, seed=seed,
                   cache_path=out / "releq_cache.json", step_rewards=opt.get("step_rewards", True))
    best: list[float] = []

    def progress(i: int, h: dict[str, Any]) -> None:  # one line per episode in campaign.log
        best.append(max([*best[-1:], h["reward"]]))
        log.info("releq episode %d/%d: acc %.4f, reward %.3f (best %.3f), %d assignments measured",
                 i + 1, opt["episodes"], h["acc"], h["reward"], best[-1], len(search.cache))

    res = search.run(opt["episodes"], progress)
    pairs = [tuple(b) if isinstance(b, list | tuple) else (int(b), 32) for b in res.best_bits]
    sizes = {n: layers[n].weight.numel() for n in names}
    rules = [{"match": n, "weight": {**WQ, "bits": int(w)}, "activation": {**AQ, "bits": int(a)}}
             for n, (w, a) in zip(names, pairs, strict=True)]
    recipe = {"name": "releq", "description": f"ReLeQ search of {payload['float_dir']}",
              "default": {"weight": None}, "rules": rules, "train": ADAM}
    wq_bits = sum(sizes[n] * w for n, (w, _) in zip(names, pairs, strict=True))
    other = sum(p.numel() for p in model.parameters()) - sum(sizes.values())
    summary = {"layers": names, "bits": [list(p) for p in pairs], "float_val_acc": float_val,
               "avg_w_bits": wq_bits / sum(sizes.values()),
               "avg_a_bits": statistics.fmean(a for _, a in pairs),
               "weight_bits_total": wq_bits + 32 * other, "search": res.to_json()}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(recipe, sort_keys=False))
    atomic_write_text(out / "releq.json", json.dumps(summary, indent=1, default=str))
    atomic_write_text(out / "config.json", json.dumps({"spec": spec, "search": opt}, indent=1))
    result = {"kind": "search", "test_acc": None, "best_acc": None, "epochs": 0, "device": device,
              "wall_time_s": time.perf_counter() - t0, "avg_w_bits": summary["avg_w_bits"],
              "avg_a_bits": summary["avg_a_bits"]}
    atomic_write_text(out / "result.json", json.dumps(result, indent=1))
    return summary


def weight_size(model: Any, in_shape: tuple[int, ...]) -> dict[str, Any]:
    """Weight bytes and BOPs of a (quantized or float) model from the export report; a float
    model (nothing quantized) counts 4 bytes per parameter and 32 x 32 bit-operations per MAC."""
    from lowbit.export import model_report
    from lowbit.nn.quantize import quantized_layers

    if quantized_layers(model):
        try:
            t = model_report(model, in_shape).totals()
            return {"weight_bytes": t["packed_bytes"], "bops": t["bops"], "file_bytes": t.get("file_bytes")}
        except Exception as e:  # a quantizer the packed format does not store (multipoint)
            log.warning("no export report (%s); weight bytes from bits per weight", e)
            return {"weight_bytes": _bits_bytes(model), "bops": None}
    macs = _macs(model, in_shape)
    return {"weight_bytes": 4 * sum(p.numel() for p in model.parameters()), "bops": macs * 32 * 32}


def _bits_bytes(model: Any) -> int:
    from lowbit.nn.quantize import quantizable_layers, quantized_layers, weight_quantizer

    q = quantized_layers(model)
    bits = 0
    for name, layer in quantizable_layers(model).items():
        if name in q:
            wq = weight_quantizer(layer)
            pts = float(wq.counts.sum()) / layer.weight.shape[0] if hasattr(wq, "counts") else 1.0
            bits += int(layer.weight.numel() * wq.bits * pts)
        else:
            bits += 32 * layer.weight.numel()
    return bits // 8


def _macs(model: Any, in_shape: tuple[int, ...]) -> int:
    import torch

    total = 0

    def hook(m: Any, _: Any, y: Any) -> None:
        nonlocal total
        w = m.weight
        total += int(y.numel() // y.shape[0] * (w[0].numel() if w.dim() > 1 else 1))

    hs = [m.register_forward_hook(hook) for m in model.modules()
          if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *in_shape, device=next(model.parameters()).device))
    for h in hs:
        h.remove()
    return total


# ----------------------------------------------------------------------------------- scheduler
_STOP: list[int] = []  # the signals received: SIGTERM/SIGINT stop the campaign like --stop-after


def _request_stop(signum: int, _frame: Any) -> None:
    _STOP.append(signum)


def run_campaign(jobs: list[Job], budget: Budget, runs: Path, data_dir: str, device: str, n_jobs: int,
                 stop_at: float | None, recorded: frozenset[str] = frozenset(),
                 sources: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, str]:
    """Start jobs in order, ``n_jobs`` at a time, each once its float model has finished; stop
    (terminate the running ones: they resume next time) at ``stop_at`` (a time.time()). Returns
    each job's state: finished, recorded, stopped, failed, blocked (its float model is not finished).

    ``recorded``: jobs whose results the previous report holds (:func:`recorded_runs`) but whose
    directories are not here: they are not run again, unless a job that still has to run starts
    from one of them (its float model), which then trains again and replaces the record.
    ``sources``: recorded runs' :func:`run_source` data: a derived arm starts from its source's
    record without running the source again. A recorded derived arm whose source runs again (its
    directory and record lack what it needs) runs again too, so it is built from the new source."""
    sources = dict(sources or {})

    def needs(job: Job) -> list[str]:  # its deps but a source whose record is enough
        return [d for d in deps(job) if not (d == source_name(job) and d in sources)]

    ctx = multiprocessing.get_context("spawn")
    state = {j.name: "finished" for j in jobs if is_finished(run_dir(runs, j))}
    by_name = {j.name: j for j in jobs}
    needed: set[str] = set()
    todo = [j.name for j in jobs if j.name not in state and j.name not in recorded]
    while todo:  # what the jobs still to run start from, transitively
        job = by_name.get(todo.pop())
        for d in needs(job) if job else ():
            if d not in needed and d not in state:
                needed.add(d)
                todo.append(d)
    # a recorded derived arm is stale once the run it was built from trains again
    needed |= {j.name for j in jobs if j.arm.derive and source_name(j) in needed and j.name not in state}
    state.update({n: "recorded" for n in recorded if n in by_name and n not in state and n not in needed})
    pending = [j for j in jobs if j.name not in state]
    running: dict[str, tuple[Any, Job]] = {}
    while pending or running:
        for name, (proc, job) in list(running.items()):
            if not proc.is_alive():
                proc.join()
                done = is_finished(run_dir(runs, job))
                state[name] = "finished" if done else "failed"
                print(f"{time.strftime('%H:%M:%S')} {name}: {state[name]} (exit {proc.exitcode})", flush=True)
                del running[name]
        if _STOP or (stop_at is not None and time.time() >= stop_at):
            for name, (proc, _) in running.items():
                proc.terminate()
                proc.join(60)
                state[name] = "stopped"
                print(f"{time.strftime('%H:%M:%S')} {name}: stopped (resumes next time)", flush=True)
            running.clear()
            break
        for job in list(pending):
            if len(running) >= n_jobs:
                break
            waiting = [d for d in needs(job) if state.get(d) != "finished"]
            if waiting:
                if any(d not in running and d not in {q.name for q in pending} for d in waiting):
                    state[job.name] = "blocked"  # a run it needs failed or is not in this campaign
                    pending.remove(job)
                continue
            pending.remove(job)
            payload = job_spec(job, budget, runs, data_dir, device, sources.get(source_name(job) or ""))
            proc = ctx.Process(target=work, args=(payload,), name=job.name)
            proc.start()
            running[job.name] = (proc, job)
            print(f"{time.strftime('%H:%M:%S')} {job.name}: started (pid {proc.pid})", flush=True)
        time.sleep(0.5)
    for j in pending:
        state.setdefault(j.name, "not started")
    return state


# ----------------------------------------------------------------------------------- archives
def archive(runs: Path, dest: Path, slim: bool = False) -> int:
    """Pack every run directory under ``runs`` into one .tar.gz: a finished run's metrics, result
    and best checkpoint (not ``checkpoint.safetensors``: the last epoch's optimizer state), an
    unfinished run's everything (its checkpoint resumes it on a fresh machine). ``slim`` also
    leaves out the best checkpoints and packed models of finished quantized runs (what a report and
    the next slice need fit in a few MB). Returns the run count."""
    dirs = sorted({p.parent for p in runs.glob("*/seed*/config.json")})
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for d in dirs:
            done, is_float = is_finished(d), d.parent.name in (FLOAT.key, FLOAT_W2.key)
            for f in sorted(d.iterdir()):
                if not f.is_file() or f.name.endswith(".tmp"):
                    continue
                if done and f.name == "checkpoint.safetensors":
                    continue
                if done and slim and not is_float and f.name in ("best.safetensors", "model.lowbit"):
                    continue
                tar.add(f, arcname=f.relative_to(runs).as_posix())
    os.replace(tmp, dest)
    return len(dirs)


def unpack(src: Path, runs: Path) -> list[str]:
    """Restore an :func:`archive` into ``runs``; a run finished here is never replaced by an
    unfinished copy. Members must be ``<run>/seed<k>/<file>`` (no absolute paths, no ``..``)."""
    restored = []
    with tarfile.open(src, "r:gz") as tar, tempfile.TemporaryDirectory() as tmpdir:
        members = tar.getmembers()
        for m in members:
            parts = Path(m.name).parts
            if (not m.isfile() or Path(m.name).is_absolute() or ".." in parts or len(parts) != 3
                    or not parts[1].startswith("seed")):
                raise ValueError(f"{src}: unexpected member {m.name!r}; an archive holds "
                                 "<run>/seed<k>/<file>")
        tar.extractall(tmpdir, members=members, filter="data")
        for d in sorted({Path(tmpdir, *Path(m.name).parts[:2]) for m in members}):
            target = runs / d.relative_to(tmpdir)
            old = target.with_name(f".{target.name}.old")
            if old.exists() and not target.exists():  # a restore killed between its two renames
                old.rename(target)
            if is_finished(target) and not is_finished(d):
                continue
            # copied next to its place, then swapped in by renames: a kill leaves the old copy
            # or the new one, never a half-copied run that looks finished
            target.parent.mkdir(parents=True, exist_ok=True)
            incoming = target.with_name(f".{target.name}.incoming")
            for leftover in (incoming, old):
                if leftover.exists():
                    shutil.rmtree(leftover)
            shutil.copytree(d, incoming)
            if target.exists():
                target.rename(old)
            incoming.rename(target)
            if old.exists():
                shutil.rmtree(old)
            restored.append(target.relative_to(runs).as_posix())
    return restored


# ----------------------------------------------------------------------------------- results
def read_run(path: Path) -> dict[str, Any] | None:
    """A finished run's numbers: test accuracy (%), weight bytes, BOPs, epochs, device, train time
    (the sum of its epochs' times) and the last logged sparsity (RVSM, WPC) if any."""
    if not is_finished(path):
        return None
    res = json.loads((path / "result.json").read_text())
    acc = res.get("test_acc")
    size = res.get("size") or (float_size(path) if acc is not None else {})
    out = {"test_acc": None if acc is None else 100 * acc,
           "val_acc": None if res.get("best_acc") is None else 100 * res["best_acc"],
           "weight_bytes": size.get("weight_bytes", size.get("packed_bytes")), "bops": size.get("bops"),
           "epochs": res.get("epochs"), "device": res.get("device", "cpu"), "train_s": 0.0}
    for k in ("avg_w_bits", "avg_a_bits"):
        if res.get(k) is not None:
            out[k] = res[k]
    if (path / "init.json").exists():  # the float model it started from (float_identity)
        out["init_from"] = json.loads((path / "init.json").read_text())
    elif path.parent.name in (FLOAT.key, FLOAT_W2.key) and (path / "best.safetensors").exists():
        out["sha256"] = file_sha(path / "best.safetensors")
    rel = path / "releq.json"
    if rel.exists():  # how far the search's agent learned: its mean reward early and late
        found = json.loads(rel.read_text())["search"]
        hist = [h["reward"] for h in found["history"]]
        w = max(1, min(50, len(hist) // 2))
        out["search"] = {"episodes": len(hist), "measured": found["evaluations"], "window": w,
                         "reward_first": statistics.fmean(hist[:w]),
                         "reward_last": statistics.fmean(hist[-w:]),
                         "best_reward": found["best_reward"], "best_proxy_acc": 100 * found["best_acc"],
                         "float_proxy_acc": 100 * found["float_acc"]}
    source = run_source(path)
    if source:  # what its derived arms start from, should this directory be gone next time
        out["source"] = source
    wb = path / "waveq_bits.json"
    if wb.exists():
        learned, sizes = json.loads(wb.read_text()), layer_sizes()
        bits = learned["bits"]
        out["avg_w_bits"] = sum(sizes[n] * b for n, b in bits.items()) / sum(sizes[n] for n in bits)
        out["bits_distinct"] = len(set(bits.values()))  # 1: every layer learned the same bits
        if learned.get("beta"):  # the continuous bit-widths before rounding (records before them: the range)
            out["beta"] = learned["beta"]
            out["beta_range"] = [min(learned["beta"].values()), max(learned["beta"].values())]
    metrics = path / "metrics.jsonl"
    if metrics.exists():
        for rec in metric_lines(metrics):
            out["train_s"] += rec.get("epoch_time_s", 0.0)
            for k in ("rvsm/sparsity", "wpc/small_groups"):
                if k in rec:
                    out[k.split("/")[1]] = rec[k]
    return out


def float_size(path: Path) -> dict[str, Any]:
    """Weight bytes and BOPs of a float run's model (its result.json has no packed size)."""
    cfg = path / "config.json"
    spec = json.loads(cfg.read_text()).get("spec", {}) if cfg.exists() else {}
    if spec.get("model") != "resnet20":
        return {}
    from lowbit.models import build_model

    return weight_size(build_model("resnet20", **(spec.get("model_kwargs") or {})), (3, 32, 32))


def metric_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl. Its lines are appended, so a run killed mid-write may
    end with a torn line: that one is skipped (the run rewrites the file from its checkpoint when it
    resumes); a bad line anywhere else is an error."""
    lines = [x for x in path.read_text().splitlines() if x.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
            log.warning("%s: skipping its torn last line (a killed write)", path)
    return out


def epoch_times(path: Path) -> list[float]:
    """Epoch times (s) logged by a run so far, finished or not."""
    m = path / "metrics.jsonl"
    if not m.exists():
        return []
    return [r["epoch_time_s"] for r in metric_lines(m) if "epoch_time_s" in r]


def stats(values: Sequence[float]) -> dict[str, Any] | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": list(values)}


#: |ours - paper| allowed for a ``level`` or ``drop`` check to count as reproduced (pp): the JPEG
#: copy and the seed noise of one ResNet-20 (a few tenths of a point) both fit inside it
TOL_PP = 1.0


def verdict(rule: str, ours: Mapping[str, Any] | None, paper: float | None) -> tuple[str, str]:
    """(verdict, why) of one check from our numbers (pp; mean, std, n over seeds).

    - ``gain`` (the paper claims a > b): reproduced when the mean seed-by-seed difference is above
      its noise (2 standard errors; with one seed, above 0: "single run"), reversed when below
      minus the noise, else not reproduced (inside the noise).
    - ``level``: reproduced when ours >= paper - max(TOL_PP, 2 se); ``drop``: ours <= paper +
      max(TOL_PP, 2 se).
    - ``loss`` (the paper claims b - a is small, e.g. sparsity "at little loss", with no number):
      reproduced when the mean loss is at most ``paper`` (default TOL_PP) + 2 se.
    - ``measure``: no claim to test ("measured").
    """
    if ours is None or not ours.get("n"):
        return "not run", ""
    m, n = ours["mean"], ours["n"]
    se = ours["std"] / math.sqrt(n) if n > 1 else 0.0
    if rule == "measure":
        return "measured", ""
    if rule == "loss":
        limit = TOL_PP if paper is None else paper
        tag = " (single run)" if n == 1 else ""
        if m <= limit + 2 * se:
            return "reproduced" + tag, ""
        return "not reproduced" + tag, (f"loss {m:.2f} pp vs at most {limit:.2f} (+ 2 se = {2 * se:.2f}, "
                                        f"n={n})")
    if rule == "gain":
        if n == 1:
            v = "reproduced" if m > 0 else ("reversed" if m < 0 else "not reproduced")
            return v + " (single run)", "" if m > 0 else f"difference {m:+.2f} pp in one run"
        noise = 2 * se
        if m > noise:
            return "reproduced", ""
        if m < -noise:
            return "reversed", f"difference {m:+.2f} pp, below minus its noise (2 se = {noise:.2f}, n={n})"
        return "not reproduced", f"difference {m:+.2f} pp is inside its noise (2 se = {noise:.2f}, n={n})"
    if paper is None:
        raise ValueError(f"verdict: rule {rule!r} needs the paper's number")
    tol = max(TOL_PP, 2 * se)
    if rule == "level":
        ok = m >= paper - tol
        why = f"{m - paper:+.2f} pp below the paper (tolerance {tol:.2f})"
        return ("reproduced", "") if ok else ("not reproduced", why)
    if rule == "drop":
        ok = m <= paper + tol
        return ("reproduced", "") if ok else ("not reproduced", f"drop {m:.2f} pp vs the paper's {paper:.2f} "
                                                                 f"(tolerance {tol:.2f})")
    raise ValueError(f"verdict: unknown rule {rule!r}; allowed: level, drop, gain, loss, measure")


def candidates_on_val(check: Check,
                      runs: Mapping[tuple[str, int], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per finished arm of ``choose``: its mean validation accuracy and n (the seeds it ran)."""
    val = {c: [r["val_acc"] for (k, _), r in runs.items() if k == c and r.get("val_acc") is not None]
           for c in check.choose}
    return {c: {"val_acc": statistics.fmean(v), "n": len(v)} for c, v in val.items() if v}


def chosen_arm(check: Check, runs: Mapping[tuple[str, int], dict[str, Any]]) -> str:
    """``arms[0]``, or among ``choose`` the finished arm with the best mean validation accuracy (of
    those with the most seeds: a sweep still running does not choose on fewer)."""
    val = candidates_on_val(check, runs)
    most = max((x["n"] for x in val.values()), default=0)
    full = [c for c, x in val.items() if x["n"] == most]
    return max(full, key=lambda c: val[c]["val_acc"]) if full else check.arms[0]


def float_acc(runs: Mapping[tuple[str, int], dict[str, Any]], seed: int,
              run: Mapping[str, Any]) -> float | None:
    """Test accuracy (%) of the float model ``run`` started from: its ``init_from`` where it recorded
    one, else the float row's model of that seed; None where neither is known."""
    started = (run.get("init_from") or {}).get("test_acc")
    if started is not None:
        return started
    fl = runs.get(("float", seed))
    return None if fl is None else fl["test_acc"]


def check_values(check: Check, runs: Mapping[tuple[str, int], dict[str, Any]]) -> list[float]:
    """Per-seed values of a check (pp): level -> acc; drop -> float acc - acc; gain -> a - b; loss ->
    b - a; for
    measure, the arm's drop vs float (or its accuracy when there is no float of that seed), or the
    run's ``metric`` when that is not test accuracy."""
    a = chosen_arm(check, runs)
    seeds = sorted(s for (k, s) in runs if k == a)
    vals = []
    for s in seeds:
        ra = runs[(a, s)]
        if check.metric != "test_acc":
            if ra.get(check.metric) is not None:
                vals.append(ra[check.metric])
        elif check.rule == "level":
            vals.append(ra["test_acc"])
        elif check.rule in ("drop", "measure"):
            fa = float_acc(runs, s, ra)
            if fa is not None:
                vals.append(fa - ra["test_acc"])
            elif check.rule == "measure":
                vals.append(ra["test_acc"])
        elif check.rule == "gain" and (check.arms[1], s) in runs:
            vals.append(ra["test_acc"] - runs[(check.arms[1], s)]["test_acc"])
        elif check.rule == "loss" and (check.arms[1], s) in runs:
            vals.append(runs[(check.arms[1], s)]["test_acc"] - ra["test_acc"])
    return vals


Runs = dict[tuple[str, int], dict[str, Any]]  # (run key, seed) -> its numbers (read_run)
Recorded = dict[tuple[str, int, str], dict[str, Any]]  # (run key, seed, budget) -> its numbers


def recorded_runs(report: Path) -> Recorded:
    """The finished runs a previous report (``cifar10_claims.json``) holds, so that results outlive
    their run directories (a fresh machine, a GPU session's scratch disk). Each keeps
    ``recorded_at``: the commit of the report that first measured it (``+dirty`` when that tree had
    changes). Runs of arms no longer in :data:`CLAIMS` are dropped. No file: nothing recorded."""
    if not report.exists():
        return {}
    try:
        data = json.loads(report.read_text())
        git = data["meta"]["git"]
        at = str(git["commit"])[:12] + ("+dirty" if git.get("dirty") else "")
        known = {a.key for c in CLAIMS for a in c.arms} | {FLOAT.key, FLOAT_W2.key}
        out: Recorded = {}
        for r in data["runs"]:
            if r["run"] in known:
                rec = {k: v for k, v in r.items() if k not in ("run", "seed", "budget")}
                rec.setdefault("recorded_at", at)
                out[(r["run"], int(r["seed"]), r["budget"])] = rec
        return out
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{report}: not a claims report ({e!r}); move it away, or pass --fresh to "
                         "build the tables from the run directories alone") from None


def build_rows(runs_root: Path, budget: Budget,
               recorded: Recorded | None = None) -> tuple[list[dict[str, Any]], Runs]:
    """One row per check of every claim, from the finished run directories under ``runs_root`` and,
    where a run's directory is not there, its ``recorded`` result (:func:`recorded_runs`)."""
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for d in sorted(runs_root.glob("*/seed*")):
        r = read_run(d)
        if r is not None:
            runs[(d.parent.name, int(d.name[4:]))] = r
    for (k, s, b), r in sorted((recorded or {}).items()):
        if b == budget.name:
            here = runs.get((k, s))
            if k in (FLOAT.key, FLOAT_W2.key) and here is not None and here.get("sha256") != r.get("sha256"):
                # a float model trained again: the row keeps the first, which the recorded runs started
                # from; the runs started from the new one carry it in their init_from
                runs[(k, s)] = dict(r)
            runs.setdefault((k, s), dict(r))
    rows = []
    for claim in CLAIMS:
        in_budget = {a.key for a in budget_arms(claim, budget)}
        for check in claim.checks:
            vals = check_values(check, runs)
            st = stats(vals)
            chosen = chosen_arm(check, runs)
            v, why = verdict(check.rule, st, check.paper)
            if v == "not run":
                if not set(check.arms) <= in_budget:
                    why = f"not run ({budget.name} budget: GPU budget only)"
                else:
                    why = f"not run ({budget.name} budget: not finished yet; resumable)"
            elif v not in ("reproduced", "measured") and check.rule in ("level", "drop") and any(
                    k == "float" for k, _ in runs):
                fl = stats([r["test_acc"] for (k, _), r in runs.items() if k == "float"])
                why += (f"; our float ResNet-20 reaches {fl['mean']:.2f}% at this budget "
                        f"({budget.float_train['epochs']} epochs; paper schedule 160+)")
            elif v in ("not reproduced", "reversed") and check.rule == "gain":
                gap = [float_acc(runs, s, r) - r["test_acc"] for (k, s), r in runs.items()
                       if k == check.arms[1] and float_acc(runs, s, r) is not None]
                if gap:  # how much a gain could recover: the arm without the method vs the float model
                    g = stats(gap)
                    side = "below" if g["mean"] >= 0 else "above"
                    why += f"; {check.arms[1]} is {abs(g['mean']):.2f} pp {side} our float model (n={g['n']})"
            cand = candidates_on_val(check, runs)
            if cand and v != "not run":  # which hyper-parameter validation chose, among those that ran
                why += ("; chosen on validation accuracy from " + ", ".join(
                    f"{c} {x['val_acc']:.2f}% (n={x['n']})" for c, x in cand.items()) + f": {chosen}")
            src = {a.after[0] for a in claim.arms
                   if a.key in check.arms and a.derive and a.derive.startswith("waveq")}
            same = [r["avg_w_bits"] for (k, _), r in runs.items() if k in src and r.get("bits_distinct") == 1]
            if same and check.rule == "gain" and st is not None:
                # learned bits equal in every layer: the "fixed" recipe (their mean) is the same recipe
                n_src = sum(1 for (k, _) in runs if k in src)
                why += (f"; the learned bits were equal in every layer in {len(same)} of {n_src} seeds "
                        f"({', '.join(f'{b:g}' for b in same)} bits), where learned and fixed are one recipe")
                ranges = [r["beta_range"] for (k, _), r in runs.items()
                          if k in src and r.get("bits_distinct") == 1 and r.get("beta_range")]
                if ranges:  # in those seeds, before rounding
                    why += (f" (their continuous bit-widths ended between {min(lo for lo, _ in ranges):.2f} "
                            f"and {max(hi for _, hi in ranges):.2f})")
            found = [(s, r["search"]) for (k, s), r in runs.items() if k == claim.search and r.get("search")]
            if found and v != "not run":  # what the assignment came from
                seed, f = found[0]
                said = (f"the search (seed {seed}) measured {f['measured']} assignments in {f['episodes']} "
                        f"episodes; the agent's mean reward over its first / last {f['window']} episodes "
                        f"{f['reward_first']:+.3f} / {f['reward_last']:+.3f}, its best "
                        f"{f['best_reward']:+.3f} (proxy accuracy {f['best_proxy_acc']:.1f}% vs the float "
                        f"model's {f['float_proxy_acc']:.1f}% on the same held-out training images)")
                why = f"{why}; {said}" if why else said
            extra = {}
            for key in ("sparsity", "small_groups"):
                got = [runs[(check.arms[0], s)][key] for (k, s) in runs if k == check.arms[0]
                       and key in runs[(check.arms[0], s)]]
                if got:
                    extra[key] = stats(got)
            if check.needs and v.startswith("reproduced") and not (extra.get(check.needs) or {}).get("mean"):
                # an accuracy that holds up means nothing without the sparsity the paper claims
                v, why = "not reproduced", f"no {check.needs.replace('_', ' ')}: {check.arms[0]} has none"
            devices = sorted({runs[(k, s)]["device"] for (k, s) in runs if k in check.arms}) if st else []
            rows.append({"claim": claim.name, "row": claim.row, "check": check.label, "rule": check.rule,
                         "arms": [chosen, *check.arms[1:]],
                         "chosen_on_val": candidates_on_val(check, runs) if check.choose else None,
                         "metric": check.metric, "paper": check.paper, "paper_text": check.paper_text,
                         "citation": claim.citation, "ours": st,
                         "diff": None if st is None or check.paper is None else st["mean"] - check.paper,
                         "verdict": v, "why": why, "budget": budget.name,
                         "device": ", ".join(devices) or "-", "departs": claim.departs, **extra})
    return rows, runs


def report_rows(runs_dir: Path, budget: Budget, recorded: Recorded | None = None,
                ) -> tuple[list[dict[str, Any]], dict[Any, Any]]:
    """Rows of every budget with runs under ``runs_dir`` or in ``recorded`` (GPU rows first), each
    row naming its budget; checks nobody ran appear once, as not run under ``budget``. The smoke
    budget reports only itself."""
    names = [budget.name] if budget.name == "smoke" else ["gpu", "cpu"]
    rows: list[dict[str, Any]] = []
    found: dict[tuple[str, int, str], Any] = {}
    for b in names:
        if b != budget.name and not (runs_dir / b).is_dir() and not any(x[2] == b for x in recorded or {}):
            continue
        r, f = build_rows(runs_dir / b, BUDGETS[b], recorded)
        rows += [x for x in r if b == budget.name or x["verdict"] != "not run"]
        found.update({(k, s, b): v for (k, s), v in f.items()})
    done = {(x["claim"], x["check"]) for x in rows if x["verdict"] != "not run"}
    rows = [x for x in rows if x["verdict"] != "not run" or (x["claim"], x["check"]) not in done]
    order = {c.name: i for i, c in enumerate(CLAIMS)}
    rows.sort(key=lambda x: (order[x["claim"]], [ch.label for ch in claim_by_name(x["claim"]).checks].index(
        x["check"]), names.index(x["budget"])))
    return rows, found


def _pm(st: Mapping[str, Any] | None, unit: str = "") -> str:
    if not st:
        return "-"
    if st["n"] == 1:
        return f"{st['mean']:.2f}{unit} (n=1)"
    return f"{st['mean']:.2f} ± {st['std']:.2f}{unit} (n={st['n']})"


_UNITS = {"level": "%", "drop": " pp", "gain": " pp", "loss": " pp", "measure": " pp"}


def _ours(r: Mapping[str, Any]) -> str:
    """Our cell: mean ± std (n), and the sparsity a check measures beside it."""
    ours = _pm(r["ours"], " bits" if "bits" in r["metric"] else _UNITS[r["rule"]])
    for key, label in (("sparsity", "weight sparsity"), ("small_groups", "small groups")):
        if r.get(key):
            ours += f"; {label} {100 * r[key]['mean']:.1f}%"
    return ours


def summary_table(rows: list[dict[str, Any]]) -> list[str]:
    """The checks that ran, one short line each (the README shows this table): claim, check, the
    paper's number, ours (mean ± std, n) and the verdict."""
    out = ["## Summary: the checks that ran", "",
           "| claim | check | paper | ours | verdict |", "|---|---|---|---|---|"]
    last = None
    for r in rows:
        if r["ours"] is None or r["verdict"] == "not run":
            continue
        claim = r["row"] if r["claim"] != last else "〃"
        last = r["claim"]
        out.append(f"| {claim} | {r['check']} | {r['paper_text']} | {_ours(r)} | {r['verdict']} |")
    return out


def render(meta: Mapping[str, Any], budget: Budget, rows: list[dict[str, Any]],
           runs: Mapping[tuple[str, int, str], dict[str, Any]], plan_text: str,
           state: Mapping[str, str], progress: Sequence[Mapping[str, Any]] = ()) -> str:
    lines = [
        "# CIFAR-10 ResNet-20: the seed papers' claims, re-measured",
        "",
        f"Command: `{meta['command']}` — commit {str(meta['git']['commit'])[:12]}"
        f"{' (dirty tree)' if meta['git']['dirty'] else ''}, torch {meta['torch']}, "
        f"{meta['machine'].get('cpu', '?')}. Budget **{budget.name}** on **{budget.device}**: {budget.note}.",
        "",
        "Data: **the CIFAR-10 JPEG copy** (`cifar10-jpeg.zip`, quality about 75: close to, not identical "
        "with, the original images; papers used the originals). Protocol: the last 5,000 training images "
        "are a validation split that picks each run's best epoch; the test set is read once, on that "
        "checkpoint. Every quantized run fine-tunes from the float ResNet-20 of the same seed. Cells: mean "
        "± std over seeds (n). `gain` checks are seed-by-seed differences (with minus without); `drop` is "
        "float minus quantized of the same seed; rows marked `measured` have no paper number beside them.",
        "",
        "Verdicts: a `gain` is reproduced when its mean is above 2 standard errors of the seed-by-seed "
        "difference, reversed when below minus that, else not reproduced (with one seed: the sign, "
        "\"single run\"); a `level`/`drop` is reproduced within max(1 pp, 2 se) of the paper. CPU budget "
        "rows are far below the papers' 160+ epoch schedules: they test the direction of a with/without "
        "claim, not the papers' absolute numbers.",
        "",
        *summary_table(rows),
        "",
        "## Every check",
        "",
        "| claim | check | paper | ours | ours − paper | verdict | why (measured) | budget / device | "
        "our departures |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    last = None
    for r in rows:
        claim = f"{r['row']} ({r['citation']})" if r["claim"] != last else "〃"
        last = r["claim"]
        ours = _ours(r)
        diff = "-" if r["diff"] is None else f"{r['diff']:+.2f}"
        lines.append(f"| {claim} | {r['check']} | {r['paper_text']} | {ours} | {diff} | {r['verdict']} | "
                     f"{r['why'] or '-'} | {r['budget']} / {r['device']} | {r['departs'] or '-'} |")
    lines += ["", "## Runs", ""]
    n_rec = sum(1 for r in runs.values() if r.get("recorded_at"))
    if n_rec:
        lines += [f"{n_rec} of {len(runs)} runs are carried from an earlier report (`recorded at` its "
                  "commit): their run directories are not on the machine that wrote this one; the numbers "
                  "are those that commit's report measured from them. A run trained again replaces its "
                  "record (a float model trained again does not replace the float row).", ""]
    again = []
    for (k, s, b), r in sorted(runs.items()):
        init, fl = r.get("init_from"), runs.get((FLOAT.key, s, b), {})
        if init and init.get("sha256") != fl.get("sha256"):
            again.append(f"`{k}` seed {s} ({init['run']} {init['test_acc']:.2f}% test, SHA-256 "
                         f"{init['sha256']})")
    if again:
        lines += ["Runs started from a float model trained again (another machine; the float row keeps the "
                  "first, which the other runs of that seed started from); a drop vs float is measured "
                  "against the model the run started from: " + "; ".join(again) + ".", ""]
    lines += ["| run | seed | budget | test acc | val acc | weight bytes | BOPs | epochs "
              "| device | train time (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (k, s, b), r in sorted(runs.items()):
        wb = f"{r['weight_bytes']:,}" if r.get("weight_bytes") else "-"
        bops = f"{r['bops']:.3g}" if r.get("bops") else "-"
        va = f"{r['val_acc']:.2f}%" if r.get("val_acc") is not None else "-"
        ta = "-" if r["test_acc"] is None else f"{r['test_acc']:.2f}%"
        if r.get("avg_w_bits") is not None:
            ta += f" (mean weight bits {r['avg_w_bits']:.2f})"
        at = f" (recorded at {r['recorded_at']})" if r.get("recorded_at") else ""
        lines.append(f"| {k}{at} | {s} | {b} | {ta} | {va} | {wb} | {bops} | {r['epochs']} | "
                     f"{r['device']} | {r['train_s']:.0f} |")
    if progress:
        done = sum(1 for p in progress if p["finished"])
        lines += ["", f"Jobs of the {budget.name} budget finished: {done} of {len(progress)}. Started, not "
                  "finished (each resumes from its last completed epoch): "
                  + (", ".join(f"`{p['job']}` ({p['epochs_done']}/{p['epochs']} epochs)" for p in progress
                               if not p["finished"] and p["started"]) or "none") + "."]
    if state:
        lines += ["", "State at the end of this invocation: "
                  + (", ".join(f"`{k}` ({v})" for k, v in sorted(state.items()) if v != "finished")
                     or "all finished") + "."]
    lines += ["", "## Plan", "", plan_text, "", "Figure: `cifar10_claims.png` (test accuracy vs weight bytes "
              "and vs BOPs, one point per arm: seed mean ± std; a second row zoomed near the float model)."]
    return "\n".join(lines) + "\n"


def plot(runs: Mapping[tuple[str, int, str], dict[str, Any]], path: Path) -> bool:
    """Test accuracy vs weight bytes (left) and vs BOPs (right), one point per arm and budget: the
    seed mean with the seeds' spread as error bars. One colour per claim, one marker per arm of it
    (filled: GPU budget, open: CPU), the float model as a dashed line. The top row shows every run;
    the bottom row zooms into the band within 6 points of the float model, where most methods sit.
    The legend names every point."""
    import itertools

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = {}  # (arm, budget) -> {field: (mean, std)}
    for k, b in sorted({(k, b) for k, _, b in runs}):
        rs = [r for (kk, _, bb), r in runs.items() if (kk, bb) == (k, b) and r.get("test_acc") is not None]
        pt = {}
        for f in ("test_acc", "weight_bytes", "bops"):
            vals = [r[f] for r in rs if r.get(f)]
            if vals and len(vals) == len(rs):  # the sample std, as in the tables
                pt[f] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        if "test_acc" in pt:
            points[(k, b)] = pt
    if not points:
        return False
    claim_of = {a.key: c.name for c in CLAIMS for a in c.arms}
    order = [c.name for c in CLAIMS]
    tab = plt.get_cmap("tab20").colors
    colors = dict(zip(order, itertools.cycle(tab[0::2] + tab[1::2]), strict=False))  # strong hues first
    rank = {k: (order.index(claim_of.get(k[0], "float")), k) for k in points}  # the legend in table order
    points = {k: points[k] for k in sorted(points, key=rank.get)}
    shapes, style = "o^sDvP*Xh<>p", {}
    for name in order:
        arms = [k for k in dict.fromkeys(k for k, _ in points) if claim_of.get(k, "float") == name]
        style.update({k: (colors[name], shapes[i % len(shapes)]) for i, k in enumerate(arms)})
    floats = {b: pt["test_acc"][0] for (k, b), pt in points.items() if k == "float"}
    fig, axes = plt.subplots(2, 2, figsize=(15, 10), sharex="col")
    for col, (field_, label) in enumerate((("weight_bytes", "weight bytes"), ("bops", "BOPs"))):
        for row in (0, 1):
            ax = axes[row][col]
            for (k, b), pt in points.items():
                if field_ not in pt:
                    continue
                c, m = style[k]
                (x, _), (y, ys) = pt[field_], pt["test_acc"]
                ax.errorbar([x], [y], yerr=[ys] if ys else None, fmt=m, ms=7, color=c, ecolor=c,
                            mfc=c if b == "gpu" else "none", mew=1.4, capsize=2, lw=1,
                            label=f"{k} [{claim_of.get(k, 'float')}, {b}]")
            for b, y in floats.items():
                ax.axhline(y, ls="--", lw=0.8, color="0.4")
                ax.annotate(f"float ({b}) {y:.2f}%", (0.01, y), xycoords=("axes fraction", "data"),
                            fontsize=8, color="0.3", xytext=(0, 3), textcoords="offset points")
            ax.set_xscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.set_ylabel("test accuracy (%)")
            if row == 1:
                ax.set_xlabel(label)
                if floats:
                    top = max(floats.values())
                    ax.set_ylim(top - 6, top + 1.5)
    handles, labels = axes[0][0].get_legend_handles_labels()
    seen = dict(zip(labels, handles, strict=True))
    fig.legend(list(seen.values()), list(seen), loc="center right", fontsize=8, frameon=False,
               title="arm [claim, budget]", title_fontsize=9)
    axes[0][0].set_title("every run")
    axes[1][0].set_title("within 6 points of the float model")
    fig.suptitle("ResNet-20, CIFAR-10 (JPEG copy): every finished arm, seed mean ± std "
                 "(filled: GPU budget, open: CPU)")
    fig.tight_layout(rect=(0, 0, 0.8, 0.97))
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def job_progress(jobs: list[Job], budget: Budget, runs: Path,
                 recorded: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """Per planned job: started, finished (here, or ``recorded`` by a previous report), epochs
    logged so far of how many."""
    out = []
    for j in jobs:
        d = run_dir(runs, j)
        total = 0 if j.arm.kind in ("ptq", "releq") else (
            budget.float_train["epochs"] if j.arm.is_float or j.arm.epochs == "float" else budget.q_epochs)
        here = is_finished(d)
        rec = not here and j.name in recorded
        out.append({"job": j.name, "started": d.exists() or rec, "finished": here or rec, "recorded": rec,
                    "epochs_done": total if rec else len(epoch_times(d)), "epochs": total})
    return out


def recorded_jobs(recorded: Recorded, budget: Budget) -> frozenset[str]:
    """Job names (``<run>/seed<k>``) of the ``budget``'s recorded runs."""
    return frozenset(f"{k}/seed{s}" for k, s, b in recorded if b == budget.name)


#: reference speed on this machine, less loaded (an earlier benchmarks/repro/run_cifar10.py run):
#: float ResNet-20 67 s per epoch on 2 threads, quantized fine-tunes 129-136 s per epoch on one thread,
#: two side by side; one thread is taken as 133 s per epoch for both (2 x 67: an upper bound for the
#: float model)
REF_EPOCH_S = 133.0


def plan_text(jobs: list[Job], budget: Budget, runs: Path) -> str:
    """The budget in numbers: the jobs, their projected CPU time at the reference speed, and the
    epoch times measured so far (wall time, whatever the machine's load was)."""
    floats = [j for j in jobs if j.arm.is_float]
    quant = [j for j in jobs if not j.arm.is_float and j.arm.kind in ("train", "waveq")]
    fe, qe = budget.float_train["epochs"], budget.q_epochs
    long = [j for j in quant if j.arm.epochs == "float"]  # quantized from scratch: the float schedule

    def epochs(j: Job) -> int:
        return fe if j.arm.epochs == "float" else qe

    paired = {c.name for c in CLAIMS if c.paired}
    core = len(floats) * fe + sum(epochs(j) for j in quant if j.claim in paired)
    rest = sum(epochs(j) for j in quant if j.claim not in paired)
    scratch = f" and {len(long)} x {fe} epochs (from scratch)" if long else ""
    out = [f"Jobs in this budget: {len(floats)} float runs x {fe} epochs, {len(quant)} quantized runs "
           f"({len(quant) - len(long)} x {qe} epochs{scratch}), {len(jobs) - len(floats) - len(quant)} "
           f"post-training or search runs; {budget.jobs} at a time, {budget.threads} thread(s) each, on "
           f"{budget.device}."]
    if budget.device == "cpu":
        out.append(f"At the reference speed ({REF_EPOCH_S:.0f} s per epoch on one idle core) the float "
                   f"models and the paired claims need {core * REF_EPOCH_S / 3600:.1f} CPU-hours "
                   f"({core * REF_EPOCH_S / 3600 / budget.jobs:.1f} h with {budget.jobs} side by side), "
                   f"the other rows {rest * REF_EPOCH_S / 3600:.1f} more (a wider network's epochs "
                   f"take longer; the searches come on top).")
    ft = [t for j in floats for t in epoch_times(run_dir(runs, j))]
    qt = [t for j in quant for t in epoch_times(run_dir(runs, j))]
    if ft or qt:
        txt = "Measured so far (wall time per epoch, under the machine's load at the time):"
        txt += f" float {statistics.fmean(ft):.0f} s ({len(ft)} epochs)" if ft else " no float epoch yet"
        txt += f", quantized {statistics.fmean(qt):.0f} s ({len(qt)} epochs)." if qt else "."
        out.append(txt)
    return " ".join(out)


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    p.add_argument("--only", nargs="+", metavar="CLAIM",
                   help=f"claims to run ({', '.join(c.name for c in CLAIMS)})")
    p.add_argument("--seeds", nargs="+", type=int, help="only these seeds")
    p.add_argument("--runs-dir", default="runs/cifar10-claims", help="runs live in RUNS_DIR/<budget>/")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--device", help="override the budget's device (cpu, cuda, cuda:N)")
    p.add_argument("--jobs", type=int, help="runs at once (default: the budget's)")
    p.add_argument("--stop-after", type=float, metavar="SECONDS",
                   help="stop the running jobs after this long (they resume next time), then report")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: tables from the run directories (and the recorded runs)")
    p.add_argument("--plan", action="store_true", help="print the jobs in order and exit")
    p.add_argument("--archive", metavar="TAR_GZ", help="afterwards, pack the run directories into this file")
    p.add_argument("--archive-slim", action="store_true",
                   help="leave the finished quantized runs' checkpoints out of the archive")
    p.add_argument("--unpack", metavar="TAR_GZ", help="first, restore run directories from this archive")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--fresh", action="store_true",
                   help="ignore the runs recorded in OUT/cifar10_claims.json whose directories are not "
                        "here: tables (and the jobs to run) from the run directories alone")
    a = p.parse_args(argv)
    t0 = time.time()
    if a.only:
        for name in a.only:
            claim_by_name(name)
    budget = BUDGETS[a.budget]
    if a.jobs:
        budget = replace(budget, jobs=a.jobs)
    device = a.device or budget.device
    runs = Path(a.runs_dir) / budget.name
    stem = "cifar10_claims" if budget.name != "smoke" else "cifar10_claims_smoke"
    recorded = {} if a.fresh else recorded_runs(Path(a.out) / f"{stem}.json")
    done_before = recorded_jobs(recorded, budget)
    jobs = plan(budget, a.only, a.seeds)
    if a.plan:
        for j in jobs:
            here = is_finished(run_dir(runs, j))
            print(f"{j.name:32s} {'finished' if here else 'recorded' if j.name in done_before else '-'}")
        return 0
    if a.unpack:
        got = unpack(Path(a.unpack), runs)
        print(f"restored {len(got)} run directories from {a.unpack}")
    state: dict[str, str] = {}
    if not a.report_only:
        stop_at = t0 + a.stop_after if a.stop_after else None
        for sig in (signal.SIGTERM, signal.SIGINT):  # kill PID stops the running jobs cleanly
            signal.signal(sig, _request_stop)
        sources = {f"{k}/seed{s}": r["source"] for (k, s, b), r in recorded.items()
                   if b == budget.name and r.get("source")}
        state = run_campaign(jobs, budget, runs, a.data_dir, device, budget.jobs, stop_at, done_before,
                             sources)
    rows, found = report_rows(Path(a.runs_dir), budget, recorded)
    meta = run_meta(__file__, argv, t0, seeds=sorted({j.seed for j in jobs}), budget=budget.name,
                    device=device, report_only=a.report_only, load_avg=os.getloadavg())
    progress = job_progress(plan(budget), budget, runs, done_before)
    text = plan_text(plan(budget), budget, runs)
    payload = {"meta": meta, "budget": dict(budget.__dict__), "rows": rows,
               "runs": [{"run": k, "seed": s, "budget": b, **r} for (k, s, b), r in sorted(found.items())],
               "state": state, "progress": progress, "plan": text,
               "data": "CIFAR-10 JPEG copy (cifar10-jpeg.zip)"}
    write_results(a.out, stem, payload, render(meta, budget, rows, found, text, state, progress))
    plot(found, Path(a.out) / f"{stem}.png")
    if a.archive:
        n = archive(runs, Path(a.archive), slim=a.archive_slim)
        print(f"archived {n} run directories to {a.archive}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
