"""Analytic FLOPs against torch's FlopCounterMode, on Hugging Face's forward and on the runtime itself."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import BartForConditionalGeneration

from rlskip.flops import encoder_decoder_flops
from rlskip.plan import Plan
from rlskip.runtime import get_runtime

from conftest import tiny_bart_config


def _count(fn) -> int:
    # FlopCounterMode has no formula for the CPU flash-attention kernel; the math backend decomposes SDPA
    # into the matmuls it does count
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.fixture(scope="module")
def small_vocab_bart():
    """Small vocabulary so attention and FFN, not the LM head, dominate the count."""
    torch.manual_seed(0)
    return BartForConditionalGeneration(tiny_bart_config(300, d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128)).eval()


def test_full_model_count_within_2_percent_of_flop_counter_on_hf_forward(small_vocab_bart):
    tiny_bart = small_vocab_bart
    rt = get_runtime(tiny_bart)
    src, tgt = 40, 12
    ids = torch.randint(4, 300, (1, src))
    dec = torch.randint(4, 300, (1, tgt))
    with torch.no_grad():
        measured = _count(lambda: tiny_bart(input_ids=ids, decoder_input_ids=dec))
    _, full = rt.flops(Plan.all_ones(rt.space, 1), src, tgt, teacher_forced=True)
    assert abs(full.item() - measured) / measured < 0.02


def test_generation_count_matches_flop_counter_on_the_runtime(small_vocab_bart):
    tiny_bart = small_vocab_bart
    """The runtime executes exactly the analytic count, so a skipped sub-layer really costs nothing."""
    rt = get_runtime(tiny_bart)
    ids = torch.randint(4, 300, (3, 30))
    obs = rt.observe(ids)
    g = torch.Generator().manual_seed(3)
    plan = Plan(rt.space, torch.rand(3, rt.space.n_bits, generator=g) < 0.5)
    first_layer = _count(lambda: rt.observe(ids))
    for kw in (dict(max_new_tokens=9, min_new_tokens=9), dict(max_new_tokens=9, min_new_tokens=9, num_beams=3)):
        box = {}
        measured = _count(lambda: box.update(out=rt.generate(obs, plan, **kw)))
        out = box["out"]
        assert (out.steps == 9).all()
        analytic = out.flops.sum().item()
        assert abs(analytic - (measured + first_layer)) / analytic < 1e-6, kw
        assert (out.flops < out.full_flops).all()


def test_skipping_one_candidate_lowers_count_by_its_share(small_vocab_bart):
    tiny_bart = small_vocab_bart
    rt = get_runtime(tiny_bart)
    full_plan = Plan.all_ones(rt.space, 1)
    base, full = rt.flops(full_plan, 50, 10, beams=2)
    assert base.item() == full.item()
    ids = torch.randint(4, 300, (1, 50))
    obs = rt.observe(ids)
    for name in rt.space.names:
        one = Plan.from_skips(rt.space, [[name]])
        executed, _ = rt.flops(one, 50, 10, beams=2)
        from rlskip.flops import encoder_decoder_flops

        _, per = encoder_decoder_flops(rt.dims, rt.space, torch.tensor([50]), torch.tensor([50]), torch.tensor([10]), 2)
        assert executed.item() == base.item() - per[0, rt.space.bit(name)].item()
        # and the runtime really saves that much
        kw = dict(max_new_tokens=10, min_new_tokens=10)
        saved = _count(lambda: rt.generate(obs, full_plan, **kw)) - _count(lambda: rt.generate(obs, one, **kw))
        _, per1 = encoder_decoder_flops(rt.dims, rt.space, torch.tensor([50]), torch.tensor([50]), torch.tensor([10]), 1)
        assert abs(saved - per1[0, rt.space.bit(name)].item()) < 1e-6 * base.item(), name
