"""What every benchmark script writes beside its numbers (its provenance): the git commit and
whether the tree was dirty, the exact command, the machine (CPU model, GPU, threads), library
versions, seeds and wall time; and the atomic JSON + Markdown result pair."""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lowbit.provenance import git_state, machine, versions
from lowbit.train import atomic_write_text

__all__ = ["ROOT", "git_state", "machine", "run_meta", "save_png", "versions", "write_results"]

ROOT = Path(__file__).resolve().parents[1]


def run_meta(script: str, argv: Sequence[str] | None, t0: float, *, seeds: Sequence[int],
             **extra: Any) -> dict[str, Any]:
    """Provenance of a result: ``{"command", **extra, "seeds", "git", "machine", "versions",
    "torch", "wall_time_s"}`` for the script at path ``script`` (its ``__file__``) run with
    ``argv`` (default: this process's arguments) since ``t0`` (a ``time.time()``).

    ``seeds`` is required: every seed the result depends on (the runs it trains or reads, the
    random inputs it draws), so the result can be reproduced. An empty list says the result uses no
    randomness at all; it is not a way to leave the seeds out."""
    if isinstance(seeds, (int, str)):
        raise TypeError(f"seeds must be a sequence of ints, e.g. seeds=[{seeds}], not {seeds!r}")
    args = list(argv) if argv is not None else sys.argv[1:]
    rel = Path(script).resolve().relative_to(ROOT).as_posix()
    meta: dict[str, Any] = {"command": " ".join(["python", rel, *(shlex.quote(a) for a in args)]), **extra}
    meta.update({"seeds": [int(s) for s in seeds], "git": git_state(ROOT), "machine": machine(),
                 "versions": versions(), "torch": torch.__version__,
                 "wall_time_s": round(time.time() - t0, 1)})
    return meta


def write_results(out: str | Path, stem: str, payload: dict[str, Any], markdown: str) -> None:
    """``out/stem.json`` (``payload``) and ``out/stem.md``, each written atomically."""
    out = Path(out)
    atomic_write_text(out / f"{stem}.json", json.dumps(payload, indent=1, default=float) + "\n")
    atomic_write_text(out / f"{stem}.md", markdown if markdown.endswith("\n") else markdown + "\n")


def save_png(fig: Any, path: str | Path, dpi: int = 100) -> None:
    """A matplotlib figure laid out and written atomically as ``path`` (PNG), then closed."""
    import matplotlib.pyplot as plt

    from lowbit._io import atomic_path

    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
