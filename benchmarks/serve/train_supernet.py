"""Train a small any-width, any-precision supernet for the serving benchmark, and compare every
sub-net with a separately trained model of the same configuration.

    python benchmarks/serve/train_supernet.py                 # ~20 min of one core
    python benchmarks/serve/train_supernet.py --epochs 1 --no-baselines --no-des

LeNet-5 with twice the channels (``width_mult=2``) on MNIST; sub-nets: widths 0.25/0.5/1.0 x
2/4/8-bit weights and activations (DoReFa weights, PACT activations, first and last layer float,
BatchNorm per sub-net), plus one non-uniform sub-net (convolutions at 0.5, hidden linear layers
at 1.0, 4 bits). Supernet: sandwich rule (largest, smallest, one random sub-net per step,
in-place distillation), Adam lr 2e-3 cosine, ``--epochs`` epochs; the same with Delayed
epsilon-Shrinking (warmup 0.25) at equal epochs; and each sub-net trained alone (plain cross
entropy, same optimizer and epochs). Validation split: 5,000 training images (which supernet
variant is written to the file is chosen on it); the test set is evaluated once per model at the
end. Sizes and BOPs by :func:`lowbit.export.report.model_report` on each extracted sub-net;
latency (ms, fastest of 30 runs in 6 rounds
over all sub-nets, one thread) by switching the eval-mode supernet at batch 1/8/32.

Writes ``runs/serve/lenet5x2.supernet`` (the file ``lowbit serve`` loads: every sub-net's packed
codes) and
``benchmarks/results/serve_supernet.{json,md}``. Each phase is saved under ``runs/serve/`` as it
ends, so a killed run resumes at the phase it was in.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lowbit._io import atomic_write_text
from lowbit.data import load_dataset
from lowbit.export.report import model_report
from lowbit.models import build_model
from lowbit.nn.supernet import Supernet
from lowbit.runtime import compile as compile_packed
from lowbit.serve import load_supernet, save_supernet
from lowbit.serve.profile import time_batch
from lowbit.train import TrainConfig, Trainer, evaluate
from lowbit.train.sandwich import DelayedShrinking, SandwichLoss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_meta, write_results

SUBNETS = [{"name": f"w{w}-b{b}", "width": w, "bits": b} for w in (0.25, 0.5, 1.0) for b in (2, 4, 8)] + [
    {"name": "conv0.5-fc1.0-b4", "width": {"conv*": 0.5, "fc*": 1.0}, "bits": 4}]
MODEL = {"name": "lenet5", "kwargs": {"width_mult": 2.0}}
SHAPE = (1, 28, 28)


def build(subnets: list[dict[str, Any]]) -> Supernet:
    torch.manual_seed(0)
    return Supernet(build_model(MODEL["name"], **MODEL["kwargs"]), subnets, SHAPE)


def train(sn: Supernet, data: Any, epochs: int, loss_fn: Any | None) -> float:
    cfg = TrainConfig(epochs=epochs, optimizer="adam", lr=2e-3, schedule="cosine", seed=0, tensorboard=False)
    t = time.perf_counter()
    Trainer(sn, data.train, None, cfg, loss_fn=loss_fn).fit()
    return time.perf_counter() - t


def fastest_ms(fn: Any, x: torch.Tensor, repeats: int) -> float:
    ts = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            t = time.perf_counter()
            fn(x)
            if i >= 1:
                ts.append(1e3 * (time.perf_counter() - t))
    return min(ts)


def accuracies(sn: Supernet, loader: Any) -> dict[str, float]:
    out = {}
    for n in sn.names:
        sn.set_subnet(n)
        out[n] = evaluate(sn, loader)["acc"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--no-des", action="store_true")
    p.add_argument("--work", default="runs/serve")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "train_state.json"
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.exists() else {}

    def save_state() -> None:
        atomic_write_text(state_path, json.dumps(state, indent=1))

    data = load_dataset("mnist", batch_size=128, seed=0, val_size=5000)
    variants = ["sandwich"] + ([] if a.no_des else ["des"])
    for v in variants:
        f = work / f"{v}.supernet"
        if f.exists() and v in state:
            continue
        sn = build(SUBNETS)
        steps = a.epochs * len(data.train)
        sched = DelayedShrinking(steps, warmup=0.25) if v == "des" else None
        secs = train(sn, data, a.epochs, SandwichLoss(n_random=1, seed=0, schedule=sched))
        sn.eval()
        state[v] = {"train_s": round(secs, 1), "val": accuracies(sn, data.val)}
        save_supernet(sn, f, codes=False)  # the trainable form: extracted from below
        save_state()
    # model selection on the validation split: mean validation accuracy over the sub-nets
    best = max(variants, key=lambda v: sum(state[v]["val"].values()))
    base = state.setdefault("baselines", {})
    if not a.no_baselines:
        for spec in SUBNETS:
            if spec["name"] in base:
                continue
            sn = build([spec])
            secs = train(sn, data, a.epochs, None)
            sn.eval()
            base[spec["name"]] = {"train_s": round(secs, 1), "val": evaluate(sn, data.val)["acc"],
                                  "test": evaluate(sn, data.test)["acc"]}
            save_state()
    # the test set, once per supernet variant and sub-net
    tests = {v: accuracies(load_supernet(work / f"{v}.supernet"), data.test) for v in variants}
    sn = load_supernet(work / f"{best}.supernet")
    for n in sn.names:
        sn.info[n] = {"val_acc": state[best]["val"][n], "test_acc": tests[best][n]}
    save_supernet(sn, work / "lenet5x2.supernet")
    rows = []
    xt = next(iter(data.test))[0]
    subs = {n: sn.extract(n) for n in sn.names}
    packed = {n: compile_packed(subs[n], xt[:1]) for n in sn.names}
    # latency: the fastest of 6 rounds x 5 runs, the rounds going over every sub-net in turn so that
    # a burst of background load does not fall on one sub-net only
    lat: dict[str, dict[str, float]] = {n: {} for n in sn.names}
    for _ in range(6):
        for n in sn.names:
            for b in (1, 8, 32):
                t_torch = time_batch(sn, n, b, SHAPE, repeats=5, warmup=1, quantile=0.0)
                t_packed = fastest_ms(packed[n], xt[:b], 5)
                for key, t in ((f"latency_b{b}_ms", t_torch), (f"packed_b{b}_ms", t_packed)):
                    lat[n][key] = min(t, lat[n].get(key, math.inf))
    for n in sn.names:
        rep = model_report(subs[n], SHAPE)
        with torch.inference_mode():
            ref, got = subs[n](xt), packed[n](xt)
        lat[n].update({"packed_max_abs_diff": float((ref - got).abs().max()),
                       "packed_same_argmax": float((ref.argmax(1) == got.argmax(1)).float().mean())})
        row = {**sn.cost(n), "name": n, **lat[n],
               "file_bytes": rep.file_bytes, "report_bops": rep.total_bops,
               **{f"{v}_val": state[v]["val"][n] for v in variants},
               **{f"{v}_test": tests[v][n] for v in variants}}
        if n in base:
            row.update({"alone_val": base[n]["val"], "alone_test": base[n]["test"]})
        rows.append(row)
    payload = {**run_meta(__file__, argv, t0, seeds=[0], epochs=a.epochs, model=MODEL, subnets=SUBNETS,
                          chosen_variant=best), "train": {v: state[v]["train_s"] for v in variants},
               "baseline_train_s": {k: v["train_s"] for k, v in base.items()}, "rows": rows}
    write_results(a.out, "serve_supernet", payload, markdown(payload, variants))
    return 0


def markdown(p: dict[str, Any], variants: list[str]) -> str:
    head = ["sub-net", "W/A bits", "file bytes", "BOPs", "ms b1", "ms b8", "ms b32", "packed ms b1/8/32"]
    head += [f"{v} test" for v in variants] + ["alone test"]
    lines = [
        "# Any-width, any-precision supernet (LeNet-5 x2, MNIST)", "",
        f"`{p['command']}`; single run, seed 0, {p['epochs']} epochs for every model; torch {p['torch']}.",
        "",
        "Test accuracy of each sub-net switched inside one supernet (sandwich rule with in-place "
        "distillation" + (", and with Delayed epsilon-Shrinking" if "des" in variants else "") +
        ") against the same configuration trained alone. The file `lowbit serve` loads holds the "
        f"`{p['chosen_variant']}` supernet (chosen on mean validation accuracy). File bytes and BOPs: "
        "`model_report` of the extracted sub-net (the packed file it would be; first/last layer float). "
        "Latency: eval-mode PyTorch with cached quantized weights (fake-quantized float kernels, so "
        "bits do not change it), the fastest of 30 runs in 6 rounds over all sub-nets, one thread (the "
        "machine is a shared 2-core "
        "box running a dozen other jobs: medians there measure waiting for a core). Packed: the "
        "extracted sub-net compiled by `lowbit.runtime.compile` (bit-plane / int8 kernels for conv2, "
        "fc1, fc2; first and last layer in PyTorch); its logits differ from PyTorch's (folded batch "
        f"norm, float epilogue) by at most {max(r['packed_max_abs_diff'] for r in p['rows']):.2g} "
        f"(same argmax on at least {100 * min(r['packed_same_argmax'] for r in p['rows']):.1f}% of "
        "1,000 test images). The server "
        "runs the eval-mode PyTorch path (switching inside one set of weights).", "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in p["rows"]:
        sub = next(s for s in p["subnets"] if s["name"] == r["name"])
        bits = sub["bits"]
        cells = [r["name"], f"{bits}/{bits}", f"{r['file_bytes']:,}", f"{r['report_bops']:,}",
                 f"{r['latency_b1_ms']:.2f}", f"{r['latency_b8_ms']:.2f}", f"{r['latency_b32_ms']:.2f}",
                 f"{r['packed_b1_ms']:.2f} / {r['packed_b8_ms']:.2f} / {r['packed_b32_ms']:.2f}"]
        cells += [f"{100 * r[f'{v}_test']:.2f}%" for v in variants]
        cells.append(f"{100 * r['alone_test']:.2f}%" if "alone_test" in r else "not run")
        lines.append("| " + " | ".join(cells) + " |")
    alone = sum(p["baseline_train_s"].values())
    lines += ["", "Training wall-clock seconds (one thread, on the shared machine at load average 12-16): "
              + ", ".join(f"{k} {v}" for k, v in p["train"].items())
              + (f"; alone: {alone:.0f} in total" if alone else "")]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
