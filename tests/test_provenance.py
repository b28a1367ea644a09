"""Provenance: the commit of a results file, also from a copy of the tree without ``.git``."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from lowbit.provenance import git_state, machine, versions


def test_repository_commit_and_dirty_flag(tmp_path, monkeypatch):
    if shutil.which("git") is None:
        pytest.skip("needs the git program")
    monkeypatch.setenv("LOWBIT_GIT_COMMIT", "f" * 40)  # a real repository wins over the environment

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    (tmp_path / "f.txt").write_text("a\n")
    git("add", "f.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = git("rev-parse", "HEAD").strip()
    assert git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "f.txt").write_text("b\n")
    assert git_state(tmp_path) == {"commit": head, "dirty": True}


def test_copy_without_git_records_the_senders_commit(tmp_path, monkeypatch):
    monkeypatch.delenv("LOWBIT_GIT_COMMIT", raising=False)
    monkeypatch.delenv("LOWBIT_GIT_DIRTY", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above tmp_path
    assert git_state(tmp_path) == {"commit": None, "dirty": None}
    monkeypatch.setenv("LOWBIT_GIT_COMMIT", "a" * 40)
    assert git_state(tmp_path) == {"commit": "a" * 40, "dirty": False, "from": "environment"}
    monkeypatch.setenv("LOWBIT_GIT_DIRTY", "1")
    assert git_state(tmp_path)["dirty"] is True


def test_machine_and_versions_name_what_ran():
    m, v = machine(), versions()
    assert m["cpus"] >= 1 and m["torch_threads"] >= 1 and isinstance(m["gpus"], list)
    assert v["torch"] and v["numpy"] and v["python"].count(".") == 2
