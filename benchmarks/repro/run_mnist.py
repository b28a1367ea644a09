"""Reproduction table: every method at its paper's bit setting, fine-tuned from one shared
full-precision LeNet-5 checkpoint, on MNIST and Fashion-MNIST.

    python benchmarks/repro/run_mnist.py                       # both datasets, all methods
    python benchmarks/repro/run_mnist.py --datasets mnist --q-epochs 5 --methods twn-w2 ttq-w2

Each dataset runs in its own process (``--jobs``). Writes ``benchmarks/results/mnist.md`` and
``mnist.json`` and keeps the runs under ``--runs-dir``: a rerun, e.g. after a kill, resumes
unfinished runs and reuses finished ones, so it rebuilds the table quickly. Every number in
the table comes from the run directory named beside it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from lowbit.experiment import RunSpec, train_run
from lowbit.models import build_model
from lowbit.recipe import load_recipe
from lowbit.train import atomic_write_text

# (recipe, model kwargs, paper the setting comes from)
METHODS: list[tuple[str, dict[str, Any], str]] = [
    ("lenet5-w1a4", {}, "binary + LSQ acts, first/last float (main job; peer budget)"),
    ("lenet5-w2a4", {}, "LSQ weights + PACT, first/last float (peer budget)"),
    ("lenet5-w4a4", {}, "LSQ weights + PACT, first/last float (peer budget)"),
    ("lenet5-w1a4-all", {}, "binary + PACT, every layer quantized"),
    ("lenet5-w2a2-all", {}, "LSQ, every layer quantized"),
    ("bcgd-w1a4", {}, "BCGD, Yin et al. 2019"),
    ("binaryrelax-w1a4", {}, "BinaryRelax, Yin et al. 2018"),
    ("twn-w2", {}, "TWN, Li et al. 2016"),
    ("ttq-w2", {}, "TTQ, Zhu et al. 2017"),
    ("tga-w2", {}, "TGA, He & Fan 2019"),
    ("ternary-stat-w2", {}, "He, Gong & Fan 2019"),
    ("ternary-stat-tex2-w2", {}, "He, Gong & Fan 2019 (residual expansion)"),
    ("lbw-w2", {}, "LBW-Net, Yin et al. 2019 (exact ternary)"),
    ("lbw-w4", {}, "LBW-Net, Yin et al. 2019 (powers of two)"),
    ("dorefa-w1a2", {}, "DoReFa-Net, Zhou et al. 2016"),
    ("dorefa-w2a4", {}, "DoReFa-Net, Zhou et al. 2016"),
    ("wrpn-w2a4", {"width_mult": 2.0}, "WRPN, Mishra et al. 2018 (2x wide, range fitted to the weights)"),
    ("wrpn-unit-w2a4", {"width_mult": 2.0}, "WRPN, Mishra et al. 2018 (2x wide, fixed [-1, 1] range)"),
    ("pact-w4a4", {}, "PACT, Choi et al. 2018"),
    ("lsq-w2a2", {}, "LSQ, Esser et al. 2020"),
    ("lsq-w4a4", {}, "LSQ, Esser et al. 2020"),
]

FP_TRAIN = {"optimizer": "adam", "lr": 2e-3, "schedule": "cosine", "weight_decay": 0.0, "seed": 0}


def bits_of(recipe_name: str) -> tuple[str, str, str]:
    """(weight bits, activation bits, which layers stay float) from the recipe."""
    r = load_recipe(recipe_name)
    w, a = r.default_weight, r.default_activation
    wb = "32" if w is None else str(w.bits * len(w.options.get("expansion") or [0]))
    ab = "32" if a is None else str(a.bits)
    first = r.plan("conv1", "conv1", "fc3")
    last = r.plan("fc3", "conv1", "fc3")
    kept = [n for n, p in (("first", first), ("last", last)) if p.weight is None]
    return wb, ab, "+".join(kept) if kept else "none"


class Finished:
    """A finished run read back from its ``result.json`` (``--report-only``)."""

    def __init__(self, run_dir: Path) -> None:
        d = json.loads((run_dir / "result.json").read_text())
        self.test_acc, self.wall_time_s, self.size = d["test_acc"], d["wall_time_s"], d.get("size")


def train_seconds(run_dir: Path) -> float:
    """Training time of a run: the sum of its epochs' times in metrics.jsonl (a run that was
    resumed, or reused by a later invocation, still reports the time its epochs took)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return float("nan")
    lines = [line for line in path.read_text().splitlines() if line]
    return sum(json.loads(line).get("epoch_time_s", 0.0) for line in lines)


def run_or_read(spec: RunSpec, report_only: bool) -> Any:
    if report_only:
        if not (Path(spec.out) / "result.json").exists():
            return None
        return Finished(Path(spec.out))
    return train_run(spec, resume=True)


