"""The encoder-decoder families' early-exit stacks (BART, T5): never exiting is the full model's ``generate()``, and
the FLOPs the method charges are what FlopCounterMode counts when tokens do exit."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import families.bart  # noqa: F401  (registers its cases)
import families.t5  # noqa: F401
from families import CASES
from rlskip.methods import _EarlyExitDecoder
from rlskip.runtime import get_runtime
from rlskip.runtime.search import greedy_search

KW = dict(max_new_tokens=8, min_new_tokens=8)


def _early_exit(rt, obs, threshold: float):
    prompt = rt.prompt(obs)  # the decoder's start token
    s = rt.search_settings(obs, prompt, **KW)
    with torch.inference_mode():
        stack = rt.exit_stack(obs, s.max_length)
        dec = _EarlyExitDecoder(stack, threshold)
        seqs, steps, _ = greedy_search(dec, prompt, s)
    return seqs, stack.fixed_flops + dec.flops(steps)


@pytest.mark.parametrize("name", ["bart-tiny", "t5-v1_0-tiny", "t5-v1_1-tiny"])
def test_seq2seq_early_exit_is_the_full_model_and_counts_what_it_runs(name):
    case = CASES[name]
    rt = get_runtime(case.model)
    ids, mask = case.inputs()
    seqs, _ = _early_exit(rt, rt.observe(ids, mask), 2.0)  # never confident enough: every layer runs
    assert torch.equal(seqs, case.hf_generate(ids, mask, **KW))
    row_ids, row_mask = ids[1:2, mask[1]], mask[1:2, mask[1]]  # one instance (a batch also computes its padding)
    obs = rt.observe(row_ids, row_mask)
    counted = FlopCounterMode(display=False)
    with sdpa_kernel([SDPBackend.MATH]), counted:
        _, flops = _early_exit(rt, obs, 0.0)  # every token exits after the first decoder layer
    first = FlopCounterMode(display=False)
    with sdpa_kernel([SDPBackend.MATH]), first:
        rt.observe(row_ids, row_mask)
    _, never = _early_exit(rt, obs, 2.0)
    assert flops.item() < never.item(), "a low threshold should exit early"
    assert abs(flops.item() - (counted.get_total_flops() + first.get_total_flops())) / flops.item() < 1e-6
