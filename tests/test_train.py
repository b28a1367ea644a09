"""Trainer, config, schedule and resume tests (small MLPs on synthetic Gaussian data)."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from _resume_worker import StepCounter, loaders, make_model
from pydantic import ValidationError
from torch import nn

from lowbit.train import (
    Callback,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    build_optimizer,
    build_scheduler,
    lr_factor,
    read_checkpoint,
)

WORKER = Path(__file__).with_name("_resume_worker.py")


pytestmark = pytest.mark.usefixtures("one_thread")


def small_cfg(**kw) -> TrainConfig:
    base = dict(epochs=3, lr=0.05, optimizer="sgd", schedule="cosine", seed=0,
                tensorboard=False, log_every=4)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------- config


def test_config_errors_name_field_value_and_choices():
    with pytest.raises(ValidationError) as e:
        TrainConfig(optimizer="rmsprop")
    msg = str(e.value)
    assert "optimizer" in msg and "rmsprop" in msg
    assert all(c in msg for c in ("'sgd'", "'adam'", "'adamw'"))

    with pytest.raises(ValidationError) as e:
        TrainConfig(schedule="linear")
    assert all(s in str(e.value) for s in ("schedule", "linear", "'cosine'", "'step'"))

    with pytest.raises(ValidationError) as e:
        TrainConfig(epoch=3)
    msg = str(e.value)
    assert "'epoch'" in msg and "did you mean 'epochs'" in msg and "allowed fields" in msg

    with pytest.raises(ValidationError) as e:
        TrainConfig(lr=-1)
    assert "lr" in str(e.value) and "-1" in str(e.value) and "greater than 0" in str(e.value)

    with pytest.raises(ValidationError, match="milestones"):
        TrainConfig(schedule="step")
    with pytest.raises(ValidationError, match="increasing"):
        TrainConfig(schedule="step", milestones=[5, 3])
    assert TrainConfig(optimizer="Adam").optimizer == "adam"
    assert isinstance(ValidationError, type) and issubclass(ValidationError, ValueError)


# ---------------------------------------------------------------- optimizer / schedule


def test_no_decay_1d_groups():
    model = make_model()  # Linear, BN, ClipAct(0-D alpha), parametrized Linear, Linear
    opt = build_optimizer(model, small_cfg(weight_decay=5e-4))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    named = dict(model.named_parameters())
    want_decay = {"0.weight", "4.parametrizations.weight.original", "7.weight"}
    assert ids(decay) == {id(named[k]) for k in want_decay}
    assert ids(no_decay) == {id(p) for k, p in named.items() if k not in want_decay}
    assert id(model[2].alpha) in ids(no_decay) and id(model[1].weight) in ids(no_decay)

    opt = build_optimizer(model, small_cfg(weight_decay=5e-4, no_decay_1d=False))
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 5e-4
    assert isinstance(build_optimizer(model, small_cfg(optimizer="adamw")), torch.optim.AdamW)


def test_pact_alpha_lr_gives_alpha_its_own_group_and_rate():
    """``alpha_lr`` puts every PACT alpha of that rate in one group without weight decay; under Adam
    at a small model rate, alpha then moves about ``alpha_lr`` per step (the paper's clip at 10
    barely moves otherwise), and the schedule scales that group like the others."""
    import lowbit
    from lowbit.quant.pact import PACTActivation

    def net(alpha_lr):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                          nn.Linear(16, 10))
        spec = {"method": "pact", "bits": 2, "alpha_init": 10.0, "alpha_lr": alpha_lr}
        w4 = {"method": "uniform", "bits": 4}
        return lowbit.quantize(m, {"default": {"weight": w4, "activation": spec},
                                   "rules": [{"match": "@first", "activation": None}]})

    moved = {}
    for alpha_lr in (None, 0.05):
        model = net(alpha_lr)
        alphas = [m.alpha for m in model.modules() if isinstance(m, PACTActivation)]
        assert len(alphas) == 2
        opt = build_optimizer(model, small_cfg(optimizer="adam", lr=1e-3, weight_decay=5e-4))
        ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
        if alpha_lr is None:
            assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]
        else:
            assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay", "param_lr/0.05"]
            own = opt.param_groups[-1]
            assert own["lr"] == 0.05 and own["weight_decay"] == 0.0 and ids(own) == {id(a) for a in alphas}
            assert all(not (ids(g) & ids(own)) for g in opt.param_groups if g is not own)
        x = torch.rand(32, 1, 8, 8) * 2
        y = torch.randint(0, 10, (32,))
        for _ in range(20):  # inputs below the clip: alpha's gradient is its L2 penalty's (PACT's)
            opt.zero_grad()
            penalty = sum(m.l2_penalty() for m in model.modules() if isinstance(m, PACTActivation))
            (F.cross_entropy(model(x), y) + 2e-4 * penalty).backward()
            opt.step()
        moved[alpha_lr] = max(abs(10.0 - float(a.detach())) for a in alphas)
    assert 0 < moved[None] <= 20 * 1.01e-3  # the penalty pulls alpha down, the model's rate per step
    assert moved[0.05] > 10 * moved[None]
    with pytest.raises(ValueError, match="alpha_lr must be a number > 0"):
        PACTActivation(2, alpha_lr=0.0)


def _lrs(cfg: TrainConfig, spe: int, steps: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, spe)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules_match_closed_forms():
    spe, lr = 10, 0.1
    cfg = small_cfg(epochs=10, lr=lr, schedule="cosine", warmup_epochs=1)
    lrs = _lrs(cfg, spe, 100)
    assert lrs[0] == pytest.approx(lr / 10) and lrs[9] == pytest.approx(lr)
    for s in (10, 33, 55, 99):
        assert lrs[s] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * (s - 10) / 90)))
    assert lrs[55] == pytest.approx(lr / 2)

    cfg = small_cfg(epochs=10, lr=lr, schedule="step", milestones=[3, 6], gamma=0.1)
    lrs = _lrs(cfg, spe, 100)
    assert lrs[29] == pytest.approx(lr) and lrs[30] == pytest.approx(lr * 0.1)
    assert lrs[59] == pytest.approx(lr * 0.1) and lrs[60] == pytest.approx(lr * 0.01)
    assert set(_lrs(small_cfg(schedule="constant", lr=lr), spe, 30)) == {lr}


def test_schedule_restores_exactly():
    cfg = small_cfg(epochs=5, warmup_epochs=0.5)
    ref = _lrs(cfg, 7, 35)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, 7)
    for _ in range(13):
        sched.step()
    state = json.loads(json.dumps(sched.state_dict()))
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched2 = build_scheduler(opt2, cfg, 7)
    sched2.load_state_dict(state)
    rest = []
    for _ in range(22):
        rest.append(opt2.param_groups[0]["lr"])
        sched2.step()
    assert rest == ref[13:]  # bit-identical, not approximately
    assert lr_factor(13, cfg, 7) * cfg.lr == ref[13]


# ---------------------------------------------------------------- training


@pytest.mark.parametrize(("optimizer", "schedule", "lr"), [
    ("sgd", "cosine", 0.05), ("sgd", "step", 0.05), ("adam", "cosine", 3e-3),
    ("adam", "step", 3e-3),
])
def test_training_learns(optimizer, schedule, lr):
    train, test = loaders()
    model = make_model(quantize=False)
    cfg = small_cfg(optimizer=optimizer, schedule=schedule, lr=lr, milestones=[2],
                    weight_decay=1e-4, label_smoothing=0.05, grad_clip=5.0)
    history = Trainer(model, train, test, cfg).fit()
    assert len(history) == 3
    assert history[-1]["test_acc"] > 0.85  # chance: 0.25
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[0]["lr"] == pytest.approx(lr)


def test_evaluate_is_eval_mode_no_grad_and_restores_mode():
    train, test = loaders()
    model = make_model()
    trainer = Trainer(model, train, test, small_cfg())
    seen = []
    model[3].register_forward_hook(lambda m, i, o: seen.append((m.training,
                                                                torch.is_grad_enabled())))
    ev = trainer.evaluate()
    assert set(seen) == {(False, False)} and model.training
    assert ev["n"] == 256 and 0 <= ev["acc"] <= 1 and ev["loss"] > 0
    model.eval()
    logits = model(test.x)
    assert ev["loss"] == pytest.approx(F.cross_entropy(logits, test.y).item(), rel=1e-5)
    assert ev["acc"] == pytest.approx((logits.argmax(1) == test.y).float().mean().item())


class _RangeObserver(nn.Module):
    """An activation quantizer whose range buffer is created lazily by the first forward
    and then tracked in place (an EMA), as observer-style quantizers do."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("hi", None)

    def forward(self, x):
        if self.hi is None:
            self.hi = x.detach().abs().amax()
        elif self.training:
            self.hi.mul_(0.9).add_(0.1 * x.detach().abs().amax())
        return torch.clamp(x, -self.hi, self.hi)