def fp_run(dataset: str, runs: Path, epochs: int, width: float,
           report_only: bool = False) -> tuple[Any, str, Path]:
    name = "fp" if width == 1.0 else f"fp-w{width:g}"
    out = runs / dataset / name
    kw = {} if width == 1.0 else {"width_mult": width}
    cmd = (f"lowbit train --model lenet5 --data {dataset} --epochs {epochs} --optimizer adam "
           f"--lr 2e-3 --out {out}" + (f" --model-arg width_mult={width:g}" if kw else ""))
    res = run_or_read(RunSpec(model="lenet5", model_kwargs=kw, dataset=dataset,
                              train={**FP_TRAIN, "epochs": epochs}, out=str(out)), report_only)
    return res, cmd, out


def run_dataset(ds: str, methods: list[tuple[str, dict[str, Any], str]], runs: Path, fp_epochs: int,
                q_epochs: int, threads: int, report_only: bool = False,
                ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The float reference(s) and every method of one dataset (one process, ``threads`` threads)."""
    torch.set_num_threads(threads)
    fps: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for width in sorted({1.0, *(float(kw.get("width_mult", 1.0)) for _, kw, _ in methods)}):
        res, cmd, fp_dir = fp_run(ds, runs, fp_epochs, width, report_only)
        if res is None:
            if width == 1.0:
                raise SystemExit(f"--report-only: the float run of {ds} has not finished")
            continue  # methods on this width are left out below
        model = res.model if not isinstance(res, Finished) else build_model("lenet5", width_mult=width)
        fp32 = 4 * sum(p.numel() for p in model.parameters())
        fps[f"{ds}/w{width:g}"] = {"dataset": ds, "width_mult": width, "test_acc": res.test_acc,
                                   "epochs": fp_epochs,
                                   "wall_time_s": round(train_seconds(fp_dir), 1),
                                   "fp32_bytes": fp32, "command": cmd}
        print(f"{ds:14s} float width {width:g}: acc {100 * res.test_acc:.2f}% {res.wall_time_s:.0f}s",
              flush=True)
    fp_ref = fps[f"{ds}/w1"]  # drops are against the standard-width float model
    for recipe, kw, paper in methods:
        width = float(kw.get("width_mult", 1.0))
        if f"{ds}/w{width:g}" not in fps:
            continue
        init = runs / ds / ("fp" if width == 1.0 else f"fp-w{width:g}") / "best.safetensors"
        run_out = runs / ds / recipe
        cmd = (f"lowbit train --model lenet5 --data {ds} --recipe {recipe} --init {init} "
               f"--epochs {q_epochs} --out {run_out}"
               + (f" --model-arg width_mult={width:g}" if width != 1.0 else ""))
        res = run_or_read(RunSpec(model="lenet5", model_kwargs=dict(kw), dataset=ds, recipe=recipe,
                                  train={"epochs": q_epochs}, init=str(init), out=str(run_out)),
                          report_only)
        if res is None:
            print(f"{ds:14s} {recipe:22s} not finished", flush=True)
            rows.append({"dataset": ds, "recipe": recipe, "paper": paper, "missing": True,
                         "width_mult": width, "command": cmd})
            continue
        wb, ab, kept = bits_of(recipe)
        rows.append({
            "dataset": ds, "recipe": recipe, "paper": paper, "w_bits": wb, "a_bits": ab,
            "float_layers": kept, "width_mult": width, "test_acc": res.test_acc,
            "fp_acc": fp_ref["test_acc"], "drop_pp": 100 * (fp_ref["test_acc"] - res.test_acc),
            "packed_bytes": res.size["file_bytes"] if res.size else None,
            "compression": fp_ref["fp32_bytes"] / res.size["file_bytes"] if res.size else None,
            "epochs": q_epochs, "wall_time_s": round(train_seconds(run_out), 1), "command": cmd,
            "fp_same_width_acc": fps[f"{ds}/w{width:g}"]["test_acc"],
        })
        print(f"{ds:14s} {recipe:22s} W{wb}/A{ab} acc {100 * res.test_acc:.2f}% "
              f"(FP {100 * fp_ref['test_acc']:.2f}%) {res.wall_time_s:.0f}s", flush=True)
    return fps, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    p.add_argument("--methods", nargs="+", help="recipe names (default: all)")
    p.add_argument("--fp-epochs", type=int, default=10)
    p.add_argument("--q-epochs", type=int, default=10)
    p.add_argument("--runs-dir", default="runs/repro")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--threads", type=int, default=1, help="torch threads per dataset process")
    p.add_argument("--jobs", type=int, default=2, help="datasets trained in parallel processes")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: build the table from the runs that have finished")
    a = p.parse_args(argv)
    runs = Path(a.runs_dir)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in METHODS if not a.methods or m[0] in a.methods]
    t_start = time.time()
    results: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, a.jobs), mp_context=ctx) as pool:
        futures = {pool.submit(run_dataset, ds, methods, runs, a.fp_epochs, a.q_epochs, a.threads,
                               a.report_only): ds
                   for ds in a.datasets}
        for fut, ds in futures.items():
            results[ds] = fut.result()
    fps = {k: v for ds in a.datasets for k, v in results[ds][0].items()}
    rows = [r for ds in a.datasets for r in results[ds][1]]
    meta = {
        "command": "python benchmarks/repro/run_mnist.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "fp_epochs": a.fp_epochs, "q_epochs": a.q_epochs, "torch": torch.__version__,
        "threads": a.threads, "jobs": a.jobs, "machine": platform.processor() or platform.machine(),
        "wall_time_s": round(time.time() - t_start, 1), "report_only": a.report_only,
    }
    atomic_write_text(out / "mnist.json", json.dumps({"meta": meta, "fp": fps, "rows": rows}, indent=1))
    atomic_write_text(out / "mnist.md", render(meta, fps, rows))
    return 0


def target(r: dict[str, Any]) -> str:
    """The MNIST bar: within 0.5 pp of float at W2/A4 or above, BCGD W1/A4 within 0.7 pp."""
    if r["dataset"] != "mnist":
        return ""
    if r["recipe"].startswith("bcgd"):
        bar = 0.7
    elif int(r["w_bits"]) >= 2 and int(r["a_bits"]) >= 4:
        bar = 0.5
    else:
        return ""
    # a widened model must meet the bar against both the standard and its own-width float model
    drop = max(r["drop_pp"], 100 * (r.get("fp_same_width_acc", r["fp_acc"]) - r["test_acc"]))
    return f"{'yes' if drop <= bar else 'NO'} (<= {bar})"


def render(meta: dict[str, Any], fps: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Reproduction on MNIST and Fashion-MNIST (LeNet-5)",
        "",
        f"Command: `{meta['command']}` — torch {meta['torch']}, {meta['threads']} thread(s), "
        f"total wall time {meta['wall_time_s']:.0f} s. Each quantized run starts from the same float "
        f"checkpoint of its dataset ({meta['fp_epochs']} epochs, Adam) and fine-tunes "
        f"{meta['q_epochs']} epochs with the recipe's settings. One run per row (seed 0). "
        "Size is the whole packed `.lowbit` file; compression is against the float LeNet-5's "
        "FP32 parameters. Train time is the sum of a run's epoch times from its metrics.jsonl. "
        "Drops are against the standard-width float model; a widened (WRPN) row also gives its drop "
        "against the float model of its own width, and the MNIST bar must hold against both.",
        "",
        *(["Rebuilt with `--report-only` from the finished run directories: the runs were trained by "
           "`python benchmarks/repro/run_mnist.py` and, for some rows, by the `lowbit train` command shown "
           "in the row, started beside it to finish sooner (same settings).", ""]
          if meta.get("report_only") else []),
        "Float references:",
        "",
        "| dataset | width | test acc | epochs | train time (s) | command |",
        "|---|---|---|---|---|---|",
    ]
    for f in fps.values():
        lines.append(f"| {f['dataset']} | {f['width_mult']:g}x | {100 * f['test_acc']:.2f}% | "
                     f"{f['epochs']} | {f['wall_time_s']:.0f} | `{f['command']}` |")
    lines += [
        "",
        "| dataset | method (recipe) | W/A bits | float layers | test acc | drop vs FP (pp) | MNIST bar met "
        "| packed bytes | compression | epochs | train time (s) | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("missing"):
            lines.append(f"| {r['dataset']} | {r['paper']} (`{r['recipe']}`) | not run to the end yet | "
                         f"| | | | | | | | `{r['command']}` |")
            continue
        size = f"{r['packed_bytes']:,}" if r["packed_bytes"] else "-"
        comp = f"{r['compression']:.1f}x" if r["compression"] else "-"
        wide = ""
        if r["width_mult"] != 1.0:
            same = 100 * r["fp_same_width_acc"]
            wide = (f"; vs the {r['width_mult']:g}x float model ({same:.2f}%): "
                    f"{same - 100 * r['test_acc']:+.2f} pp")
        lines.append(
            f"| {r['dataset']} | {r['paper']} (`{r['recipe']}`) | W{r['w_bits']}/A{r['a_bits']} | "
            f"{r['float_layers']} | {100 * r['test_acc']:.2f}% | {r['drop_pp']:+.2f}{wide} | {target(r)} | "
            f"{size} | {comp} | "
            f"{r['epochs']} | {r['wall_time_s']:.0f} | `{r['command']}` |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
