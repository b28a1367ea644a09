"""The package's one numba set-up (lowbit._numba): thread policy enforced on every loop, the
switch and its old names, the cache switch, and the runtime's forced plain path switch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
from numba.core.registry import CPUDispatcher

from lowbit import _numba
from lowbit.quant import fused
from lowbit.runtime import (
    _jit,
    kernels,
    kernels_int8,
    kernels_pack,
    kernels_pool,
    kernels_popcount,
    kernels_select,
)

RUNTIME_MODULES = [kernels_pack, kernels_select, kernels_pool, kernels_popcount, kernels_int8]


def _dispatchers(mod: types.ModuleType) -> dict[str, CPUDispatcher]:
    return {n: v for n, v in vars(mod).items() if isinstance(v, CPUDispatcher)}


def test_runtime_kernels_are_serial_and_release_the_gil():
    found = 0
    for mod in RUNTIME_MODULES:
        for name, d in _dispatchers(mod).items():
            found += 1
            assert not d.targetoptions.get("parallel"), f"{mod.__name__}.{name} opens a parallel region"
            assert d.targetoptions.get("nogil") is True, f"{mod.__name__}.{name} holds the GIL"
            assert d.targetoptions.get("fastmath") is False, f"{mod.__name__}.{name} uses fastmath"
    assert found >= 10


@pytest.mark.skipif(not fused.available(), reason="fused kernels need numba")
def test_fused_loops_follow_the_policy():
    k = fused._load()
    assert set(k.parallel) == set(fused._FORWARD + fused._BACKWARD)
    for name, d in k.parallel.items():
        assert d.targetoptions["parallel"] is True and d.targetoptions["nogil"] is True
        assert not k.serial[name].targetoptions["parallel"]
    for name in fused._FORWARD + fused._SERIAL_ONLY:  # only backward reductions may reassociate
        assert k.serial[name].targetoptions["fastmath"] is False


def _runtime_style_loop(x):
    return x + 1


def test_parallel_regions_refused_outside_the_training_loops():
    with pytest.raises(ValueError, match="parallel regions are allowed only in"):
        _numba.jit(_runtime_style_loop, parallel=True)
    assert _numba.jit(_runtime_style_loop)(1) == 2  # serial is fine


def test_set_enabled_is_the_fused_switch():
    import torch

    x = torch.ones(8)
    try:
        _numba.set_enabled(False)
        assert not fused.is_enabled() and not fused.supported(x)
        fused.set_enabled(True)
        assert _numba.enabled() == _numba.ENV_ENABLED
        assert fused.supported(x) == fused.available()
    finally:
        _numba.set_enabled(True)


def test_unwritable_cache_dir_disables_caching(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(blocker / "cache"))
    _numba._cache_ok.cache_clear()
    try:
        assert not _numba.cache_enabled(__file__)
        monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "cache"))
        _numba._cache_ok.cache_clear()
        assert _numba.cache_enabled(__file__)
        monkeypatch.setenv("LOWBIT_NUMBA_CACHE", "0")
        assert not _numba.cache_enabled(__file__)
    finally:
        _numba._cache_ok.cache_clear()


_PROBE = """
import json, torch
from lowbit import _numba
from lowbit.quant import fused
from lowbit.runtime import _jit, kernels, kernels_pack
print(json.dumps({"fused": fused.available(), "supported": fused.supported(torch.ones(3)),
                  "cache": _jit.CACHE, "cache_any": _numba.cache_enabled(),
                  "pack_cache": type(kernels_pack._pack_rows_range._cache).__name__,
                  "vnni": kernels.HAS_VNNI, "plain": _jit.plain()}))
