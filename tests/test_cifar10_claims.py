"""The CIFAR-10 claims campaign (benchmarks/cifar10/claims.py) on tiny fake run directories:
the claim table, the job order, resume, the report, verdicts, archives. No training."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tarfile
import time
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    path = ROOT / "benchmarks" / "cifar10" / "claims.py"
    spec = importlib.util.spec_from_file_location("cifar10_claims", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["cifar10_claims"] = mod
    spec.loader.exec_module(mod)
    return mod


C = _load()

# the rows of issue 12's table, in order
ISSUE_ROWS = [
    "float baseline",
    "TTQ, TWN, statistical ternary (+ residual expansion), TGA, LBW ternary and 4-bit",
    "BCGD",
    "SinReQ",
    "WaveQ / SINAREQ",
    "DCQ",
    "ReLeQ",
    "width multiplier vs mixed precision",
    "PACT, LSQ, DoReFa baselines",
    "multipoint PTQ",
    "RVSM",
    "WPC",
]


def fake_run(root: Path, key: str, seed: int, acc: float, finished: bool = True, epochs: int = 2,
             extra: dict | None = None) -> Path:
    d = root / key / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"spec": {"out": str(d)}}))
    (d / "checkpoint.safetensors").write_bytes(bytes([seed, 1, 2, 3]))
    lines = [{"epoch": e, "epoch_time_s": 10.0, "val_acc": acc, **(extra or {})} for e in range(epochs)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if finished:
        (d / "result.json").write_text(json.dumps({"test_acc": acc, "best_acc": acc, "epochs": epochs,
                                                   "device": "cpu", "size": {"packed_bytes": 1000 + seed,
                                                                             "bops": 2e9}}))
    return d


def test_claim_table_is_the_issues_table():
    assert sorted(c.row for c in C.CLAIMS) == sorted(ISSUE_ROWS)
    assert len({c.name for c in C.CLAIMS}) == len(C.CLAIMS)
    for claim in C.CLAIMS:
        assert claim.checks, claim.name
        keys = {a.key for a in claim.arms}
        assert len(keys) == len(claim.arms), f"{claim.name}: duplicate arm keys"
        for check in claim.checks:
            assert check.rule in ("level", "drop", "gain", "loss", "measure")
            assert len(check.arms) == (2 if check.rule in ("gain", "loss") else 1)
            assert set(check.arms) | set(check.choose) <= keys, (claim.name, check.label)
            if check.rule in ("level", "drop"):
                assert check.paper is not None
    # the paper numbers the issue sets beside ours
    by = {c.name: c for c in C.CLAIMS}
    assert by["float"].checks[0].paper == 91.7
    assert [ch.paper for ch in by["dcq"].checks] == [9.7, 9.7]
    assert {ch.paper for ch in by["sinreq"].checks} == {2.82, 2.11}
    assert [ch.paper for ch in by["baselines"].checks[:2]] == [88.9, 90.8]


def test_every_recipe_resolves_and_validates():
    from lowbit.recipe import Recipe

    ctx = {"{float}": "runs/x/float/seed0", "{q_half}": 3, "{middle}": ["layer1.0.conv1"]}
    # the arms checked by name below exist (a renamed arm would skip its check silently)
    assert {"waveq", "dorefa-w2-dcq", "bcgd-fl-rho0"} <= {arm.key for claim in C.CLAIMS for arm in claim.arms}
    for claim in C.CLAIMS:
        for arm in claim.arms:
            r = C.resolve_recipe(arm, ctx)
            if arm.is_float or arm.derive or arm.kind in ("ptq", "releq"):
                assert r is None
                continue
            Recipe.from_dict(r)  # raises on a bad field
            if arm.key == "waveq":
                assert r["methods"][0]["layers"] == ["layer1.0.conv1"]
            if arm.key == "dorefa-w2-dcq":
                assert r["methods"] == [{"name": "dcq", "teacher": "runs/x/float/seed0", "dcq_epochs": 3}]
            if arm.key == "bcgd-fl-rho0":
                assert r["methods"] == [{"name": "bcgd", "rho": 0.0}]
                assert r["default"]["weight"]["bits"] == 1


def test_plan_order_and_seeds():
    cpu = C.plan(C.BUDGETS["cpu"])
    names = [j.name for j in cpu]
    assert names[0] == "float/seed0"
    pos = {n: i for i, n in enumerate(names)}
    for j in cpu:  # every quantized job after its float model
        if j.arm.init == "float":
            assert pos[f"{C.float_arm(j.arm.width).key}/seed{j.seed}"] < pos[j.name]
    # the floats, then the paired claims claim by claim (every seed of one before the next):
    # post-training first (minutes), then BCGD, DCQ, SinReQ
    assert names[:3] == ["float/seed0", "float/seed1", "float/seed2"]
    claims = [j.claim for j in cpu[3:]]
    firsts = list(dict.fromkeys(claims))[:4]
    assert firsts == ["multipoint", "bcgd", "dcq", "sinreq"]
    assert claims == sorted(claims, key=lambda c: firsts.index(c) if c in firsts else 9)
    bcgd = [n for n in names if n.startswith("bcgd")]
    assert bcgd == [f"bcgd-{p}{r}/seed{s}" for s in range(3) for p in ("fl", "all") for r in ("", "-rho0")]
    assert {j.seed for j in cpu if j.arm.key == "dorefa-w2-dcq"} == {0, 1, 2}
    assert {j.seed for j in cpu if j.arm.key == "ttq"} == {0, 1, 2}
    # the other rows seed by seed: every row's seed 0 before any row's seed 1, seed 1 before seed 2
    rest = [j.seed for j in cpu if j.claim in ("ternary", "baselines", "rvsm")]
    assert rest == sorted(rest) and rest.count(0) == rest.count(1) == rest.count(2) > 0
    # the search and the runs built on it: seed 0 only, each after the search of its seed
    search = [j.name for j in cpu if j.claim in ("releq", "width")]
    assert search == ["releq/seed0", "releq-ft/seed0", "width-mixed/seed0", "width-wide/seed0"]
    assert C.deps(next(j for j in cpu if j.name == "width-mixed/seed0")) == ["releq/seed0"]
    # WaveQ (one fine-tune learning the bits, then the two it derives; again with the sine weight
    # ramped) runs on 3 seeds, each derived fine-tune after its own seed's WaveQ run
    waveq = [j.name for j in cpu if j.claim == "waveq"]
    assert sorted(waveq) == sorted(f"{v}{a}/seed{s}" for v in ("waveq", "waveq-ramp")
                                   for a in ("", "-learned", "-fixed") for s in range(3))
    for v in ("waveq", "waveq-ramp"):
        for s in range(3):
            assert pos[f"{v}/seed{s}"] < pos[f"{v}-learned/seed{s}"]
            assert C.deps(next(j for j in cpu if j.name == f"{v}-fixed/seed{s}")) == [
                f"float/seed{s}", f"{v}/seed{s}"]
    gpu = C.plan(C.BUDGETS["gpu"])
    assert {j.seed for j in gpu if j.arm.key == "ttq"} == {0, 1, 2}
    assert "float-w2/seed0" in {j.name for j in gpu}  # the WRPN arms' float model
    gpos = {j.name: i for i, j in enumerate(gpu)}
    for j in gpu:  # every dependency is planned, and before its dependants
        for d in C.deps(j):
            assert gpos[d] < gpos[j.name], (d, j.name)
    wide = next(j for j in gpu if j.name == "width-wide/seed0")
    assert C.deps(wide) == ["releq/seed0"]  # from scratch: the search's float model comes before the search
    assert C.deps(next(j for j in gpu if j.name == "float-w2/seed1")) == []
    only = C.plan(C.BUDGETS["cpu"], only=["dcq"], seeds=[1])
    assert [j.name for j in only] == ["float/seed1", "dorefa-w2/seed1", "dorefa-w2-dcq/seed1",
                                      "dorefa-w1/seed1", "dorefa-w1-dcq/seed1"]


class FakeProcess:
    started: typing.ClassVar[list[str]] = []

    def __init__(self, target, args, name):
        self.name, self.payload, self.exitcode = name, args[0], 0

    def start(self):
        FakeProcess.started.append(self.name)
        out = Path(self.payload["spec"]["out"])
        fake_run(out.parents[1], out.parent.name, int(out.name[4:]), 0.5)  # "trains" at once
        self.pid = 0

    def is_alive(self):
        return False

    def join(self, timeout=None):
        pass

    def terminate(self):
        raise AssertionError("nothing to stop")


class FakeContext:
    Process = FakeProcess


def test_resume_reuses_finished_runs_and_starts_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(C.multiprocessing, "get_context", lambda _: FakeContext)
    FakeProcess.started = []
    runs = tmp_path / "cpu"
    fake_run(runs, "float", 0, 0.85)
    fake_run(runs, "dorefa-w2", 0, 0.80)
    fake_run(runs, "dorefa-w2-dcq", 0, 0.0, finished=False)  # killed mid-run: resumes
    jobs = C.plan(C.BUDGETS["cpu"], only=["dcq"], seeds=[0])
    state = C.run_campaign(jobs, C.BUDGETS["cpu"], runs, "data", "cpu", 2, None)
    assert FakeProcess.started == ["dorefa-w2-dcq/seed0", "dorefa-w1/seed0", "dorefa-w1-dcq/seed0"]
    assert state == dict.fromkeys(["float/seed0", "dorefa-w2/seed0", "dorefa-w2-dcq/seed0", "dorefa-w1/seed0",
                                   "dorefa-w1-dcq/seed0"], "finished")
    # all finished now: a rerun starts nothing
    FakeProcess.started = []
    C.run_campaign(jobs, C.BUDGETS["cpu"], runs, "data", "cpu", 2, None)
    assert FakeProcess.started == []


class SlowProcess(FakeProcess):
    terminated: typing.ClassVar[list[str]] = []

    def start(self):
        self.pid = 0

    def is_alive(self):
        return True

    def terminate(self):
        SlowProcess.terminated.append(self.name)


def test_stop_terminates_running_jobs_which_resume_later(tmp_path, monkeypatch):
    monkeypatch.setattr(C.multiprocessing, "get_context", lambda _: type("Ctx", (), {"Process": SlowProcess}))
    SlowProcess.terminated = []
    jobs = C.plan(C.BUDGETS["cpu"], only=["dcq"], seeds=[0])
    state = C.run_campaign(jobs, C.BUDGETS["cpu"], tmp_path, "data", "cpu", 2, time.time() + 1.0)
    assert SlowProcess.terminated == ["float/seed0"]  # its fine-tunes wait for it
    assert state == {"float/seed0": "stopped", **dict.fromkeys(
        ["dorefa-w2/seed0", "dorefa-w2-dcq/seed0", "dorefa-w1/seed0", "dorefa-w1-dcq/seed0"], "not started")}
    stops: list[int] = []
    monkeypatch.setattr(C, "_STOP", stops)
    monkeypatch.setattr(SlowProcess, "start", lambda self: stops.append(15))  # SIGTERM while it runs
    monkeypatch.setattr(SlowProcess, "pid", 0, raising=False)
    SlowProcess.terminated = []
    state = C.run_campaign(jobs, C.BUDGETS["cpu"], tmp_path, "data", "cpu", 2, None)
    assert SlowProcess.terminated == ["float/seed0"] and state["float/seed0"] == "stopped"


def test_job_spec_of_a_fine_tune(tmp_path):
    job = next(j for j in C.plan(C.BUDGETS["cpu"]) if j.name == "dorefa-w2-dcq/seed1")
    p = C.job_spec(job, C.BUDGETS["cpu"], tmp_path, "data", "cpu")
    s = p["spec"]
    assert s["init"] == str(tmp_path / "float" / "seed1" / "best.safetensors")
    assert s["out"] == str(tmp_path / "dorefa-w2-dcq" / "seed1")
    assert s["train"] == {"epochs": 5, "tensorboard": False, "precision": "bf16", "seed": 1}
    assert s["recipe"]["methods"][0]["teacher"] == str(tmp_path / "float" / "seed1")
    fl = C.job_spec(C.plan(C.BUDGETS["cpu"])[0], C.BUDGETS["cpu"], tmp_path, "data", "cpu")["spec"]
    assert fl["init"] is None and fl["recipe"] is None and fl["train"]["epochs"] == 20


@pytest.mark.parametrize("rule,ours,paper,expect", [
    ("gain", {"mean": 1.0, "std": 0.3, "n": 3}, 2.82, "reproduced"),  # 2 se = 0.35
    ("gain", {"mean": 0.2, "std": 0.3, "n": 3}, 2.82, "not reproduced"),
    ("gain", {"mean": -1.0, "std": 0.3, "n": 3}, None, "reversed"),
    ("gain", {"mean": 0.1, "std": 0.0, "n": 1}, None, "reproduced (single run)"),
    ("gain", {"mean": -0.1, "std": 0.0, "n": 1}, None, "reversed (single run)"),
    ("level", {"mean": 90.8, "std": 0.1, "n": 3}, 91.7, "reproduced"),  # within 1 pp
    ("level", {"mean": 88.0, "std": 0.1, "n": 3}, 91.7, "not reproduced"),
    ("level", {"mean": 88.0, "std": 3.0, "n": 3}, 91.7, "not reproduced"),  # 2 se = 3.46 < 3.7
    ("level", {"mean": 88.5, "std": 3.0, "n": 3}, 91.7, "reproduced"),  # 3.2 <= 3.46
    ("drop", {"mean": 1.5, "std": 0.0, "n": 1}, 0.64, "reproduced"),
    ("drop", {"mean": 2.0, "std": 0.0, "n": 1}, 0.64, "not reproduced"),
    ("measure", {"mean": 2.0, "std": 0.0, "n": 1}, None, "measured"),
    ("loss", {"mean": 0.8, "std": 0.0, "n": 1}, None, "reproduced (single run)"),  # <= TOL_PP
    ("loss", {"mean": -0.5, "std": 0.0, "n": 1}, None, "reproduced (single run)"),  # sparse is better
    ("loss", {"mean": 3.9, "std": 0.0, "n": 1}, None, "not reproduced (single run)"),
    ("loss", {"mean": 1.5, "std": 0.6, "n": 3}, None, "reproduced"),  # 1.5 <= 1 + 2 se (0.69)
    ("loss", {"mean": 1.8, "std": 0.6, "n": 3}, None, "not reproduced"),
    ("loss", {"mean": 0.4, "std": 0.0, "n": 1}, 0.3, "not reproduced (single run)"),  # a paper's limit
    ("gain", None, 9.7, "not run"),
])
def test_verdict(rule, ours, paper, expect):
    v, why = C.verdict(rule, ours, paper)
    assert v == expect
    if v.startswith(("not reproduced", "reversed")):
        assert why  # one measured line on why


def test_derived_recipes(tmp_path):
    (tmp_path / "result.json").write_text("{}")  # a finished run
    sizes = C.layer_sizes()
    middle = list(sizes)[1:-1]
    bits = {n: (2 if i % 2 else 6) for i, n in enumerate(middle)}
    (tmp_path / "waveq_bits.json").write_text(json.dumps({"bits": bits}))
    learned, w = C.derived_recipe("waveq-learned", tmp_path)
    assert w == 1.0 and {r["match"]: r["weight"]["bits"] for r in learned["rules"]} == bits
    fixed, _ = C.derived_recipe("waveq-fixed", tmp_path)
    mean = sum(sizes[n] * b for n, b in bits.items()) / sum(sizes[n] for n in middle)
    assert {r["weight"]["bits"] for r in fixed["rules"]} == {round(mean)}
    # width-wide: the widest 2-bit ResNet-20 within the assignment's weight bits
    from lowbit.models import build_model
    from lowbit.search import model_weight_bits

    budget = model_weight_bits(build_model("resnet20"), 4)  # a uniform 4-bit assignment's storage
    (tmp_path / "releq.json").write_text(json.dumps({"weight_bits_total": budget, "avg_a_bits": 3.4}))
    wide, width = C.derived_recipe("width-wide", tmp_path)
    assert wide["default"]["weight"]["bits"] == 2 and wide["default"]["activation"]["bits"] == 3
    assert width > 1.2
    assert model_weight_bits(build_model("resnet20", width_mult=width), 2) <= budget
    with pytest.raises(ValueError, match="unknown derive"):
        C.derived_recipe("nope", tmp_path)
    # the directory gone: the recorded source gives the same recipe; with neither, a clear error
    source = C.run_source(tmp_path)
    assert C.derived_recipe("width-wide", tmp_path / "gone", source) == (wide, width)
    assert C.derived_recipe("waveq-learned", tmp_path / "gone", json.loads(json.dumps(source)))[0] == learned
    with pytest.raises(FileNotFoundError, match="neither here nor recorded"):
        C.derived_recipe("releq", tmp_path / "gone", source)  # a search's recipe.yaml was never there


def test_a_derived_arm_starts_from_its_sources_record(tmp_path, monkeypatch):
    """A search whose directory is gone but whose report recorded its assignment is not run again
    (nor its float model trained again): the arms built from it start from the record."""
    monkeypatch.setattr(C.multiprocessing, "get_context", lambda _: FakeContext)
    runs, out = tmp_path / "runs", tmp_path / "o"
    d = fake_run(runs / "cpu", "releq", 0, 0.5)
    from lowbit.models import build_model
    from lowbit.search import model_weight_bits

    found = {"name": "found", "default": {"weight": {"method": "dorefa", "bits": 3}}}
    (d / "recipe.yaml").write_text(json.dumps(found))  # YAML reads JSON
    search = {"history": [{"reward": 0.1}], "evaluations": 1, "best_reward": 0.1, "best_acc": 0.5,
              "float_acc": 0.6}
    total = model_weight_bits(build_model("resnet20"), 3)
    (d / "releq.json").write_text(json.dumps({"weight_bits_total": total, "avg_a_bits": 4.0,
                                              "search": search}))
    fake_run(runs / "cpu", "float", 0, 0.8)
    C.main(["--budget", "cpu", "--report-only", "--runs-dir", str(runs), "--out", str(out)])
    shutil.rmtree(runs)  # a fresh machine: only the report is left
    recorded = C.recorded_runs(out / "cifar10_claims.json")
    assert recorded[("releq", 0, "cpu")]["source"]["recipe"] == found
    jobs = C.plan(C.BUDGETS["cpu"], only=["width"], seeds=[0])
    sources = {"releq/seed0": recorded[("releq", 0, "cpu")]["source"]}
    FakeProcess.started, seen = [], []
    real = C.job_spec
    monkeypatch.setattr(C, "job_spec", lambda *a: seen.append(real(*a)) or seen[-1])
    state = C.run_campaign(jobs, C.BUDGETS["cpu"], runs / "cpu", "data", "cpu", 2, None,
                           frozenset({"float/seed0", "releq/seed0"}), sources)
    assert FakeProcess.started == ["width-mixed/seed0", "width-wide/seed0"]
    assert state["releq/seed0"] == state["float/seed0"] == "recorded"
    assert seen[0]["spec"]["recipe"] == found and seen[0]["spec"]["init"] is None
    assert seen[1]["spec"]["model_kwargs"]["width_mult"] > 1.2
    # recorded without its source (an older report): the search runs again, its float model first
    shutil.rmtree(runs)
    FakeProcess.started = []
    monkeypatch.setattr(C, "job_spec", lambda *a: {"spec": {"out": str(C.run_dir(a[2], a[0]))}})
    C.run_campaign(jobs, C.BUDGETS["cpu"], runs / "cpu", "data", "cpu", 2, None,
                   frozenset({"float/seed0", "releq/seed0"}))
    assert FakeProcess.started[:2] == ["float/seed0", "releq/seed0"]
    # ... and the fine-tune of its old assignment, recorded, runs again from the new one
    shutil.rmtree(runs)
    FakeProcess.started = []
    jobs = C.plan(C.BUDGETS["cpu"], only=["releq", "width"], seeds=[0])
    state = C.run_campaign(jobs, C.BUDGETS["cpu"], runs / "cpu", "data", "cpu", 2, None,
                           frozenset({"float/seed0", "releq/seed0", "releq-ft/seed0"}))
    assert FakeProcess.started[:2] == ["float/seed0", "releq/seed0"]
    assert "releq-ft/seed0" in FakeProcess.started
    assert state["releq-ft/seed0"] == "finished"


def test_rvsm_little_loss_is_dense_minus_sparse():
    check = next(ch for ch in C.claim_by_name("rvsm").checks if ch.label.startswith("L1"))
    assert check.rule == "loss" and check.needs == "sparsity"
    runs = {("rvsm-l1", 0): {"test_acc": 56.5}, ("rvsm-none", 0): {"test_acc": 57.0},
            ("rvsm-l1", 1): {"test_acc": 55.0}, ("rvsm-none", 1): {"test_acc": 58.0}}
    assert C.check_values(check, runs) == [pytest.approx(0.5), pytest.approx(3.0)]


def test_hyper_parameter_chosen_on_validation_not_test():
    check = next(ch for ch in C.claim_by_name("sinreq").checks if ch.label.startswith("DoReFa W4"))
    runs = {("dorefa-w4-sinreq-l10", 0): {"val_acc": 80.0, "test_acc": 90.0},
            ("dorefa-w4-sinreq-l100", 0): {"val_acc": 82.0, "test_acc": 85.0},
            ("dorefa-w4", 0): {"val_acc": 81.0, "test_acc": 84.0}}
    assert C.chosen_arm(check, runs) == "dorefa-w4-sinreq-l100"
    assert C.check_values(check, runs) == [pytest.approx(1.0)]


def test_a_sweep_still_running_does_not_choose_on_fewer_seeds():
    check = next(ch for ch in C.claim_by_name("sinreq").checks if ch.label.startswith("DoReFa W3"))
    runs = {("dorefa-w3-sinreq-l100", s): {"val_acc": 82.0 + s, "test_acc": 84.0} for s in range(3)}
    runs[("dorefa-w3-sinreq-l10", 0)] = {"val_acc": 95.0, "test_acc": 85.0}  # 1 of 3 seeds so far
    assert C.chosen_arm(check, runs) == "dorefa-w3-sinreq-l100"
    cand = C.candidates_on_val(check, runs)
    assert cand["dorefa-w3-sinreq-l10"]["n"] == 1 and cand["dorefa-w3-sinreq-l100"]["n"] == 3
    assert cand["dorefa-w3-sinreq-l100"]["val_acc"] == pytest.approx(83.0)
    runs.update({("dorefa-w3-sinreq-l10", s): {"val_acc": 95.0, "test_acc": 85.0} for s in (1, 2)})
    assert C.chosen_arm(check, runs) == "dorefa-w3-sinreq-l10"


def test_verdict_rejects_bad_rules():
    with pytest.raises(ValueError, match="unknown rule"):
        C.verdict("bigger", {"mean": 1.0, "std": 0.0, "n": 1}, 1.0)
    with pytest.raises(ValueError, match="paper's number"):
        C.verdict("level", {"mean": 1.0, "std": 0.0, "n": 1}, None)


def _fixture_runs(root: Path) -> None:
    cpu = root / "cpu"
    for s, (f, w, wo) in enumerate([(0.86, 0.80, 0.78), (0.85, 0.81, 0.78), (0.87, 0.80, 0.79)]):
        fake_run(cpu, "float", s, f)
        fake_run(cpu, "bcgd-fl", s, w)
        fake_run(cpu, "bcgd-fl-rho0", s, wo)
    fake_run(cpu, "ttq", 0, 0.84)
    fake_run(cpu, "twn-gl-wpc", 0, 0.83, extra={"wpc/small_groups": 0.25})
    fake_run(cpu, "twn-gl", 0, 0.82, extra={"wpc/small_groups": 0.5})


def test_report_only_rebuilds_the_same_table(tmp_path):
    _fixture_runs(tmp_path / "runs")
    args = ["--budget", "cpu", "--report-only", "--runs-dir", str(tmp_path / "runs"),
            "--out", str(tmp_path / "o")]
    C.main(args)
    first = json.loads((tmp_path / "o" / "cifar10_claims.json").read_text())
    md = (tmp_path / "o" / "cifar10_claims.md").read_text()
    C.main(args)
    again = json.loads((tmp_path / "o" / "cifar10_claims.json").read_text())
    assert first["rows"] == again["rows"] and first["runs"] == again["runs"]
    rows = {(r["claim"], r["check"]): r for r in first["rows"]}
    assert len(first["rows"]) == sum(len(c.checks) for c in C.CLAIMS)  # every check, run or not
    fl = rows[("float", "ResNet-20 float test accuracy")]
    assert fl["ours"]["n"] == 3 and fl["ours"]["mean"] == pytest.approx(86.0)
    assert fl["verdict"] == "not reproduced" and "91.7" not in fl["why"] and "-5.70" in fl["why"]
    b = rows[("bcgd", "W1A4, first/last float: rho 1e-5 minus rho 0")]
    assert b["ours"]["values"] == pytest.approx([2.0, 3.0, 1.0])
    assert b["verdict"] == "reproduced" and b["budget"] == "cpu" and b["device"] == "cpu"
    t = rows[("ternary", "TTQ drop vs float")]
    assert t["ours"]["mean"] == pytest.approx(2.0) and t["diff"] == pytest.approx(2.0 - 0.64)
    assert t["verdict"] == "not reproduced" and "86.00%" in t["why"]
    w = rows[("wpc", "ternary + group lasso: with minus without WPC")]
    assert w["verdict"] == "reproduced (single run)" and w["small_groups"]["mean"] == 0.25
    assert rows[("dcq", "DoReFa W2: with minus without DCQ")]["verdict"] == "not run"
    dcq = rows[("dcq", "DoReFa W2: with minus without DCQ")]
    assert "not run (cpu budget: not finished yet" in dcq["why"]
    assert "GPU budget only" in rows[("sinreq", "WRPN W3 (2x wide): with minus without SinReQ")]["why"]
    assert "not finished yet" in rows[("sinreq", "DoReFa W3: with minus without SinReQ")]["why"]
    assert "not finished yet" in rows[("releq", "average weight bits of the assignment")]["why"]
    assert "JPEG copy" in md and md.count("not run (cpu budget") >= 10
    assert (tmp_path / "o" / "cifar10_claims.png").stat().st_size > 0
    # the summary lists exactly the checks that ran, above the full table, with our cell as there
    summary = md.split("## Summary: the checks that ran")[1].split("## Every check")[0]
    lines = [ln for ln in summary.splitlines() if ln.startswith("| ") and not ln.startswith("| claim")]
    ran = [r for r in first["rows"] if r["verdict"] != "not run"]
    assert len(lines) == len(ran) > 0
    bcgd = "| BCGD | W1A4, first/last float: rho 1e-5 minus rho 0 | blending helps at 1 bit | "
    assert bcgd + "2.00 ± 1.00 pp (n=3) | reproduced |" in lines
    assert not any("DoReFa W2: with minus without DCQ" in ln for ln in lines)  # not run: full table only


def test_archive_unpack_round_trip(tmp_path):
    runs = tmp_path / "runs" / "gpu"
    _fixture_runs(tmp_path / "runs")
    src_cpu = tmp_path / "runs" / "cpu"
    fake_run(src_cpu, "dorefa-w2", 0, 0.5, finished=False)  # an unfinished run travels too
    n = C.archive(src_cpu, tmp_path / "a.tar.gz")
    assert n == 13  # 9 + ttq + 2 wpc runs + the unfinished one
    got = C.unpack(tmp_path / "a.tar.gz", runs)
    assert len(got) == 13
    for f in src_cpu.rglob("*"):
        rel = f.relative_to(src_cpu)
        if f.name == "checkpoint.safetensors" and (f.parent / "result.json").exists():
            assert not (runs / rel).exists()  # a finished run's optimizer state stays behind
        elif f.is_file():
            assert (runs / rel).read_bytes() == f.read_bytes()
    assert (runs / "dorefa-w2" / "seed0" / "checkpoint.safetensors").exists()  # unfinished: resumes
    # slim: the finished quantized runs' checkpoints stay behind, the float models' travel
    for d in (src_cpu / "ttq" / "seed0", src_cpu / "float" / "seed0"):
        (d / "best.safetensors").write_bytes(b"w")
    C.archive(src_cpu, tmp_path / "slim.tar.gz", slim=True)
    with tarfile.open(tmp_path / "slim.tar.gz") as tar:
        names = set(tar.getnames())
    assert "float/seed0/best.safetensors" in names and "ttq/seed0/best.safetensors" not in names
    assert "ttq/seed0/result.json" in names and "dorefa-w2/seed0/checkpoint.safetensors" in names
    # a run finished here is not replaced by an unfinished copy
    fake_run(runs, "dorefa-w2", 0, 0.7)
    C.archive(src_cpu, tmp_path / "b.tar.gz")
    C.unpack(tmp_path / "b.tar.gz", runs)
    assert json.loads((runs / "dorefa-w2" / "seed0" / "result.json").read_text())["test_acc"] == 0.7
    # a member outside <run>/seed<k>/<file> is refused
    bad = tmp_path / "bad.tar.gz"
    (tmp_path / "x").write_text("x")
    with tarfile.open(bad, "w:gz") as tar:
        tar.add(tmp_path / "x", arcname="../x")
    with pytest.raises(ValueError, match="unexpected member"):
        C.unpack(bad, runs)


@pytest.mark.parametrize("small, expect", [(0.0, "not reproduced"), (0.25, "reproduced (single run)")])
def test_a_sparsity_claim_needs_sparsity(tmp_path, small, expect):
    """WPC keeping accuracy is not its claim: with no pruned group the verdict cannot be reproduced."""
    root = tmp_path / "cpu"
    fake_run(root, "twn-gl", 0, 84.4, extra={"wpc/small_groups": 0.0})
    fake_run(root, "twn-gl-wpc", 0, 84.8, extra={"wpc/small_groups": small})
    rows, _ = C.build_rows(root, C.BUDGETS["cpu"])
    (row,) = [r for r in rows if r["claim"] == "wpc"]
    assert row["verdict"] == expect
    assert row["small_groups"]["mean"] == small
    assert ("no small groups" in row["why"]) == (small == 0.0)


def test_a_torn_last_metrics_line_is_skipped_and_a_bad_inner_line_is_an_error(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text('{"epoch": 1, "epoch_time_s": 2.0}\n{"epoch": 2, "epoch_time_s": 3.0}\n{"epoch": 3, "epo')
    assert C.epoch_times(tmp_path) == [2.0, 3.0]  # a run killed while appending its third line
    m.write_text('{"epoch": 1, "epoch_time_s": 2.0}\n{"epo\n{"epoch": 3, "epoch_time_s": 3.0}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        C.epoch_times(tmp_path)


def test_results_outlive_their_run_directories(tmp_path, monkeypatch):
    """A run whose directory is gone (a fresh machine) keeps its result from the previous report,
    with the commit that measured it, and is not trained again unless a job still to run needs it."""
    root, out = tmp_path / "runs", tmp_path / "o"
    _fixture_runs(root)
    args = ["--budget", "cpu", "--report-only", "--runs-dir", str(root), "--out", str(out)]
    C.main(args)
    first = json.loads((out / "cifar10_claims.json").read_text())
    commit = first["meta"]["git"]["commit"][:12]
    for key, seed in (("float", 0), ("bcgd-fl", 2), ("ttq", 0)):
        shutil.rmtree(root / "cpu" / key / f"seed{seed}")
    C.main(args)
    again = json.loads((out / "cifar10_claims.json").read_text())
    assert again["rows"] == first["rows"]
    by_run = {(r["run"], r["seed"]): r for r in again["runs"]}
    assert len(by_run) == len(first["runs"])
    assert by_run[("float", 0)]["recorded_at"].startswith(commit)
    assert "recorded_at" not in by_run[("float", 1)]
    assert by_run[("ttq", 0)]["test_acc"] == pytest.approx(84.0)
    progress = {p["job"]: p for p in again["progress"]}
    assert progress["ttq/seed0"]["finished"] and progress["ttq/seed0"]["recorded"]
    assert "carried from an earlier report" in (out / "cifar10_claims.md").read_text()
    # a third report keeps the first commit, not its own
    C.main(args)
    third = {(r["run"], r["seed"]): r for r in json.loads((out / "cifar10_claims.json").read_text())["runs"]}
    assert third[("float", 0)]["recorded_at"] == by_run[("float", 0)]["recorded_at"]
    # --fresh: the directories alone
    C.main([*args, "--fresh"])
    fresh = json.loads((out / "cifar10_claims.json").read_text())
    assert len(fresh["runs"]) == len(first["runs"]) - 3
    assert not any(r.get("recorded_at") for r in fresh["runs"])

    # the campaign: a recorded run is not trained again, unless a job still to run starts from it
    monkeypatch.setattr(C.multiprocessing, "get_context", lambda _: FakeContext)
    FakeProcess.started = []
    jobs = [j for j in C.plan(C.BUDGETS["cpu"], only=["bcgd"], seeds=[0, 2]) if "-all" not in j.arm.key]
    recorded = frozenset({"float/seed0", "bcgd-fl/seed2"})
    state = C.run_campaign(jobs, C.BUDGETS["cpu"], root / "cpu", "data", "cpu", 2, None, recorded)
    assert FakeProcess.started == []
    assert state["float/seed0"] == "recorded" and state["bcgd-fl/seed2"] == "recorded"
    shutil.rmtree(root / "cpu" / "bcgd-fl-rho0" / "seed0")  # lost and never recorded: it runs again
    state = C.run_campaign(jobs, C.BUDGETS["cpu"], root / "cpu", "data", "cpu", 2, None, recorded)
    assert FakeProcess.started == ["float/seed0", "bcgd-fl-rho0/seed0"]  # its float model first
    assert state["float/seed0"] == "finished" and state["bcgd-fl/seed2"] == "recorded"


def test_a_report_that_is_not_one_is_refused(tmp_path):
    bad = tmp_path / "cifar10_claims.json"
    bad.write_text('{"rows": []}')
    with pytest.raises(ValueError, match=r"not a claims report.*--fresh"):
        C.recorded_runs(bad)
    assert C.recorded_runs(tmp_path / "missing.json") == {}


def test_waveq_with_equal_learned_bits_says_the_arms_are_one_recipe(tmp_path):
    """Learned bits equal in every layer make the "fixed" recipe (their mean) the learned one: the
    report says so beside the difference, in the seeds where it happened."""
    cpu = tmp_path / "runs" / "cpu"
    names = list(C.layer_sizes())[1:-1]
    for s, bits in enumerate(({n: 3 for n in names}, {n: 3 + (i % 2) for i, n in enumerate(names)})):
        fake_run(cpu, "float", s, 0.85)
        d = fake_run(cpu, "waveq", s, 0.845)
        beta = {n: b + 0.1 * (i % 3) for i, (n, b) in enumerate(bits.items())}
        (d / "waveq_bits.json").write_text(json.dumps({"bits": bits, "beta": beta}))
        fake_run(cpu, "waveq-learned", s, 0.8511)
        fake_run(cpu, "waveq-fixed", s, 0.8511 if s == 0 else 0.8500)
    C.main(["--budget", "cpu", "--report-only", "--runs-dir", str(tmp_path / "runs"),
            "--out", str(tmp_path / "o")])
    report = json.loads((tmp_path / "o" / "cifar10_claims.json").read_text())
    rows = {(r["claim"], r["check"]): r for r in report["rows"]}
    gain = rows[("waveq", "learned bits minus fixed bits at equal average bits")]
    assert gain["ours"]["n"] == 2
    assert "the learned bits were equal in every layer in 1 of 2 seeds (3 bits)" in gain["why"]
    assert "(their continuous bit-widths ended between 3.00 and 3.20)" in gain["why"]
    assert rows[("waveq", "learned average weight bits")]["ours"]["values"][0] == pytest.approx(3.0)


def test_a_search_row_says_how_far_its_agent_learned(tmp_path):
    """The ReLeQ rows name the search behind the assignment: episodes, assignments measured, the
    agent's mean reward early and late (from releq.json), its best and the proxy accuracies."""
    cpu = tmp_path / "runs" / "cpu"
    fake_run(cpu, "float", 0, 0.85)
    d = cpu / "releq" / "seed0"
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"kind": "search", "test_acc": None, "best_acc": None,
                                               "device": "cpu", "avg_w_bits": 3.5, "avg_a_bits": 4.0}))
    history = [{"bits": [], "reward": r, "acc": 0.7} for r in [-0.4] * 10 + [0.2] * 10]
    (d / "releq.json").write_text(json.dumps({"search": {
        "history": history, "evaluations": 17, "best_reward": 0.25, "best_acc": 0.8, "float_acc": 0.9}}))
    out = tmp_path / "o"
    C.main(["--budget", "cpu", "--report-only", "--runs-dir", str(tmp_path / "runs"), "--out", str(out)])
    report = json.loads((out / "cifar10_claims.json").read_text())
    rows = {(r["claim"], r["check"]): r for r in report["rows"]}
    bits = rows[("releq", "average weight bits of the assignment")]
    assert bits["ours"]["mean"] == pytest.approx(3.5) and bits["verdict"] == "measured"
    assert bits["why"] == (
        "the search (seed 0) measured 17 assignments in 20 episodes; the agent's mean reward over its "
        "first / last 10 episodes -0.400 / +0.200, its best +0.250 (proxy accuracy 80.0% vs the float "
        "model's 90.0% on the same held-out training images)")
    assert rows[("releq", "the searched assignment, fine-tuned: drop vs float")]["verdict"] == "not run"


