"""Reproduction table: every method at its paper's bit setting, fine-tuned from a
full-precision LeNet-5 checkpoint of the same seed, on MNIST and Fashion-MNIST.

    python benchmarks/repro/run_mnist.py                       # both datasets, all methods, seed 0
    python benchmarks/repro/run_mnist.py --datasets mnist --seeds 0 1 2 \
        --methods lenet5-w1a4 lenet5-w2a4 lenet5-w4a4          # the headline rows, 3 seeds

Evidence protocol: every run holds out the last 5,000 training images as a validation split,
which picks the best epoch; the test set is evaluated once, on that epoch's checkpoint. Rows
report mean ± std over the seeds run (n given). Rows of the previous results file that this
invocation did not regenerate are kept in a separate table, labelled with the protocol they
were measured under.

Each dataset runs in its own process (``--jobs``). Writes ``benchmarks/results/mnist.md`` and
``mnist.json`` and keeps the runs under ``--runs-dir``: a rerun, e.g. after a kill, resumes
unfinished runs and reuses finished ones, so it rebuilds the table quickly. Every number in
the table comes from the run directories named beside it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.common import run_meta
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

FP_TRAIN = {"optimizer": "adam", "lr": 2e-3, "schedule": "cosine", "weight_decay": 0.0}
OLD_PROTOCOL = ("old protocol: one run (seed 0), no validation split; each row is its last epoch's test "
                "accuracy, and the float checkpoint the fine-tunes start from is the float run's epoch of "
                "best test accuracy (selection on the test set); not regenerated")


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
        self.best_acc = d.get("best_acc")


def train_seconds(run_dir: Path) -> float:
    """Training time of a run: the sum of its epochs' times in metrics.jsonl (a run that was
    resumed, or reused by a later invocation, still reports the time its epochs took)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return float("nan")
    lines = [line for line in path.read_text().splitlines() if line]
    return sum(json.loads(line).get("epoch_time_s", 0.0) for line in lines)


def run_or_read(spec: RunSpec, report_only: bool) -> Any:
    if report_only or (Path(spec.out) / "result.json").exists():
        if not (Path(spec.out) / "result.json").exists():
            return None
        return Finished(Path(spec.out))
    return train_run(spec, resume=True)


def fp_run(dataset: str, runs: Path, epochs: int, width: float, seed: int,
           report_only: bool = False) -> tuple[Any, str, Path]:
    name = "fp" if width == 1.0 else f"fp-w{width:g}"
    out = runs / dataset / f"s{seed}" / name
    kw = {} if width == 1.0 else {"width_mult": width}
    cmd = (f"lowbit train --model lenet5 --data {dataset} --epochs {epochs} --optimizer adam "
           f"--lr 2e-3 --seed {seed} --out {out}" + (f" --model-arg width_mult={width:g}" if kw else ""))
    res = run_or_read(RunSpec(model="lenet5", model_kwargs=kw, dataset=dataset,
                              train={**FP_TRAIN, "epochs": epochs, "seed": seed}, out=str(out)), report_only)
    return res, cmd, out


def commit_text(meta: dict[str, Any]) -> str:
    """``commit <first 12 hex digits>``, plus `` (dirty tree)`` where tracked files differed from it."""
    git = meta["git"]
    return f"commit {str(git['commit'])[:12]}{' (dirty tree)' if git['dirty'] else ''}"


