"""The backbone warm-up's in-place distillation (sandwich steps): for a classifier, a seq2seq generator and a
decoder-only generator, distilled sub-networks end closer to their own full model than sub-networks trained on
the labels alone, from the same start, for the same steps and data. With token dropping in the random plans
(``token_drop``), plans that drop input tokens end closer to the full model than without it. Warmed up on its
own outputs (``own_targets``), a generator keeps saying what it said."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rlskip.agents.warmup import own_targets, random_plan, random_token_keep, train_generator
from rlskip.encoding import Encoder
from rlskip.envs.tasks.synthetic import SyntheticTask, small_bart_config, synthetic_tokenizer
from rlskip.plan import Plan
from rlskip.prompts import PromptFormat
from rlskip.runtime import get_runtime

MARKERS = ("copy", "sort", "reverse")
WORDS = ["copy", "sort", "reverse", "add", "1", "2", "3", "4", "5"]  # the synthetic tokenizer's own words


def _classification_examples(n: int, seed: int) -> list:
    """Five-word sentences; the label is which of three marker words comes first (the others are filler)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        words = [WORDS[i] for i in torch.randint(len(WORDS), (5,), generator=g).tolist()]
        marker = next((w for w in words if w in MARKERS), MARKERS[0])
        out.append(SimpleNamespace(source=" ".join(words), source_pair=None, label=MARKERS.index(marker)))
    return out


def _roberta(tok):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, type_vocab_size=1, num_labels=3, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    return RobertaForSequenceClassification(cfg)


def _bart(tok):
    from transformers import BartForConditionalGeneration

    torch.manual_seed(0)
    return BartForConditionalGeneration(
        small_bart_config(len(tok), d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64)
    )


def _llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=96, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    return LlamaForCausalLM(cfg)


def _sub_network_gap(model, encoder: Encoder, examples: list, classifier: bool, skip_prob: float = 0.3,
                     token_drop: float = 0.0) -> float:
    """Mean KL(full || random plan) of the predictions, over 4 seeded sets of random plans (``skip_prob``, and
    tokens dropped at rates up to ``token_drop``)."""
    rt = get_runtime(model)
    rows, _ = encoder.inputs(examples)
    gaps = []
    with torch.no_grad():
        for seed in range(4):
            g = torch.Generator().manual_seed(100 + seed)
            bits = random_plan(rt.space, len(examples), skip_prob, g).bits
            full = Plan.all_ones(rt.space, len(examples))
            if classifier:
                obs = rt.observe(*encoder.batch(rows))
            else:
                ids, mask, protected, labels = encoder.training_rows(rows, encoder.labels(examples))
                obs = rt.observe(ids, mask, protected)
            sub = Plan(rt.space, bits, random_token_keep(obs, token_drop, g) if token_drop else None)
            if classifier:
                a, b = rt.classify(obs, full).logits, rt.classify(obs, sub).logits
            else:
                scored = rt.logit_targets(labels) != -100
                a, b = rt.forward(obs, full, labels)[0][scored], rt.forward(obs, sub, labels)[0][scored]
            gaps.append(F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="batchmean"))
    return float(torch.stack(gaps).mean())


# The weight that shows it within 80 steps: a classifier's single prediction at 1 (the MiniLM configs' weight);
# a generator's per-token KL is small beside its cross-entropy, and at weight 1 the gap stays where label
# training alone leaves it (measured: tiny BART 0.069 vs 0.067 at 80 steps, 0.137 vs 0.105 at 200).
@pytest.mark.parametrize("family,weight", [("roberta-classifier", 1.0), ("bart-seq2seq", 4.0), ("llama-causal", 4.0)])
def test_distilled_sub_networks_stay_closer_to_the_full_model(family, weight):
    tok = synthetic_tokenizer()
    if family == "roberta-classifier":
        build, classifier = _roberta, True
        train, held = _classification_examples(400, 0), _classification_examples(64, 1)
        encoder = Encoder(tok, 16)
    else:
        build, classifier = (_bart if family == "bart-seq2seq" else _llama), False
        task = SyntheticTask(seed=0, n_train=400, n_eval=48, max_len=6)
        train, held = task.load("train"), task.load("validation")
        causal = family == "llama-causal"
        encoder = Encoder(tok, 48, prompt=PromptFormat("{input} =") if causal else None, causal=causal, max_target_tokens=16)
    gaps = {}
    for distill in (0.0, weight):
        model = build(tok)
        stats = train_generator(model, encoder, train, steps=80, batch_size=16, lr=5e-3, skip_prob=0.3, distill=distill,
                                seed=0, progress=False)
        assert stats.steps == 80 and not model.training
        first, last = sum(stats.losses[:10]) / 10, sum(stats.losses[-10:]) / 10
        assert last < first, (distill, first, last)  # the loss falls under both
        gaps[distill] = _sub_network_gap(model, encoder, held, classifier)
    assert gaps[weight] < 0.75 * gaps[0.0], gaps