"""


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("LOWBIT_NUMBA", "LOWBIT_FUSED", "LOWBIT_NUMBA_CACHE", "LOWBIT_RUNTIME_PLAIN",
                          "LOWBIT_RUNTIME_INT8")}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_environment_switches_end_to_end():
    new = _probe(LOWBIT_NUMBA="0", LOWBIT_NUMBA_CACHE="0", LOWBIT_RUNTIME_PLAIN="1")
    assert new["fused"] is False and new["supported"] is False
    assert new["cache"] is False and new["cache_any"] is False and new["pack_cache"] == "NullCache"
    assert new["vnni"] is False and new["plain"] is True


@pytest.mark.parametrize("env,off", [
    ({}, False), ({"LOWBIT_NUMBA": "0"}, True), ({"LOWBIT_FUSED": "0"}, True),
    ({"LOWBIT_FUSED": "off", "LOWBIT_NUMBA": "1"}, True), ({"LOWBIT_NUMBA": "1"}, False)])
def test_switch_and_its_old_name(monkeypatch, env, off):
    for k in ("LOWBIT_NUMBA", "LOWBIT_FUSED"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert _numba._env_off("LOWBIT_NUMBA", "LOWBIT_FUSED") is off


@pytest.mark.parametrize("env,plain", [
    ({}, False), ({"LOWBIT_RUNTIME_PLAIN": "1"}, True), ({"LOWBIT_RUNTIME_INT8": "0"}, True),
    ({"LOWBIT_RUNTIME_PLAIN": "0"}, False)])
def test_plain_switch_and_its_old_name(monkeypatch, env, plain):
    for k in ("LOWBIT_RUNTIME_PLAIN", "LOWBIT_RUNTIME_INT8"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert _jit._env_plain() is plain


def test_set_plain_switches_the_layers_choice():
    from lowbit.runtime import kernels_gemm

    was_plain, lut = _jit.plain(), kernels_gemm.HAS_LUT
    try:
        _jit.set_plain(True)
        assert kernels.HAS_VNNI is False and _jit.plain() and kernels_gemm.HAS_LUT is False
        _jit.set_plain(False)
        assert kernels.HAS_VNNI == _jit.HOST_VNNI and lut == kernels_gemm.HAS_LUT
    finally:
        _jit.set_plain(was_plain)


def test_package_stamp_follows_every_file(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    s0 = _numba.package_stamp([a, b])
    assert _numba.package_stamp([a, b]) == s0
    b.write_text("y = 3\n")
    assert _numba.package_stamp([a, b]) != s0
    # the default covers the runtime, the fused loops and this module
    names = {f.name for pat in _numba.STAMP_FILES for f in _numba._PKG.glob(pat)}
    assert {"_numba.py", "fused.py", "_jit.py", "_amx.py", "kernels_int8.py", "executor.py"} <= names


@pytest.mark.skipif(not _numba.cache_enabled(), reason="numba's disk cache is off in this environment")
def test_runtime_kernels_carry_the_package_stamp():
    from lowbit.runtime import kernels_int8

    k = kernels_int8._int8_conv_range
    assert _numba.stamped_cache(k)
    own, pkg = k._cache._impl.locator.get_source_stamp()
    assert pkg == _numba.package_stamp() and own


_STALE = r"""
import sys, pathlib
from lowbit import _numba
pkg = pathlib.Path(sys.argv[1])
_numba._PKG = pkg  # a stand-in package: its loops are stamped with every file in it
_numba.STAMP_FILES = ("*.py",)
sys.path.insert(0, str(pkg))
import mod
print(mod.f(1), mod.f.stats.cache_hits.get(mod.f.signatures[0], 0) if mod.f.signatures else -1)
"""


def test_editing_an_inlined_file_recompiles_the_cached_loop(tmp_path):
    """The hazard: ``mod.f`` inlines ``dep.g``; numba alone keys the cache on mod.py only, so an edit
    of dep.py would keep running the stale cached ``f``."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "dep.py").write_text("from lowbit import _numba\n\n@_numba.jit\ndef g(x):\n    return x + 1\n")
    (pkg / "mod.py").write_text("from lowbit import _numba\nfrom dep import g\n\n"
                                "@_numba.jit\ndef f(x):\n    return g(x) * 10\n")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "LOWBIT_NUMBA_CACHE")}

    def run() -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", _STALE, str(pkg)], capture_output=True, text=True,
                             env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        value, hits = out.stdout.split()
        return int(value), int(hits)

    assert run() == (20, 0)  # compiled, cached
    assert run() == (20, 1)  # from the cache
    (pkg / "dep.py").write_text("from lowbit import _numba\n\n@_numba.jit\ndef g(x):\n    return x + 2\n")
    assert run() == (30, 0)  # recompiled: the cached f inlined the old g


def test_launching_the_runtime_threads_keeps_pytorchs_thread_count():
    """numba's OpenMP layer, launched on the first kernel thread query, resets the OpenMP thread count
    PyTorch reads in the calling thread; a server that profiles its models right after compiling them
    then ran every PyTorch op on the wrong number of threads. A fresh process: the layer launches once."""
    code = ("import torch; torch.set_num_threads(1); assert torch.get_num_threads() == 1\n"
            "from lowbit.runtime import kernels_threads as T\n"
            "T.num_threads(); print(torch.get_num_threads())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    env["NUMBA_NUM_THREADS"] = "2"  # numba's pool larger than the 1 thread PyTorch was given
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1"
