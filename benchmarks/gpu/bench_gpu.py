"""GPU check and training throughput, in at most ~8 minutes of one GPU.

    python benchmarks/gpu/bench_gpu.py --data /path/to/cifar10-jpeg.zip     # on a GPU machine
    python benchmarks/gpu/bench_gpu.py --smoke --out /tmp/gpu-smoke          # CPU, tiny sizes

1. runs the CUDA test subset (``pytest tests/test_devices.py -k cuda``);
2. measures ResNet-20 training on CIFAR-10 through the real path (``lowbit.train.Trainer``,
   the data set held on the GPU, crop+flip per batch on the GPU): images/s and the time of
   one full epoch (the second of two: the first pays for cuDNN autotuning), for float and
   QAT models (W1A4: binary weights, W2A4: DoReFa, W4A4: LSQ; 4-bit LSQ activations; first
   and last layer float), fp32 and bf16, batch 128 and a 256/512 sweep;
3. runs N identical trainings at once (separate processes on the one GPU) and reports their
   summed throughput and peak memory, i.e. how many small runs share one GPU;
4. writes ``gpu.json`` and ``gpu.md`` (with provenance: commit, command, machine, versions).

Every configuration after the time budget (``--budget-s``) is listed as skipped, not run.
Without ``--data`` (or with ``--smoke``) the images are random uint8 tensors of CIFAR-10's
shape: throughput does not depend on pixel values, and the results say which was used.

Real CIFAR-10 on a lent GPU machine whose transfer limit (64 MiB with the source tree) is below
the zip's 63 MB plus the tree: split it here into the ignored ``data/`` folder, carry one half
per call while the machine stays warm (a carried path replaces only itself there), and join them
there (the join is byte-exact; check with ``sha256sum`` against the zip's)::

    mkdir -p data && split -b 32m ../shared/data/cifar10-jpeg.zip data/cifar10-jpeg.zip.part-
    # call 1 carries data/cifar10-jpeg.zip.part-aa and runs: true
    # call 2 carries data/cifar10-jpeg.zip.part-ab and runs:
    cat data/cifar10-jpeg.zip.part-a? > data/cifar10-jpeg.zip && rm data/cifar10-jpeg.zip.part-a? \
        && python benchmarks/gpu/bench_gpu.py --data data/cifar10-jpeg.zip --out "$OUT" \
        && python benchmarks/cifar10/claims.py --budget gpu --data-dir data --stop-after 240 \
               --archive "$OUT/runs.tar.gz" --archive-slim
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.common import ROOT, run_meta, write_results
from lowbit.data import Augment, BatchLoader
from lowbit.models import build_model
from lowbit.nn import quantize
from lowbit.train import TrainConfig, Trainer

ACT = {"method": "lsq", "bits": 4}
RECIPES: dict[str, dict[str, Any] | None] = {
    "float": None,
    "w1a4": {"weight": {"method": "binary", "bits": 1, "per_channel": True}, "activation": ACT},
    "w2a4": {"weight": {"method": "dorefa", "bits": 2}, "activation": ACT},
    "w4a4": {"weight": {"method": "lsq", "bits": 4, "per_channel": True}, "activation": ACT},
}
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def recipe(mode: str) -> dict[str, Any] | None:
    d = RECIPES[mode]
    if d is None:
        return None
    return {"default": d, "rules": [{"match": "@first", "weight": None, "activation": None},
                                    {"match": "@last", "weight": None}]}


def load_images(data: str | None, n: int | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """CIFAR-10 training images as uint8 (N, 3, 32, 32) and labels, and where they came from."""
    if data:
        from lowbit.data import load_dataset

        b = load_dataset("imagefolder", data_dir=data, val_size=None, workers=os.cpu_count() or 2)
        x, y = b.train.x, b.train.y  # type: ignore[attr-defined]
        src = f"CIFAR-10 JPEG copy ({data})"
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (50000, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (50000,), generator=g)
        src = "random uint8 images of CIFAR-10's shape (throughput only)"
    if n is not None:
        x, y = x[:n], y[:n]
    return x, y, src


def train_one(mode: str, precision: str, batch: int, device: torch.device, x: torch.Tensor,
              y: torch.Tensor, epochs: int = 2, compile_: bool = False) -> dict[str, Any]:
    """Train ResNet-20 for ``epochs`` epochs; the last epoch's time and images/s."""
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10)
    r = recipe(mode)
    if r is not None:
        quantize(model, r)
    loader = BatchLoader(x, y, batch_size=batch, shuffle=True, seed=0, mean=CIFAR_MEAN, std=CIFAR_STD,
                         augment=Augment(pad=4, flip=True)).to(device)
    cfg = TrainConfig(epochs=epochs, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
                      precision=precision, channels_last=device.type == "cuda", compile=compile_,
                      tensorboard=False, log_every=100)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.backends.cudnn.benchmark = True
    hist = Trainer(model, loader, None, cfg, device=device).fit()
    last = hist[-1]
    out = {"mode": mode, "precision": precision, "batch": batch, "images": int(x.shape[0]),
           "epoch_time_s": round(last["epoch_time_s"], 3), "images_per_s": round(last["images_per_s"], 1),
           "train_loss": round(last["train_loss"], 4), "compile": compile_}
    if device.type == "cuda":
        out["peak_mem_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def concurrent(n: int, args: argparse.Namespace, mode: str, precision: str, batch: int) -> dict[str, Any]:
    """``n`` worker processes training at once on this machine's one device."""
    cmd = [sys.executable, __file__, "--worker", mode, precision, str(batch), "--device", args.device]
    if args.smoke:
        cmd.append("--smoke")
    if args.data:
        cmd += ["--data", args.data]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=ROOT) for _ in range(n)]
    outs = [p.communicate() for p in procs]
    wall = time.time() - t0
    bad = [err[-2000:] for p, (_, err) in zip(procs, outs, strict=True) if p.returncode != 0]
    if bad:
        return {"n": n, "error": bad[0]}
    runs = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    return {"n": n, "mode": mode, "precision": precision, "batch": batch, "wall_s": round(wall, 1),
            "images_per_s_each": [r["images_per_s"] for r in runs],
            "images_per_s_total": round(sum(r["images_per_s"] for r in runs), 1),
            "epoch_time_s_each": [r["epoch_time_s"] for r in runs],
            "peak_mem_mib_each": [r.get("peak_mem_mib") for r in runs]}