def test_distillation_rejects_bad_settings():
    tok = synthetic_tokenizer()
    model, exs = _roberta(tok), _classification_examples(8, 0)
    with pytest.raises(ValueError, match="distill must be a weight >= 0"):
        train_generator(model, Encoder(tok, 16), exs, steps=1, distill=-1.0)
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        train_generator(model, Encoder(tok, 16), exs, steps=1, batch_size=1, distill=1.0)
    stats = train_generator(model, Encoder(tok, 16), exs, steps=3, batch_size=4, distill=1.0, token_drop=0.5, progress=False)
    assert stats.steps == 3 and all(map(math.isfinite, stats.losses))  # a classifier's warm-up runs with token drops too
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="token_drop must be a rate in"):
            train_generator(model, Encoder(tok, 16), exs, steps=1, token_drop=bad)


def test_random_token_keep_drops_only_droppable_tokens_at_rates_up_to_the_bound():
    tok = synthetic_tokenizer()
    rt = get_runtime(_roberta(tok))
    rows, _ = Encoder(tok, 16).inputs(_classification_examples(200, 0))
    obs = rt.observe(*Encoder(tok, 16).batch(rows))
    keep = random_token_keep(obs, 0.6, torch.Generator().manual_seed(0))
    mask, always = obs.attention_mask.bool(), obs.always_keep.bool()
    assert not (keep & ~mask).any() and (keep | ~(mask & always)).all()  # no padding kept, always-kept tokens kept
    droppable = mask & ~always
    rates = ((droppable & ~keep).sum(1) / droppable.sum(1)).tolist()
    # a rate drawn from U(0, 0.6) per row: 0.3 on average over 200 rows of 5 droppable words, not one rate for all
    assert 0.22 < sum(rates) / len(rates) < 0.38 and torch.tensor(rates).std() > 0.15, rates
    assert random_token_keep(obs, 0.0, torch.Generator().manual_seed(0)).equal(mask)


# Trained for the same steps from the same start with the same sandwich weight, a generator whose random plans
# also dropped prompt (causal) or source (seq2seq) tokens agrees better with its full model under plans that
# drop tokens; the causal rows' answers are never dropped. (The tiny classifier of the test above does not
# learn its marker task in this many steps without sub-layer skips, so it would compare two near-constant models.)
@pytest.mark.parametrize("family", ["bart-seq2seq", "llama-causal"])
def test_token_drop_in_the_warm_up_makes_token_dropping_plans_agree_with_the_full_model(family):
    tok = synthetic_tokenizer()
    causal = family == "llama-causal"
    build = _llama if causal else _bart
    encoder = Encoder(tok, 48, prompt=PromptFormat("{input} =") if causal else None, causal=causal, max_target_tokens=16)
    task = SyntheticTask(seed=0, n_train=400, n_eval=48, max_len=6)
    train, held = task.load("train"), task.load("validation")
    if causal:  # a training row's answer is protected: no random plan drops it
        ids, mask, protected, labels = encoder.training_rows(encoder.inputs(held)[0], encoder.labels(held))
        obs = get_runtime(build(tok)).observe(ids, mask, protected)
        keep = random_token_keep(obs, 0.9, torch.Generator().manual_seed(0))
        assert keep[labels != -100].all() and not keep[mask.bool() & (labels == -100)].all()
    gaps = {}
    for token_drop in (0.0, 0.5):
        model = build(tok)
        stats = train_generator(model, encoder, train, steps=80, batch_size=16, lr=5e-3, skip_prob=0.0, distill=4.0,
                                token_drop=token_drop, seed=0, progress=False)
        assert stats.steps == 80 and all(map(math.isfinite, stats.losses))
        assert sum(stats.losses[-10:]) < sum(stats.losses[:10])
        gaps[token_drop] = _sub_network_gap(model, encoder, held, False, skip_prob=0.0, token_drop=0.5)
    assert gaps[0.5] < 0.75 * gaps[0.0], gaps


