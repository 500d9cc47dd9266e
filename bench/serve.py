"""Serving load test: ``python -m rlskip.serve`` on loopback under 16 concurrent clients, in four modes.

One server process per mode, the same run directory and requests: the full model with its pools cut by the
plan-aware rule (``full_model=true plan_aware=true``: one plan, so batches of similar lengths), the full model
with FIFO batches (``full_model=true plan_aware=false``), the policy with FIFO batches (``plan_aware=false``)
and the policy with plan-aware batches (:mod:`rlskip.batching`). Each policy mode is compared with the full
model batched the same way, so a ratio holds what the plans save and not what the length order saves. Clients
run a closed loop (each sends its next request when the last is answered) over a fixed list of requests,
bounded in count and time, then the server gets SIGTERM and must exit 0. The modes run in rounds
(``--rounds``, default 2) whose order alternates (full, full FIFO, FIFO, plan-aware, then back), so drift in
the load of a shared machine hits every mode alike; rates come from the totals over the rounds.

Reported per mode: requests and texts per second, p50 / p95 request latency, failed requests (an HTTP
error), lost requests (no answer, or a wrong number of items), and from the server's own metrics the
FLOPs ratio and the mean rows and distinct plans per runtime call. ``throughput_ratio_plan_aware`` is the
plan-aware policy's requests/s over the full model's with the same batching, ``throughput_ratio_fifo`` the
FIFO policy's over the FIFO full model's, ``full_length_order_gain`` the full model's plan-aware (length-
ordered) requests/s over its FIFO requests/s; ``ideal_speedup`` is 1 / the FLOPs ratio of the policy's plans
(total executed over total full-model FLOPs, decisions included), which the performance contract asks
plan-aware serving to reach within 0.9.

Each request carries ``--texts-per-request`` texts (default 4): the batcher decides and batches the texts
waiting at once, at most 16 clients x texts per request, so with one text per request a pool is one
batch of 16 and plan-aware batching has nothing to regroup.

The run directory, by default, is made here (``hand-made`` in the JSON): a random-weight BART of
``--shape`` (``base``: bart-base's; ``small``: d_model 512, FFN 2048, 6 + 6 layers, the --quick default)
with the real BART tokenizer, every generation decoding ``--new-tokens`` tokens (``min_new_tokens`` in its
generation config: a random model would stop at once), and a hand-made policy that sends each input to one of
four plans by a random projection of its pooled first-layer state, the buckets cut at quantiles of the
requests (40/30/20/10%), as a trained policy uses few distinct plans; the plans share half of their skips
and each skips about half of the sub-layers. The requests are XSum documents (../shared/data/xsum). With
``--run <run dir>`` a trained run is served instead (e.g. the embedded default) on its own held-out instances.

    python bench/serve.py --quick               # under 10 minutes on 2 cores
    python bench/serve.py --run runs/<run> --quick

Writes the full JSON to ``--out`` and prints one JSON summary object as its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
XSUM = SHARED / "data" / "xsum" / "test_1000.jsonl"
TOKENIZER = SHARED / "models" / "bart-tokenizer"
SHAPES = {
    "base": dict(d_model=768, encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072),
    "small": dict(d_model=512, encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048),
}
MODES = {
    "full": ["full_model=true", "plan_aware=true"],  # pools cut by the plan-aware rule: one plan, batches by length
    "full_fifo": ["full_model=true", "plan_aware=false"],
    "fifo": ["plan_aware=false"],
    "plan_aware": ["plan_aware=true"],
}
SHARES = (0.4, 0.3, 0.2, 0.1)  # how often the hand-made policy picks each of its plans


def hand_made_run(out: Path, texts: list[str], shape: str, source_tokens: int, new_tokens: int, seed: int = 0) -> dict:
    """Write a run directory with a random-weight generator and a four-plan policy; returns its description."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration

    from rlskip.checkpoint import make_backbone_ref, save_checkpoint
    from rlskip.config import compose
    from rlskip.encoding import Encoder
    from rlskip.policy import SkipPolicy
    from rlskip.runtime import get_runtime

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=len(tok), encoder_layers=6, decoder_layers=6, max_position_embeddings=1024, **SHAPES[shape]
    )).eval()
    model.generation_config.min_new_tokens = new_tokens
    gen_dir = out / "generator"
    model.save_pretrained(gen_dir)
    tok.save_pretrained(gen_dir)
    cfg = compose([
        "env=xsum", f"env.max_source_tokens={source_tokens}", f"env.max_new_tokens={new_tokens}",
        f"backbone.name_or_path={gen_dir}",
    ])
    OmegaConf.save(cfg, out / "config.yaml")

    rt = get_runtime(model)
    n = rt.space.n_bits
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    common, rest = order[: n // 4], order[n // 4 :]
    plans = torch.ones(len(SHARES), n, dtype=torch.bool)
    for k in range(len(SHARES)):  # every plan skips the common quarter and a quarter of its own
        plans[k, common] = False
        plans[k, rest[torch.randperm(rest.numel(), generator=g)[: n // 4]]] = False
    # the policy's score: a random projection of the normalised pooled state, cut at quantiles of the requests
    ids, mask, _ = Encoder(tok, source_tokens).encode(texts)
    with torch.no_grad():
        policy = SkipPolicy(rt.dims.d_model, n, hidden=len(SHARES) - 1, token_head=False)
        u = torch.randn(rt.dims.d_model, generator=g)
        u /= u.norm()
        pooled = torch.cat([rt.observe(ids[i : i + 32], mask[i : i + 32]).pooled() for i in range(0, len(texts), 32)])
        score = policy.pooled_norm(pooled) @ u
        cuts = torch.quantile(score, torch.tensor(SHARES[:-1]).cumsum(0))
        slope = 200.0 / float(score.std())
        policy.trunk[0].weight.copy_(slope * u.expand(len(cuts), -1))
        policy.trunk[0].bias.copy_(-slope * cuts)
        # unit k of the trunk is +1 above cut k, -1 below: bucket b has units 1..b at +1; logits +-8 give plan b
        target = torch.where(plans, 8.0, -8.0)  # [buckets, n_bits]
        w = (target[1:] - target[:-1]) / 2  # the jump of each bit's logit at each cut
        policy.bit_out.weight.copy_(w.T)
        policy.bit_out.bias.copy_(target[0] + w.sum(0))
    ref = make_backbone_ref(model, rt.family, str(gen_dir))
    save_checkpoint(out, policy, rt.space, ref, step=0, extra={"threshold": 0.5}, name="last")
    return {"kind": "hand-made", "shape": shape, "plans": len(SHARES), "shares": SHARES, "skipped_per_plan": int((~plans[0]).sum()), "n_bits": n}


def trained_texts(run: Path, n: int) -> list[str]:
    """Held-out instances of a trained run's own task."""
    from rlskip.envs.data import build_task, load_examples
    from rlskip.inference import run_config, run_env

    cfg = run_config(run)
    env = run_env(cfg, run)
    task = build_task(env, int(cfg.seed))
    _, held_out, _ = load_examples(env, task, max(n, int(cfg.eval.limit)))
    return [ex.source for ex in held_out[:n]]


def xsum_texts(n: int) -> list[str]:
    with open(XSUM) as f:
        return [json.loads(line)["document"] for line, _ in zip(f, range(n))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric_values(text: str) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def run_mode(run: Path, mode: str, requests: list[list[str]], clients: int, deadline_s: float, extra: list[str]) -> dict:
    """Serve ``run`` in ``mode``, send ``requests`` from ``clients`` closed-loop clients, stop with SIGTERM."""
    port = free_port()
    cmd = [sys.executable, "-m", "rlskip.serve", f"ckpt={run}", f"port={port}", "log_level=warning", *MODES[mode], *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            start = time.monotonic()
            while True:
                if proc.poll() is not None or time.monotonic() - start > 300:
                    raise RuntimeError(f"the {mode} server did not start: {proc.stderr.read()[-2000:] if proc.poll() is not None else 'timeout'}")
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            for texts in requests[:2]:  # warm-up, not timed
                client.post("/v1/generate", json={"texts": texts})
            before = metric_values(client.get("/metrics").text)
            latencies, failed, lost, sent, texts_done = [], 0, 0, 0, 0
            lock, todo = threading.Lock(), list(reversed(requests))
            t0 = time.monotonic()

            def worker() -> None:
                nonlocal failed, lost, sent, texts_done
                with httpx.Client(base_url=url, timeout=600) as c:
                    while True:
                        with lock:
                            if not todo or time.monotonic() - t0 > deadline_s:
                                return
                            texts = todo.pop()
                            sent += 1
                        s = time.monotonic()
                        try:
                            r = c.post("/v1/generate", json={"texts": texts})
                        except httpx.HTTPError:
                            with lock:
                                lost += 1
                            continue
                        with lock:
                            if r.status_code != 200:
                                failed += 1
                            elif len(r.json().get("items", [])) != len(texts):
                                lost += 1
                            else:
                                latencies.append(time.monotonic() - s)
                                texts_done += len(texts)

            threads = [threading.Thread(target=worker) for _ in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.monotonic() - t0
            after = metric_values(client.get("/metrics").text)
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    metrics = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return {
        "sent": sent, "latencies": latencies, "failed": failed, "lost": lost, "texts": texts_done, "seconds": wall,
        "metrics": metrics, "exit_code": exit_code, "unsent": len(requests) - sent,
    }


def combine(mode: str, rounds: list[dict]) -> dict:
    """One mode's figures over its rounds: rates from totals, latency quantiles over every request."""
    lat = [x for r in rounds for x in r["latencies"]]
    wall = sum(r["seconds"] for r in rounds)
    m = {k: sum(r["metrics"].get(k, 0.0) for r in rounds) for k in rounds[0]["metrics"]}
    q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else [float("nan")] * 19
    return {
        "mode": mode, "rounds": len(rounds), "requests_sent": sum(r["sent"] for r in rounds), "requests_answered": len(lat),
        "failed_requests": sum(r["failed"] for r in rounds), "lost_requests": sum(r["lost"] for r in rounds),
        "unsent_requests": sum(r["unsent"] for r in rounds), "seconds": wall, "requests_per_s": len(lat) / wall,
        "requests_per_s_by_round": [len(r["latencies"]) / r["seconds"] for r in rounds],
        "texts_per_s": sum(r["texts"] for r in rounds) / wall, "p50_latency_s": statistics.median(lat) if lat else float("nan"),
        "p95_latency_s": q[18], "flops_ratio": m["rlskip_flops_total"] / m["rlskip_full_flops_total"],
        "batches": m["rlskip_batches_total"], "rows_per_batch": m["rlskip_batch_rows_sum"] / max(1.0, m["rlskip_batch_rows_count"]),
        "distinct_plans_per_batch": m["rlskip_batch_distinct_plans_sum"] / max(1.0, m["rlskip_batch_distinct_plans_count"]),
        "exit_codes_after_sigterm": [r["exit_code"] for r in rounds],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests and the small shape (under 10 minutes)")
    ap.add_argument("--run", type=Path, default=None, help="serve this trained run instead of a hand-made one")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="hand-made generator (default: small if --quick, else base)")
    ap.add_argument("--requests", type=int, default=None, help="requests per mode and round (default 96 if --quick, else 320)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over the modes, alternating their order")
    ap.add_argument("--texts-per-request", type=int, default=4)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--source-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--deadline", type=float, default=150.0, help="seconds of load per mode at most")
    ap.add_argument("--server-args", nargs="*", default=[], help="more key=value overrides for every server")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.json")
    args = ap.parse_args(argv)
    n_req = args.requests or (96 if args.quick else 320)
    n_texts = n_req * args.texts_per_request
    with tempfile.TemporaryDirectory() as tmp:
        if args.run is not None:
            run, texts = args.run, trained_texts(args.run, n_texts)
            about = {"kind": "trained", "run": str(args.run)}
        else:
            texts = xsum_texts(n_texts)
            run = Path(tmp) / "run"
            about = hand_made_run(run, texts, args.shape or ("small" if args.quick else "base"), args.source_tokens, args.new_tokens)
        texts = (texts * (n_texts // max(1, len(texts)) + 1))[:n_texts]
        k = args.texts_per_request
        requests = [texts[i : i + k] for i in range(0, n_texts, k)]
        extra = ["max_batch=16", f"max_pool={16 * max(1, min(4, k))}", "max_wait_ms=50", f"max_items={k}", *args.server_args]
        # rounds alternate the order of the modes (full, fifo, plan-aware, then back), so drift in the load of
        # this shared machine hits every mode alike
        raw: dict[str, list[dict]] = {m: [] for m in MODES}
        for r in range(args.rounds):
            for m in (list(MODES) if r % 2 == 0 else list(reversed(MODES))):
                raw[m].append(run_mode(run, m, requests, args.clients, args.deadline, extra))
        rows = {m: combine(m, raw[m]) for m in MODES}
    full, full_fifo, fifo, aware = rows["full"], rows["full_fifo"], rows["fifo"], rows["plan_aware"]
    summary = {
        "throughput_ratio_plan_aware": aware["requests_per_s"] / full["requests_per_s"],
        "throughput_ratio_fifo": fifo["requests_per_s"] / full_fifo["requests_per_s"],
        "full_length_order_gain": full["requests_per_s"] / full_fifo["requests_per_s"],
        "ideal_speedup": 1.0 / aware["flops_ratio"],
        "p95_latency_ratio_plan_aware": aware["p95_latency_s"] / full["p95_latency_s"],
        "failed_requests": sum(r["failed_requests"] for r in rows.values()),
        "lost_requests": sum(r["lost_requests"] for r in rows.values()),
        "unsent_requests": sum(r["unsent_requests"] for r in rows.values()),
        "requests_per_mode_and_round": n_req, "rounds": args.rounds, "texts_per_request": k, "clients": args.clients, "run": about["kind"],
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }
    summary["plan_aware_over_ideal"] = summary["throughput_ratio_plan_aware"] / summary["ideal_speedup"]
    result = {"summary": summary, "modes": rows, "run": about, "server_args": extra}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
