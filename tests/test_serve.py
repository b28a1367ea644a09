"""lowbit serve against a real server process on 127.0.0.1: endpoints, outputs equal to the
compiled sub-net's (--runtime packed, the default; a float sub-net falls back to PyTorch) and to
the supernet's (--runtime torch), both served from the file's stored codes,
the bad-request table, shedding (deadline and queue), metrics,
SIGTERM exit status; and the policy, trace and parsing logic on their own."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import threading

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import lowbit.runtime  # noqa: E402
from lowbit.models import build_model  # noqa: E402
from lowbit.nn.supernet import Supernet  # noqa: E402
from lowbit.serve import Decision, load_supernet, make_policy, save_supernet  # noqa: E402
from lowbit.serve.app import BadRequestError, parse_binary, serve  # noqa: E402
from lowbit.serve.bench import free_port, start_server, stop_server  # noqa: E402
from lowbit.serve.engines import SubnetEngines  # noqa: E402
from lowbit.serve.loadgen import Record, make_trace, summarize  # noqa: E402

SHAPE = (1, 28, 28)
NAMES = ["small", "big", "float"]
ARGS = ["--slo-ms", "5000", "--max-batch", "4", "--max-queue", "3", "--profile-repeats", "2"]


@pytest.fixture(scope="module")
def trainable() -> Supernet:
    torch.manual_seed(0)
    subnets = [
        {"name": "small", "width": 0.25, "bits": 2},
        {"name": "big", "width": 1.0, "bits": 8},
        {"name": "float", "width": 0.5, "bits": 32},  # nothing to pack: served by PyTorch
    ]
    sn = Supernet(build_model("lenet5"), subnets, SHAPE)
    sn.info = {n: {"val_acc": a, "test_acc": a} for n, a in zip(NAMES, (0.9, 0.99, 0.5), strict=True)}
    return sn.eval()


@pytest.fixture(scope="module")
def supernet_file(trainable: Supernet, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("serve") / "tiny.supernet"
    save_supernet(trainable, path)  # every sub-net's packed codes, no latent weights
    return path


def _start(path, args):
    port = free_port()
    proc = start_server(path, port, args, timeout_s=90)
    return f"http://127.0.0.1:{port}", proc


@pytest.fixture(scope="module")
def server(supernet_file):
    url, proc = _start(supernet_file, ARGS)  # the default runtime: packed
    yield url, proc, load_supernet(supernet_file)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_health_and_predictions_equal_the_compiled_subnets(server, trainable) -> None:
    url, _, _ = server
    h = httpx.get(f"{url}/health").json()
    assert h["status"] == "ok" and h["subnets"] == NAMES and h["input_shape"] == list(SHAPE)
    assert h["runtime"] == {"small": "packed", "big": "packed", "float": "torch"}
    assert list(h["runtime_reasons"]) == ["float"] and "no quantized layer" in h["runtime_reasons"]["float"]
    # compiling launched numba's threading layer, which sets PyTorch's threads to numba's count (2 on
    # this 2-core machine); the server keeps its --threads (default 1)
    assert h["torch_threads"] == 1
    x = torch.randn(3, *SHAPE)
    r = httpx.post(f"{url}/predict", json={"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["subnet"] == "big" and body["batch"] == 3  # slackfit: the most accurate fits a 5 s SLO
    # the server loaded the sub-net's stored codes; the packed kernels are deterministic: the served
    # batch equals the sub-net extracted from the trainable supernet and compiled alone, bit for bit
    ref = lowbit.runtime.compile(trainable.extract("big"), x)(x)
    assert torch.equal(torch.tensor(body["outputs"]), ref)
    assert body["predictions"] == ref.argmax(1).tolist()
    raw = x.numpy().astype("<f4").tobytes()
    octet = {"content-type": "application/octet-stream"}
    for kw in (
        {"headers": {**octet, "x-shape": "3,1,28,28"}},
        {"headers": octet, "params": {"shape": "3,1,28,28"}},
        {"headers": octet},
    ):
        rb = httpx.post(f"{url}/predict", content=raw, **kw)
        assert rb.status_code == 200 and torch.equal(torch.tensor(rb.json()["outputs"]), ref), rb.text


ONE = [[[0.0] * 28] * 28]
BAD = [  # content type, body, query, status, part of the message
    ("application/json", b"{", {}, 400, "not valid JSON"),
    ("application/json", b'{"x": 1}', {}, 400, '{"inputs"'),
    ("application/json", b'{"inputs": [1, 2]}', {}, 400, "does not match the model's input [1, 28, 28]"),
    ("application/json", b'{"inputs": [[1], [1, 2]]}', {}, 400, "rectangular"),
    ("application/json", b'{"inputs": ["a"]}', {}, 400, "nested list of numbers"),
    ("application/json", json.dumps({"inputs": [ONE] * 5}).encode(), {}, 413, "at most 4"),
    ("application/json", json.dumps({"inputs": [[[math.nan] * 28] * 28]}).encode(), {}, 400, "NaN"),
    ("application/octet-stream", b"\0" * 10, {}, 400, "whole number of float32 samples"),
    ("application/octet-stream", b"\0" * 3136, {"shape": "2,1,28,28"}, 400, "needs 6272"),
    ("application/octet-stream", b"\0" * 3136, {"shape": "a,b"}, 400, "comma-separated"),
    ("application/octet-stream", b"\0" * 3136, {"shape": "1,1,28,27"}, 400, "does not match"),
    ("application/octet-stream", b"\0" * 1568, {"dtype": "float16"}, 415, "float32"),
    ("application/octet-stream", b"\0" * 3136, {"slo_ms": "-1"}, 400, "SLO override"),
    ("text/plain", b"hello", {}, 415, "application/json or application/octet-stream"),
]


@pytest.mark.parametrize(("ctype", "body", "query", "status", "msg"), BAD)
def test_bad_requests_get_4xx_with_a_clear_message(
    server, ctype: str, body: bytes, query: dict, status: int, msg: str
) -> None:
    url, _, _ = server
    r = httpx.post(f"{url}/predict", content=body, params=query, headers={"content-type": ctype})
    assert r.status_code == status, r.text
    assert msg in r.json()["error"]


def test_wrong_method_and_path(server) -> None:
    url, _, _ = server
    assert httpx.get(f"{url}/predict").status_code == 405
    assert httpx.get(f"{url}/nope").status_code == 404


def test_overload_is_shed_with_503_and_metrics_count_it(server) -> None:
    url, _, _ = server
    one = {"inputs": ONE}
    # a deadline no sub-net can meet is shed, not served late
    r = httpx.post(f"{url}/predict", json=one, headers={"x-slo-ms": "0.001"})
    assert r.status_code == 503 and "deadline cannot be met" in r.json()["error"]

    async def flood() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as c:
            rs = await asyncio.gather(*(c.post(f"{url}/predict", json=one) for _ in range(40)))
        return [x.status_code for x in rs]

    codes = asyncio.run(flood())  # 40 at once into a queue of 3
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0
    m = httpx.get(f"{url}/metrics").json()
    assert m["shed"] >= 1 + codes.count(503)
    assert m["served"] >= codes.count(200) and m["rejected"] >= len(BAD)
    assert m["queue_depth"] == 0 and abs(sum(m["subnet_mix"].values()) - 1) < 1e-3
    assert 0 <= m["slo_attainment"] <= 1 and m["latency_ms"]["p50"] <= m["latency_ms"]["p99"]
    assert set(m["profile_ms"]) == set(NAMES) and len(m["profile_ms"]["big"]) == 4
    assert m["runtime"] == {"small": "packed", "big": "packed", "float": "torch"}


def test_torch_runtime_serves_the_stored_subnet_as_the_supernet_runs_it(supernet_file, trainable) -> None:
    url, proc = _start(supernet_file, [*ARGS, "--runtime", "torch", "--policy", "fixed:small"])
    try:
        h = httpx.get(f"{url}/health").json()
        assert h["runtime"] == dict.fromkeys(NAMES, "torch") and h["runtime_reasons"] == {}
        x = torch.randn(2, *SHAPE)
        body = httpx.post(f"{url}/predict", json={"inputs": x.tolist()}).json()
        assert body["subnet"] == "small"
        sn = load_supernet(supernet_file)
        with torch.inference_mode():
            ref = sn.run(x, "small")
            assert torch.equal(ref, trainable.run(x, "small"))  # stored codes = the switched supernet
        assert torch.equal(torch.tensor(body["outputs"]), ref)
    finally:
        assert stop_server(proc) == 0


def test_engines_fall_back_to_pytorch_for_a_subnet_that_does_not_compile(supernet_file) -> None:
    sn = load_supernet(supernet_file)
    eng = SubnetEngines(sn, "packed")
    assert eng.runtime == {"small": "packed", "big": "packed", "float": "torch"}
    x = torch.randn(5, *SHAPE)
    with torch.inference_mode():
        assert torch.equal(eng.run(x, "float"), sn.run(x, "float"))
        # packed: the compiled sub-net stays within the compiler's tolerance of the fake-quantized one
        for n in ("small", "big"):
            ref = sn.run(x, n)
            assert (eng.run(x, n) - ref).abs().max() <= 1e-4 * ref.abs().max()
        assert not torch.equal(eng.run(x, "small"), eng.run(x, "big"))
    with pytest.raises(ValueError, match="allowed: packed, torch"):
        SubnetEngines(sn, "onnx")


def test_switching_runs_the_built_packed_models_and_never_quantizes_or_compiles(
    supernet_file, monkeypatch
) -> None:
    from lowbit.nn.quantize import weight_quantizers
    from lowbit.serve import engines as engines_module

    sn = load_supernet(supernet_file)
    eng = SubnetEngines(sn, "packed")
    x = torch.randn(4, *SHAPE)
    with torch.inference_mode():
        before = {n: eng.run(x, n) for n in ("small", "big")}

    def refuse(*args, **kwargs):
        raise AssertionError("quantized or compiled on the hot path")

    kinds = {type(q) for n in ("small", "big") for _, _, q in weight_quantizers(sn.models[n]).values()}
    assert kinds  # the sub-nets do have weight quantizers, which must stay idle
    for k in kinds:
        monkeypatch.setattr(k, "forward", refuse)
        monkeypatch.setattr(k, "encode", refuse)
    monkeypatch.setattr(lowbit.runtime, "compile", refuse)
    monkeypatch.setattr(engines_module, "SubnetEngines", refuse)
    with torch.inference_mode():
        for n in ("small", "big", "small", "big"):  # switching back and forth: the same packed models
            assert torch.equal(eng.run(x, n), before[n]), n


def test_engines_cap_the_packed_kernels_threads_in_the_thread_that_runs_them(supernet_file) -> None:
    from lowbit.runtime.kernels_threads import num_threads

    eng = SubnetEngines(load_supernet(supernet_file), "packed", threads=1)
    seen: list[int] = []

    def infer() -> None:  # numba's thread count is per thread: check it in a fresh one
        eng.run(torch.randn(2, *SHAPE), "small")
        seen.append(num_threads())

    t = threading.Thread(target=infer)
    t.start()
    t.join()
    assert seen == [1]


def test_sigterm_exits_cleanly(server) -> None:
    url, proc, _ = server
    assert stop_server(proc) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=1)


def test_policies_pick_by_slack_accuracy_and_batch() -> None:
    table = {("a", 1): 1.0, ("a", 2): 2.0, ("a", 3): 3.0, ("b", 1): 3.0, ("b", 2): 5.0, ("b", 3): 8.0}
    lat = lambda s, b: table[(s, b)]  # noqa: E731
    acc = {"a": 0.9, "b": 0.99}
    slack = make_policy("slackfit", acc, max_batch=3)
    assert slack.choose(5, 10.0, lat) == Decision("b", 3)  # everything fits: most accurate, full batch
    assert slack.choose(5, 4.0, lat) == Decision(
        "a", 3
    )  # b misses at batch 3: the larger batch wins over accuracy
    assert slack.choose(1, 4.0, lat) == Decision("b", 1)
    assert slack.choose(3, 0.5, lat).subnet is None  # nothing fits: shed the oldest
    fixed = make_policy("fixed:b", acc, max_batch=3)
    assert fixed.choose(3, 4.0, lat) == Decision("b", 1)  # a fixed sub-net shrinks its batch instead
    assert make_policy("max-accuracy", acc, 3).candidates == ["b"]
    with pytest.raises(ValueError, match="allowed: slackfit, slackfit-queue, max-accuracy, fixed:<name>"):
        make_policy("fastest", acc, 3)
    with pytest.raises(ValueError, match="no sub-net 'c'"):
        make_policy("fixed:c", acc, 3)


def test_traces_are_seeded_and_have_their_mean_rate() -> None:
    for kind in ("constant", "bursty", "ramp"):
        a = make_trace(kind, rate=200, duration=20, seed=1)
        assert a == make_trace(kind, rate=200, duration=20, seed=1)
        assert abs(len(a) - 4000) < 5 * math.sqrt(4000), (kind, len(a))  # Poisson: mean 4000
    ramp = make_trace("ramp", rate=200, duration=20, seed=1)
    first, last = sum(t < 5 for t in ramp), sum(t >= 15 for t in ramp)
    assert last > 3 * first  # mean rates 0.4 and 1.6 x 200 in the first and last quarters
    assert len(make_trace("constant", 200, 20, max_requests=7)) == 7
    recs = [Record(0, 200, 10, "a"), Record(0, 200, 50, "b"), Record(0, 503, 1, None), Record(0, 0, 1, None)]
    s = summarize(recs, 30, {"a": 0.9, "b": 0.99}, duration=2)
    assert s["slo_attainment"] == 0.25 and s["served_accuracy"] == pytest.approx(0.945)
    assert s["throughput_rps"] == 1.0 and s["statuses"] == {"200": 2, "503": 1, "0": 1}


def test_capacity_is_the_best_rate_over_batches_of_whole_requests() -> None:
    from lowbit.serve.bench import capacity_rps

    ms = [1.0 + 0.5 * b for b in range(1, 9)]  # 1.5 ms at batch 1 ... 5 ms at batch 8
    # 2 samples per request: 1, 2, 3 or 4 requests per batch of 2, 4, 6, 8 samples
    assert capacity_rps(ms, 2) == pytest.approx(max(1e3 * k / (1.0 + 0.5 * 2 * k) for k in (1, 2, 3, 4)))
    assert capacity_rps(ms, 2) == pytest.approx(800.0)  # 4 requests in 5 ms
    assert capacity_rps(ms, 8) == pytest.approx(200.0)
    with pytest.raises(ValueError, match="do not fit a batch of at most 8"):
        capacity_rps(ms, 9)


def test_report_states_the_rate_basis_and_the_served_mix(tmp_path) -> None:
    from lowbit.serve.bench import write_report

    recs = [Record(0, 200, 10, "a"), Record(0, 200, 50, "b"), Record(0, 503, 1, None)]
    runs = [{"policy": p, "trace": "constant", **summarize(recs, 30, {"a": 0.9, "b": 0.99}, 2)}
            for p in ("slackfit", "fixed:a")]
    basis = {"load": 1.5, "subnet": "b", "rate": 15.0, "capacity_rps": {"a": 40.0, "b": 10.0},
             "profile_ms_at_max_batch": {"a": 1.0, "b": 4.0}}
    settings = {"rate": 15.0, "duration_s": 2, "slo_ms": 30, "max_batch": 4, "seed": 0,
                "traces": ["constant"], "policies": ["slackfit", "fixed:a"], "samples_per_request": 1,
                "runtime": "packed",
                "rate_basis": basis, "load_average": (1.0, 1.0, 1.0)}
    write_report({"runs": runs, "server_exit_status": {"slackfit": 0}, "settings": settings}, tmp_path, "r")
    md = (tmp_path / "r.md").read_text()
    assert "1.5 x the capacity of the most accurate sub-net b = 15.0 req/s" in md
    assert "a 40, b 10" in md and "| 33.3% | 94.50% |" in md and "| a 50%, b 50% |" in md
    assert (tmp_path / "r.png").stat().st_size > 0 and json.loads((tmp_path / "r.json").read_text())["runs"]


def test_repeated_runs_are_summarized_by_mean_and_sample_std() -> None:
    from lowbit.serve.bench import aggregate

    runs = [{"trace": "t", "policy": "p", "slo_attainment": v, "served_accuracy": a}
            for v, a in ((0.5, 0.2), (0.7, math.nan), (0.9, 0.4))]
    (row,) = aggregate(runs)
    assert row["n"] == 3 and row["slo_mean"] == pytest.approx(0.7) and row["slo_std"] == pytest.approx(0.2)
    # a run that answered nothing has no served accuracy: the other two give it
    assert row["acc_mean"] == pytest.approx(0.3) and row["acc_std"] == pytest.approx(math.sqrt(0.02))
    assert aggregate(runs[:1])[0]["slo_std"] == 0.0


def test_binary_parser_rejects_what_it_cannot_read() -> None:
    x = parse_binary(b"\0" * 3136 * 2, None, None, SHAPE, 4)
    assert x.shape == (2, *SHAPE)
    with pytest.raises(BadRequestError, match="at most 4"):
        parse_binary(b"\0" * 3136 * 5, None, None, SHAPE, 4)


def test_server_refuses_a_bad_policy_before_serving(tmp_path) -> None:
    sn = Supernet(build_model("lenet5"), [{"name": "only", "width": 0.5, "bits": 4}], SHAPE)
    save_supernet(sn, tmp_path / "s.supernet")
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        serve(tmp_path / "s.supernet", policy="fastest")


def test_bench_serve_cli_writes_a_report_with_provenance(supernet_file, tmp_path) -> None:
    from lowbit import cli

    rc = cli.main(["--threads", "1", "bench", "serve", str(supernet_file), "--policies", "fixed:small",
                   "--traces", "constant", "--rate", "4", "--duration", "1", "--max-requests", "4",
                   "--slo-ms", "5000", "--max-batch", "4", "--profile-repeats", "1", "--repeats", "1",
                   "--samples", "1",
                   "--out", str(tmp_path), "--stem", "b", "--note", "a quiet test machine"])
    assert rc in (0, None)
    res = json.loads((tmp_path / "b.json").read_text())
    assert set(res["git"]) == {"commit", "dirty"} and res["versions"]["torch"] == torch.__version__
    assert res["seeds"] == [0] and res["command"].startswith("lowbit ") and "--note" in res["command"]
    (run,) = res["runs"]
    assert run["policy"] == "fixed:small" and run["requests"] >= 1
    assert "a quiet test machine" in (tmp_path / "b.md").read_text()


def test_a_server_started_by_a_load_test_ends_when_that_process_is_gone(supernet_file) -> None:
    """A server whose starter (``LOWBIT_SERVE_PARENT_PID``) is not its parent any more exits by
    itself, before compiling and profiling: a killed load test leaves no server behind."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id that is nobody's parent now
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOWBIT_SERVE_PARENT_PID": str(gone.pid)}
    proc = subprocess.run([sys.executable, "-m", "lowbit.cli", "serve", str(supernet_file), "--port",
                           str(free_port()), *ARGS], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert f"(pid {gone.pid}) is gone" in " ".join((proc.stdout + proc.stderr).split())
