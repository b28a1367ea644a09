"""lowbit bench serve --resume: a load test stopped after some runs goes on from its partial-results
file with the same settings (a real tiny supernet served on 127.0.0.1), keeps the finished runs as
they were, plans with the first process's server profiles, and refuses other settings, a leftover
file without --resume, and bad lines."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

import lowbit.provenance
import lowbit.serve.bench as bench
from lowbit import cli
from lowbit.models import build_model
from lowbit.nn.supernet import Supernet
from lowbit.serve import save_supernet

CODE = {"commit": "0" * 40, "dirty": False}  # the tree may change under a test: its state is fixed here


@pytest.fixture
def supernet_file(tmp_path):
    torch.manual_seed(0)
    sn = Supernet(build_model("lenet5"), [{"name": "small", "width": 0.25, "bits": 2},
                                          {"name": "big", "width": 0.5, "bits": 4}], (1, 28, 28))
    sn.info = {"small": {"val_acc": 0.9, "test_acc": 0.9}, "big": {"val_acc": 0.95, "test_acc": 0.95}}
    save_supernet(sn.eval(), tmp_path / "tiny.supernet")
    return tmp_path / "tiny.supernet"


def _argv(path, out, *extra):
    return ["--threads", "1", "bench", "serve", str(path), "--policies", "fixed:small",
            "--traces", "constant",
            "--rate", "8", "--duration", "0.5", "--max-requests", "2", "--slo-ms", "5000", "--max-batch", "4",
            "--profile-repeats", "1", "--repeats", "2", "--samples", "1", "--out", str(out), "--stem", "s",
            *extra]


def _error(capsys) -> str:
    return " ".join(capsys.readouterr().out.split())


def test_a_stopped_load_test_resumes_with_its_finished_runs_unchanged(supernet_file, tmp_path, monkeypatch,
                                                                      capsys) -> None:
    monkeypatch.setattr(lowbit.provenance, "git_state", lambda *a, **k: dict(CODE))
    real, calls = bench.replay, []

    def stop_at_the_second(*args, **kwargs):  # a kill while the second run is measured
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "replay", stop_at_the_second)
    out = tmp_path / "out"
    assert cli.main(_argv(supernet_file, out)) == 130
    partial = bench.partial_path(out, "s")
    records, torn = bench.read_partial(partial)
    old = [r["run"] for r in records if r["kind"] == "run"]
    assert not torn and [r["seed"] for r in old] == [0] and not (out / "s.json").exists()
    with open(partial, "a") as f:  # and the kill cut an append short
        f.write('{"kind": "run", "run": {"policy": "fixed:small", "trace": "constant", "seed": 1, "req')

    # a leftover file is neither continued nor deleted without being asked
    assert cli.main(_argv(supernet_file, out)) == 2
    assert "pass --resume to continue it, --overwrite to start again" in _error(capsys)
    # other settings are refused, naming what differs
    assert cli.main(_argv(supernet_file, out, "--resume", "--slo-ms", "4000")) == 2
    msg = _error(capsys)
    assert "slo_ms was 5000.0, now 4000.0" in msg and "Drop --resume" in msg and "--stem" in msg
    monkeypatch.setattr(lowbit.provenance, "git_state", lambda *a, **k: {**CODE, "commit": "1" * 40})
    assert cli.main(_argv(supernet_file, out, "--resume")) == 2
    assert "git was" in _error(capsys)
    # refusals leave the file as it was (the torn line aside; JSON text, as NaN != NaN)
    assert json.dumps(bench.read_partial(partial)[0]) == json.dumps(records)

    monkeypatch.setattr(lowbit.provenance, "git_state", lambda *a, **k: dict(CODE))
    monkeypatch.setattr(bench, "replay", real)
    assert cli.main(_argv(supernet_file, out, "--resume")) == 0
    res = json.loads((out / "s.json").read_text())
    runs = res["runs"]
    assert [r["seed"] for r in runs] == [0, 1] and all(r["requests"] == 2 for r in runs)
    assert json.dumps(runs[0], sort_keys=True) == json.dumps(old[0], sort_keys=True)  # kept as measured
    assert [r["measured_by_process"] for r in runs] == [0, 1]
    assert [p["runs"] for p in res["processes"]] == [1, 1]
    # the resumed process's server planned with the profile the first one measured (lowbit serve --profile)
    first, then = (p["server_profiles"]["fixed:small"] for p in res["processes"])
    assert first["ms"]["small"] and then == first and res["same_server_profiles"] is True
    assert res["settings"]["resumed"] and res["settings"]["rate"] == 8.0
    assert [a["n"] for a in res["summary"]] == [2]
    assert "Measured by 2 processes" in (out / "s.md").read_text()
    assert not partial.exists()  # every run is in the report


def test_read_partial_skips_a_torn_last_line_and_refuses_a_bad_one_before_it(tmp_path) -> None:
    path = tmp_path / "p.partial.jsonl"
    path.write_text('{"kind": "header"}\n{"kind": "run", "run": {}}\n{"kind": "ru')
    assert bench.read_partial(path) == ([{"kind": "header"}, {"kind": "run", "run": {}}], True)
    path.write_text('{"kind": "header"}\n{"kind": "run", "run": {}}\n')
    assert bench.read_partial(path)[1] is False
    path.write_text('{"kind": "header"}\n{"kind"\n{"kind": "run", "run": {}}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        bench.read_partial(path)


def test_overwrite_deletes_a_leftover_partial_file_and_a_foreign_file_is_refused(tmp_path) -> None:
    path = tmp_path / "p.partial.jsonl"
    path.write_text('{"kind": "run", "run": {}}\n')
    with pytest.raises(ValueError, match="no settings line"):
        bench._claim_partial(path, {}, resume=True, overwrite=False)
    assert bench._claim_partial(path, {}, resume=False, overwrite=True) == (None, [], [])
    assert not path.exists()
