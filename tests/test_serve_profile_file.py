"""lowbit serve --profile FILE / --save-profile FILE: a server saves the profile it plans with, a
server given a profile file plans with those latencies (seen in /metrics and in the sub-net that
answers), saving what was loaded gives the same file back, and a bad or mismatched file is refused
at start-up with a message saying what was wrong, before anything is served."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from lowbit import cli  # noqa: E402
from lowbit.models import build_model  # noqa: E402
from lowbit.nn.supernet import Supernet  # noqa: E402
from lowbit.serve import save_supernet  # noqa: E402
from lowbit.serve.bench import free_port, start_server, stop_server  # noqa: E402
from lowbit.serve.profile import (  # noqa: E402
    LatencyProfile,
    file_sha256,
    load_profile,
    profile_document,
    save_profile,
)

SHAPE = (1, 28, 28)
# PyTorch engines: nothing to compile, so a server starts in seconds
ARGS = ["--runtime", "torch", "--slo-ms", "5000", "--max-batch", "4", "--profile-repeats", "1"]


@pytest.fixture(scope="module")
def supernet_file(tmp_path_factory):
    torch.manual_seed(0)
    sn = Supernet(build_model("lenet5"), [{"name": "small", "width": 0.25, "bits": 2},
                                          {"name": "big", "width": 0.5, "bits": 4}], SHAPE)
    sn.info = {"small": {"val_acc": 0.9, "test_acc": 0.9}, "big": {"val_acc": 0.95, "test_acc": 0.95}}
    path = tmp_path_factory.mktemp("profile") / "tiny.supernet"
    save_supernet(sn.eval(), path)
    return path


def _serve(path, args):
    """/metrics and the answer to one sample of a server started with ``args``, then stopped."""
    port = free_port()
    proc = start_server(path, port, args, timeout_s=120)
    try:
        url = f"http://127.0.0.1:{port}"
        metrics = httpx.get(f"{url}/metrics").json()
        answer = httpx.post(f"{url}/predict", json={"inputs": torch.zeros(SHAPE).tolist()}).json()
    finally:
        assert stop_server(proc) == 0
    return metrics, answer


@pytest.fixture(scope="module")
def measured(supernet_file, tmp_path_factory):
    """The profile file of a server that measured its latencies, with its /metrics and one answer."""
    saved = tmp_path_factory.mktemp("measured") / "measured.json"
    metrics, answer = _serve(supernet_file, [*ARGS, "--save-profile", str(saved)])
    return saved, metrics, answer


def test_a_server_saves_the_profile_it_plans_with(supernet_file, measured) -> None:
    saved, metrics, answer = measured
    doc = json.loads(saved.read_text())
    assert doc["format"] == "lowbit.serve.profile" and doc["version"] == 1
    assert doc["supernet_sha256"] == file_sha256(supernet_file)
    assert doc["runtime"] == {"small": "torch", "big": "torch"} and doc["threads"] == 1
    assert doc["max_batch"] == 4
    assert {n: [round(v, 4) for v in row] for n, row in doc["ms"].items()} == metrics["profile_ms"]
    assert answer["subnet"] == "big"  # slackfit: the most accurate sub-net fits a 5 s SLO


def test_a_server_given_a_profile_plans_with_it_and_saves_it_unchanged(supernet_file, measured,
                                                                       tmp_path) -> None:
    doc = json.loads(measured[0].read_text())
    # the most accurate sub-net is given 20 s a batch: it never fits the 5 s SLO, so the cheaper answers
    doc["ms"] = {"small": [0.25, 0.5, 0.75, 1.0], "big": [20000.0] * 4}
    given, again = tmp_path / "given.json", tmp_path / "again.json"
    save_profile(given, doc)
    metrics, answer = _serve(supernet_file, [*ARGS, "--profile", str(given), "--save-profile", str(again)])
    assert metrics["profile_ms"] == doc["ms"]
    assert answer["subnet"] == "small"
    assert again.read_bytes() == given.read_bytes()


def test_save_then_load_gives_the_same_profile_back(supernet_file, tmp_path) -> None:
    names = ["small", "big"]
    prof = LatencyProfile({"small": [1 / 3, 0.7, 0.7, 1.1], "big": [2 / 7, 3.14159265358979, 5.0, 9.5]}, 4)
    runtime = {"small": "packed", "big": "torch"}
    sha = file_sha256(supernet_file)
    doc = profile_document(prof, sha, runtime, threads=2)
    save_profile(tmp_path / "p.json", doc)
    loaded, measured_on = load_profile(tmp_path / "p.json", names, sha, max_batch=4, threads=2)
    assert loaded == prof and measured_on == runtime  # every float exactly
    save_profile(tmp_path / "q.json", profile_document(loaded, sha, measured_on, threads=2))
    assert (tmp_path / "q.json").read_bytes() == (tmp_path / "p.json").read_bytes()


def _edit(doc, key, value):
    d = copy.deepcopy(doc)
    if value is None:
        del d[key]
    else:
        d[key] = value
    return d


BAD = [  # (what is wrong, a change to the measured file's object or a text for the file, extra
    #        serve arguments, part of the message)
    ("not JSON", "{", [], "is not JSON"),
    ("another format", lambda d: _edit(d, "format", "lowbit.other"), [], "expected 'lowbit.serve.profile'"),
    ("another version", lambda d: _edit(d, "version", 2), [], "version 2 is not supported (expected 1)"),
    ("another supernet", lambda d: _edit(d, "supernet_sha256", "0" * 64), [],
     "measured on the supernet file with SHA-256 '0000"),
    ("another max batch", lambda d: d, ["--max-batch", "8"], "pass --max-batch 4"),
    ("other threads", lambda d: _edit(d, "threads", 2), [], "measured with 2 inference thread(s)"),
    ("a sub-net missing", lambda d: _edit(d, "ms", {"small": d["ms"]["small"]}), [], "missing big"),
    ("a sub-net unknown", lambda d: _edit(d, "ms", {**d["ms"], "huge": [1.0] * 4}), [], "unknown huge"),
    ("a short row", lambda d: _edit(d, "ms", {**d["ms"], "big": [1.0] * 3}), [], "must have 4 latencies"),
    ("NaN", lambda d: _edit(d, "ms", {**d["ms"], "big": [1.0, math.nan, 2.0, 3.0]}), [],
     "batch 2 has latency nan; every latency must be a positive finite number"),
    ("zero", lambda d: _edit(d, "ms", {**d["ms"], "small": [0.0] * 4}), [], "batch 1 has latency 0.0"),
    ("a string", lambda d: _edit(d, "ms", {**d["ms"], "small": ["1"] * 4}), [], "has latency '1'"),
    ("other engines", lambda d: _edit(d, "runtime", {"small": "packed", "big": "torch"}), [],
     "measured on other sub-net engines (small 'packed' there, 'torch' here); pass the --runtime"),
]


@pytest.mark.parametrize("why,change,extra,message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_or_mismatched_profile_is_refused_before_serving(supernet_file, measured, tmp_path, monkeypatch,
                                                               capsys, why, change, extra, message) -> None:
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server started serving"))
    bad = tmp_path / "bad.json"
    doc = json.loads(measured[0].read_text())
    bad.write_text(change if isinstance(change, str) else json.dumps(change(doc)))
    assert cli.main(["serve", str(supernet_file), "--profile", str(bad), *ARGS, *extra]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert message in out and "--save-profile FILE" in out


def test_a_missing_profile_file_is_refused(supernet_file, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server started serving"))
    assert cli.main(["serve", str(supernet_file), "--profile", str(tmp_path / "none.json"), *ARGS]) == 2
    assert "cannot be read (No such file or directory)" in " ".join(capsys.readouterr().out.split())


def test_the_server_process_exits_with_an_error_status_on_a_mismatched_profile(supernet_file, measured,
                                                                               tmp_path) -> None:
    bad = tmp_path / "other.json"
    save_profile(bad, _edit(json.loads(measured[0].read_text()), "supernet_sha256", "f" * 64))
    with pytest.raises(RuntimeError, match=r"exited with status 2 before answering(.|\n)*SHA-256"):
        start_server(supernet_file, free_port(), [*ARGS, "--profile", str(bad)], timeout_s=120)