def test_the_tail_rule_keeps_a_lead_of_random_length():
    tok = synthetic_tokenizer()
    rt = get_runtime(_roberta(tok))
    rows, _ = Encoder(tok, 16).inputs(_classification_examples(200, 0))
    obs = rt.observe(*Encoder(tok, 16).batch(rows))
    keep = random_token_keep(obs, 0.6, torch.Generator().manual_seed(0), rule="tail")
    mask, always = obs.attention_mask.bool(), obs.always_keep.bool()
    assert not (keep & ~mask).any() and (keep | ~(mask & always)).all()
    droppable = mask & ~always
    for row_keep, row_drop in zip(keep, droppable):
        kept = row_keep[row_drop].tolist()
        assert kept == sorted(kept, reverse=True) and kept[0]  # a non-empty lead, then only drops
    rates = ((droppable & ~keep).sum(1) / droppable.sum(1)).tolist()
    assert 0.15 < sum(rates) / len(rates) < 0.38 and torch.tensor(rates).std() > 0.1, rates
    with pytest.raises(ValueError, match="token drop rule must be one of"):
        random_token_keep(obs, 0.6, rule="middle")


def test_own_targets_are_what_generate_says_and_a_warm_up_on_them_keeps_the_full_model():
    """The targets ``own_targets`` makes are Hugging Face ``generate()``'s greedy outputs, one prompt at a time.
    Trained on them with the sandwich rule, the full model keeps its outputs far better than trained on the
    task's references for the same steps from the same start (a random tiny Llama says nothing like them)."""
    tok = synthetic_tokenizer()
    encoder = Encoder(tok, 48, prompt=PromptFormat("{input} ="), causal=True, max_target_tokens=16)
    task = SyntheticTask(seed=0, n_train=200, n_eval=32, max_len=6)
    train, held = task.load("train"), task.load("validation")
    settings = {"max_new_tokens": 8, "num_beams": 1}
    model = _llama(tok).eval()
    own = own_targets(model, encoder, train[:24], settings, batch_size=5, progress=False)
    assert [e.source for e in own] == [e.source for e in train[:24]] and all(len(e.targets) == 1 for e in own)
    rows, _ = encoder.inputs(train[:24])
    with torch.no_grad():
        for row, ex in zip(rows[:6], own):
            ids = torch.tensor([list(row)])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            assert ex.targets[0] == encoder.decode(out[:, ids.shape[1]:])[0]
    with pytest.raises(ValueError, match="own targets need generation examples"):
        own_targets(model, encoder, _classification_examples(3, 0), settings)

    said = own_targets(model, encoder, held, settings, progress=False)  # what the untrained model says

    def nll_of_said(m) -> float:  # teacher-forced, the full model: how surely m still says it
        rt = get_runtime(m)
        ids, mask, protected, labels = encoder.training_rows(encoder.inputs(said)[0], encoder.labels(said))
        with torch.no_grad():
            return float(rt.forward(rt.observe(ids, mask, protected), Plan.all_ones(rt.space, len(said)), labels)[1])

    nll = {"start": nll_of_said(model)}
    for name in ("reference", "own"):
        m = _llama(tok)
        data = train if name == "reference" else own_targets(m, encoder, train, settings, progress=False)
        train_generator(m, encoder, data, steps=40, batch_size=16, lr=5e-3, skip_prob=0.3, distill=4.0,
                        token_drop=0.5, token_drop_rule="tail", seed=0, progress=False)
        nll[name] = nll_of_said(m)
    assert nll["own"] < nll["start"] < nll["reference"], nll
