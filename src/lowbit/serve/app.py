"""``lowbit serve``: an ASGI app (starlette) over the batching queue, run by uvicorn.

Endpoints
---------
``POST /predict`` with one of two bodies (``n`` samples of the supernet's input shape ``S``,
1 <= n <= max batch):

- JSON (``Content-Type: application/json``): ``{"inputs": [...]}``, a nested list of numbers of
  shape ``S`` (one sample) or ``(n, *S)``.
- Binary (``Content-Type: application/octet-stream``): the raw little-endian float32 tensor,
  C order. Its shape is the header ``X-Shape: n,1,28,28`` or the query ``?shape=n,1,28,28``;
  without either, ``n`` is the body length / (4 x prod(S)). ``?dtype=`` (or ``X-Dtype``), if
  given, must be ``float32``.

A request may tighten or relax its own deadline with the header ``X-SLO-Ms`` (or ``?slo_ms=``).
The answer (JSON): ``{"subnet", "batch", "latency_ms", "outputs": [[...]], "predictions": [...]}``.
Bad requests get 4xx with ``{"error": "..."}`` saying what was wrong and what is expected (400
malformed body or shape, 413 too many samples or too many bytes, 415 unsupported content type or
dtype); a request whose deadline cannot be met, or that finds the queue full, gets 503 (shed).

``GET /health``: ``{"status": "ok", "subnets", "policy", "slo_ms", "max_batch", "input_shape",
"runtime", "runtime_reasons"}``: ``runtime`` maps each sub-net to ``"packed"`` or ``"torch"`` (see
:mod:`lowbit.serve.engines`), ``runtime_reasons`` says why a sub-net runs in PyTorch under
``--runtime packed``.
``GET /metrics``: queue depth, served/shed/rejected counts, sub-net mix, latency percentiles,
SLO attainment, the latency profile (measured at start, or read from ``--profile FILE``), and
``runtime``/``runtime_reasons``;
``?decisions=N`` adds the policy's last ``N`` decisions (``decision_log``: time, queue length and
samples, the oldest request's slack, sub-net, batch, requests shed, latency scale, decision cost).

SIGTERM (or Ctrl-C): uvicorn stops accepting connections, lets in-flight requests finish, the
worker stops and requests still queued get 503; the process exits with status 0. A request on a
connection uvicorn accepted but had not read yet is dropped with the connection (the client sees a
closed connection, not a status): clients should retry such requests.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..export.supernet_file import LoadedSupernet
from ..nn.supernet import Supernet
from .batching import Batcher, Shed
from .engines import SubnetEngines
from .file import load_supernet
from .policy import make_policy
from .profile import (
    LatencyProfile,
    check_runtime,
    file_sha256,
    load_profile,
    profile_document,
    profile_supernet,
    save_profile,
)

__all__ = ["BadRequestError", "create_app", "parse_binary", "parse_json_inputs", "serve"]

log = logging.getLogger(__name__)


class BadRequestError(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _slo_override(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (v > 0 and math.isfinite(v)):
        raise BadRequestError(
            400,
            f"SLO override {text!r} (X-SLO-Ms header or slo_ms query) must be a number of milliseconds > 0",
        )
    return v


def _shape_of(text: str, what: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise BadRequestError(
            400, f"{what} {text!r} is not a comma-separated list of integers, e.g. 2,1,28,28"
        ) from None
    if not dims or any(d < 1 for d in dims):
        raise BadRequestError(400, f"{what} {text!r} must list positive integers, e.g. 2,1,28,28")
    return dims


def _batch_shape(shape: tuple[int, ...], sample: Sequence[int], max_batch: int) -> tuple[int, ...]:
    sample = tuple(sample)
    if shape == sample:
        shape = (1, *sample)
    if shape[1:] != sample:
        raise BadRequestError(
            400,
            f"input shape {list(shape)} does not match the model's input {list(sample)} "
            f"(send one sample {list(sample)} or a batch [n, {', '.join(map(str, sample))}])",
        )
    if shape[0] > max_batch:
        raise BadRequestError(413, f"{shape[0]} samples in one request; at most {max_batch} (the max batch)")
    return shape


def parse_binary(
    body: bytes, shape_text: str | None, dtype: str | None, sample: Sequence[int], max_batch: int
) -> torch.Tensor:
    """A raw little-endian float32 body as a ``(n, *sample)`` tensor, or :class:`BadRequestError`."""
    if dtype is not None and dtype.lower() not in ("float32", "f32", "<f4"):
        raise BadRequestError(
            415, f"dtype {dtype!r} is not supported; send little-endian float32 (dtype=float32)"
        )
    per = 4 * math.prod(sample)
    if shape_text:
        shape = _batch_shape(_shape_of(shape_text, "shape"), sample, max_batch)
    else:
        if len(body) == 0 or len(body) % per:
            raise BadRequestError(
                400,
                f"body of {len(body)} bytes is not a whole number of float32 samples of shape "
                f"{list(sample)} ({per} bytes each)",
            )
        shape = _batch_shape((len(body) // per, *sample), sample, max_batch)
    need = 4 * math.prod(shape)
    if len(body) != need:
        raise BadRequestError(400, f"body has {len(body)} bytes; shape {list(shape)} of float32 needs {need}")
    x = torch.frombuffer(bytearray(body), dtype=torch.float32).reshape(shape)
    if not torch.isfinite(x).all():
        raise BadRequestError(400, "inputs contain NaN or infinity")
    return x


def parse_json_inputs(body: bytes, sample: Sequence[int], max_batch: int) -> torch.Tensor:
    """``{"inputs": nested list}`` as a ``(n, *sample)`` float32 tensor, or :class:`BadRequestError`."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequestError(400, f"body is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise BadRequestError(400, 'JSON body must be an object {"inputs": [...]} (a nested list of numbers)')
    try:
        x = torch.tensor(doc["inputs"], dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as e:
        raise BadRequestError(400, f'"inputs" must be a rectangular nested list of numbers ({e})') from None
    x = x.reshape(_batch_shape(tuple(x.shape), sample, max_batch))
    if not torch.isfinite(x).all():
        raise BadRequestError(400, "inputs contain NaN or infinity")
    return x


def create_app(
    supernet: Supernet | LoadedSupernet,
    profile: LatencyProfile,
    policy: str = "slackfit",
    slo_ms: float = 30.0,
    max_queue: int = 1024,
    max_body: int | None = None,
    engines: SubnetEngines | None = None,
) -> Starlette:
    """The ASGI app serving ``supernet`` (eval mode, weights cached) with a batch ``policy``;
    ``engines`` (default: every sub-net in PyTorch) runs the batches."""
    engines = engines or SubnetEngines(supernet, "torch")
    accuracy = {
        n: float(supernet.info.get(n, {}).get("val_acc", supernet.info.get(n, {}).get("test_acc", -1)))
        for n in supernet.names
    }
    if all(a < 0 for a in accuracy.values()):  # no accuracies recorded: more BOPs counts as more accurate
        accuracy = {n: float(i) for i, n in enumerate(supernet.choices)}
    pol = make_policy(policy, accuracy, profile.max_batch)
    sample = supernet.input_shape
    limit = max_body or 4 * math.prod(sample) * profile.max_batch * 20 + 4096  # JSON text is verbose
    state: dict[str, Batcher] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        b = Batcher(engines, profile, pol, slo_ms, max_queue)
        await b.warmup()
        b.start()
        state["batcher"] = b
        log.info("serving %d sub-nets, policy %s, SLO %g ms, runtimes %s", len(supernet.names), policy,
                 slo_ms, engines.runtime)
        try:
            yield
        finally:
            await b.stop()

    def error(status: int, message: str) -> JSONResponse:
        if status < 500:
            state["batcher"].metrics.rejected += 1
        return JSONResponse({"error": message}, status_code=status)

    async def predict(request: Request) -> JSONResponse:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            declared = int(request.headers.get("content-length", "0") or 0)
        except ValueError:
            return error(400, "Content-Length is not an integer")
        if declared > limit:
            return error(413, f"body of {declared} bytes exceeds the {limit}-byte limit")
        body = await request.body()
        if len(body) > limit:
            return error(413, f"body of {len(body)} bytes exceeds the {limit}-byte limit")
        try:
            if ctype == "application/json":
                x = parse_json_inputs(body, sample, profile.max_batch)
            elif ctype == "application/octet-stream":
                shape = request.headers.get("x-shape") or request.query_params.get("shape")
                dtype = request.headers.get("x-dtype") or request.query_params.get("dtype")
                x = parse_binary(body, shape, dtype, sample, profile.max_batch)
            else:
                raise BadRequestError(
                    415,
                    f"content type {ctype or '(none)'!r} is not supported; send "
                    "application/json or application/octet-stream (raw float32)",
                )
            own_slo = _slo_override(request.headers.get("x-slo-ms") or request.query_params.get("slo_ms"))
        except BadRequestError as e:
            return error(e.status, str(e))
        try:
            r = await state["batcher"].submit(x, own_slo)
        except Shed as e:
            return JSONResponse({"error": str(e)}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse(
            {
                "subnet": r.subnet,
                "batch": r.batch,
                "latency_ms": round(r.latency_ms, 3),
                "outputs": r.outputs.tolist(),
                "predictions": r.outputs.argmax(1).tolist(),
            }
        )

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "status": "ok",
                "subnets": supernet.names,
                "policy": policy,
                "slo_ms": slo_ms,
                "max_batch": profile.max_batch,
                "input_shape": list(sample),
                **engines.describe(),
            }
        )

    async def metrics(request: Request) -> JSONResponse:
        b = state["batcher"]
        try:
            last = int(request.query_params.get("decisions", "0"))
        except ValueError:
            last = -1
        if last < 0:
            return error(400, "decisions must be a count of recent decisions >= 0, e.g. ?decisions=100")
        log_tail = list(b.decisions)[-last:] if last else []
        return JSONResponse(
            {
                **b.metrics.to_dict(b.depth),
                "policy": policy,
                "slo_ms": slo_ms,
                "accuracy": accuracy,
                "profile_ms": profile.to_dict(),
                "latency_scale": round(b.scale, 3),
                **engines.describe(),
                **({"decision_log": log_tail} if last else {}),
            }
        )

    routes = [
        Route("/predict", predict, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


#: set by a load test that starts this server (``lowbit.serve.bench.start_server``): its process id
PARENT_ENV = "LOWBIT_SERVE_PARENT_PID"


def _exit_with_parent() -> None:
    """A server started by a load test ends when that process is gone (killed, say): otherwise it
    would keep compiling, profiling or serving beside the next run and skew its latencies."""
    raw = os.environ.get(PARENT_ENV, "").strip()
    if not raw.isdigit():
        return
    parent = int(raw)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        log.warning("the load test that started this server (pid %d) is gone: exiting", parent)
        logging.shutdown()
        os._exit(0)

    threading.Thread(target=watch, name="lowbit-serve-parent", daemon=True).start()


def serve(
    path: str | os.PathLike[str],
    slo_ms: float = 30.0,
    port: int = 8000,
    policy: str = "slackfit",
    host: str = "127.0.0.1",
    max_batch: int = 32,
    threads: int = 1,
    profile_repeats: int = 10,
    max_queue: int = 1024,
    runtime: str = "packed",
    profile_file: str | os.PathLike[str] | None = None,
    save_profile_file: str | os.PathLike[str] | None = None,
) -> int:
    """Load the supernet file, compile every sub-net (``runtime="packed"``; a sub-net that does not
    compile runs in PyTorch, the reason logged), profile each (or take the latencies from the profile
    file ``profile_file``; :mod:`lowbit.serve.profile`), write it to ``save_profile_file`` if
    given, and serve until SIGTERM/SIGINT; returns 0. A bad policy or profile file is a ValueError
    before anything is served."""
    import uvicorn

    from .._io import check_file_path

    _exit_with_parent()
    torch.set_num_threads(threads)
    sn = load_supernet(path)
    make_policy(policy, dict.fromkeys(sn.names, 0.0), max_batch)  # a bad policy fails before profiling
    if save_profile_file is not None:
        check_file_path(save_profile_file, "profile.json")  # a bad path fails before compiling, too
    sha = file_sha256(path)
    if profile_file is not None:  # a file of another supernet or max batch fails before compiling
        prof, measured_on = load_profile(profile_file, sn.names, sha, max_batch, threads)
    engines = SubnetEngines(sn, runtime, threads=threads)
    if profile_file is not None:
        check_runtime(profile_file, measured_on, engines.runtime)
        log.info("latency profile from %s (not measured)", profile_file)
    else:
        prof = profile_supernet(engines, max_batch=max_batch, repeats=profile_repeats)
    if save_profile_file is not None:
        save_profile(save_profile_file, profile_document(prof, sha, engines.runtime, threads))
    app = create_app(sn, prof, policy=policy, slo_ms=slo_ms, max_queue=max_queue, engines=engines)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the previous handler: make that
    # a no-op so a graceful stop exits with status 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    return 0