def test_a_run_is_compared_with_the_float_model_it_started_from(tmp_path, monkeypatch):
    """A float model trained again (a fresh machine) does not replace the recorded one in the float
    row, which the recorded runs started from; a run started from the new one records it
    (init.json: its SHA-256 and accuracy) and its drop is measured against it."""
    root, out = tmp_path / "runs", tmp_path / "o"
    f0 = fake_run(root / "cpu", "float", 0, 0.85)
    (f0 / "best.safetensors").write_bytes(b"first float")
    fake_run(root / "cpu", "ttq", 0, 0.83)
    args = ["--budget", "cpu", "--report-only", "--runs-dir", str(root), "--out", str(out)]
    C.main(args)
    first = {(r["run"], r["seed"]): r for r in json.loads((out / "cifar10_claims.json").read_text())["runs"]}
    assert first[("float", 0)]["sha256"] == C.file_sha(f0 / "best.safetensors")
    shutil.rmtree(root)  # a fresh machine: the float model trained again, a new run starts from it
    f0 = fake_run(root / "cpu", "float", 0, 0.80)
    (f0 / "best.safetensors").write_bytes(b"second float")
    job = next(j for j in C.plan(C.BUDGETS["cpu"], only=["releq"], seeds=[0]) if j.arm.key == "releq-ft")
    payload = C.job_spec(job, C.BUDGETS["cpu"], root / "cpu", "data", "cpu",
                         {"recipe": {"name": "r", "default": {"weight": {"method": "dorefa", "bits": 4}}}})
    assert payload["init_from"] == {"run": "float/seed0", "sha256": C.file_sha(f0 / "best.safetensors"),
                                    "test_acc": pytest.approx(80.0), "val_acc": pytest.approx(80.0)}
    monkeypatch.setattr("lowbit.experiment.train_run",
                        lambda spec, resume: fake_run(root / "cpu", "releq-ft", 0, 0.79))
    C.work(payload)
    assert json.loads((root / "cpu" / "releq-ft" / "seed0" / "init.json").read_text()) == payload["init_from"]
    C.main(args)
    rep = json.loads((out / "cifar10_claims.json").read_text())
    runs = {(r["run"], r["seed"]): r for r in rep["runs"]}
    assert runs[("float", 0)]["test_acc"] == pytest.approx(85.0)  # the first, recorded
    assert runs[("ttq", 0)]["test_acc"] == pytest.approx(83.0)
    rows = {(r["claim"], r["check"]): r for r in rep["rows"]}
    assert rows[("ternary", "TTQ drop vs float")]["ours"]["values"] == pytest.approx([2.0])
    drop = rows[("releq", "the searched assignment, fine-tuned: drop vs float")]["ours"]
    assert drop["values"] == pytest.approx([1.0])  # 80 - 79: its own float model, not the row's 85
    assert runs[("releq-ft", 0)]["init_from"]["sha256"] != runs[("float", 0)]["sha256"]
    assert "started from a float model trained again" in (out / "cifar10_claims.md").read_text()