def test_evaluate_first_then_train_with_lazy_quantizer_state():
    train, test = loaders()

    def model_():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), _RangeObserver(), nn.ReLU(), nn.Linear(32, 4))

    model = model_()
    trainer = Trainer(model, train, test, small_cfg(epochs=2))
    trainer.evaluate()  # creates the buffer under no_grad
    assert trainer.fit()[-1]["test_acc"] > 0.85
    # the reason evaluate() uses no_grad and not inference_mode:
    model = model_().eval()
    with torch.inference_mode():
        model(test.x)
    with pytest.raises(RuntimeError, match=r"[Ii]nference"):
        model.train()(test.x).sum().backward()


def test_run_dir_files_metrics_and_regularizers(tmp_path):
    train, test = loaders()
    model = make_model()

    def l2(m):
        return 1e-4 * sum((p**2).sum() for p in m.parameters())

    seen_regs = []

    class Peek(Callback):
        def on_step_end(self, trainer, step, metrics):
            seen_regs.append(metrics["reg/l2"])

        def on_epoch_end(self, trainer, epoch, metrics):
            metrics["bits/mean"] = 3.5 + epoch

    history = Trainer(model, train, test, small_cfg(epochs=2), tmp_path,
                      regularizers=[l2], callbacks=[Peek()],
                      run_config={"model": "mlp", "recipe": {"default": None}}).fit()
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == history
    keys = {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s",
            "images_per_s", "reg/l2", "step"}
    assert keys <= set(lines[0]) and [m["epoch"] for m in lines] == [1, 2]
    assert lines[0]["reg/l2"] > 0 and len(seen_regs) == 2 * len(train)
    assert [m["bits/mean"] for m in lines] == [3.5, 4.5]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model"] == "mlp" and cfg["train"]["epochs"] == 2
    assert (tmp_path / "checkpoint.safetensors").is_file()
    assert (tmp_path / "best.safetensors").is_file()
    meta, _ = read_checkpoint(tmp_path / "best.safetensors")
    best_epoch = max(history, key=lambda m: m["test_acc"])["epoch"]
    assert meta["epoch"] == best_epoch


