"""DistributedDataParallel on the CPU (gloo): N processes x batch b take the same steps as one
process x batch N*b; a resumed DDP run equals an uninterrupted one; a dead rank ends the job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lowbit.data import BatchLoader
from lowbit.train import distributed as D

sys.path.insert(0, str(Path(__file__).parent))
import _ddp_worker as W

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available")


METHODS = ("binary_relax", "sinreq", "kd")


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a if a[k].is_floating_point())
    den = sum(float(b[k].double().norm() ** 2) for k in b if b[k].is_floating_point())
    return (num / den) ** 0.5


def test_ddp_equals_one_process_and_resumes_exactly(tmp_path):
    """One pair of gloo processes runs: (1) one epoch at batch 16 per rank; (2) two epochs;
    (3) the same two-epoch run stopped after its first epoch's checkpoint, then (4) resumed;
    (5) one epoch with BinaryRelax, SinReQ and KD instead of BCGD."""
    W.train(1, 0, batch=32, epochs=1, run_dir=None, out=str(tmp_path / "single"))
    W.train(1, 0, batch=32, epochs=1, run_dir=None, out=str(tmp_path / "single-m"), methods=METHODS)
    jobs = [{"batch": 16, "epochs": 1, "run_dir": None, "out": str(tmp_path / "ddp")},
            {"batch": 16, "epochs": 2, "run_dir": str(tmp_path / "a"), "out": str(tmp_path / "full")},
            {"batch": 16, "epochs": 2, "run_dir": str(tmp_path / "b"), "out": str(tmp_path / "half"),
             "stop_after": 1},
            {"batch": 16, "epochs": 2, "run_dir": str(tmp_path / "b"), "out": str(tmp_path / "resumed"),
             "resume": True},
            {"batch": 16, "epochs": 1, "run_dir": None, "out": str(tmp_path / "ddp-m"), "methods": METHODS}]
    mp.spawn(W.worker, args=(2, str(tmp_path / "rdzv"), jobs), nprocs=2, join=True)

    # 2 processes x batch 16 == 1 process x batch 32
    single = load_file(tmp_path / "single.rank0.safetensors")
    r0 = load_file(tmp_path / "ddp.rank0.safetensors")
    r1 = load_file(tmp_path / "ddp.rank1.safetensors")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # the ranks hold one model
    # the LSQ activation steps were initialised from the data (not left at 1.0), identically
    steps = [k for k in r0 if k.endswith(".s") and "parametrizations" not in k]
    assert steps and all(float(single[k]) != 1.0 for k in steps)
    init = W.model().state_dict()
    assert _rel(single, {k: init[k] for k in single}) > 1e-3  # training moved the weights
    assert _rel(r0, single) <= 1e-5
    # the logged epoch loss is the global batch's, as in one process
    assert float((tmp_path / "ddp.rank0.json").read_text()) == pytest.approx(
        float((tmp_path / "single.rank0.json").read_text()), rel=1e-5)

    # resumed == uninterrupted, bit for bit, and the metrics agree
    full = load_file(tmp_path / "full.rank0.safetensors")
    resumed = load_file(tmp_path / "resumed.rank0.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)

    def losses(run: str) -> list[str]:  # metrics lines less their timings
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [line.split('"epoch_time_s"')[0] for line in lines]

    assert len(losses("a")) == 2 and losses("a") == losses("b")

    # BinaryRelax (callback), SinReQ (regularizer), KD (loss): the same steps as one process
    single_m = load_file(tmp_path / "single-m.rank0.safetensors")
    assert _rel(load_file(tmp_path / "ddp-m.rank0.safetensors"), single_m) <= 1e-5
    assert _rel({k: single_m[k] for k in single}, single) > 1e-3  # the methods changed the training


def test_a_dead_rank_ends_the_job(tmp_path):
    rdzv = tmp_path / "rdzv"
    kwargs = {"batch": 16, "epochs": 3, "run_dir": None, "out": str(tmp_path / "dead"), "die_rank": 1}
    ctx = mp.start_processes(W.worker, args=(2, str(rdzv), [kwargs]), nprocs=2, join=False,
                             start_method="spawn")
    p0, p1 = ctx.processes
    p1.join(60)
    p0.join(60)  # rank 0 must not wait forever on the dead peer
    alive = p0.is_alive()
    if alive:
        p0.kill()
    assert p1.exitcode == 17
    assert not alive and p0.exitcode != 0


def test_cli_launcher_names_the_failed_ranks(tmp_path):
    """`lowbit train --nproc 2` runs torchrun; when the ranks fail, the job fails with a message
    naming them (here both fail: the --init file does not exist)."""
    proc = subprocess.run(
        [sys.executable, "-m", "lowbit", "train", "--nproc", "2", "--device", "cpu", "--data", "synthetic",
         "--model", "mlp", "--epochs", "1", "--init", str(tmp_path / "missing.safetensors"),
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "the distributed run failed" in out and "rank 0" in out and "rank 1" in out


def test_cli_launcher_trains_on_two_ranks(tmp_path):
    """`lowbit train --nproc 2` that succeeds: exit status 0, rank 0's summary printed (the ranks end
    through exit_process, which must flush it), the run directory written once by a 2-rank job."""
    proc = subprocess.run(
        [sys.executable, "-m", "lowbit", "train", "--nproc", "2", "--device", "cpu", "--data", "synthetic",
         "--model", "mlp", "--epochs", "1", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 0, out[-2000:]
    assert out.count("test accuracy") == 1  # rank 0 alone reports
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["world_size"] == 2
    # the reported accuracy is the saved model's top-1 on the test split, counted here
    from lowbit.experiment import load_run

    model, data, _ = load_run(tmp_path / "run")
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in data.test)
    assert result["test_acc"] == hits / data.test.num_samples


def test_shards_partition_every_global_batch():
    x = torch.arange(22, dtype=torch.float32).reshape(22, 1)
    y = torch.zeros(22, dtype=torch.int64)
    full = BatchLoader(x, y, batch_size=8, shuffle=True, seed=1)
    parts = [BatchLoader(x, y, batch_size=8, shuffle=True, seed=1).shard(r, 3) for r in range(3)]
    for loader in (full, *parts):
        loader.set_epoch(2)
    glob = [b[0].flatten().tolist() for b in full]
    per_rank = [[b[0].flatten().tolist() for b in p] for p in parts]
    assert all(len(r) == len(glob) == 3 for r in per_rank)
    for i, g in enumerate(glob):
        assert [v for r in per_rank for v in r[i]] == g  # rank order concatenates to the global batch
        assert max(len(r[i]) for r in per_rank) - min(len(r[i]) for r in per_rank) <= 1
    x0, _ = parts[1].global_batch(0)
    assert x0.flatten().tolist() == glob[0]
    with pytest.raises(ValueError, match="rank"):
        full.shard(3, 3)


def test_without_nproc_and_device_errors():
    assert D.without_nproc(["train", "--nproc", "4", "--out", "r", "--nproc=2"]) == ["train", "--out", "r"]
    assert D.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert D.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA device"):
            D.resolve_device("cuda:0")
    with pytest.raises(ValueError, match="not a device"):
        D.resolve_device("gpu7")


def test_exit_process_leaves_the_group_and_keeps_the_status_and_output(tmp_path):
    """A rank ends through exit_process: the group is left, what it printed is flushed, the status is
    the one asked for; a process outside any group exits with it normally."""
    code = (
        "import sys, torch, torch.distributed as dist\n"
        "from lowbit.train import distributed as D\n"
        "if sys.argv[1] == 'rank':\n"
        f"    dist.init_process_group('gloo', init_method='file://{tmp_path / 'rdzv'}', rank=0,\n"
        "                            world_size=1)\n"
        "    t = torch.ones(3)\n"
        "    dist.all_reduce(t)\n"
        "    print('sum', float(t.sum()), end='')  # no newline: only a flush writes it\n"
        "D.exit_process(int(sys.argv[2]))\n")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)

    rank = run("rank", "3")
    assert rank.returncode == 3 and rank.stdout == "sum 3.0", rank.stderr
    plain = run("plain", "4")
    assert plain.returncode == 4 and plain.stdout == ""
