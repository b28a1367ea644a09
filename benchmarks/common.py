"""What every benchmark script writes beside its numbers: the command that reproduces them, the
versions and machine, the wall time; and the atomic JSON + Markdown result pair."""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lowbit.train import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def run_meta(script: str, argv: Sequence[str] | None, t0: float, **extra: Any) -> dict[str, Any]:
    """``{"command", **extra, "torch", "machine", "wall_time_s"}`` for the script at path ``script``
    (its ``__file__``) run with ``argv`` (default: this process's arguments) since ``t0``."""
    args = list(argv) if argv is not None else sys.argv[1:]
    rel = Path(script).resolve().relative_to(ROOT).as_posix()
    return {"command": " ".join([f"python {rel}", *args]), **extra, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "wall_time_s": round(time.time() - t0, 1)}


def write_results(out: str | Path, stem: str, payload: dict[str, Any], markdown: str) -> None:
    """``out/stem.json`` (``payload``) and ``out/stem.md``, each written atomically."""
    out = Path(out)
    atomic_write_text(out / f"{stem}.json", json.dumps(payload, indent=1, default=float) + "\n")
    atomic_write_text(out / f"{stem}.md", markdown if markdown.endswith("\n") else markdown + "\n")
