"""The BART runtime against Hugging Face: exactness of the all-ones plan, gather/scatter, skipping, tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlskip.plan import Plan
from rlskip.runtime import get_runtime

BEAM = dict(num_beams=4, no_repeat_ngram_size=3, length_penalty=2.0, early_stopping=True)


def _plans(rt, batch, p_keep=0.6, seed=1, tokens=None):
    g = torch.Generator().manual_seed(seed)
    bits = torch.rand(batch, rt.space.n_bits, generator=g) < p_keep
    bits[0] = True  # keep one all-ones row among the distinct plans
    tk = None if tokens is None else torch.rand(tokens, generator=g) < 0.7
    return Plan(rt.space, bits, tk)


def test_all_ones_greedy_and_beam_equal_hf_generate(tiny_bart, mixed_batch):
    rt = get_runtime(tiny_bart)
    obs = rt.observe(mixed_batch.input_ids, mixed_batch.attention_mask)
    plan = Plan.all_ones(rt.space, obs.batch_size)
    for kw in (dict(max_new_tokens=30), dict(max_new_tokens=30, **BEAM), dict(max_new_tokens=30, min_new_tokens=6, **BEAM)):
        hf = tiny_bart.generate(mixed_batch.input_ids, attention_mask=mixed_batch.attention_mask, **kw)
        out = rt.generate(obs, plan, **kw)
        assert torch.equal(out.sequences, hf), kw
        # the batch really mixes lengths: some rows stop early on EOS, others run on
        ends = [(r[1:] == tiny_bart.config.eos_token_id).nonzero().flatten()[:1].tolist() for r in hf]
        assert len({e[0] if e else -1 for e in ends}) > 1, "test input should make rows stop at different steps"
        assert torch.allclose(out.flops_ratio, torch.ones_like(out.flops_ratio))


def test_greedy_margins_equal_the_gap_in_hf_generate_scores(tiny_bart, mixed_batch):
    """A row's margin is the smallest top-1 minus top-2 score over the steps it decoded, as HF scores them."""
    rt = get_runtime(tiny_bart)
    obs = rt.observe(mixed_batch.input_ids, mixed_batch.attention_mask)
    kw = dict(max_new_tokens=30, min_new_tokens=3)
    hf = tiny_bart.generate(
        mixed_batch.input_ids, attention_mask=mixed_batch.attention_mask, output_scores=True, return_dict_in_generate=True, **kw
    )
    out = rt.generate(obs, Plan.all_ones(rt.space, obs.batch_size), return_margins=True, **kw)
    assert torch.equal(out.sequences, hf.sequences)
    top = torch.stack(hf.scores, 1).float().topk(2, dim=-1).values  # [rows, steps, 2]
    gaps = top[..., 0] - top[..., 1]
    expected = torch.stack([gaps[r, : int(out.steps[r])].min() for r in range(obs.batch_size)])
    assert torch.allclose(out.margins, expected, atol=1e-4)
    assert len(set(out.steps.tolist())) > 1  # rows of different lengths: a finished row's later steps do not count
    # a plan that skips changes the margins; beam search reports none
    bits = torch.ones(obs.batch_size, rt.space.n_bits, dtype=torch.bool)
    bits[:, -1] = False
    assert not torch.allclose(rt.generate(obs, Plan(rt.space, bits), return_margins=True, **kw).margins, out.margins)
    ones = Plan.all_ones(rt.space, obs.batch_size)
    assert rt.generate(obs, ones, return_margins=True, max_new_tokens=10, **BEAM).margins is None
    plain = rt.generate(obs, ones, **kw)  # not asked for: not computed, and the tokens are the same
    assert plain.margins is None and torch.equal(plain.sequences, out.sequences)


def test_all_ones_teacher_forced_logits_match_hf(tiny_bart, mixed_batch, bart_tokenizer):
    rt = get_runtime(tiny_bart)
    labels = bart_tokenizer(["a summary", "hi there my friend", "x", "one two three", "rates"], return_tensors="pt", padding=True).input_ids
    labels[labels == bart_tokenizer.pad_token_id] = -100
    hf = tiny_bart(input_ids=mixed_batch.input_ids, attention_mask=mixed_batch.attention_mask, labels=labels)
    obs = rt.observe(mixed_batch.input_ids, mixed_batch.attention_mask)
    logits, loss = rt.forward(obs, Plan.all_ones(rt.space, obs.batch_size), labels=labels)
    assert (logits - hf.logits).abs().max().item() < 1e-5
    assert abs(loss.item() - hf.loss.item()) < 1e-5


