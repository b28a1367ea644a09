"""The quick-start job: a float LeNet-5 on MNIST, then a binary-weight / 4-bit-activation
fine-tune started from it, and a table of accuracy, bits and real packed size.

Both runs follow the evidence protocol (see :mod:`lowbit.experiment`): the last 5,000 training
images are a validation split that picks the best epoch; the test set is read once, at the
end. ``out/results.json`` holds the table with its provenance (commit, command, machine,
versions, seed, wall time) and ``out/results.md`` the same table in Markdown; the README's
main-job table is copied from such a file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._io import atomic_write_text, check_file_path
from .experiment import RunSpec, train_run
from .provenance import provenance
from .recipe import load_recipe

FP_TRAIN = {"optimizer": "adam", "lr": 2e-3, "schedule": "cosine", "weight_decay": 0.0, "seed": 0}


def _train_s(history: list[dict[str, Any]]) -> float:
    """Seconds the run's epochs took (also when this invocation only resumed a finished run)."""
    return round(sum(h.get("epoch_time_s", 0.0) for h in history), 1)


def _bits(spec: dict[str, Any] | None) -> str:
    return "32" if spec is None else f"{spec['bits']} {spec['method']}"


def run_demo(
    out: str | Path,
    fp_epochs: int = 10,
    q_epochs: int = 10,
    recipe: str = "lenet5-w1a4",
    progress_factory: Callable[[], Any] | None = None,
    say: Callable[[str], Any] = lambda s: None,
    device: str = "auto",
    results: str | Path | None = None,
    command: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Train both runs under ``out`` (resuming any that was interrupted); returns table rows
    and writes ``out/results.json`` / ``results.md`` (and copies to ``results``.json/.md)."""
    t0 = time.time()
    out = Path(out)
    prog = progress_factory or (lambda: None)
    # a misspelt recipe or an unwritable results path fails now, not after the float run's training
    r = load_recipe(recipe)
    for ext in (".json", ".md") if results else ():
        check_file_path(Path(results).with_suffix(ext), f"results{ext}")
    say("[bold]1/2[/] full-precision LeNet-5 on MNIST")
    fp = train_run(
        RunSpec(model="lenet5", dataset="mnist", train={**FP_TRAIN, "epochs": fp_epochs},
                out=str(out / "fp"), device=device),
        resume=True, progress=prog(),
    )
    say(f"[bold]2/2[/] {r.name or recipe}: {r.description}")
    q = train_run(
        RunSpec(model="lenet5", dataset="mnist", recipe=recipe, train={"epochs": q_epochs},
                init=str(out / "fp" / "best.safetensors"), out=str(out / "quantized"), device=device),
        resume=True, progress=prog(),
    )
    fp_bytes = 4 * sum(p.numel() for p in fp.model.parameters())  # type: ignore[union-attr]
    rd = r.to_dict()["default"]
    rows = [
        {"name": "float", "weight_bits": "32", "act_bits": "32", "test_acc": fp.test_acc,
         "val_acc": fp.best_acc, "best_epoch": fp.best_epoch, "epochs": fp_epochs,
         "bytes": fp_bytes, "compression": 1.0, "run": str(out / "fp"), "train_s": _train_s(fp.history)},
        {"name": r.name or str(recipe), "weight_bits": _bits(rd["weight"]),
         "act_bits": _bits(rd["activation"]), "test_acc": q.test_acc, "val_acc": q.best_acc,
         "best_epoch": q.best_epoch, "epochs": q_epochs,
         "bytes": q.size["file_bytes"] if q.size else None,
         "compression": fp_bytes / q.size["file_bytes"] if q.size else None, "run": str(out / "quantized"),
         "train_s": _train_s(q.history)},
    ]
    cmd = " ".join(command) if command is not None else (
        f"lowbit demo --out {out} --fp-epochs {fp_epochs} --q-epochs {q_epochs} --recipe {recipe}")
    meta = provenance(cmd, seeds=[FP_TRAIN["seed"]], n_runs=1, device=q.device,
                      protocol="validation split (last 5,000 training images) picks the best epoch; "
                               "test set evaluated once, at the end",
                      wall_time_s=round(time.time() - t0, 1))
    payload = {"meta": meta, "rows": rows}
    md = render(meta, rows)
    for target in [out / "results", *([Path(results).with_suffix("")] if results else [])]:
        atomic_write_text(target.with_suffix(".json"), json.dumps(payload, indent=1) + "\n")
        atomic_write_text(target.with_suffix(".md"), md)
    return rows


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The main-job table in Markdown, with its provenance line."""
    git = meta["git"]
    commit = f"commit {str(git['commit'])[:12]}" if git["commit"] else "no git commit"
    commit += " (dirty tree)" if git["dirty"] else ""
    lines = ["# Main job: LeNet-5 on MNIST", "",
             f"`{meta['command']}` — {commit}, {meta['machine']['cpu']}, device {meta['device']}, "
             f"torch {meta['versions']['torch']}, seed {meta['seeds'][0]} (one run per row), "
             f"wall time of this invocation {meta['wall_time_s']:.0f} s (finished runs are reused, not "
             "retrained; train time is the sum of each run's epoch times). The validation split "
             "(the last 5,000 training images) picks each run's best epoch; test accuracy is measured "
             "once, on that checkpoint (10,000 test images).", "",
             "| model | weight bits | activation bits | test acc | val acc (best epoch) | bytes | smaller "
             "| train time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        val = f"{r['val_acc']:.2%} ({r['best_epoch']}/{r['epochs']})" if r["val_acc"] is not None else "-"
        size = f"{r['bytes']:,}" if r["bytes"] else "-"
        comp = f"{r['compression']:.1f}x" if r["compression"] else "-"
        lines.append(f"| {r['name']} | {r['weight_bits']} | {r['act_bits']} | {r['test_acc']:.2%} | {val} | "
                     f"{size} | {comp} | {r['train_s']:.0f} |")
    return "\n".join(lines) + "\n"
