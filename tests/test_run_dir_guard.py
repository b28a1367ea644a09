"""`lowbit train` into a directory that holds a run: refused (nothing of it changes) unless --resume
or --overwrite; a directory another process is training into is locked."""

from __future__ import annotations

import fcntl
import hashlib
import sys
from pathlib import Path

import pytest

from lowbit import cli
from lowbit.train import TrainConfig, Trainer
from lowbit.train.checkpoint import read_checkpoint
from lowbit.train.trainer import RunDirInUse

sys.path.insert(0, str(Path(__file__).parent))
from _resume_worker import loaders, make_model


def _train(out, *extra):
    return cli.main(["--threads", "1", "train", "--model", "mlp", "--data", "synthetic", "--subset", "64",
                     "--epochs", "1", "--val-size", "16", "--out", str(out), *extra])


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def test_a_second_train_into_a_run_is_refused_and_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run) == 0
    before = _digest(run)
    assert "checkpoint.safetensors" in before and "result.json" in before
    capsys.readouterr()
    assert _train(run) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "already holds a run" in out and "--resume" in out and "--overwrite" in out
    assert _digest(run) == before


def test_overwrite_starts_again_and_resume_continues(tmp_path):
    run = tmp_path / "run"
    assert _train(run) == 0
    (run / "model.lowbit").write_bytes(b"stale")  # a file of the old run the new one does not write
    assert _train(run, "--overwrite") == 0
    assert not (run / "model.lowbit").exists()  # a float run packs nothing: the old file is gone
    assert (run / "checkpoint.safetensors").is_file() and (run / "result.json").is_file()
    assert _train(run, "--resume") == 0  # already at its last epoch: resumes and finishes
    assert _train(tmp_path / "fresh") == 0  # a new directory is no run


def test_a_run_directory_being_trained_is_locked(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    train, val = loaders()
    cfg = TrainConfig(epochs=1, optimizer="adam", lr=1e-3, tensorboard=False)
    with open(run / ".lock", "a") as held:  # another process's run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunDirInUse, match="being trained by another process"):
            Trainer(make_model(), train, val, cfg, run).fit()
        assert not (run / "checkpoint.safetensors").exists()
    hist = Trainer(make_model(), train, val, cfg, run).fit()  # released: trains
    assert len(hist) == 1 and (run / "checkpoint.safetensors").is_file()
    Trainer(make_model(), train, val, cfg, run).fit(resume=True)  # and its lock went with it


def test_snn_convert_into_a_run_is_refused(tmp_path, capsys):
    out = tmp_path / "snn"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes(b"a run's checkpoint")
    assert cli.main(["snn", "convert", str(tmp_path / "float-run"), "--out", str(out)]) == 2
    assert "already holds a run" in " ".join(capsys.readouterr().out.split())
    assert (out / "checkpoint.safetensors").read_bytes() == b"a run's checkpoint"


def test_resume_with_another_recipe_or_model_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--threads", "1", "train", "--data", "synthetic", "--subset", "64", "--val-size", "16",
            "--out", str(run)]
    assert cli.main([*args, "--model", "mlp", "--recipe", "lsq-w2a2", "--epochs", "1"]) == 0
    before = _digest(run)
    capsys.readouterr()
    assert cli.main([*args, "--model", "mlp", "--recipe", "lsq-w4a4", "--epochs", "2", "--resume"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "holds a different run" in out and "lsq-w2a2" in out and "recipe" in out
    assert _digest(run) == before
    assert cli.main([*args, "--model", "mlp", "--recipe", "lsq-w2a2", "--epochs", "2", "--resume"]) == 0


def test_a_best_left_behind_by_a_kill_is_taken_from_the_checkpoint_on_resume(tmp_path):
    run = tmp_path / "run"
    train, val = loaders()
    cfg = TrainConfig(epochs=1, optimizer="adam", lr=1e-3, tensorboard=False)
    Trainer(make_model(), train, val, cfg, run).fit()
    old_best = (run / "best.safetensors").read_bytes()  # epoch 1
    cfg2 = TrainConfig(epochs=2, optimizer="adam", lr=1e-3, tensorboard=False)
    Trainer(make_model(), train, val, cfg2, run).fit(resume=True)
    meta, _ = read_checkpoint(run / "checkpoint.safetensors")
    assert meta["extra"]["best_epoch"] == 2  # (seeded) epoch 2 improved: the case to repair
    (run / "best.safetensors").unlink()
    (run / "best.safetensors").write_bytes(old_best)  # as if killed between the two writes
    Trainer(make_model(), train, val, cfg2, run).fit(resume=True)  # finished: resumes, repairs
    assert read_checkpoint(run / "best.safetensors")[0]["epoch"] == 2
