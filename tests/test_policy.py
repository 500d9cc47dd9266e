"""SkipPolicy: shapes, masking of padded tokens, log-probabilities, initial keep rate, budget input, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch

from rlskip.policy import SkipPolicy, observation_inputs
from rlskip.runtime.base import Observation

D, BITS = 16, 10


def _inputs(batch=3, seq=7, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, seq, D, generator=g) * scale
    lengths = torch.tensor([seq, 4, 2][:batch])
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return pooled, tokens, mask


def test_output_shapes():
    pooled, tokens, mask = _inputs()
    pol = SkipPolicy(D, BITS)
    bits, tok = pol(pooled, tokens, mask)
    assert bits.shape == (3, BITS) and tok.shape == (3, 7)
    assert pol(pooled)[1] is None  # no tokens given: no token decisions
    bits, keep, lp, ent = pol.sample(pooled, tokens, mask)
    assert bits.shape == (3, BITS) and bits.dtype == torch.bool
    assert keep.shape == (3, 7) and keep.dtype == torch.bool
    assert lp.shape == (3,) and ent.shape == (3,)
    no_tokens = SkipPolicy(D, BITS, token_head=False)
    assert no_tokens(pooled, tokens, mask)[1] is None
    b, k, lp, _ = no_tokens.sample(pooled, tokens, mask)
    assert k is None and lp.shape == (3,)


def test_log_prob_and_entropy_match_bernoulli_by_hand():
    pooled, tokens, mask = _inputs()
    pol = SkipPolicy(D, BITS, init_keep_logit=0.3)
    torch.manual_seed(1)
    bits, keep, lp, ent = pol.sample(pooled, tokens, mask)
    bl, tl = pol(pooled, tokens, mask)

    def logp(logits, a):  # log sigmoid(l) for a kept unit, log(1 - sigmoid(l)) for a skipped one
        p = torch.sigmoid(logits)
        return torch.where(a, p.log(), (1 - p).log())

    def entropy(logits):
        p = torch.sigmoid(logits)
        return -(p * p.log() + (1 - p) * (1 - p).log())

    m = mask.float()
    want_lp = logp(bl, bits).sum(1) + (logp(tl, keep) * m).sum(1)
    want_ent = entropy(bl).sum(1) + (entropy(tl) * m).sum(1)
    torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-5)
    lp2, ent2 = pol.evaluate_actions(pooled, bits, tokens, mask, keep)
    torch.testing.assert_close(lp2, lp)
    torch.testing.assert_close(ent2, ent)


def test_padded_positions_contribute_nothing():
    pooled, tokens, mask = _inputs()
    pol = SkipPolicy(D, BITS, init_keep_logit=0.0)
    bits = torch.ones(3, BITS, dtype=torch.bool)
    keep = torch.rand(3, 7) > 0.5
    lp, ent = pol.evaluate_actions(pooled, bits, tokens, mask, keep)
    # change what sits at padded positions (even to NaN) and the decisions there: nothing moves
    tokens2 = torch.where(mask[..., None], tokens, torch.nan)
    keep2 = torch.where(mask, keep, ~keep)
    lp2, ent2 = pol.evaluate_actions(pooled, bits, tokens2, mask, keep2)
    torch.testing.assert_close(lp2, lp)
    torch.testing.assert_close(ent2, ent)
    # a row with fewer real tokens has proportionally less token entropy
    _, tl = pol(pooled, tokens, mask)
    p = torch.sigmoid(tl)
    tok_ent = -(p * p.log() + (1 - p) * (1 - p).log())
    bit_ent = pol.evaluate_actions(pooled, bits)[1]  # no tokens: bits only
    torch.testing.assert_close(ent - bit_ent, (tok_ent * mask).sum(1))
    # sampled and decided keep-masks leave positions outside the mask kept
    _, k, _, _ = pol.sample(pooled, tokens, mask)
    assert k[~mask].all()
    _, k = pol.decide(pooled, tokens, mask, threshold=0.99)
    assert k[~mask].all() and not k[mask].any()


def test_initial_keep_probability_is_about_095_at_any_input_scale():
    for scale in (0.01, 1.0, 300.0):  # hidden-state scales differ by orders of magnitude across backbones
        pooled, tokens, mask = _inputs(scale=scale)
        bl, tl = SkipPolicy(D, BITS)(pooled, tokens, mask)
        for p in (torch.sigmoid(bl), torch.sigmoid(tl[mask])):
            assert 0.94 < p.min() and p.max() < 0.96
    pol = SkipPolicy(D, BITS)
    bits, keep = pol.decide(*_inputs())
    assert bits.all() and keep.all()


def test_decisions_follow_the_threshold_even_where_float32_sigmoid_saturates():
    """keep iff sigmoid(logit) >= threshold, judged exactly: logits 20 and 25 both round to sigmoid 1.0 in
    float32, yet a threshold of 1 - 1e-10 (logit 23.03) keeps the second only; elsewhere as the sigmoid says."""
    pooled, tokens, mask = _inputs()
    pol = SkipPolicy(D, BITS)
    logits = torch.tensor([[-25.0, -20.0, -3.0, -0.1, 0.0, 0.1, 3.0, 20.0, 25.0, 40.0]]).expand(3, BITS)
    pol.forward = lambda *a, **k: (logits, torch.where(mask, 25.0, -25.0))
    for t in (1e-10, 1e-3, 0.3, 0.5, 0.7, 0.999, 1 - 1e-10):
        bits, keep = pol.decide(pooled, tokens, mask, threshold=t)
        exact = torch.tensor([1 / (1 + math.exp(-x)) >= t for x in logits[0].tolist()])
        assert torch.equal(bits[0], exact), t
        assert keep.all()  # positions outside the mask kept, the others at logit 25 (sigmoid 1 - 1.4e-11)
    assert pol.decide(pooled, tokens, mask, threshold=1 - 1e-10)[0][0].tolist() == [False] * 8 + [True] * 2


def test_budget_input_changes_the_outputs_and_is_required():
    pooled, tokens, mask = _inputs()
    torch.manual_seed(0)
    pol = SkipPolicy(D, BITS, budget_input=True)
    lo = pol(pooled, tokens, mask, budget=torch.full((3,), 0.2))
    hi = pol(pooled, tokens, mask, budget=torch.full((3,), 0.9))
    assert not torch.allclose(lo[0], hi[0]) and not torch.allclose(lo[1], hi[1])
    with pytest.raises(ValueError, match="built with budget_input=True: pass budget"):
        pol(pooled, tokens, mask)
    with pytest.raises(ValueError, match=r"budget must lie in \[0, 1\]"):
        pol(pooled, budget=torch.tensor([0.5, 1.5, 0.2]))
    with pytest.raises(ValueError, match=r"expects budget \[3\]"):
        pol(pooled, budget=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="built without budget_input"):
        SkipPolicy(D, BITS)(pooled, budget=torch.full((3,), 0.5))


def test_length_input_tells_lengths_apart_and_is_required():
    """Two inputs with the same pooled vector but different lengths: only a length-reading policy differs."""
    pooled, tokens, mask = _inputs()
    same = pooled[:1].expand(3, -1)
    torch.manual_seed(0)
    pol = SkipPolicy(D, BITS, length_input=True, init_keep_logit=0.0)
    torch.nn.init.normal_(pol.bit_out.weight)  # out of the near-constant start, so inputs show
    bits = pol(same, tokens, mask)[0]
    assert not torch.allclose(bits[0], bits[1]) and not torch.allclose(bits[1], bits[2])
    plain = SkipPolicy(D, BITS, init_keep_logit=0.0)
    torch.nn.init.normal_(plain.bit_out.weight)
    b = plain(same, tokens, mask)[0]
    torch.testing.assert_close(b[0], b[1])
    assert pol.init_kwargs["length_input"] is True
    with pytest.raises(ValueError, match="built with length_input=True: pass tokens and token_mask"):
        pol(pooled)


def test_gradients_reach_every_parameter():
    pooled, tokens, mask = _inputs()
    pol = SkipPolicy(D, BITS, budget_input=True, init_keep_logit=0.5)
    _, _, lp, ent = pol.sample(pooled, tokens, mask, budget=torch.tensor([0.1, 0.5, 0.9]))
    (-(lp * torch.tensor([1.0, -2.0, 0.5])).mean() - 0.01 * ent.mean()).backward()
    for name, p in pol.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_sampling_is_reproducible_with_a_generator():
    pooled, tokens, mask = _inputs()
    pol = SkipPolicy(D, BITS, init_keep_logit=0.0)
    a = pol.sample(pooled, tokens, mask, generator=torch.Generator().manual_seed(3))
    b = pol.sample(pooled, tokens, mask, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_flops_count_and_share_of_a_bart_base_forward():
    pol = SkipPolicy(D, BITS, hidden=8)
    trunk, bits, ctx, tok = 2 * (D * 8), 2 * (8 * BITS), 2 * (8 * 8), 2 * (D * 8 + 8 * 1)
    assert pol.flops(5) == trunk + bits + ctx + 5 * tok
    assert SkipPolicy(D, BITS, hidden=8, token_head=False).flops(5) == trunk + bits
    assert SkipPolicy(D, BITS, hidden=8, budget_input=True).flops(5) == pol.flops(5) + 2 * 8
    for p in (pol, SkipPolicy(D, BITS, hidden=8, token_head=False)):  # a batch of lengths in one call
        lengths = torch.tensor([1, 5, 37])
        batch = p.flops(lengths)
        assert batch.dtype == torch.float64 and batch.tolist() == [p.flops(n) for n in (1, 5, 37)]

    # bart-base: d 768, ffn 3072, 6 + 6 layers; a short input and a one-step output is the worst case
    from transformers import BartConfig, BartForConditionalGeneration

    from rlskip.plan import Plan
    from rlskip.runtime import get_runtime

    with torch.device("meta"):  # the shapes are all the FLOPs table reads
        rt = get_runtime(BartForConditionalGeneration(BartConfig(
            vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
            decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
        )))
    base = SkipPolicy(768, rt.space.n_bits, hidden=64, budget_input=True)
    for src, steps in ((16, 1), (512, 64)):
        _, full = rt.flops(Plan.all_ones(rt.space, 1), src, steps=steps)
        assert 0 < base.flops(src) < 0.01 * float(full)


def test_observation_inputs_mask_out_padding_as_the_environment_does():
    hidden = torch.randn(2, 5, D)
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    special = torch.tensor([[1, 0, 0, 0, 1], [1, 0, 1, 0, 0]], dtype=torch.bool)
    obs = Observation(hidden, attn, torch.zeros(2, 5, dtype=torch.long), special, torch.arange(5).expand(2, 5))
    inp = observation_inputs(obs)
    assert inp["token_mask"].tolist() == attn.tolist()
    torch.testing.assert_close(inp["pooled"], obs.pooled())
    bits, keep = SkipPolicy(D, BITS).decide(**inp)
    assert bits.shape == (2, BITS) and keep.shape == (2, 5)


def test_bad_inputs_are_one_clear_error():
    pooled, tokens, mask = _inputs()
    pol = SkipPolicy(D, BITS)
    with pytest.raises(ValueError, match=r"expects pooled \[batch, 16\], got \[3, 8\]"):
        pol(pooled[:, :8])
    with pytest.raises(ValueError, match=r"expects tokens \[3, source_len, 16\]"):
        pol(pooled, tokens[:2])
    with pytest.raises(ValueError, match="token_mask as a bool tensor"):
        pol(pooled, tokens, mask.long())
    with pytest.raises(ValueError, match=r"needs token_keep \[3, 7\], got None"):
        pol.evaluate_actions(pooled, torch.ones(3, BITS), tokens, mask)
    with pytest.raises(ValueError, match=r"needs bits \[3, 10\], got \[3, 9\]"):
        pol.evaluate_actions(pooled, torch.ones(3, 9))
    with pytest.raises(ValueError, match=r"threshold must lie in \(0, 1\)"):
        pol.decide(pooled, threshold=1.0)
    with pytest.raises(ValueError, match="non-finite logits: NaN or inf in the hidden states"):
        pol.sample(torch.where(torch.arange(D) == 3, torch.nan, pooled))
    with pytest.raises(ValueError, match="n_bits must be a positive integer"):
        SkipPolicy(D, 0)


def test_without_a_bit_head_every_candidate_is_kept_and_only_tokens_are_learned():
    pooled, tokens, mask = _inputs()
    pol = SkipPolicy(D, BITS, bit_head=False, init_keep_logit=0.0)
    assert not hasattr(pol, "bit_out") and pol.init_kwargs["bit_head"] is False
    bits, keep, lp, ent = pol.sample(pooled, tokens, mask, generator=torch.Generator().manual_seed(0))
    assert bits.all() and not keep[mask].all() and not keep[mask].logical_not().all()
    for threshold in (1e-6, 0.5, 1 - 1e-9):  # the whole calibration grid keeps every candidate
        assert pol.decide(pooled, tokens, mask, threshold=threshold)[0].all()
    # the log-probability is the token decisions' alone; gradients reach the token head, and the trunk through it
    _, tok = pol(pooled, tokens, mask)
    by_hand = (torch.distributions.Bernoulli(logits=tok).log_prob(keep.float()) * mask).sum(1)
    torch.testing.assert_close(lp, by_hand)
    (-lp.sum()).backward()
    assert all(p.grad is not None for p in pol.parameters())
    assert pol.flops(7) < SkipPolicy(D, BITS, init_keep_logit=0.0).flops(7)
    with pytest.raises(ValueError, match="needs a bit head or a token head"):
        SkipPolicy(D, BITS, bit_head=False, token_head=False)


def test_token_features_see_position_and_scale_and_ignore_padding_side():
    """The token head with ``token_features`` reads each token's place among the real tokens and its relative
    scale: identical hidden states at different places get different logits, the same row padded on the
    left gets the same logits, and scaling a whole row changes nothing (both are relative)."""
    torch.manual_seed(0)
    pol = SkipPolicy(D, BITS, token_features=True, init_keep_logit=0.0)
    torch.nn.init.normal_(pol.token_out.weight)  # out of the near-constant start, so inputs show
    same = torch.randn(1, 1, D).expand(1, 6, D).clone()
    mask = torch.ones(1, 6, dtype=torch.bool)
    tok = pol(same.mean(1), same, mask)[1][0]
    assert (tok[1:] - tok[:-1]).abs().min() > 1e-6  # position alone tells them apart
    plain = SkipPolicy(D, BITS, init_keep_logit=0.0)
    torch.testing.assert_close(plain(same.mean(1), same, mask)[1][0], plain(same.mean(1), same, mask)[1][0, :1].expand(6))
    # scale: one token 10x larger than its identical neighbours stands out; the whole row 10x larger does not
    bigger = same.clone()
    bigger[0, 2] *= 10
    assert (pol(same.mean(1), bigger, mask)[1][0, 2] - tok[2]).abs() > 1e-4
    pooled, tokens, m = _inputs(batch=1, seq=5)
    base = pol(pooled, tokens, m)[1]
    torch.testing.assert_close(pol(pooled, tokens * 10, m)[1], base, rtol=1e-4, atol=1e-4)
    # left padding: two pad columns in front, the real tokens' logits unchanged
    left = torch.cat([torch.randn(1, 2, D), tokens], 1)
    left_mask = torch.cat([torch.zeros(1, 2, dtype=torch.bool), m], 1)
    torch.testing.assert_close(pol(pooled, left, left_mask)[1][:, 2:], base, rtol=1e-5, atol=1e-5)
    assert pol.flops(5) > plain.flops(5)  # two more inputs to the token head's first layer


def test_lead_prior_starts_at_the_lead_plan_of_each_row_and_is_learned():
    """With ``lead_prior`` f an untrained token head keeps (probability > 0.5) about the first f of each row's
    decided tokens, whatever the row's length and padding; the position term is a trained parameter; bad f and
    a prior without a token head are one clear error each."""
    torch.manual_seed(0)
    pol = SkipPolicy(D, BITS, lead_prior=0.4)
    lengths = [10, 25]
    tokens = torch.randn(2, 30, D)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[0, 5:15] = True  # 10 decided tokens, 5 padding columns in front
    mask[1, :25] = True
    _, logits = pol(tokens.mean(1), tokens, mask)
    for row, n in enumerate(lengths):
        keep = (torch.sigmoid(logits[row][mask[row]]) > 0.5).tolist()
        k = sum(keep)
        assert keep == [True] * k + [False] * (n - k)  # a prefix of the row
        assert abs(k / n - 0.4) <= 1.0 / n + 0.03
    assert logits[~mask].abs().max() == 0
    loss = torch.sigmoid(logits[mask]).sum()
    loss.backward()
    assert pol.token_lead.weight.grad.abs().item() > 0
    assert pol.flops(25) > SkipPolicy(D, BITS).flops(25)
    with pytest.raises(ValueError, match="lead_prior must be a fraction"):
        SkipPolicy(D, BITS, lead_prior=1.5)
    with pytest.raises(ValueError, match="needs token_head=True"):
        SkipPolicy(D, BITS, token_head=False, lead_prior=0.4)