def test_runtime_shares_weights_with_the_model(tiny_bart):
    rt = get_runtime(tiny_bart)
    assert rt.model is tiny_bart
    params_before = {id(p) for p in tiny_bart.parameters()}
    assert not any(isinstance(v, torch.nn.Parameter) for v in vars(rt).values())
    assert {id(p) for p in tiny_bart.parameters()} == params_before


@pytest.mark.parametrize("kw", [dict(max_new_tokens=25), dict(max_new_tokens=25, **BEAM)], ids=["greedy", "beam"])
def test_distinct_plans_in_a_batch_equal_each_row_alone(tiny_bart, mixed_batch, kw):
    rt = get_runtime(tiny_bart)
    ids, am = mixed_batch.input_ids, mixed_batch.attention_mask
    obs = rt.observe(ids, am)
    plan = _plans(rt, obs.batch_size, tokens=ids.shape)
    assert len({tuple(r) for r in plan.bits.tolist()}) == obs.batch_size
    out = rt.generate(obs, plan, **kw)
    for i in range(obs.batch_size):
        n = int(am[i].sum())
        alone_obs = rt.observe(ids[i : i + 1, :n], am[i : i + 1, :n])
        alone = rt.generate(alone_obs, Plan(rt.space, plan.bits[i : i + 1], plan.token_keep[i : i + 1, :n]), **kw)
        seq = alone.sequences[0]
        assert torch.equal(out.sequences[i, : seq.shape[0]], seq), i
        assert (out.sequences[i, seq.shape[0] :] == tiny_bart.config.pad_token_id).all()
        assert out.flops[i] == alone.flops[0] and out.steps[i] == alone.steps[0]


def test_distinct_plans_teacher_forced_logits_equal_each_row_alone(tiny_bart, mixed_batch):
    rt = get_runtime(tiny_bart)
    ids, am = mixed_batch.input_ids, mixed_batch.attention_mask
    labels = torch.randint(4, 1000, (ids.shape[0], 7))
    obs = rt.observe(ids, am)
    plan = _plans(rt, obs.batch_size, tokens=ids.shape)
    logits, _ = rt.forward(obs, plan, labels=labels)
    for i in range(obs.batch_size):
        n = int(am[i].sum())
        o1 = rt.observe(ids[i : i + 1, :n], am[i : i + 1, :n])
        l1, _ = rt.forward(o1, Plan(rt.space, plan.bits[i : i + 1], plan.token_keep[i : i + 1, :n]), labels=labels[i : i + 1])
        assert (logits[i] - l1[0]).abs().max().item() < 1e-5


# ---- an independent reference: Hugging Face's own modules, every sub-layer computed, identity substituted ----
def _ref_sublayer(x, keep: bool, compute):
    y = compute(x)  # always computed: the reference never saves work
    return y if keep else x


def _causal(n, dtype):
    return torch.triu(torch.full((n, n), torch.finfo(dtype).min), 1)[None, None]


def reference_logits(model, ids, space, skip: set[str], keep_tokens: torch.Tensor | None, dec_ids):
    """One instance, no cache, HF BartAttention/LayerNorm modules called directly."""
    enc, dec = model.model.encoder, model.model.decoder
    pos = enc.embed_positions(ids)
    h = enc.layernorm_embedding(enc.embed_tokens(ids) + pos)
    for i, layer in enumerate(enc.layers):
        if i == 1 and keep_tokens is not None:
            h = h[:, keep_tokens]
        h = _ref_sublayer(h, f"enc.{i}.attn" not in skip, lambda x: layer.self_attn_layer_norm(x + layer.self_attn(x)[0]))
        h = _ref_sublayer(h, f"enc.{i}.ffn" not in skip, lambda x: layer.final_layer_norm(x + layer.fc2(layer.activation_fn(layer.fc1(x)))))
    memory = h
    y = dec.layernorm_embedding(dec.embed_tokens(dec_ids) + dec.embed_positions(dec_ids))
    mask = _causal(dec_ids.shape[1], y.dtype)
    for i, layer in enumerate(dec.layers):
        y = _ref_sublayer(y, f"dec.{i}.self_attn" not in skip, lambda x: layer.self_attn_layer_norm(x + layer.self_attn(x, attention_mask=mask)[0]))
        y = _ref_sublayer(y, f"dec.{i}.cross_attn" not in skip, lambda x: layer.encoder_attn_layer_norm(x + layer.encoder_attn(x, key_value_states=memory)[0]))
        y = _ref_sublayer(y, f"dec.{i}.ffn" not in skip, lambda x: layer.final_layer_norm(x + layer.fc2(layer.activation_fn(layer.fc1(x)))))
    return model.lm_head(y) + model.final_logits_bias


