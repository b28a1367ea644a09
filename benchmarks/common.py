"""What every benchmark script writes beside its numbers (its provenance): the git commit and
whether the tree was dirty, the exact command, the machine (CPU model, GPU, threads), library
versions, seeds and wall time; and the atomic JSON + Markdown result pair."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lowbit.train import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the repository the script runs in;
    dirty means tracked files differ from the commit (untracked files do not count)."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """CPU model, logical CPUs, torch threads and the GPUs torch sees (names)."""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpus": gpus, "platform": platform.platform()}


def versions() -> dict[str, str]:
    """Versions of the libraries a number depends on."""
    import numpy

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    try:
        from importlib.metadata import version

        out["lowbit"] = version("lowbit")
    except Exception:  # not installed as a distribution: the commit says which code ran
        pass
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def run_meta(script: str, argv: Sequence[str] | None, t0: float, *, seeds: Sequence[int] | None = None,
             **extra: Any) -> dict[str, Any]:
    """Provenance of a result: ``{"command", **extra, "seeds", "git", "machine", "versions",
    "torch", "wall_time_s"}`` for the script at path ``script`` (its ``__file__``) run with
    ``argv`` (default: this process's arguments) since ``t0`` (a ``time.time()``)."""
    args = list(argv) if argv is not None else sys.argv[1:]
    rel = Path(script).resolve().relative_to(ROOT).as_posix()
    meta: dict[str, Any] = {"command": " ".join(["python", rel, *(shlex.quote(a) for a in args)]), **extra}
    if seeds is not None:
        meta["seeds"] = list(seeds)
    meta.update({"git": git_state(), "machine": machine(), "versions": versions(),
                 "torch": torch.__version__, "wall_time_s": round(time.time() - t0, 1)})
    return meta


def write_results(out: str | Path, stem: str, payload: dict[str, Any], markdown: str) -> None:
    """``out/stem.json`` (``payload``) and ``out/stem.md``, each written atomically."""
    out = Path(out)
    atomic_write_text(out / f"{stem}.json", json.dumps(payload, indent=1, default=float) + "\n")
    atomic_write_text(out / f"{stem}.md", markdown if markdown.endswith("\n") else markdown + "\n")
