"""``python -m rlskip.serve ckpt=<run dir> [key=value ...]``: an HTTP server for a trained skip policy.

Loads the run's checkpoint with its generator (:func:`rlskip.load`) and serves it with FastAPI on uvicorn.
Keys (Hydra overrides; schema :class:`rlskip.config.ServeConfig`): ``host``, ``port``, ``max_batch``,
``max_wait_ms``, ``max_pool``, ``plan_aware``, ``full_model``, ``max_items``, ``max_chars``,
``max_new_tokens_limit``, ``max_beams``, ``threshold``, ``backbone``, ``name``, ``threads``, ``log_level``.

Endpoints:

- ``POST /v1/generate`` (generation checkpoints): ``{"texts": [str, ...], "max_new_tokens": int,
  "num_beams": int, "budget": float}`` (all but ``texts`` optional; defaults: the run's settings) ->
  ``{"items": [{"text": <generation>, "flops_ratio": float, "skipped": [candidate, ...]}, ...]}`` in the
  order of ``texts``. ``flops_ratio`` is the analytic FLOPs with the policy (its own cost included) over the
  full model's at the same lengths; ``budget`` is for budget-conditioned policies only.
- ``POST /v1/classify`` (classification checkpoints): ``{"texts": [...], "budget": float}`` ->
  ``{"items": [{"label": <class id>, "flops_ratio", "skipped"}, ...]}``.
- ``GET /health``: ``{"status": "ok", "kind", "checkpoint", "max_batch", "plan_aware", "full_model"}``.
- ``GET /metrics``: Prometheus text format: ``rlskip_requests_total{endpoint,code}``, ``rlskip_items_total``,
  ``rlskip_request_seconds`` (histogram, answered requests), ``rlskip_batches_total``,
  ``rlskip_batch_rows`` and ``rlskip_batch_distinct_plans`` (histograms per runtime call),
  ``rlskip_batch_seconds``, ``rlskip_flops_total`` and ``rlskip_full_flops_total`` (executed FLOPs and the
  full model's on the same lengths: the FLOPs saved are ``rlskip_full_flops_total - rlskip_flops_total``),
  ``rlskip_queue_rows`` and ``rlskip_inflight_requests`` (gauges).

Every answer an item gets is what ``rlskip.load(run).generate`` gives it alone. A bad request gets a JSON
``{"error": "<one line>"}``: 400 for invalid JSON, wrong types or unknown fields; 422 for values out of range
(an empty or over-long text, too many items, settings over the limits, a wrong budget); 404 for the other kind
of checkpoint's endpoint; the server keeps serving.

Batching (:class:`Batcher`): one worker thread owns the model. It starts work once the oldest request has
waited ``max_wait_ms`` or enough rows wait (``max_pool`` with plan-aware batching, whose batches agree more
often the larger the pool; else ``max_batch``), then takes every waiting request up to ``max_pool`` rows;
requests with the same generation settings and budget form one pool (requests with different settings never
share a runtime call), which is observed and decided at once and cut into batches of at most ``max_batch``
rows whose plans agree, each of similar input lengths (:mod:`rlskip.batching`; ``plan_aware=false``:
consecutive batches). A request is answered as soon as the batches holding its texts are done.
``full_model=true`` serves the unmodified model (all-ones plans, no policy), the reference a policy's
throughput is compared with; with ``plan_aware=true`` its pools are cut by the same rule (one plan: batches of
similar lengths).

SIGTERM or SIGINT: no new connections; requests in flight are answered, the batcher finishes its queue, and
the process exits with status 0. Configuration and loading errors: one line ``error: ...`` on stderr, exit 2.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from rlskip.config import compose

log = logging.getLogger("rlskip.serve")


class BadRequest(ValueError):
    """A request the server refuses: HTTP ``status`` and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_request(body: bytes, model, cfg, endpoint: str) -> tuple[list[str], dict[str, int], float | None]:
    """``(texts, generation options, budget)`` of a request body; :class:`BadRequest` for anything else."""
    try:
        req = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(400, f"the body is not valid JSON ({e})") from None
    fields = ("texts", "budget") + (("max_new_tokens", "num_beams") if endpoint == "generate" else ())
    if not isinstance(req, dict):
        raise BadRequest(400, f"the body must be a JSON object with fields {list(fields)}, got {type(req).__name__}")
    unknown = sorted(set(req) - set(fields))
    if unknown:
        raise BadRequest(400, f"unknown field {unknown[0]!r}; fields: {list(fields)}")
    texts = req.get("texts")
    if not isinstance(texts, list):
        raise BadRequest(400, f"'texts' must be a list of strings, got {type(texts).__name__ if 'texts' in req else 'nothing'}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise BadRequest(400, f"texts[{i}] must be a string, got {type(t).__name__}")
        if not t.strip():
            raise BadRequest(422, f"texts[{i}] is empty")
        if len(t) > cfg.max_chars:
            raise BadRequest(422, f"texts[{i}] has {len(t)} characters, more than max_chars={cfg.max_chars}")
    if not texts:
        raise BadRequest(422, "'texts' is empty: give at least one text")
    if len(texts) > cfg.max_items:
        raise BadRequest(422, f"{len(texts)} texts in one request, more than max_items={cfg.max_items}")
    gen = dict(model.executor.gen_kwargs)
    for key, top in (("max_new_tokens", new_tokens_limit(model, cfg)), ("num_beams", cfg.max_beams)):
        if key in req:
            v = req[key]
            if not _is_int(v):
                raise BadRequest(400, f"{key!r} must be an integer, got {type(v).__name__}")
            if not 1 <= v <= top:
                raise BadRequest(422, f"{key}={v} is out of range 1..{top}")
            gen[key] = v
    budget = req.get("budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))):
        raise BadRequest(400, f"'budget' must be a number, got {type(budget).__name__}")
    if not cfg.full_model:
        try:
            model.source(budget)
        except ValueError as e:
            raise BadRequest(422, str(e)) from None
    return texts, gen, None if budget is None else float(budget)


def new_tokens_limit(model, cfg) -> int:
    """The largest ``max_new_tokens`` a request may ask for: the configured limit, within the decoder's positions."""
    limit, positions = cfg.max_new_tokens_limit, model.runtime.dims.max_positions
    if positions is not None:
        prompt = 1 if model.runtime.kind == "seq2seq" else model.executor.encoder.max_tokens
        limit = min(limit, positions - prompt)
    return limit


def check_config(cfg) -> None:
    """One-line errors for values the schema's types allow but the server cannot use."""
    for key in ("max_batch", "max_pool", "max_items", "max_chars", "max_new_tokens_limit", "max_beams"):
        if cfg[key] < 1:
            raise ValueError(f"bad configuration: {key}={cfg[key]}, expected a positive integer")
    if cfg.max_pool < cfg.max_batch:
        raise ValueError(f"bad configuration: max_pool={cfg.max_pool} must be >= max_batch={cfg.max_batch}")
    if not 0 <= cfg.max_wait_ms <= 60_000:
        raise ValueError(f"bad configuration: max_wait_ms={cfg.max_wait_ms}, expected 0..60000")
    if not 0 <= cfg.port <= 65535:
        raise ValueError(f"bad configuration: port={cfg.port}, expected 0..65535")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"bad configuration: threads={cfg.threads}, expected a positive integer")


class Metrics:
    """The server's Prometheus metrics, in a registry of their own (one per application)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("rlskip_requests", "HTTP requests answered", ["endpoint", "code"], registry=r)
        self.items = Counter("rlskip_items", "texts answered", registry=r)
        self.request_seconds = Histogram(
            "rlskip_request_seconds", "time from arrival to answer of answered requests", registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.batches = Counter("rlskip_batches", "runtime calls", registry=r)
        self.batch_rows = Histogram(
            "rlskip_batch_rows", "instances per runtime call", registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128)
        )
        self.batch_plans = Histogram(
            "rlskip_batch_distinct_plans", "distinct sub-layer plans per runtime call", registry=r,
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
        )
        self.batch_seconds = Histogram(
            "rlskip_batch_seconds", "time of one runtime call", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.flops = Counter("rlskip_flops", "executed FLOPs, decisions included", registry=r)
        self.full_flops = Counter("rlskip_full_flops", "the full model's FLOPs on the same lengths", registry=r)
        self.queue_rows = Gauge("rlskip_queue_rows", "texts waiting for the batcher", registry=r)
        self.inflight = Gauge("rlskip_inflight_requests", "requests received and not yet answered", registry=r)


@dataclass
class _Job:
    """One request: its texts, settings, and the answers filled in as its batches finish."""

    texts: list[str]
    gen: dict[str, int]
    budget: float | None
    future: Future
    arrival: float = field(default_factory=time.monotonic)
    items: list = field(default_factory=list)
    left: int = 0

    @property
    def key(self) -> tuple:
        return tuple(sorted(self.gen.items())) + (self.budget,)


class Batcher:
    """The dynamic batcher: a worker thread that owns the model and answers queued requests in pools (see the
    module docstring). :meth:`submit` is thread-safe; :meth:`close` stops taking requests, finishes the queue
    and joins the worker."""

    def __init__(self, model, cfg, metrics: Metrics) -> None:
        self.model, self.cfg, self.metrics = model, cfg, metrics
        self._queue: deque[_Job] = deque()
        self._rows = 0
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="rlskip-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, texts: list[str], gen: dict[str, int], budget: float | None) -> Future:
        """Queue one request; its future gets the list of answer items (or the exception that failed it)."""
        job = _Job(list(texts), gen, budget, Future(), items=[None] * len(texts), left=len(texts))
        with self._cond:
            if self._closing:
                raise BadRequest(503, "the server is shutting down")
            self._queue.append(job)
            self._rows += len(texts)
            self.metrics.queue_rows.set(self._rows)
            self._cond.notify()
        return job.future

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

    def _take(self) -> list[_Job]:
        """Wait for work; then every waiting request up to ``max_pool`` rows ([] once closed and drained)."""
        cfg = self.cfg
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return []
            deadline = self._queue[0].arrival + cfg.max_wait_ms / 1000.0
            fill = cfg.max_pool if cfg.plan_aware else cfg.max_batch
            while self._rows < fill and not self._closing and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            jobs, rows = [], 0
            while self._queue and (not jobs or rows + len(self._queue[0].texts) <= cfg.max_pool):
                jobs.append(self._queue.popleft())
                rows += len(jobs[-1].texts)
            self._rows -= rows
            self.metrics.queue_rows.set(self._rows)
            return jobs

    def _work(self) -> None:
        while jobs := self._take():
            pools: dict[tuple, list[_Job]] = {}
            for job in jobs:
                pools.setdefault(job.key, []).append(job)
            for pool in pools.values():
                try:
                    self._serve(pool)
                except Exception as e:  # fail these requests, keep serving the others
                    for job in pool:
                        if not job.future.done():
                            job.future.set_exception(e)

    def _serve(self, jobs: list[_Job]) -> None:
        """Observe, decide and execute one pool of requests that share their settings."""
        import torch

        from rlskip.batching import execute, pool_batches
        from rlskip.plan import Plan

        m, cfg, metrics = self.model, self.cfg, self.metrics
        owner = [(job, k) for job in jobs for k in range(len(job.texts))]
        obs = m.executor.observe(m.token_rows([t for job in jobs for t in job.texts]))
        if cfg.full_model:
            plan, cost = Plan.all_ones(m.space, obs.batch_size), torch.zeros(obs.batch_size, dtype=torch.float64)
        else:
            plan, cost = m.source(jobs[0].budget)(obs)
        label = "text" if m.kind == "generation" else "label"
        batches = pool_batches(obs, plan, cfg.max_batch, cfg.plan_aware)
        start = time.perf_counter()
        for index, out in execute(m.executor, obs, plan, cost, batches, **jobs[0].gen):
            metrics.batch_seconds.observe(time.perf_counter() - start)
            metrics.batches.inc()
            metrics.batch_rows.observe(len(index))
            metrics.batch_plans.observe(len({bytes(r) for r in plan.bits[index].to(torch.uint8).numpy()}))
            metrics.flops.inc(float(out.flops.sum()))
            metrics.full_flops.inc(float(out.full_flops.sum()))
            for r, i in enumerate(index):
                job, k = owner[i]
                job.items[k] = {label: out.predictions[r], "flops_ratio": float(out.flops_ratio[r]), "skipped": plan.skipped_names(i)}
                job.left -= 1
                if job.left == 0:
                    job.future.set_result(job.items)
            start = time.perf_counter()


def build_app(model, cfg):
    """The FastAPI application serving ``model`` (a :class:`rlskip.inference.SkipModel`) under ``cfg``."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    metrics = Metrics()
    batcher = Batcher(model, cfg, metrics)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.close)  # finish the queue, then stop the worker

    app = FastAPI(title="rlskip", lifespan=lifespan)
    app.state.batcher, app.state.metrics = batcher, metrics
    kind_endpoint = "generate" if model.kind == "generation" else "classify"

    async def handle(request: Request, endpoint: str):
        start = time.perf_counter()
        metrics.inflight.inc()
        try:
            if endpoint != kind_endpoint:
                raise BadRequest(404, f"this checkpoint is for {model.kind}: POST /v1/{kind_endpoint}")
            texts, gen, budget = parse_request(await request.body(), model, cfg, endpoint)
            items = await asyncio.wrap_future(batcher.submit(texts, gen, budget))
        except BadRequest as e:
            metrics.requests.labels(endpoint, str(e.status)).inc()
            return JSONResponse({"error": " ".join(str(e).splitlines())}, status_code=e.status)
        except Exception as e:  # a failure inside the model: this request fails, the server keeps serving
            log.exception("request failed")
            metrics.requests.labels(endpoint, "500").inc()
            return JSONResponse({"error": f"internal error: {' '.join(str(e).splitlines())}"}, status_code=500)
        finally:
            metrics.inflight.dec()
        metrics.requests.labels(endpoint, "200").inc()
        metrics.items.inc(len(items))
        metrics.request_seconds.observe(time.perf_counter() - start)
        return {"items": items}

    @app.post("/v1/generate")
    async def generate(request: Request):
        return await handle(request, "generate")

    @app.post("/v1/classify")
    async def classify(request: Request):
        return await handle(request, "classify")

    @app.get("/health")
    async def health():
        return {
            "status": "ok", "kind": model.kind, "checkpoint": f"{cfg.ckpt}:{cfg.name}", "max_batch": cfg.max_batch,
            "plan_aware": cfg.plan_aware, "full_model": cfg.full_model,
        }

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(cfg) -> None:
    """Load the checkpoint and serve until SIGTERM or SIGINT (then drain and return)."""
    import torch
    import uvicorn

    from rlskip.inference import load

    check_config(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    model = load(
        cfg.ckpt, name=cfg.name, backbone=cfg.backbone, threshold=cfg.threshold, batch_size=cfg.max_batch,
        plan_aware=cfg.plan_aware,
    )
    app = build_app(model, cfg)
    # log_config=None: uvicorn logs through the root logger; its own set-up (dictConfig) would close every
    # logging handler the process already has
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, log_config=None))
    # uvicorn re-raises the signal that stopped it once it has drained; a handler of ours takes it, so a
    # drained shutdown exits with status 0
    before = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind or start the application, having logged why
        app.state.batcher.close()
        raise ValueError(f"the server could not start on {cfg.host}:{cfg.port} (the log line above says why)") from None
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        serve(compose(argv, "serve"))
    except (ValueError, FileNotFoundError) as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