def test_regularizer_changes_training():
    train, test = loaders()
    norms = []
    for lam in (0.0, 0.05):
        model = make_model(quantize=False)
        Trainer(model, train, test, small_cfg(epochs=2),
                regularizers=[lambda m, lam=lam: lam * (m[0].weight ** 2).sum()]).fit()
        norms.append(model[0].weight.norm().item())
    assert norms[1] < 0.7 * norms[0]


def test_tensorboard_optional(tmp_path, monkeypatch):
    train, test = loaders()
    Trainer(make_model(), train, test, small_cfg(epochs=1, tensorboard=True),
            tmp_path / "a").fit()
    assert list((tmp_path / "a" / "tb").glob("events.out.tfevents.*"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    Trainer(make_model(), train, test, small_cfg(epochs=1, tensorboard=True),
            tmp_path / "b").fit()
    assert not (tmp_path / "b" / "tb").exists()
    assert (tmp_path / "b" / "metrics.jsonl").read_text().count("\n") == 1


def test_library_never_prints_and_rich_progress_draws(capfd):
    from rich.console import Console

    from lowbit.progress import RichProgress

    train, test = loaders()
    Trainer(make_model(), train, test, small_cfg(epochs=2)).fit()
    out, err = capfd.readouterr()
    assert out == "" and err == ""

    buf = io.StringIO()
    progress = RichProgress(Console(file=buf, width=200, force_terminal=False))
    events = []

    class Spy:
        def __getattr__(self, name):
            return lambda *a: (events.append(name), getattr(progress, name)(*a))

    Trainer(make_model(), train, test, small_cfg(epochs=2), progress=Spy()).fit()
    text = buf.getvalue()
    assert "epoch 1/2" in text and "epoch 2/2" in text and "test loss" in text
    assert events[0] == "start" and events[-1] == "close"
    assert events.count("epoch_summary") == 2 and events.count("start_epoch") == 2
    assert events.count("advance") == 2 * math.ceil(len(train) / 4)


# ---------------------------------------------------------------- divergence


def test_nan_loss_raises_and_keeps_last_checkpoint(tmp_path):
    train, test = loaders()
    steps = len(train)
    bad_step = steps + 6  # global step (1-based) in epoch 2
    calls = {"n": 0}

    def loss_fn(model, x, y):
        calls["n"] += 1
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return (loss * math.nan if calls["n"] == bad_step else loss), logits

    saved = {}

    class Snap(Callback):
        def on_epoch_start(self, trainer, epoch):
            if epoch == 1:
                saved["ckpt"] = (tmp_path / "checkpoint.safetensors").read_bytes()
                saved["best"] = (tmp_path / "best.safetensors").read_bytes()

    trainer = Trainer(make_model(), train, test, small_cfg(log_every=4), tmp_path,
                      loss_fn=loss_fn, callbacks=[Snap()])
    with pytest.raises(TrainingDiverged) as e:
        trainer.fit()
    msg = str(e.value)
    assert isinstance(e.value, RuntimeError)
    assert "epoch 2" in msg and f"step 6/{steps}" in msg and f"global step {bad_step}" in msg
    assert "nan" in msg and "learning rate" in msg and "untouched" in msg
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == saved["ckpt"]
    assert (tmp_path / "best.safetensors").read_bytes() == saved["best"]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_infinite_regularizer_is_divergence():
    train, test = loaders()
    trainer = Trainer(make_model(), train, test, small_cfg(),
                      regularizers=[lambda m: torch.tensor(math.inf)])
    with pytest.raises(TrainingDiverged, match="regularizer"):
        trainer.fit()
    names = [n for n, _ in Trainer(make_model(), train, test, small_cfg(),
                                    regularizers=[lambda m: 0, lambda m: 0]).regularizers]
    assert names == ["reg", "reg2"]


# ---------------------------------------------------------------- wrapped optimizer


class _BlendWrapper:
    """BCGD-shaped wrapper: blends weights toward their sign before the inner step, keeps
    its own state (a tensor and a number) in state_dict."""

    def __init__(self, inner, model, rho=1e-3):
        self.inner, self.rho = inner, rho
        self.params = [p for p in model.parameters() if p.ndim > 1]
        self.count = torch.zeros((), dtype=torch.int64)

    @property
    def param_groups(self):
        return self.inner.param_groups

    def zero_grad(self, set_to_none=True):
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self):
        for p in self.params:
            p.mul_(1 - self.rho).add_(self.rho * p.sign() * p.abs().mean())
        self.count += 1
        self.inner.step()

    def state_dict(self):
        return {"inner": self.inner.state_dict(), "rho": self.rho, "count": self.count}

    def load_state_dict(self, state):
        self.inner.load_state_dict(state["inner"])
        self.rho, self.count = state["rho"], state["count"].clone()


class _Crash(Exception):  # noqa: N818
    pass


class _CrashAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            raise _Crash


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _equal_files(p1: Path, p2: Path, skip=("epoch_time_s", "images_per_s")):
    (m1, t1), (m2, t2) = read_checkpoint(p1), read_checkpoint(p2)
    _assert_same_state(t1, t2)  # model/, optim/, sched/, extra/ (RNG) tensors
    h1 = [{k: v for k, v in m.items() if k not in skip} for m in m1["extra"]["history"]]
    h2 = [{k: v for k, v in m.items() if k not in skip} for m in m2["extra"]["history"]]
    assert h1 == h2
    for key in ("epoch", "optimizer", "scheduler"):
        assert m1[key] == m2[key], key
    assert m1["extra"]["callbacks"] == m2["extra"]["callbacks"]


def test_parametrized_model_wrapped_optimizer_resume_in_process(tmp_path):
    """A sign-STE parametrized model + BCGD-like wrapped optimizer: crash mid-epoch 2,
    resume in a fresh Trainer with a differently initialised model -> identical end."""
    train, test = loaders()
    cfg = small_cfg(epochs=3, optimizer="sgd", nesterov=True, weight_decay=1e-3,
                    warmup_epochs=1, deterministic=True)

    def run(run_dir, crash_at=None, resume=False, seed=0):
        model = make_model(seed=seed)
        counter = StepCounter()
        cbs = [counter] + ([_CrashAt(crash_at)] if crash_at else [])
        trainer = Trainer(model, train, test, cfg, run_dir, callbacks=cbs,
                          wrap_optimizer=lambda opt, m: _BlendWrapper(opt, m))
        trainer.fit(resume=resume)
        return model, trainer, counter

    model_a, trainer_a, counter_a = run(tmp_path / "a")
    assert trainer_a.history[-1]["test_acc"] > 0.85
    assert int(trainer_a.optimizer.count) == 3 * len(train)

    with pytest.raises(_Crash):
        run(tmp_path / "b", crash_at=len(train) + 5)
    assert read_checkpoint(tmp_path / "b" / "checkpoint.safetensors")[0]["epoch"] == 1
    model_b, trainer_b, counter_b = run(tmp_path / "b", resume=True, seed=123)

    assert "4.parametrizations.weight.original" in model_b.state_dict()
    assert parametrize.is_parametrized(model_b[4], "weight")
    _assert_same_state(model_a.state_dict(), model_b.state_dict())
    assert int(trainer_b.optimizer.count) == int(trainer_a.optimizer.count)
    assert counter_b.steps == counter_a.steps == 3 * len(train)
    assert counter_b.loss_sum == counter_a.loss_sum
    _equal_files(tmp_path / "a" / "checkpoint.safetensors",
                 tmp_path / "b" / "checkpoint.safetensors")
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2, 3]