def test_skipped_sublayers_match_identity_reference(tiny_bart, mixed_batch):
    rt = get_runtime(tiny_bart)
    ids, am = mixed_batch.input_ids, mixed_batch.attention_mask
    obs = rt.observe(ids, am)
    plan = _plans(rt, obs.batch_size, p_keep=0.5, seed=7, tokens=ids.shape)
    dec_ids = torch.randint(4, 1000, (ids.shape[0], 6))
    dec_ids[:, 0] = tiny_bart.config.decoder_start_token_id
    with torch.no_grad():
        logits, _ = rt.forward(obs, plan, decoder_input_ids=dec_ids)
        out = rt.generate(obs, plan, max_new_tokens=8, min_new_tokens=8)
        for i in range(obs.batch_size):
            n = int(am[i].sum())
            skip = set(plan.skipped_names(i))
            keep = (plan.token_keep[i, :n] | obs.always_keep[i, :n]).clone()
            ref = reference_logits(tiny_bart, ids[i : i + 1, :n], rt.space, skip, keep, dec_ids[i : i + 1])
            assert (logits[i] - ref[0]).abs().max().item() < 1e-5
            # generation with the cache equals greedy re-decoding with the no-cache reference (EOS banned
            # by min_new_tokens until the last step, where the config's forced_eos_token_id applies)
            seq = out.sequences[i : i + 1, :1]
            length = out.sequences.shape[1]
            for t in range(1, length):
                nxt = reference_logits(tiny_bart, ids[i : i + 1, :n], rt.space, skip, keep, seq)[0, -1].clone()
                nxt[tiny_bart.config.eos_token_id] = float("-inf")
                tok = nxt.argmax() if t < length - 1 else torch.tensor(tiny_bart.config.forced_eos_token_id)
                seq = torch.cat([seq, tok.view(1, 1)], 1)
            assert torch.equal(seq[0], out.sequences[i]), i


def test_skipping_changes_outputs_and_all_skips_of_a_kind_are_identity(tiny_bart, mixed_batch):
    rt = get_runtime(tiny_bart)
    obs = rt.observe(mixed_batch.input_ids, mixed_batch.attention_mask)
    dec_ids = torch.full((obs.batch_size, 3), tiny_bart.config.decoder_start_token_id)
    full, _ = rt.forward(obs, Plan.all_ones(rt.space, obs.batch_size), decoder_input_ids=dec_ids)
    one = Plan.from_skips(rt.space, [["dec.1.ffn"]] * obs.batch_size)
    skipped, _ = rt.forward(obs, one, decoder_input_ids=dec_ids)
    assert (full - skipped).abs().max() > 1e-3
    # skipping the last FFN equals reading the stream right before it (post-LN: the block is the identity)
    layer = tiny_bart.model.decoder.layers[1]
    hooked = {}
    handle = layer.fc1.register_forward_hook(lambda m, i, o: hooked.update(x=i[0]))
    try:
        tiny_bart(input_ids=mixed_batch.input_ids, attention_mask=mixed_batch.attention_mask, decoder_input_ids=dec_ids)
    finally:
        handle.remove()
    expect = F.linear(hooked["x"], tiny_bart.lm_head.weight) + tiny_bart.final_logits_bias
    assert (skipped - expect).abs().max().item() < 1e-5


def test_dropped_tokens_leave_the_tensors_and_specials_stay(tiny_bart, mixed_batch, bart_tokenizer):
    rt = get_runtime(tiny_bart)
    ids, am = mixed_batch.input_ids, mixed_batch.attention_mask
    obs = rt.observe(ids, am)
    drop_all = Plan(rt.space, torch.ones(obs.batch_size, rt.space.n_bits, dtype=torch.bool), torch.zeros_like(am, dtype=torch.bool))
    memory, mask = rt._encode(obs, drop_all)
    # only <s> and </s> survive when every droppable token is dropped: the memory is 2 wide
    assert memory.shape == (obs.batch_size, 2, tiny_bart.config.d_model)
    assert mask.all()
    half = torch.zeros_like(am, dtype=torch.bool)
    half[:, ::2] = True
    memory, mask = rt._encode(obs, Plan(rt.space, drop_all.bits, half))
    expect = ((half & am.bool()) | obs.always_keep).sum(1)
    assert torch.equal(mask.sum(1), expect)
    assert memory.shape[1] == int(expect.max()) < ids.shape[1]
    out = rt.generate(obs, Plan(rt.space, drop_all.bits, half), max_new_tokens=5)
    assert torch.equal(out.source_kept, expect)
    assert (out.flops < out.full_flops).all()
    specials = torch.isin(ids, torch.tensor(bart_tokenizer.all_special_ids)) & am.bool()
    assert torch.equal(obs.always_keep, specials)