def cuda_tests(smoke: bool) -> dict[str, Any]:
    """The CUDA test subset (tests named *cuda*; they skip without a GPU)."""
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_devices.py", "-k", "cuda"],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    tail = (p.stdout + p.stderr).strip().splitlines()[-1:] if (p.stdout + p.stderr).strip() else [""]
    return {"returncode": p.returncode, "summary": tail[0], "wall_s": round(time.time() - t0, 1)}


def render(meta: dict[str, Any], res: dict[str, Any]) -> str:
    m = meta["machine"]
    dev = ", ".join(m["gpus"]) or m["cpu"]
    lines = ["# Training throughput on one GPU (ResNet-20, CIFAR-10)", "",
             f"Command: `{meta['command']}` — commit {str(meta['git']['commit'])[:12]}"
             f"{' (dirty tree)' if meta['git']['dirty'] else ''}, {dev}, torch {meta['torch']}, "
             f"wall time {meta['wall_time_s']:.0f} s. Data: {res['data']}. "
             + ("**Smoke run on the CPU with tiny sizes: these numbers say nothing about a GPU.**"
                if res["smoke"] else ""), "",
             f"CUDA test subset: {res['tests'].get('summary', 'not run')}", "",
             "Each row is one training process (lowbit.train.Trainer, data on the device, random crop + "
             "flip per batch on the device, channels_last on CUDA); time and images/s of the second of two "
             "epochs. QAT: 4-bit LSQ activations, first and last layer float. One run per row (no seeds: a "
             "speed measurement).", "",
             "| model | precision | batch | epoch time (s) | images/s "
             "| vs float (same precision, batch, compile) | peak memory (MiB) |",
             "|---|---|---|---|---|---|---|"]
    base = {(r["precision"], r["batch"], r.get("compile", False)): r for r in res["single"]
            if r.get("mode") == "float"}
    for r in res["single"]:
        if "error" in r or "skipped" in r:
            why = r.get("skipped") or r["error"][:80]
            name = f"{r['mode']} (torch.compile)" if r.get("compile") else r["mode"]
            lines.append(f"| {name} | {r['precision']} | {r['batch']} | {why} | | | |")
            continue
        b = base.get((r["precision"], r["batch"], r.get("compile", False)))
        ratio = f"{r['epoch_time_s'] / b['epoch_time_s']:.2f}x time" if b and "epoch_time_s" in b else "-"
        name = f"{r['mode']} (torch.compile)" if r.get("compile") else r["mode"]
        lines.append(f"| {name} | {r['precision']} | {r['batch']} | {r['epoch_time_s']:.2f} | "
                     f"{r['images_per_s']:,.0f} | {ratio} | {r.get('peak_mem_mib', '-')} |")
    lines += ["", "Concurrent runs (identical processes sharing the device):", "",
              "| runs | model | precision | batch | images/s each | images/s total "
              "| peak memory each (MiB) |",
              "|---|---|---|---|---|---|---|"]
    for c in res["concurrent"]:
        if "error" in c or "skipped" in c:
            lines.append(f"| {c['n']} | {c.get('skipped') or c['error'][-80:]} | | | | | |")
            continue
        each = ", ".join(f"{v:,.0f}" for v in c["images_per_s_each"])
        mem = ", ".join(str(v) for v in c["peak_mem_mib_each"])
        lines.append(f"| {c['n']} | {c['mode']} | {c['precision']} | {c['batch']} | {each} | "
                     f"{c['images_per_s_total']:,.0f} | {mem} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="the CIFAR-10 image-folder zip (else random images of its shape)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU check of this script)")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting new measurements after this")
    p.add_argument("--concurrent", type=int, nargs="+", default=[1, 4], help="numbers of simultaneous runs")
    p.add_argument("--compile", action="store_true", help="also time torch.compile for float/w4a4 bf16")
    p.add_argument("--worker", nargs=3, metavar=("MODE", "PRECISION", "BATCH"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    from lowbit.train.distributed import resolve_device

    device = resolve_device(a.device)
    n_images = 256 if a.smoke else None
    if a.smoke:
        torch.set_num_threads(1)
    if a.worker:  # one run of a concurrent group: print its JSON line
        x, y, _ = load_images(None if a.smoke else a.data, n_images)
        mode, precision, batch = a.worker[0], a.worker[1], int(a.worker[2])
        print(json.dumps(train_one(mode, precision, batch, device, x, y, epochs=1 if a.smoke else 2)))
        return 0
    t0 = time.time()
    deadline = t0 + a.budget_s
    tests = {"summary": "skipped (--smoke)"} if a.smoke else cuda_tests(a.smoke)
    x, y, src = load_images(None if a.smoke else a.data, n_images)
    batches = (32,) if a.smoke else (128,)
    sweep = (64,) if a.smoke else (256, 512)
    modes = ("float", "w1a4") if a.smoke else ("float", "w1a4", "w2a4", "w4a4")
    plan = [(m, prec, b) for prec in ("fp32", "bf16") for m in modes for b in batches]
    plan += [(m, "bf16", b) for m in ("float", "w4a4") for b in sweep]
    single: list[dict[str, Any]] = []
    conc: list[dict[str, Any]] = []

    def save() -> None:  # after every measurement: a run stopped from outside keeps what it measured
        res = {"smoke": a.smoke, "device": str(device), "data": src, "tests": tests, "single": single,
               "concurrent": conc}
        meta = run_meta(__file__, argv, t0, seeds=[0], smoke=a.smoke)
        write_results(a.out, "gpu_smoke" if a.smoke else "gpu", {"meta": meta, **res}, render(meta, res))

    def measure(mode: str, prec: str, b: int, compile_: bool = False) -> None:
        if time.time() > deadline:
            single.append({"mode": mode, "precision": prec, "batch": b, "compile": compile_,
                           "skipped": "time budget spent"})
        else:
            try:
                single.append(train_one(mode, prec, b, device, x, y, epochs=1 if a.smoke else 2,
                                        compile_=compile_))
            except Exception as e:  # recorded, not hidden: a failing configuration is a result
                single.append({"mode": mode, "precision": prec, "batch": b, "compile": compile_,
                               "error": f"{type(e).__name__}: {e}"})
        print(json.dumps(single[-1]), flush=True)
        save()

    for mode, prec, b in plan:
        measure(mode, prec, b)
    for n in a.concurrent:
        if time.time() > deadline:
            conc.append({"n": n, "skipped": "time budget spent"})
        else:
            conc.append(concurrent(n, a, "w4a4", "fp32" if a.smoke else "bf16", batches[0]))
        print(json.dumps(conc[-1]), flush=True)
        save()
    if a.compile:  # last: compiling costs tens of seconds per model
        for mode in ("float", "w4a4"):
            measure(mode, "bf16" if not a.smoke else "fp32", batches[0], compile_=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
