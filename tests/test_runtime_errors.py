"""Bad inputs to the runtime fail with one clear ValueError naming what was expected."""

from __future__ import annotations

import pytest
import torch

from rlskip.plan import Plan
from rlskip.runtime import get_runtime
from rlskip.space import SkipSpace

from conftest import tiny_bart_config


def test_plan_of_wrong_shape_or_dtype(tiny_bart, mixed_batch):
    rt = get_runtime(tiny_bart)
    obs = rt.observe(mixed_batch.input_ids, mixed_batch.attention_mask)
    with pytest.raises(ValueError, match=r"bool tensor \[batch, 10\]"):
        rt.generate(obs, Plan(rt.space, torch.ones(5, 10, dtype=torch.int64)), max_new_tokens=2)
    with pytest.raises(ValueError, match="plan has 2 rows but the observation has 5"):
        rt.generate(obs, Plan.all_ones(rt.space, 2), max_new_tokens=2)
    bad_tokens = Plan(rt.space, torch.ones(5, 10, dtype=torch.bool), torch.ones(5, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_keep has 3 positions, expected the input length"):
        rt.forward(obs, bad_tokens, labels=torch.ones(5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="expected an rlskip.Plan"):
        rt.generate(obs, torch.ones(5, 10, dtype=torch.bool), max_new_tokens=2)


def test_plan_or_space_from_another_layout(tiny_bart, mixed_batch):
    rt = get_runtime(tiny_bart)
    obs = rt.observe(mixed_batch.input_ids, mixed_batch.attention_mask)
    other = SkipSpace.encoder_decoder("bart", 6, 6)
    with pytest.raises(ValueError, match=r"made for a bart SkipSpace \(6 encoder \+ 6 decoder.*has a bart SkipSpace \(3 encoder"):
        rt.generate(obs, Plan.all_ones(other, 5), max_new_tokens=2)
    with pytest.raises(ValueError, match="6 encoder"):
        rt.space.check_compatible(SkipSpace.from_json(other.to_json()), what="checkpoint")


def test_unsupported_model_family():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"unsupported model family: GPT2LMHeadModel .*supported: \['bart'"):
        get_runtime(model)


def test_bad_generation_options_and_inputs(tiny_bart, mixed_batch):
    rt = get_runtime(tiny_bart)
    obs = rt.observe(mixed_batch.input_ids, mixed_batch.attention_mask)
    plan = Plan.all_ones(rt.space, 5)
    with pytest.raises(ValueError, match="unknown generation arguments"):
        rt.generate(obs, plan, max_new_tokens=2, beam_width=3)
    with pytest.raises(ValueError, match="do_sample=True needs num_beams=1"):
        rt.generate(obs, plan, max_new_tokens=2, do_sample=True, num_beams=2)
    with pytest.raises(ValueError, match="generation option typical_p=0.5 is not supported"):
        rt.generate(obs, plan, max_new_tokens=2, typical_p=0.5)
    with pytest.raises(ValueError, match="input of 300 tokens exceeds the model's 256 positions"):
        rt.observe(torch.ones(1, 300, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one real token"):
        rt.observe(torch.ones(2, 4, dtype=torch.long), torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="long tensor"):
        rt.observe(torch.ones(2, 4))


def test_sequence_classifier_path():
    from transformers import BartForSequenceClassification

    torch.manual_seed(0)
    model = BartForSequenceClassification(tiny_bart_config(300, num_labels=3)).eval()
    rt = get_runtime(model)
    ids = torch.tensor([[0, 10, 11, 12, 2, 2, 20, 21, 2], [0, 30, 31, 2, 2, 40, 2, 1, 1]])
    am = (ids != 1).long()
    hf = model(input_ids=ids[:1], attention_mask=am[:1]).logits
    obs = rt.observe(ids, am)
    out = rt.classify(obs, Plan.all_ones(rt.space, 2))
    assert (out.logits[0] - hf[0]).abs().max().item() < 1e-5
    assert torch.equal(out.flops, out.full_flops)
    with pytest.raises(ValueError, match="use classify"):
        rt.generate(obs, Plan.all_ones(rt.space, 2), max_new_tokens=2)


def test_family_specific_input_errors():
    import families.bert  # noqa: F401
    import families.t5  # noqa: F401
    from families import CASES

    bert = get_runtime(CASES["bert-tiny"].model)
    ids, mask = CASES["bert-tiny"].inputs()
    left = torch.flip(ids, [1]), torch.flip(mask, [1])  # padding first
    with pytest.raises(ValueError, match="inputs must be right-padded"):
        bert.observe(*left)
    with pytest.raises(ValueError, match="FLOPs take steps=None"):
        bert.flops(Plan.all_ones(bert.space, 1), 10, steps=3)
    t5 = get_runtime(CASES["t5-v1_0-tiny"].model)
    with pytest.raises(ValueError, match="FLOPs need the number of decoding steps"):
        t5.flops(Plan.all_ones(t5.space, 1), 10)


def test_generation_options_leave_the_model_config_alone(tiny_bart, mixed_batch):
    """Options merged for one call never reach the model's own generation config; an option set there that the
    runtime cannot honour is refused as one given to the call would be; a config saved by another transformers
    version is not."""
    rt = get_runtime(tiny_bart)
    obs = rt.observe(mixed_batch.input_ids, mixed_batch.attention_mask)
    plan = Plan.all_ones(rt.space, 5)
    gc = tiny_bart.generation_config
    before = gc.to_dict()
    out = rt.generate(obs, plan, max_new_tokens=3, num_beams=2, length_penalty=2.0, no_repeat_ngram_size=2)
    assert out.sequences.shape[1] <= 4
    assert gc.to_dict() == before
    saved = gc.typical_p, gc.transformers_version
    try:
        gc.transformers_version = "4.40.0"
        rt.generate(obs, plan, max_new_tokens=2)
        gc.typical_p = 0.5
        with pytest.raises(ValueError, match="generation option typical_p=0.5 is not supported"):
            rt.generate(obs, plan, max_new_tokens=2)
    finally:
        gc.typical_p, gc.transformers_version = saved


def test_generate_counts_the_full_model_on_the_original_lengths(tiny_bart, mixed_batch):
    """With tokens dropped, the executed FLOPs use the kept lengths and the full model's the original ones; with
    none dropped the two tables are one."""
    rt = get_runtime(tiny_bart)
    obs = rt.observe(mixed_batch.input_ids, mixed_batch.attention_mask)
    ones = rt.generate(obs, Plan.all_ones(rt.space, 5), max_new_tokens=3)
    assert torch.equal(ones.flops, ones.full_flops)
    keep = obs.attention_mask.clone()
    keep[:, 2] = False  # the third position, where it is not a special token
    keep |= obs.always_keep
    assert not bool(keep.equal(obs.attention_mask))
    dropped = rt.generate(obs, Plan(rt.space, torch.ones(5, rt.space.n_bits, dtype=torch.bool), keep), max_new_tokens=3)
    _, full = rt.flops(Plan.all_ones(rt.space, 5), obs.lengths, steps=dropped.steps)
    assert torch.allclose(dropped.full_flops, full)
    assert bool((dropped.flops <= dropped.full_flops).all()) and bool((dropped.flops < dropped.full_flops).any())
