"""Every results JSON records the seeds it used: ``benchmarks/common.run_meta`` requires them, and
every benchmark script passes them by name (checked on the source, so a new script cannot skip it)."""

from __future__ import annotations

import ast
import importlib.util
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _common() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_bench_common", BENCH / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_meta_names(tree: ast.AST) -> set[str]:
    """The names ``run_meta`` is called by in a module: itself and any ``import ... as`` alias."""
    names = {"run_meta"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names |= {a.asname for a in node.names if a.name == "run_meta" and a.asname}
    return names


def calls_without_seeds(source: str, filename: str) -> tuple[int, list[str]]:
    """How many calls of ``run_meta`` the source makes, and ``file:line`` of those that do not pass
    ``seeds=`` by name (a ``**kwargs`` splat does not count: the reader must see the seeds)."""
    tree = ast.parse(source, filename)
    names = _run_meta_names(tree)
    calls, missing = 0, []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        named = isinstance(f, ast.Name) and f.id in names
        if not (named or (isinstance(f, ast.Attribute) and f.attr == "run_meta")):
            continue
        calls += 1
        if not any(k.arg == "seeds" for k in node.keywords):
            missing.append(node.lineno)
    return calls, [f"{filename}:{line}" for line in sorted(missing)]


def test_the_check_finds_a_call_without_seeds():
    calls, missing = calls_without_seeds(
        "from common import run_meta as rm\nimport common\n"
        "a = rm(__file__, None, 0.0, seeds=[0])\nb = rm(__file__, None, 0.0, **kw)\n"
        "c = common.run_meta(__file__, None, 0.0)\n", "x.py")
    assert calls == 3 and missing == ["x.py:4", "x.py:5"]


def test_every_benchmark_call_of_run_meta_passes_seeds():
    scripts = sorted(p for p in BENCH.rglob("*.py") if p.name != "common.py")
    missing, uncounted = [], []
    for path in scripts:
        source = path.read_text()
        rel = path.relative_to(ROOT).as_posix()
        calls, bad = calls_without_seeds(source, rel)
        missing += bad
        if "run_meta(" in source and calls == 0:
            uncounted.append(rel)  # called some way the check does not see: it would pass unchecked
    assert not uncounted, f"run_meta called in a form this test does not recognise: {uncounted}"
    assert not missing, (
        "these calls of run_meta record no seeds; pass seeds=[...] with every seed the result used "
        f"(seeds=[] only for a result without randomness): {missing}")


def test_run_meta_without_seeds_is_a_type_error():
    common = _common()
    with pytest.raises(TypeError, match="seeds"):
        common.run_meta(str(BENCH / "common.py"), [], time.time())
    with pytest.raises(TypeError, match=r"seeds=\[3\]"):
        common.run_meta(str(BENCH / "common.py"), [], time.time(), seeds=3)


def test_run_meta_records_command_seeds_git_machine_versions_and_wall_time():
    common = _common()
    script = BENCH / "speed" / "bench_gemv.py"
    argv = ["--sizes", "512", "--note", "two words"]
    meta = common.run_meta(str(script), argv, time.time() - 2.0, seeds=(3, 1), width=8)
    assert meta["command"] == "python benchmarks/speed/bench_gemv.py " + " ".join(map(shlex.quote, argv))
    assert meta["seeds"] == [3, 1] and meta["width"] == 8
    assert set(meta["git"]) >= {"commit", "dirty"}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert meta["git"]["commit"] == head.stdout.strip() and isinstance(meta["git"]["dirty"], bool)
    assert meta["machine"]["cpus"] >= 1 and meta["machine"]["cpu"]
    assert meta["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert meta["versions"]["torch"] == meta["torch"]
    assert meta["wall_time_s"] >= 2.0
    assert common.run_meta(str(script), [], time.time(), seeds=[])["seeds"] == []  # no randomness
