"""Wall-clock savings of the skip-aware runtime against its FLOPs savings and against Hugging Face.

Random-weight BART models with the real bart-base and bart-large shapes (bart-large's from the real
config in ../shared/models/bart-tokenizer/config.json when present), 400-token sources, 32 new tokens
greedy (EOS suppressed, so every plan decodes the same number of steps), batch 1 and 16. For each skip
level (25/50/75% of the skippable sub-layers) it times, at batch 16, plans drawn independently per instance
(``independent``) and one drawn plan shared by every row (``shared``: what plan-aware batching forms from
agreeing plans; :mod:`rlskip.batching`), and at batch 1 one drawn plan; it reports

- flops_ratio: executed / full-model FLOPs (analytic, rlskip.flops);
- ideal_speedup = 1 / flops_ratio, realised_speedup = time(all-ones plan) / time(plan);
- realised_over_ideal: realised_speedup / ideal_speedup (the performance contract asks >= 0.9);

and all_ones_over_hf = time(all-ones plan) / time(model.generate()) on the same inputs (<= 1.05).

It also measures what the hardware allows: the time of one feed-forward sub-layer (as the runtime runs it,
on the model's first decoder layer) on 4 of 16 rows over its time on all 16, for one token per row (a decoding step)
and for 400 (the encoder). The FLOPs ratio is 0.25 in both; a time ratio well above it means those calls
are bound by reading the weights, which every executing row shares, so skipping rows cannot save their
FLOPs' share of the time (``row_scaling`` in the JSON).

Timings are medians over repeats taken round-robin across configurations, warm-up excluded. Writes JSON
(``--out``) and prints one JSON summary object as its last line.

    python bench/speed.py --quick      # bart-base only, fewer repeats (< 3 minutes on 2 cores)
    python bench/speed.py              # bart-base and bart-large
    python bench/speed.py --quick --threads 1 --cpu-time   # on a machine shared with other jobs

With more runnable threads than cores (other jobs on a shared machine), torch's intra-op threads wait for each
other at every operation and every timing swells; ``--threads 1`` avoids that, and ``--threads 1 --cpu-time``
times the process's CPU time, which other jobs' turns on the cores do not inflate (one thread's CPU time is the
wall-clock an idle core would give, up to the caches and memory bandwidth the machine shares). The thread
count, the clock and the load average are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import BartConfig, BartForConditionalGeneration

from rlskip.plan import Plan
from rlskip.runtime import get_runtime

ROOT = Path(__file__).resolve().parents[1]
LARGE_CONFIG = ROOT.parent / "shared" / "models" / "bart-tokenizer" / "config.json"
SKIP_LEVELS = (0.25, 0.5, 0.75)
SRC_LEN, NEW_TOKENS = 400, 32


def model_config(name: str) -> BartConfig:
    """Real shapes: bart-base from its published hyper-parameters, bart-large from the shared config."""
    if name == "bart-base":
        return BartConfig(
            vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
            decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024,
        )
    if LARGE_CONFIG.is_file():
        return BartConfig.from_pretrained(str(LARGE_CONFIG.parent))
    return BartConfig(vocab_size=50265)  # BartConfig's defaults are bart-large's shapes


def random_plan(space, batch: int, skip: float, gen: torch.Generator, shared: bool = False) -> Plan:
    """Each instance skips round(skip * n_bits) skippable sub-layers, chosen independently, or (``shared``)
    every instance the same ones."""
    n_skip = round(skip * space.n_bits)
    bits = torch.ones(1 if shared else batch, space.n_bits, dtype=torch.bool)
    for i in range(bits.shape[0]):
        bits[i, torch.randperm(space.n_bits, generator=gen)[:n_skip]] = False
    return Plan(space, bits.expand(batch, -1).clone())


def bench_model(name: str, batches: tuple[int, ...], repeats: int, clock=time.perf_counter, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(model_config(name)).eval()
    rt = get_runtime(model)
    gen_kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=1)
    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(seed + batch)
        ids = torch.randint(4, model.config.vocab_size, (batch, SRC_LEN), generator=g)
        ids[:, 0], ids[:, -1] = model.config.bos_token_id, model.config.eos_token_id
        mask = torch.ones_like(ids)
        plans = {"all_ones": Plan.all_ones(rt.space, batch)}
        kinds = ("independent", "shared") if batch > 1 else ("independent",)
        plans.update({
            f"skip_{int(s * 100)}_{kind}": random_plan(rt.space, batch, s, g, kind == "shared") for s in SKIP_LEVELS for kind in kinds
        })

        def run_plan(plan):
            with torch.inference_mode():
                return rt.generate(rt.observe(ids, mask), plan, **gen_kwargs)

        def run_hf():
            with torch.inference_mode():
                return model.generate(ids, attention_mask=mask, **gen_kwargs)

        runs = {k: (lambda p=p: run_plan(p)) for k, p in plans.items()}
        runs["hf_generate"] = run_hf
        ref = run_plan(plans["all_ones"]).sequences
        assert torch.equal(ref, run_hf()), "all-ones plan must reproduce HF generate()"
        times: dict[str, list[float]] = {k: [] for k in runs}
        # round 0 is warm-up; rounds go round-robin so drift of the machine hits every configuration alike
        for round_ in range(repeats + 1):
            for k, fn in runs.items():
                t0 = clock()
                fn()
                if round_:
                    times[k].append(clock() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, plan in plans.items():
            if k == "all_ones":
                continue
            out = run_plan(plan)
            ratio = float(out.flops.sum() / out.full_flops.sum())
            realised = med["all_ones"] / med[k]
            rows.append(dict(
                model=name, batch=batch, plan=k, plans="shared" if k.endswith("shared") else "independent", flops_ratio=ratio, ideal_speedup=1 / ratio,
                realised_speedup=realised, realised_over_ideal=realised * ratio,
                seconds=med[k], seconds_all_ones=med["all_ones"],
            ))
        rows.append(dict(
            model=name, batch=batch, plan="all_ones_vs_hf", seconds=med["all_ones"], seconds_hf=med["hf_generate"],
            all_ones_over_hf=med["all_ones"] / med["hf_generate"],
        ))
        for r in rows[-len(plans) :]:
            print(json.dumps(r), file=sys.stderr, flush=True)
    rows.append(row_scaling(name, rt))
    return rows


def row_scaling(name: str, rt, repeats: int = 200) -> dict:
    """Time of the runtime's FFN sub-layer (first decoder layer) on 4 of 16 rows over all 16, at 1 token per
    row and at SRC_LEN tokens."""
    layer = rt.model.model.decoder.layers[0]

    def timed(rows: int, tokens: int, reps: int) -> float:
        x = torch.randn(rows, tokens, layer.fc1.in_features)
        for _ in range(3):
            rt._ffn(layer, x)
        t = []
        for _ in range(reps):
            t0 = time.perf_counter()
            rt._ffn(layer, x)
            t.append(time.perf_counter() - t0)
        return statistics.median(t)

    out = {"model": name, "plan": "row_scaling", "flops_ratio": 0.25}
    for label, tokens, reps in (("decode_step", 1, repeats), ("encoder", SRC_LEN, max(3, repeats // 40))):
        out[f"time_ratio_4_of_16_{label}"] = timed(4, tokens, reps) / timed(16, tokens, reps)
    print(json.dumps(out), file=sys.stderr, flush=True)
    return out


def summarise(rows: list[dict]) -> dict:
    """The worst ratio over skip levels (and models) per batch size and kind of plans."""
    out = {}
    for b in sorted({r["batch"] for r in rows if "batch" in r}):
        for kind, suffix in (("shared", "_shared_plan"), ("independent", "_independent")):
            vals = [r["realised_over_ideal"] for r in rows if r.get("plans") == kind and r["batch"] == b]
            if vals:  # at batch 1 there is one plan, and no suffix
                out[f"realised_over_ideal_b{b}" + (suffix if b > 1 else "")] = round(min(vals), 4)
        out[f"all_ones_over_hf_b{b}"] = round(max(r["all_ones_over_hf"] for r in rows if "all_ones_over_hf" in r and r["batch"] == b), 4)
    for r in rows:
        if r.get("plan") == "row_scaling" and r["model"] == "bart-base":
            out["ffn_time_ratio_4_of_16_rows_decode_step"] = round(r["time_ratio_4_of_16_decode_step"], 4)
            out["ffn_time_ratio_4_of_16_rows_encoder"] = round(r["time_ratio_4_of_16_encoder"], 4)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="bart-base only, fewer repeats")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per configuration (after warm-up)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--cpu-time", action="store_true", help="time the process's CPU time (needs --threads 1)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "speed.json")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.cpu_time and args.threads != 1:
        ap.error("--cpu-time measures one thread's work: give --threads 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    models = ("bart-base",) if args.quick else ("bart-base", "bart-large")
    repeats = args.repeats or (3 if args.quick else 5)
    rows = []
    for name in models:
        rows += bench_model(name, (1, 16), repeats, time.process_time if args.cpu_time else time.perf_counter)
    summary = summarise(rows)
    summary["load_avg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]  # other jobs on the machine at the end
    summary["torch_threads"] = torch.get_num_threads()
    summary["clock"] = "process cpu time" if args.cpu_time else "wall"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "rows": rows, "quick": args.quick, "repeats": repeats}, indent=1))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