def _stats(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def run_dataset(ds: str, methods: list[tuple[str, dict[str, Any], str]], runs: Path, fp_epochs: int,
                q_epochs: int, seeds: list[int], threads: int, report_only: bool = False,
                ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The float reference(s) and every method of one dataset, every seed (one process,
    ``threads`` threads); seed-major, so an interrupted invocation leaves whole seeds."""
    torch.set_num_threads(threads)
    widths = sorted({1.0, *(float(kw.get("width_mult", 1.0)) for _, kw, _ in methods)})
    per_seed: dict[tuple[str, int], dict[str, Any]] = {}
    fp_info: dict[str, dict[str, Any]] = {}
    for seed in seeds:
        fp_acc: dict[float, float] = {}
        for width in widths:
            res, cmd, fp_dir = fp_run(ds, runs, fp_epochs, width, seed, report_only)
            key = f"{ds}/w{width:g}"
            if res is None:
                continue
            model = build_model("lenet5", width_mult=width)
            fp_info.setdefault(key, {"dataset": ds, "width_mult": width, "epochs": fp_epochs,
                                     "fp32_bytes": 4 * sum(p.numel() for p in model.parameters()),
                                     "command": cmd.replace(f"--seed {seed}", "--seed SEED")
                                     .replace(f"/s{seed}/", "/sSEED/"), "runs": {}})
            fp_info[key]["runs"][seed] = {"test_acc": res.test_acc, "val_acc": res.best_acc,
                                          "train_s": round(train_seconds(fp_dir), 1), "dir": str(fp_dir)}
            fp_acc[width] = res.test_acc
            print(f"{ds:14s} seed {seed} float width {width:g}: test {100 * res.test_acc:.2f}%", flush=True)
        for recipe, kw, _ in methods:
            width = float(kw.get("width_mult", 1.0))
            if width not in fp_acc or 1.0 not in fp_acc:
                continue
            init = runs / ds / f"s{seed}" / ("fp" if width == 1.0 else f"fp-w{width:g}") / "best.safetensors"
            run_out = runs / ds / f"s{seed}" / recipe
            cmd = (f"lowbit train --model lenet5 --data {ds} --recipe {recipe} --init {init} "
                   f"--epochs {q_epochs} --seed {seed} --out {run_out}"
                   + (f" --model-arg width_mult={width:g}" if width != 1.0 else ""))
            res = run_or_read(RunSpec(model="lenet5", model_kwargs=dict(kw), dataset=ds, recipe=recipe,
                                      train={"epochs": q_epochs, "seed": seed}, init=str(init),
                                      out=str(run_out)), report_only)
            if res is None:
                continue
            per_seed[(recipe, seed)] = {
                "test_acc": res.test_acc, "val_acc": res.best_acc,
                "drop_pp": 100 * (fp_acc[1.0] - res.test_acc),
                "drop_same_width_pp": 100 * (fp_acc[width] - res.test_acc),
                "packed_bytes": res.size["file_bytes"] if res.size else None,
                "train_s": round(train_seconds(run_out), 1), "command": cmd}
            print(f"{ds:14s} seed {seed} {recipe:22s} test {100 * res.test_acc:.2f}% "
                  f"(FP {100 * fp_acc[1.0]:.2f}%)", flush=True)
    fps = {k: {**v, "test_acc": _stats([r["test_acc"] for r in v["runs"].values()]),
               "train_s": statistics.fmean(r["train_s"] for r in v["runs"].values())}
           for k, v in fp_info.items()}
    rows: list[dict[str, Any]] = []
    for recipe, kw, paper in methods:
        got = {seed: per_seed[(recipe, seed)] for seed in seeds if (recipe, seed) in per_seed}
        width = float(kw.get("width_mult", 1.0))
        if not got:
            rows.append({"dataset": ds, "recipe": recipe, "paper": paper, "missing": True,
                         "width_mult": width})
            continue
        wb, ab, kept = bits_of(recipe)
        one = next(iter(got.values()))
        fp32 = fps[f"{ds}/w1"]["fp32_bytes"]
        rows.append({
            "dataset": ds, "recipe": recipe, "paper": paper, "w_bits": wb, "a_bits": ab,
            "float_layers": kept, "width_mult": width, "seeds": sorted(got),
            "test_acc": _stats([r["test_acc"] for r in got.values()]),
            "val_acc": _stats([r["val_acc"] for r in got.values() if r["val_acc"] is not None]),
            "drop_pp": _stats([r["drop_pp"] for r in got.values()]),
            "drop_same_width_pp": _stats([r["drop_same_width_pp"] for r in got.values()]),
            "packed_bytes": one["packed_bytes"],
            "compression": fp32 / one["packed_bytes"] if one["packed_bytes"] else None,
            "epochs": q_epochs, "train_s": statistics.fmean(r["train_s"] for r in got.values()),
            "command": one["command"].replace(f"--seed {min(got)}", "--seed SEED")
            .replace(f"/s{min(got)}/", "/sSEED/"),
            "per_seed": {str(k): v for k, v in got.items()},
        })
    return fps, rows


def legacy_rows(path: Path, regenerated: set[tuple[str, str]]) -> dict[str, Any]:
    """Rows of the previous results file not regenerated now, with the protocol they were
    measured under (a file of this format passes its own legacy table on)."""
    if not path.exists():
        return {"protocol": OLD_PROTOCOL, "fp": {}, "rows": []}
    old = json.loads(path.read_text())
    if "legacy" in old:  # this format: current rows of the old file + its legacy rows
        leg = old["legacy"]
        fp = {**old.get("fp", {}), **leg.get("fp", {})}  # current rows (dropped below if aggregated)
        rows = list(leg.get("rows", []))
        kept = {(r["dataset"], r["recipe"]) for r in rows}
        rows += [r for r in old.get("rows", []) if (r["dataset"], r["recipe"]) not in kept]
    else:
        fp, rows = old.get("fp", {}), old.get("rows", [])
    # every old float reference stays: the old rows' drops are measured against them
    old_fp = {k: v for k, v in fp.items() if isinstance(v.get("test_acc"), float)}
    old_rows = [r for r in rows if (r["dataset"], r["recipe"]) not in regenerated
                and not r.get("missing") and isinstance(r.get("test_acc"), float)]
    return {"protocol": OLD_PROTOCOL, "fp": old_fp if old_rows else {}, "rows": old_rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    p.add_argument("--methods", nargs="+", help="recipe names (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--fp-epochs", type=int, default=10)
    p.add_argument("--q-epochs", type=int, default=10)
    p.add_argument("--runs-dir", default="runs/repro-val")
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
        futures = {pool.submit(run_dataset, ds, methods, runs, a.fp_epochs, a.q_epochs, a.seeds, a.threads,
                               a.report_only): ds
                   for ds in a.datasets}
        for fut, ds in futures.items():
            results[ds] = fut.result()
    fps = {k: v for ds in a.datasets for k, v in results[ds][0].items()}
    rows = [r for ds in a.datasets for r in results[ds][1]]
    done = {(r["dataset"], r["recipe"]) for r in rows if not r.get("missing")}
    legacy = legacy_rows(out / "mnist.json", done)
    torch.set_num_threads(a.threads)
    meta = run_meta(__file__, argv, t_start, seeds=a.seeds, fp_epochs=a.fp_epochs, q_epochs=a.q_epochs,
                    threads=a.threads, jobs=a.jobs, report_only=a.report_only,
                    protocol="validation split: the last 5,000 training images pick the best epoch; "
                             "the test set is evaluated once, on that checkpoint")
    payload = {"meta": meta, "fp": fps, "rows": rows, "legacy": legacy}
    atomic_write_text(out / "mnist.json", json.dumps(payload, indent=1) + "\n")
    atomic_write_text(out / "mnist.md", render(meta, fps, rows, legacy))
    return 0


def target(r: dict[str, Any]) -> str:
    """The MNIST bar: within 0.5 pp of float at W2/A4 or above, BCGD W1/A4 within 0.7 pp (on
    the mean drop over seeds; a widened model against both float models)."""
    if r["dataset"] != "mnist":
        return ""
    if r["recipe"].startswith("bcgd"):
        bar = 0.7
    elif int(r["w_bits"]) >= 2 and int(r["a_bits"]) >= 4:
        bar = 0.5
    else:
        return ""
    if isinstance(r["drop_pp"], dict):
        drop = max(r["drop_pp"]["mean"], r["drop_same_width_pp"]["mean"])
    else:  # a legacy row
        drop = max(r["drop_pp"], 100 * (r.get("fp_same_width_acc", r["fp_acc"]) - r["test_acc"]))
    return f"{'yes' if drop <= bar else 'NO'} (<= {bar})"


def _pm(st: dict[str, Any], scale: float = 100.0, unit: str = "%") -> str:
    if not st or not st.get("n"):
        return "-"
    if st["n"] == 1:
        return f"{scale * st['mean']:.2f}{unit} (n=1, single run)"
    return f"{scale * st['mean']:.2f} ± {scale * st['std']:.2f}{unit} (n={st['n']})"


def render(meta: dict[str, Any], fps: dict[str, dict[str, Any]], rows: list[dict[str, Any]],
           legacy: dict[str, Any]) -> str:
    git = meta["git"]
    lines = [
        "# Reproduction on MNIST and Fashion-MNIST (LeNet-5)",
        "",
        f"Command: `{meta['command']}` — commit {str(git['commit'])[:12]}"
        f"{' (dirty tree)' if git['dirty'] else ''}, torch {meta['torch']}, {meta['threads']} thread(s) on "
        f"{meta['machine']['cpu']}, seeds {meta['seeds']}, total wall time {meta['wall_time_s']:.0f} s.",
        "",
        "Protocol: the last 5,000 MNIST/Fashion-MNIST training images are a validation split (training "
        "uses the other 55,000); it picks the best epoch, and the test set (10,000 images) is evaluated "
        "once, on that epoch's checkpoint. Each seed trains its own float model "
        f"({meta['fp_epochs']} epochs, Adam) and fine-tunes every quantized run "
        f"({meta['q_epochs']} epochs, the recipe's settings) from it. Cells give mean ± std over the seeds "
        "(n runs; n=1 is a single run). Drops are per seed against that seed's float model, then averaged. "
        "Size is the whole packed `.lowbit` file; compression is against the float LeNet-5's FP32 "
        "parameters. Train time is the mean over seeds of the sum of a run's epoch times.",
        "",
        *(["Rebuilt with `--report-only` from the finished run directories; they were trained by this "
           "script, one process per seed (`--seeds 0`, `--seeds 1`, `--seeds 2` side by side, same other "
           "arguments). Train times were measured on a shared 2-core machine under heavy load (load "
           "average about 13): they measure the contention more than the code.", ""]
          if meta.get("report_only") else []),
        "Float references:",
        "",
        "| dataset | width | test acc | epochs | train time (s) | command |",
        "|---|---|---|---|---|---|",
    ]
    for f in fps.values():
        lines.append(f"| {f['dataset']} | {f['width_mult']:g}x | {_pm(f['test_acc'])} | "
                     f"{f['epochs']} | {f['train_s']:.0f} | `{f['command']}` |")
    lines += [
        "",
        "| dataset | method (recipe) | W/A bits | float layers | test acc | val acc (best epoch) | "
        "drop vs FP (pp) | MNIST bar met | packed bytes | compression | epochs | train time (s) | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("missing"):
            lines.append(f"| {r['dataset']} | {r['paper']} (`{r['recipe']}`) | not run to the end yet | "
                         "| | | | | | | | | |")
            continue
        size = f"{r['packed_bytes']:,}" if r["packed_bytes"] else "-"
        comp = f"{r['compression']:.1f}x" if r["compression"] else "-"
        drop = _pm(r["drop_pp"], 1.0, "")
        if r["width_mult"] != 1.0:
            drop += f"; vs the {r['width_mult']:g}x float model: {_pm(r['drop_same_width_pp'], 1.0, '')}"
        lines.append(
            f"| {r['dataset']} | {r['paper']} (`{r['recipe']}`) | W{r['w_bits']}/A{r['a_bits']} | "
            f"{r['float_layers']} | {_pm(r['test_acc'])} | {_pm(r['val_acc'])} | {drop} | {target(r)} | "
            f"{size} | {comp} | {r['epochs']} | {r['train_s']:.0f} | `{r['command']}` |")
    if legacy["rows"] or legacy["fp"]:
        lines += [
            "",
            "## Rows not regenerated (old protocol)",
            "",
            legacy["protocol"][0].upper() + legacy["protocol"][1:] + ".",
            "",
            "These numbers come from the earlier results file: one run each, trained on all 60,000 "
            "training images, fine-tuned from the float epoch that scored best on the test set. The test "
            "set took part in a choice, so they may read slightly high; compare them with each other "
            "rather than with the table above.",
            "",
            "| dataset | width | test acc (old protocol) | command |",
            "|---|---|---|---|",
        ]
        for f in legacy["fp"].values():
            lines.append(f"| {f['dataset']} | {f['width_mult']:g}x | {100 * f['test_acc']:.2f}% | "
                         f"`{f['command']}` |")
        lines += [
            "",
            "| dataset | method (recipe) | W/A bits | float layers | test acc (old protocol) "
            "| drop vs FP (pp) | packed bytes | compression | command |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in legacy["rows"]:
            size = f"{r['packed_bytes']:,}" if r.get("packed_bytes") else "-"
            comp = f"{r['compression']:.1f}x" if r.get("compression") else "-"
            lines.append(f"| {r['dataset']} | {r['paper']} (`{r['recipe']}`) | "
                         f"W{r['w_bits']}/A{r['a_bits']} | {r['float_layers']} | "
                         f"{100 * r['test_acc']:.2f}% | {r['drop_pp']:+.2f} | {size} | {comp} | "
                         f"`{r['command']}` |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
