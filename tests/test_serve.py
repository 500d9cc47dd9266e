"""``python -m rlskip.serve``: a real HTTP client (httpx) against the real server (uvicorn on a free loopback
port) with a tiny trained run: answers equal ``rlskip.load(...).generate`` on each text alone, bad requests get
their 4xx and the server keeps serving, the Prometheus metrics parse, and SIGTERM drains a request in flight."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from test_inference import one_thread, trained_run  # noqa: F401  (one_thread: autouse)

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [f"{op} {' '.join(str((3 * i + j) % 10) for j in range(2 + i % 6))}" for i, op in enumerate(["sort", "copy", "reverse"] * 5)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(run_dir):
    """The run loaded for inference at a threshold amid its policy's keep probabilities (several plans)."""
    import rlskip
    from rlskip.policy import observation_inputs

    m = rlskip.load(run_dir)
    with torch.no_grad():
        m.threshold = float(torch.sigmoid(m.policy(**observation_inputs(m.observe(TEXTS)))[0]).median())
    assert len({tuple(r) for r in m.decide(TEXTS).bits.tolist()}) > 2
    return m


@pytest.fixture(scope="module")
def url(run_dir, reference):
    """A server in a thread of this process, stopped at the end of the module."""
    import uvicorn

    from rlskip.config import compose
    from rlskip.inference import load
    from rlskip.serve import build_app

    port = free_port()
    cfg = compose([
        f"ckpt={run_dir}", f"port={port}", f"threshold={reference.threshold}", "max_batch=4", "max_pool=12",
        "max_wait_ms=30", "max_items=6", "max_chars=300",
    ], "serve")
    model = load(run_dir, threshold=cfg.threshold, batch_size=cfg.max_batch)
    server = uvicorn.Server(uvicorn.Config(build_app(model, cfg), host="127.0.0.1", port=port, log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=60)


def _alone(reference, text: str, **kw) -> dict:
    d = reference.generate([text], return_details=True, **kw)[0]
    return {"text": d["generation"], "flops_ratio": d["flops_ratio"], "skipped": d["skipped"]}


def _same(got: dict, want: dict) -> None:
    assert got["text"] == want["text"] and got["skipped"] == want["skipped"]
    assert got["flops_ratio"] == pytest.approx(want["flops_ratio"], rel=1e-9)


def test_concurrent_requests_get_what_each_text_gets_alone(url, reference):
    requests = [
        {"texts": TEXTS[i : i + 1 + i % 3], **({"max_new_tokens": 4} if i % 4 == 3 else {})} for i in range(12)
    ]
    with httpx.Client(base_url=url, timeout=120) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: client.post("/v1/generate", json=body), requests))
    for body, r in zip(requests, answers):
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        assert len(items) == len(body["texts"])
        kw = {k: v for k, v in body.items() if k != "texts"}
        for text, item in zip(body["texts"], items):
            _same(item, _alone(reference, text, **kw))


BAD = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"text": ["copy 1"]}, 400, "unknown field 'text'"),
    ({"texts": "copy 1 2"}, 400, "'texts' must be a list"),
    ({"texts": ["copy 1", 7]}, 400, "texts[1] must be a string"),
    ({"texts": ["copy 1", "  "]}, 422, "texts[1] is empty"),
    ({"texts": []}, 422, "'texts' is empty"),
    ({"texts": ["copy " + "1 " * 200]}, 422, "max_chars=300"),
    ({"texts": ["copy 1"] * 7}, 422, "max_items=6"),
    ({"texts": ["copy 1"], "max_new_tokens": "5"}, 400, "'max_new_tokens' must be an integer"),
    ({"texts": ["copy 1"], "max_new_tokens": 0}, 422, "max_new_tokens=0 is out of range"),
    ({"texts": ["copy 1"], "num_beams": 99}, 422, "num_beams=99 is out of range"),
    ({"texts": ["copy 1"], "budget": 0.5}, 422, "without a budget input"),
]


def test_bad_requests_get_a_one_line_4xx_and_the_server_keeps_serving(url, reference):
    with httpx.Client(base_url=url, timeout=120) as client:
        for body, status, reason in BAD:
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = client.post("/v1/generate", headers={"content-type": "application/json"}, **kw)
            assert r.status_code == status, (body, r.text)
            error = r.json()["error"]
            assert reason in error and "\n" not in error, (body, error)
            ok = client.post("/v1/generate", json={"texts": [TEXTS[0]]})
            assert ok.status_code == 200
            _same(ok.json()["items"][0], _alone(reference, TEXTS[0]))
        r = client.post("/v1/classify", json={"texts": ["copy 1"]})
        assert r.status_code == 404 and "POST /v1/generate" in r.json()["error"]
        assert client.get("/health").json()["status"] == "ok"


