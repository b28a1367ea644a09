"""Where a number came from: the git commit (and whether the tree was dirty), the machine
(CPU model, GPUs, threads) and library versions. Written beside every results file."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

__all__ = ["cpu_model", "git_state", "machine", "provenance", "versions"]


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the repository at ``root`` (default: the one holding lowbit's
    source); dirty: tracked files differ from the commit. None where there is no repository.

    A copy of the tree without ``.git`` (shipped to a GPU machine, say) cannot know its commit:
    there the sender's ``LOWBIT_GIT_COMMIT`` (and ``LOWBIT_GIT_DIRTY=1`` if its tree was dirty) is
    recorded, marked ``"from": "environment"``."""
    where = Path(root) if root is not None else Path(__file__).resolve().parent
    commit = _git(where, "rev-parse", "HEAD")
    if commit is None and os.environ.get("LOWBIT_GIT_COMMIT"):
        return {"commit": os.environ["LOWBIT_GIT_COMMIT"], "dirty": os.environ.get("LOWBIT_GIT_DIRTY") == "1",
                "from": "environment"}
    status = _git(where, "status", "--porcelain", "--untracked-files=no")
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
    """CPU model, logical CPUs, torch threads and the names of the GPUs torch sees."""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpus": gpus, "platform": platform.platform()}


def versions() -> dict[str, str]:
    """Versions of python, torch, numpy, lowbit (and CUDA when torch has it)."""
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


def provenance(command: str, **extra: Any) -> dict[str, Any]:
    """``{"command", **extra, "git", "machine", "versions"}``."""
    return {"command": command, **extra, "git": git_state(), "machine": machine(), "versions": versions()}
