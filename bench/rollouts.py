"""Rollout throughput: ``SkipVecEnv`` (16 instances in one batched runtime call) against a ``DummyVecEnv`` of 16
``SkipEnv`` stepped one at a time, same model, data and random actions.

Small random BART (d_model 256, 3+3 layers, FFN 1024) on two data sets: ``synthetic`` (its own 17-word
vocabulary, sources up to 27 tokens) and the XSum slice in ../shared/data (real BART tokenizer and 50k
vocabulary, max_source_tokens 256). Each step draws 16 instances and executes 16 random plans (every bit a
fair coin: about half the sub-layers and half the tokens dropped), greedy, ``max_new_tokens`` new tokens.

The full model's outputs are precomputed (and shared by both sides) before timing, so the numbers are the
steady state of a learner that has seen the data once; warm-up steps are excluded, and instances per second
come from the median step time, the two sides' steps alternating. ``batched_over_single`` is the ratio of the
two; the summary reports the minimum over the data sets. As a reference for what batching can gain on this
machine at all, ``hf_batched_over_single`` is the same ratio for plain Hugging Face ``model.generate()`` (full
model, batch of 16 against 16 batches of 1); the performance contract asks ``<data>_gain_over_hf_gain``, the
first over the second, to reach 0.9.

The two gains are not like for like: Hugging Face's runs the full model, ours random plans, which make our
one-at-a-time steps about twice as cheap, while a batched step of 16 distinct plans pays each sub-layer's fixed
cost (reading its weights) whenever any row keeps it. So each data set also reports the all-ones plan's gain
(``all_ones_batched_over_single``), our one-at-a-time all-ones step over Hugging Face's
(``single_all_ones_over_hf_single``), our batched random-plan throughput over Hugging Face's batched full model
(``batched_instances_per_s_over_hf_batched``), the random plans' FLOPs ratio, and
``ideal_batched_over_single``: the gain if a batched step cost exactly that FLOPs share of the all-ones batched
step. When the ideal itself is below 0.9x Hugging Face's gain, no batched executor can meet the contract on
that data set: the one-at-a-time side is too cheap.

    python bench/rollouts.py --quick     # fewer steps and repeats (< 3 minutes on 2 cores)
    python bench/rollouts.py
    python bench/rollouts.py --quick --threads 1   # on a machine shared with other jobs (see below)

With more runnable threads than cores (other jobs on a shared machine), torch's intra-op threads wait for
each other at every operation, which slows the many small operations of one-at-a-time stepping far more
than the batched ones; ``--threads 1`` avoids that, and ``--threads 1 --cpu-time`` times the process's CPU
time, which other jobs' turns on the cores do not inflate. The thread count, the clock and the load average
are recorded.

Writes the full JSON to ``--out`` and prints a JSON summary object as its last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from stable_baselines3.common.vec_env import DummyVecEnv
from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration

from rlskip.envs import SkipEnv, SkipVecEnv
from rlskip.envs.tasks import get_task
from rlskip.envs.tasks.synthetic import small_bart_config, synthetic_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
XSUM = SHARED / "data" / "xsum" / "test_1000.jsonl"
TOKENIZER = SHARED / "models" / "bart-tokenizer"
SHAPE = dict(d_model=256, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=1024, decoder_ffn_dim=1024)
# New tokens per instance, every one decoded (EOS suppressed until then): a random model would otherwise stop
# at once (its tied head echoes the start token, EOS) and the benchmark would time encoders only. About the
# length of a synthetic target and of an XSum summary.
NEW_TOKENS = {"synthetic": 16, "xsum": 32}


def setting(name: str, n_examples: int) -> dict:
    """Model, tokenizer, task, examples and lengths of one data set."""
    torch.manual_seed(0)
    if name == "synthetic":
        task = get_task("synthetic", n_train=n_examples)
        model = BartForConditionalGeneration(small_bart_config(**SHAPE)).eval()
        return dict(model=model, tokenizer=synthetic_tokenizer(), task=task, examples=task.load("train"),
                    max_source_tokens=64, max_new_tokens=NEW_TOKENS["synthetic"])
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    task = get_task("xsum")
    model = BartForConditionalGeneration(
        BartConfig(vocab_size=len(tokenizer), max_position_embeddings=256, **SHAPE)
    ).eval()
    return dict(model=model, tokenizer=tokenizer, task=task, examples=task.load(data_files=str(XSUM), limit=n_examples),
                max_source_tokens=256, max_new_tokens=NEW_TOKENS["xsum"])


def hf_batching(model, source_ids: list[list[int]], pad_id: int, new: int, repeats: int, clock=time.perf_counter) -> dict:
    """Hugging Face ``generate()`` on 16 sources: median seconds one at a time (``single``) and as one batch."""
    width = max(len(r) for r in source_ids)
    ids = torch.full((len(source_ids), width), pad_id, dtype=torch.long)
    for i, r in enumerate(source_ids):
        ids[i, : len(r)] = torch.tensor(r)
    mask = ids != pad_id
    kw = dict(max_new_tokens=new, min_new_tokens=new, num_beams=1)

    def batched():
        model.generate(ids, attention_mask=mask, **kw)

    def one_at_a_time():
        for r in source_ids:
            model.generate(torch.tensor([r]), **kw)

    seconds: dict[str, list[float]] = {"batched": [], "single": []}
    with torch.inference_mode():
        batched()  # warm-up
        for _ in range(repeats):
            for key, fn in (("batched", batched), ("single", one_at_a_time)):
                start = clock()
                fn()
                seconds[key].append(clock() - start)
    return {k: statistics.median(v) for k, v in seconds.items()}


def bench_data(name: str, num_envs: int, n_examples: int, steps: int, repeats: int, clock=time.perf_counter) -> dict:
    s = setting(name, n_examples)
    new = s["max_new_tokens"]
    common = dict(max_source_tokens=s["max_source_tokens"], max_new_tokens=new, gen_kwargs={"min_new_tokens": new})
    args = (s["model"], s["tokenizer"], s["task"], s["examples"])
    batched = SkipVecEnv(*args, num_envs=num_envs, seed=0, **common)
    batched.precompute_full()
    singles = [SkipEnv(*args, seed=1 + j, **common) for j in range(num_envs)]
    for env in singles:
        env.full_outputs = batched.full_outputs  # one shared cache: neither side recomputes the full model
    single = DummyVecEnv([lambda env=env: env for env in singles])
    gen = np.random.default_rng(0)
    actions = [gen.integers(0, 2, (num_envs, batched.rollout.n_actions), dtype=np.int8) for _ in range(steps)]

    infos: list[dict] = []  # the last step's

    def timed_step(venv, action) -> float:
        nonlocal infos
        start = clock()
        infos = venv.step(action)[3]
        return clock() - start

    ones = np.ones_like(actions[0])
    seconds: dict[str, list[float]] = {"batched": [], "single": [], "batched_all_ones": [], "single_all_ones": []}
    costs: list[float] = []
    for venv in (batched, single):
        venv.reset()
        venv.step(actions[0])  # warm-up, excluded
    # Steps alternate between the two sides, so a burst of load from other processes on this shared machine
    # hits both about equally; medians over steps discard the worst bursts.
    for _ in range(repeats):
        for a in actions:
            seconds["batched"].append(timed_step(batched, a))
            costs.extend(info["cost"] for info in infos)
            seconds["single"].append(timed_step(single, a))
        # the all-ones plan on both sides: the like-for-like of Hugging Face's full-model figures
        seconds["batched_all_ones"].append(timed_step(batched, ones))
        seconds["single_all_ones"].append(timed_step(single, ones))
    med = {k: statistics.median(v) for k, v in seconds.items()}
    ips = {k: num_envs / v for k, v in med.items()}
    lengths = [len(ids) for ids in batched.rollout.source_ids]
    hf = hf_batching(s["model"], batched.rollout.source_ids[:num_envs], batched.rollout.executor.encoder.pad_id, new, repeats, clock)
    flops = float(np.mean(costs))
    return {
        "data": name,
        "num_envs": num_envs,
        "examples": len(s["examples"]),
        "mean_source_tokens": float(np.mean(lengths)),
        "max_source_tokens": s["max_source_tokens"],
        "max_new_tokens": s["max_new_tokens"],
        "timed_steps": steps * repeats,
        "batched_instances_per_s": ips["batched"],
        "single_instances_per_s": ips["single"],
        "batched_over_single": ips["batched"] / ips["single"],
        "hf_batched_over_single": hf["single"] / hf["batched"],
        "random_plans_flops_ratio": flops,
        # the same gain for the all-ones plan, and each side against Hugging Face's in absolute time
        "all_ones_batched_over_single": ips["batched_all_ones"] / ips["single_all_ones"],
        "single_all_ones_over_hf_single": med["single_all_ones"] / hf["single"],
        "batched_all_ones_over_hf_batched": med["batched_all_ones"] / hf["batched"],
        "batched_instances_per_s_over_hf_batched": ips["batched"] * hf["batched"] / num_envs,
        # the gain a batched step would reach if it cost exactly the random plans' FLOPs share of the all-ones
        # batched step (the ideal of skipping; a step's fixed costs make the real one higher)
        "ideal_batched_over_single": med["single"] / (flops * med["batched_all_ones"]),
        "hf_seconds": hf,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (< 3 minutes on 2 cores)")
    parser.add_argument("--num-envs", type=int, default=16, help="parallel instances per step")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--cpu-time", action="store_true", help="time the process's CPU time (needs --threads 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rollouts.json", help="JSON output path")
    args = parser.parse_args(argv)
    if args.cpu_time and args.threads != 1:
        parser.error("--cpu-time measures one thread's work: give --threads 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.getLogger("rlskip.envs.rollout").setLevel(logging.ERROR)  # XSum truncation is expected here
    steps, repeats, n_examples = (2, 2, 32) if args.quick else (4, 5, 256)
    data = ["synthetic"] + (["xsum"] if XSUM.is_file() and (TOKENIZER / "tokenizer.json").is_file() else [])
    clock = time.process_time if args.cpu_time else time.perf_counter
    rows = [bench_data(name, args.num_envs, n_examples, steps, repeats, clock) for name in data]
    summary = {"batched_over_single": min(r["batched_over_single"] for r in rows)}
    for r in rows:
        summary[f"{r['data']}_batched_over_single"] = r["batched_over_single"]
        summary[f"{r['data']}_hf_batched_over_single"] = r["hf_batched_over_single"]
        summary[f"{r['data']}_gain_over_hf_gain"] = r["batched_over_single"] / r["hf_batched_over_single"]  # contract: >= 0.9
        for key in ("all_ones_batched_over_single", "single_all_ones_over_hf_single", "ideal_batched_over_single",
                    "batched_instances_per_s_over_hf_batched", "random_plans_flops_ratio"):
            summary[f"{r['data']}_{key}"] = r[key]
    summary["load_avg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    if "xsum" not in data:
        summary["skipped"] = f"xsum: data or tokenizer absent under {SHARED}"
    result = {
        "summary": summary,
        "rows": rows,
        "machine": {
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_1_5_15": os.getloadavg(),
            "clock": "process cpu time" if args.cpu_time else "wall",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