def test_metrics_expose_the_documented_counters_and_histograms(url):
    with httpx.Client(base_url=url, timeout=120) as client:
        assert client.post("/v1/generate", json={"texts": TEXTS[:5]}).status_code == 200
        client.post("/v1/generate", content=b"{")
        text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    kinds = {
        "rlskip_requests": "counter", "rlskip_items": "counter", "rlskip_request_seconds": "histogram",
        "rlskip_batches": "counter", "rlskip_batch_rows": "histogram", "rlskip_batch_distinct_plans": "histogram",
        "rlskip_batch_seconds": "histogram", "rlskip_flops": "counter", "rlskip_full_flops": "counter",
        "rlskip_queue_rows": "gauge", "rlskip_inflight_requests": "gauge",
    }
    for name, kind in kinds.items():
        assert families[name].type == kind, name
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert value[("rlskip_requests_total", (("code", "200"), ("endpoint", "generate")))] >= 1
    assert value[("rlskip_requests_total", (("code", "400"), ("endpoint", "generate")))] >= 1
    assert value[("rlskip_items_total", ())] >= 5
    rows = value[("rlskip_batch_rows_sum", ())]
    assert rows >= 5 and value[("rlskip_batch_rows_count", ())] == value[("rlskip_batches_total", ())]
    assert value[("rlskip_batch_rows_bucket", (("le", "4.0"),))] == value[("rlskip_batches_total", ())]  # max_batch=4
    assert 0 < value[("rlskip_flops_total", ())] < value[("rlskip_full_flops_total", ())]  # the policy saves FLOPs


def test_sigterm_answers_the_request_in_flight_then_exits_0(run_dir, reference):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlskip.serve", f"ckpt={run_dir}", f"port={port}", f"threshold={reference.threshold}",
         "max_wait_ms=3000", "threads=1", "log_level=warning"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "no start"
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            answer: list = []
            request = threading.Thread(target=lambda: answer.append(client.post("/v1/generate", json={"texts": TEXTS[:2]})))
            request.start()
            # the batcher holds the request for max_wait_ms: SIGTERM arrives while it is in flight
            while 'rlskip_inflight_requests 1.0' not in client.get("/metrics").text:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            request.join(timeout=120)
        assert proc.wait(timeout=120) == 0, proc.stderr.read()[-2000:]
        assert answer and answer[0].status_code == 200, answer
        for text, item in zip(TEXTS[:2], answer[0].json()["items"]):
            _same(item, _alone(reference, text))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serving_leaves_the_process_logging_alone(run_dir, tmp_path):
    """uvicorn's own logging set-up (``logging.config.dictConfig``) closes every handler the process has; the
    server logs through the root logger instead, so a host process's log file keeps receiving its lines."""
    import logging

    from rlskip.serve import main

    handler = logging.FileHandler(tmp_path / "host.log", mode="w")
    logging.getLogger().addHandler(handler)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        assert main([f"ckpt={run_dir}", f"port={busy.getsockname()[1]}", "log_level=critical"]) == 2
        logging.getLogger("host").warning("still logging")
        handler.flush()
        assert "still logging" in (tmp_path / "host.log").read_text()
    finally:
        busy.close()
        logging.getLogger().removeHandler(handler)
        handler.close()


def test_configuration_errors_are_one_line_exit_2(run_dir, capsys):
    from rlskip.serve import main

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    for args, reason in (
        ([f"ckpt={run_dir}", f"port={busy.getsockname()[1]}", "log_level=critical"], "could not start on 127.0.0.1"),
        ([f"ckpt={run_dir}", "colour=red"], "unknown config key 'colour'"),
        ([f"ckpt={run_dir}", "max_batch=0"], "max_batch=0"),
        ([f"ckpt={run_dir}", "port=abc"], "port=abc: Value 'abc' of type 'str' could not be converted to Integer"),
        ([f"ckpt={run_dir}", "max_batch=32", "max_pool=16"], "max_pool=16 must be >= max_batch=32"),
        (["ckpt=/nonexistent/run"], "run directory not found"),
    ):
        assert main(args) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and reason in err[0], (args, err)
    busy.close()
