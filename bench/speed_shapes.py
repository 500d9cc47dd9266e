"""Wall-clock savings of the T5 and BERT runtimes against their FLOPs savings and against Hugging Face.

Random-weight models with real shapes: t5-base (T5 v1.0: 12 + 12 layers, d_model 768, 12 heads, d_ff 3072)
generating 32 new tokens greedily (``min_new_tokens = max_new_tokens``, so every plan decodes the same number of
steps) from 256-token sources, and a bert-base sequence classifier (12 layers, d_model 768) on 128-token inputs.
At batch 1 and 16, with plans that skip half of the skippable sub-layers, it reports

- ideal speedup = full FLOPs / executed FLOPs (analytic, :mod:`rlskip.flops`), realised speedup =
  time(all-ones plan) / time(plan), and realised_over_ideal = realised / ideal (the performance contract asks
  >= 0.9 at batch 1 and at batch 16 when the rows share a plan);
- at batch 16, for a plan shared by every row (``shared_plan``) and for plans drawn independently per row
  (``per_row_plans``; each sub-layer then runs on the rows that keep it);
- all_ones_over_hf = time(all-ones plan) / time(Hugging Face): ``generate()`` for T5, the model's forward for
  BERT (the contract asks <= 1.05).

Timings are medians over repeats taken round-robin across the configurations of one model and batch size, the
first round (warm-up) excluded. Torch runs one thread by default (``--threads``): on a shared 2-core machine its
OpenMP workers wait on each other for every small operation (a decoding step's attention took 10 ms instead
of 10 us with two threads while another process ran), which would time the machine's load, not the runtime.
The all-ones plan is checked to reproduce Hugging Face's output first. Each row goes to stderr as JSON; the
last line printed is one JSON summary object.

    python bench/speed_shapes.py --quick    # 3 timed repeats (5-10 minutes on 2 shared cores)
    python bench/speed_shapes.py            # 7 timed repeats
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, T5Config, T5ForConditionalGeneration

from rlskip.plan import Plan
from rlskip.runtime import get_runtime

ROOT = Path(__file__).resolve().parents[1]
T5_SRC_LEN, T5_NEW_TOKENS, BERT_LEN, SKIP = 256, 32, 128, 0.5


def skip_plan(space, batch: int, gen: torch.Generator, shared: bool) -> Plan:
    """Plans skipping ``SKIP`` of the skippable sub-layers: one drawn for every row, or one per row."""
    n_skip = round(SKIP * space.n_bits)
    bits = torch.ones(batch, space.n_bits, dtype=torch.bool)
    for i in range(1 if shared else batch):
        bits[i, torch.randperm(space.n_bits, generator=gen)[:n_skip]] = False
    if shared:
        bits[1:] = bits[0]
    return Plan(space, bits)


def timed_rounds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each run over ``repeats`` round-robin rounds after one warm-up round."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for round_ in range(repeats + 1):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            if round_:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_t5(batches: tuple[int, ...], repeats: int, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, feed_forward_proj="relu",
        decoder_start_token_id=0,
    )
    model = T5ForConditionalGeneration(cfg).eval()
    rt = get_runtime(model)
    kw = dict(max_new_tokens=T5_NEW_TOKENS, min_new_tokens=T5_NEW_TOKENS, num_beams=1)
    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(seed + batch)
        ids = torch.randint(2, cfg.vocab_size, (batch, T5_SRC_LEN), generator=g)
        ids[:, -1] = cfg.eos_token_id
        mask = torch.ones_like(ids)

        def run(plan, ids=ids, mask=mask):
            return lambda: rt.generate(rt.observe(ids, mask), plan, **kw)

        def hf(ids=ids, mask=mask):
            return model.generate(ids, attention_mask=mask, **kw)

        assert torch.equal(run(Plan.all_ones(rt.space, batch))().sequences, hf()), "all-ones plan must equal generate()"
        rows.append(measure("t5_base", rt, batch, run, hf, repeats, g))
    return rows


def bench_bert(batches: tuple[int, ...], repeats: int, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(num_labels=2)).eval()  # BertConfig's defaults: bert-base
    rt = get_runtime(model)
    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(seed + batch)
        ids = torch.randint(1000, model.config.vocab_size, (batch, BERT_LEN), generator=g)
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
        mask = torch.ones_like(ids)

        def run(plan, ids=ids, mask=mask):
            return lambda: rt.classify(rt.observe(ids, mask), plan)

        def hf(ids=ids, mask=mask):
            return model(input_ids=ids, attention_mask=mask).logits

        ref = run(Plan.all_ones(rt.space, batch))().logits
        assert torch.allclose(ref, hf(), atol=1e-4), "all-ones plan must reproduce the model's logits"
        rows.append(measure("bert_base", rt, batch, run, hf, repeats, g))
    return rows


def measure(name: str, rt, batch: int, run, hf, repeats: int, g: torch.Generator) -> dict:
    """Time the all-ones plan, the skipping plans and Hugging Face on one batch; one JSON row."""
    plans = {"shared_plan": skip_plan(rt.space, batch, g, shared=True)}
    if batch > 1:
        plans["per_row_plans"] = skip_plan(rt.space, batch, g, shared=False)
    runs = {"all_ones": run(Plan.all_ones(rt.space, batch)), **{k: run(p) for k, p in plans.items()}, "hf": hf}
    med = timed_rounds(runs, repeats)
    row = dict(model=name, batch=batch, seconds=med, all_ones_over_hf=med["all_ones"] / med["hf"])
    for k in plans:
        out = runs[k]()
        ideal = float(out.full_flops.sum() / out.flops.sum())
        realised = med["all_ones"] / med[k]
        row[k] = dict(ideal_speedup=ideal, realised_speedup=realised, realised_over_ideal=realised / ideal)
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def summarise(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        m, b = r["model"], r["batch"]
        for k in ("shared_plan", "per_row_plans"):
            if k in r:
                suffix = f"b{b}" if b == 1 else f"b{b}_{k}"
                out[f"{m}_realised_over_ideal_{suffix}"] = round(r[k]["realised_over_ideal"], 4)
                out[f"{m}_ideal_speedup_{suffix}"] = round(r[k]["ideal_speedup"], 4)
        out[f"{m}_all_ones_over_hf_b{b}"] = round(r["all_ones_over_hf"], 4)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 timed repeats instead of 7")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per configuration (after warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see above)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "speed_shapes.json")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    rows = []
    with torch.inference_mode():
        for bench in (bench_t5, bench_bert):
            rows += bench((1, 16), repeats)
    summary = summarise(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "rows": rows, "repeats": repeats, "threads": args.threads}, indent=1))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
