"""A ResNet-20 (half width: 8/16/32 channels) any-width, any-precision supernet on CIFAR-10 on one
CPU core, at nice 19 on a shared machine: trained once (sandwich rule, and Delayed epsilon-Shrinking
at equal epochs) against separately trained models of the same configurations; accuracy, weight
bytes, BOPs and packed-runtime latency per sub-net.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/serve/supernet_resnet20.py train sandwich des
    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/serve/supernet_resnet20.py train alone
    OMP_NUM_THREADS=1 python benchmarks/serve/supernet_resnet20.py report
    OMP_NUM_THREADS=1 python benchmarks/serve/supernet_resnet20.py train sandwich --smoke  # a dry run

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
latency at batch 1/8/32 (the fastest of 5 rounds over all sub-nets x 3 runs, one thread). Writes
``benchmarks/results/serve_resnet20.{json,md}``. Each training is a Trainer run directory under
``--work``; a killed run resumes from its last epoch.
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
from lowbit.models import build_model
from lowbit.nn.supernet import Supernet
from lowbit.train import TrainConfig, Trainer, evaluate, load_checkpoint
from lowbit.train.sandwich import DelayedShrinking, SandwichLoss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import run_meta, write_results

STAGES = {"layer1.*": 0.5, "layer2.*": 0.75, "layer3.*": 1.0}
SUBNETS = [{"name": f"w{w}-b{b}", "width": w, "bits": b} for w in (0.5, 1.0) for b in (2, 4, 8)] + [
    {"name": "stages-b4", "width": STAGES, "bits": 4}]
ALONE = ["w1.0-b8", "w0.5-b2", "stages-b4"]
MODEL = {"name": "resnet20", "kwargs": {"width_mult": 0.5}}  # 8/16/32 channels: the CPU budget
SHAPE = (3, 32, 32)


def build(subnets: list[dict[str, Any]]) -> Supernet:
    torch.manual_seed(0)
    return Supernet(build_model(MODEL["name"], **MODEL["kwargs"]), subnets, SHAPE)


def get_data(a: argparse.Namespace) -> tuple[Any, Any, Any]:
    data = load_dataset("cifar10", data_dir=a.data_dir, batch_size=64, test_batch_size=500, seed=0)
    pool = data.train.subset(a.subset, seed=0)
    val, train = pool.split(a.val, seed=0)
    test = data.test if a.test_n >= data.test.num_samples else data.test.subset(a.test_n, seed=0)
    return train, val.replace(augment=None, shuffle=False), test


def accuracies(sn: Supernet, loader: Any) -> dict[str, float]:
    out = {}
    for n in sn.names:
        sn.set_subnet(n)
        out[n] = float(evaluate(sn, loader)["acc"])
    return out


def train_one(name: str, a: argparse.Namespace, data: tuple[Any, Any, Any]) -> dict[str, Any]:
    """One training (a supernet variant or one configuration alone), resumable; its result JSON."""
    run = Path(a.work) / name
    done = run / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    train, val, test = data
    alone = name.startswith("alone-")
    sn = build([next(s for s in SUBNETS if s["name"] == name[len("alone-"):])] if alone else SUBNETS)
    cfg = TrainConfig(epochs=a.epochs, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                      schedule="cosine", seed=0, tensorboard=False)
    loss, callbacks = None, []
    if not alone:
        sched = DelayedShrinking(a.epochs * len(train), warmup=0.25) if name == "des" else None
        loss = SandwichLoss(n_random=1, seed=0, schedule=sched)
        callbacks = [loss]
    t0 = time.time()
    Trainer(sn, train, None, cfg, run, loss_fn=loss, callbacks=callbacks).fit(resume=True)
    train_s = time.time() - t0
    sn.eval()
    res = {"name": name, "epochs": a.epochs, "train_s_last_session": round(train_s, 1),
           "val": accuracies(sn, val), "test": accuracies(sn, test)}
    atomic_write_text(done, json.dumps(res, indent=1) + "\n")
    return res


def load_trained(name: str, a: argparse.Namespace) -> Supernet:
    sn = build(SUBNETS)
    load_checkpoint(Path(a.work) / name / "checkpoint.safetensors", sn)
    return sn.eval()


def fastest_ms(fn: Any, x: torch.Tensor, repeats: int) -> float:
    ts = []
    with torch.inference_mode():
        fn(x)
        for _ in range(repeats):
            t = time.perf_counter()
            fn(x)
            ts.append(1e3 * (time.perf_counter() - t))
    return min(ts)


def report(a: argparse.Namespace, argv: list[str] | None, t0: float) -> None:
    from lowbit.export.report import model_report
    from lowbit.export.supernet_file import load_supernet_file, save_supernet_file
    from lowbit.serve import SubnetEngines

    work = Path(a.work)
    res = {v: json.loads((work / v / "result.json").read_text()) for v in ("sandwich", "des")
           if (work / v / "result.json").exists()}
    alone = {n: json.loads((work / f"alone-{n}" / "result.json").read_text()) for n in ALONE
             if (work / f"alone-{n}" / "result.json").exists()}
    if res:
        best: str | None = max(res, key=lambda v: sum(res[v]["val"].values()))
        sn = load_trained(best, a)
        for n in sn.names:
            sn.info[n] = {"val_acc": res[best]["val"][n], "test_acc": res[best]["test"][n]}
    else:  # no supernet finished training: sizes, BOPs and latency of the initial weights only
        best, sn = None, build(SUBNETS).eval()
    path = work / "resnet20.supernet"
    sizes = save_supernet_file(sn, path, model_spec=MODEL)
    engines = SubnetEngines(load_supernet_file(path), "packed")  # from the stored codes
    g = torch.Generator().manual_seed(0)
    xs = {b: torch.randn((b, *SHAPE), generator=g) for b in (1, 8, 32)}
    lat: dict[str, dict[str, float]] = {n: {} for n in sn.names}
    for _ in range(5):
        for n in sn.names:
            for b, x in xs.items():
                t = fastest_ms(lambda x, n=n: engines.run(x, n), x, 3)
                lat[n][f"packed_b{b}_ms"] = min(t, lat[n].get(f"packed_b{b}_ms", math.inf))
    rows = []
    for n in sn.names:
        rep = model_report(sn.extract(n), SHAPE)
        row = {"name": n, **sn.cost(n), **lat[n], "runtime": engines.runtime[n],
               "packed_max_abs_diff": engines.max_abs_diff.get(n),
               "weight_bytes": rep.file_bytes, "report_bops": rep.total_bops,
               **{f"{v}_val": res[v]["val"][n] for v in res}, **{f"{v}_test": res[v]["test"][n] for v in res}}
        if n in alone:
            row.update({"alone_val": alone[n]["val"][n], "alone_test": alone[n]["test"][n]})
        rows.append(row)
    payload = {**run_meta(__file__, argv, t0, seed=0, epochs=a.epochs, subset=a.subset, val=a.val,
                          test_n=a.test_n, model=MODEL, subnets=SUBNETS, chosen_variant=best),
               "file": sizes, "rows": rows}
    write_results(a.out, "serve_resnet20", payload, markdown(payload, list(res)))


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
        "fastest of 15 runs in 5 rounds over all sub-nets, one thread, on a shared 2-core machine.", "",
        f"Supernet file: {f['file_bytes']:,} bytes holding every sub-net's codes "
        f"({f['stored_tensor_bytes']:,} tensor bytes stored once; {f['subnet_tensor_bytes']:,} if each "
        "sub-net were stored separately); "
        f"the largest sub-net alone: {f['largest_subnet_bytes']:,} bytes; the latent float weights and "
        f"per-sub-net state of the trainable supernet: {f['latent_bytes']:,} bytes.", "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in p["rows"]:
        sub = next(s for s in p["subnets"] if s["name"] == r["name"])
        cells = [r["name"], f"{sub['bits']}/{sub['bits']}", f"{r['weight_bytes']:,}", f"{r['report_bops']:,}",
                 f"{r['packed_b1_ms']:.2f} / {r['packed_b8_ms']:.2f} / {r['packed_b32_ms']:.2f}"]
        cells += [f"{100 * r[f'{v}_val']:.2f}% / {100 * r[f'{v}_test']:.2f}%" for v in variants]
        cells.append(f"{100 * r['alone_val']:.2f}% / {100 * r['alone_test']:.2f}%" if "alone_test" in r
                     else "not trained")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["train", "report"])
    p.add_argument("which", nargs="*", default=[], help="train: sandwich, des, alone")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--subset", type=int, default=2500)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--test-n", type=int, default=1000, help="random test images (10000: all)")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--work", default="runs/serve_r20")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs")
    a = p.parse_args(argv)
    if a.smoke:
        a.subset, a.val, a.epochs, a.test_n, a.work = 256, 64, 1, 256, a.work + "_smoke"
    torch.set_num_threads(1)
    t0 = time.time()
    Path(a.work).mkdir(parents=True, exist_ok=True)
    if a.phase == "report":
        report(a, argv, t0)
        return 0
    data = get_data(a)
    names: list[str] = []
    for w in a.which:
        names += [f"alone-{n}" for n in ALONE] if w == "alone" else [w]
    for n in names:
        r = train_one(n, a, data)
        print(n, json.dumps({k: r[k] for k in ("val", "test")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