def test_resume_of_finished_run_is_a_no_op(tmp_path):
    train, test = loaders()
    Trainer(make_model(), train, test, small_cfg(epochs=1), tmp_path).fit()
    before = (tmp_path / "checkpoint.safetensors").read_bytes()
    stale = tmp_path / ".checkpoint.safetensors.x1y2.tmp"  # left by a killed save
    stale.write_bytes(b"partial")
    history = Trainer(make_model(), train, test, small_cfg(epochs=1), tmp_path).fit(resume=True)
    assert len(history) == 1
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == before
    assert not stale.exists()


# ---------------------------------------------------------------- resume after SIGKILL


def _worker(run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, str(WORKER), str(run_dir), "--deterministic", "--epochs", "3",
            "--out", str(run_dir / "final.safetensors"), *args]


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    marker = tmp_path / "marker"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    full = subprocess.Popen(_worker(a), env=env, stderr=subprocess.PIPE)
    victim = subprocess.Popen(_worker(b, "--marker", str(marker), "--slow-from-epoch", "1",
                                      "--delay", "0.05"), env=env, stderr=subprocess.PIPE)
    steps = len(loaders()[0])
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            assert victim.poll() is None, victim.stderr.read().decode()
            text = marker.read_text() if marker.exists() else ""
            if text.endswith("\n"):
                epoch, step = map(int, text.split())
                if epoch == 1 and step >= steps + 3:  # epoch 2, 3 steps in
                    break
            time.sleep(0.005)
        else:
            pytest.fail("the worker never reached epoch 2")
        assert (b / "checkpoint.safetensors").exists()
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        victim.kill()
        victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert read_checkpoint(b / "checkpoint.safetensors")[0]["epoch"] == 1
    assert not (b / "final.safetensors").exists()

    resumed = subprocess.run(_worker(b, "--resume"), env=env, capture_output=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert full.wait(timeout=120) == 0, full.stderr.read().decode()

    from safetensors.torch import load_file

    _assert_same_state(load_file(a / "final.safetensors"), load_file(b / "final.safetensors"))
    _equal_files(a / "checkpoint.safetensors", b / "checkpoint.safetensors")
    lines = [json.loads(s) for s in (b / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]


# ---------------------------------------------------------------- evidence protocol


def test_train_run_selects_on_validation_and_tests_once(tmp_path, one_thread):
    from lowbit.experiment import RunSpec, load_run, train_run
    from lowbit.train import evaluate, load_checkpoint

    spec = RunSpec(model="mlp", dataset="synthetic", train={"epochs": 3, "optimizer": "adam", "lr": 1e-3,
                                                            "tensorboard": False}, out=str(tmp_path / "r"))
    res = train_run(spec)
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    epochs, final = lines[:-1], lines[-1]
    assert len(epochs) == 3 and all("val_acc" in m and "test_acc" not in m for m in epochs)
    assert final["final"] is True and final["split"] == "test" and final["selected_on"] == "val_acc"
    best = max(epochs, key=lambda m: m["val_acc"])["epoch"]  # first maximum, as the Trainer keeps it
    assert res.best_epoch == final["best_epoch"] == best
    assert res.best_acc == max(m["val_acc"] for m in epochs)
    # the reported test accuracy is the best-validation checkpoint's, measured once
    _, data, _ = load_run(tmp_path / "r")
    model = res.model
    load_checkpoint(tmp_path / "r" / "best.safetensors", model)
    assert evaluate(model, data.test)["acc"] == res.test_acc == final["test_acc"]
    assert res.val_size == 4096 // 10
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["dataset"]["val_samples"] == 409 and cfg["dataset"]["train_samples"] == 4096 - 409
    # a finished run resumed writes the same final line once
    train_run(spec, resume=True)
    again = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert len(again) == 4 and json.loads(again[-1])["test_acc"] == final["test_acc"]


def test_train_run_without_validation_tests_the_last_epoch(tmp_path, one_thread):
    from lowbit.experiment import RunSpec, train_run

    res = train_run(RunSpec(model="mlp", dataset="synthetic", val_size=0, train_subset=512,
                            train={"epochs": 2, "tensorboard": False}, out=str(tmp_path / "r")))
    final = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert res.selected_on == "last_epoch" and res.best_acc is None and res.best_epoch == 2
    assert final["checkpoint"] == "checkpoint.safetensors"
    # best.safetensors is the final model, so `--init RUN/best.safetensors` works without a split too
    best, last = (tmp_path / "r" / n for n in ("best.safetensors", "checkpoint.safetensors"))
    assert best.read_bytes() == last.read_bytes()


def test_eval_split_names_the_metrics():
    train, test = loaders()
    hist = Trainer(make_model(), train, test, small_cfg(epochs=1), eval_split="val").fit()
    assert "val_acc" in hist[0] and "test_acc" not in hist[0]


def test_epoch_summary_line_shows_the_validation_split() -> None:
    from lowbit.progress import format_epoch_summary

    m = {"epoch": 2, "train_loss": 0.5, "train_acc": 0.9, "val_loss": 0.25, "val_acc": 0.955,
         "lr": 1e-3, "epoch_time_s": 2.0, "images_per_s": 100.0}
    line = format_epoch_summary(m, 3)
    assert "val loss 0.2500 acc 95.50%" in line and "test" not in line
    del m["val_loss"]  # a callback that sets the accuracy alone (a supernet's mean over sub-nets)
    assert "| val acc 95.50% |" in format_epoch_summary(m, 3)
