"""Decoding loops (greedy, sampling, beam search) over a skip-aware decoder, matching Hugging Face ``generate()``.

The runtime owns the loop because Hugging Face cache objects cannot update a subset of rows, and a plan
changes which rows run which sub-layer. The loops are model-agnostic: they drive any :class:`SkipDecoder`,
which a family builds for one batch and plan (``Runtime.decoder``).

Token selection reproduces transformers 5.x exactly: the same logits processors and sampling warpers (the
library's own classes, in the library's order), padding of finished rows, multinomial sampling from the
processed scores, and the vectorised beam search (top ``max(2, 1 + n_eos) * num_beams`` continuations,
length penalty ``score / generated_len ** length_penalty``, the same early-stopping heuristic and output
cropping). Lengths follow ``generate()``: for decoder-only models the prompt counts towards ``max_length``
and ``min_length``; an encoder-decoder's decoder prompt is its start token.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    ForcedBOSTokenLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

# Options a user may set; anything else that differs from GenerationConfig's default is refused rather than
# silently ignored.
SUPPORTED = {
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "num_beams", "length_penalty",
    "early_stopping", "no_repeat_ngram_size", "repetition_penalty", "forced_bos_token_id",
    "forced_eos_token_id", "eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id",
    "num_return_sequences", "use_cache", "output_attentions", "output_hidden_states", "do_sample",
    "temperature", "top_k", "top_p",
}


class SkipDecoder(Protocol):
    """What a family hands the search for one batch under one plan (rows = instances x beams, beams adjacent)."""

    def prefill(self) -> torch.Tensor:
        """Run the prompt (an encoder-decoder: its start token); logits ``[rows, vocab]`` of the first new token."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row at the next position; logits ``[rows, vocab]`` of the token after it."""

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Row ``i`` continues from row ``beam_idx[i]``."""


@dataclass
class SearchSettings:
    """Resolved generation settings (model defaults overridden by the caller's keyword arguments)."""

    config: GenerationConfig
    max_length: int  # total sequence length, prompt (or start token) included
    min_length: int
    prompt_len: int
    eos: list[int]
    pad: int | None
    # per instance, the padding a decoder-only prompt starts with: the repetition penalty ignores it, as
    # generate() does with the attention mask (None: no padding to ignore)
    prompt_padding: torch.Tensor | None = None

    @property
    def num_beams(self) -> int:
        return int(self.config.num_beams or 1)

    @property
    def max_new_tokens(self) -> int:
        return self.max_length - self.prompt_len

    @property
    def do_sample(self) -> bool:
        return bool(self.config.do_sample)


def resolve_settings(model_generation_config: GenerationConfig, prompt_len: int, **kwargs) -> SearchSettings:
    """Merge ``kwargs`` over the model's generation config as ``generate()`` does.

    Args:
        model_generation_config: the model's ``generation_config``.
        prompt_len: width of the prompt as ``generate()`` sees it: 1 (the start token) for an encoder-decoder,
            the (padded) prompt width for a decoder-only model.
    """
    # a shallow copy: below, options are only ever replaced (setattr), never changed in place, so the model's
    # own config and its containers stay untouched (a deep copy and to_diff_dict() cost a tenth of a
    # millisecond per batch, which a small model's short generations notice)
    cfg = copy.copy(model_generation_config)
    unknown = cfg.update(**kwargs)
    if unknown:
        raise ValueError(f"unknown generation arguments {sorted(unknown)}; supported: {sorted(SUPPORTED)}")
    # transformers 5 leaves unset options as None and fills these documented defaults inside generate()
    defaults = GenerationConfig._get_default_generation_params()
    base = _class_defaults()
    for key, val in vars(cfg).items():
        if key.startswith("_") or key == "transformers_version" or key in SUPPORTED:
            continue  # bookkeeping, and the options handled here
        if key in base and val == base[key]:
            continue  # GenerationConfig's own default: what to_diff_dict() leaves out
        if val is not None and val != defaults.get(key):
            raise ValueError(f"generation option {key}={val!r} is not supported by the skip-aware runtime")
    for key in (
        "length_penalty", "early_stopping", "num_beams", "min_length", "no_repeat_ngram_size", "repetition_penalty",
        "do_sample", "temperature", "top_k", "top_p",
    ):
        if getattr(cfg, key) is None:
            setattr(cfg, key, defaults[key])
    if cfg.max_new_tokens is None and cfg.max_length is None:
        cfg.max_new_tokens = defaults["max_length"]  # generate()'s default: 20 new tokens
    if (cfg.num_return_sequences or 1) != 1:
        raise ValueError("num_return_sequences must be 1")
    if cfg.do_sample and int(cfg.num_beams) > 1:
        raise ValueError("sampling decodes one row per instance: do_sample=True needs num_beams=1")
    max_length = cfg.max_new_tokens + prompt_len if cfg.max_new_tokens is not None else int(cfg.max_length)
    min_length = cfg.min_new_tokens + prompt_len if cfg.min_new_tokens is not None else int(cfg.min_length or 0)
    cfg.max_length, cfg.min_length = max_length, min_length
    if max_length <= prompt_len:
        raise ValueError(f"max_new_tokens must be >= 1, got a max length of {max_length} for a prompt of {prompt_len}")
    eos = cfg.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    # generate() pads finished rows with the first EOS when the model has no pad token (many decoder-only models)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else None)
    return SearchSettings(cfg, max_length, min_length, int(prompt_len), eos, pad)


@functools.cache
def _class_defaults() -> dict:
    """``GenerationConfig()``'s attributes: an option equal to its class default is not the user's choice."""
    return dict(vars(GenerationConfig()))


def logits_processors(s: SearchSettings, device: torch.device) -> LogitsProcessorList:
    """The transformers processors (and, when sampling, warpers) ``generate()`` would build, in its order."""
    cfg, procs = s.config, LogitsProcessorList()
    eos_t = torch.tensor(s.eos, device=device) if s.eos else None
    if cfg.repetition_penalty is not None and cfg.repetition_penalty != 1.0:
        padding = None if s.prompt_padding is None else s.prompt_padding.repeat_interleave(s.num_beams).to(device)
        procs.append(RepetitionPenaltyLogitsProcessor(penalty=cfg.repetition_penalty, prompt_ignore_length=padding))
    if cfg.no_repeat_ngram_size:
        procs.append(NoRepeatNGramLogitsProcessor(cfg.no_repeat_ngram_size))
    if eos_t is not None and s.min_length > 0:
        procs.append(MinLengthLogitsProcessor(s.min_length, eos_t, device=device))
    if eos_t is not None and cfg.min_new_tokens:
        procs.append(MinNewTokensLengthLogitsProcessor(s.prompt_len, cfg.min_new_tokens, eos_t, device=device))
    if cfg.forced_bos_token_id is not None:
        procs.append(ForcedBOSTokenLogitsProcessor(cfg.forced_bos_token_id))
    if cfg.forced_eos_token_id is not None:
        procs.append(ForcedEOSTokenLogitsProcessor(s.max_length, cfg.forced_eos_token_id, device=device))
    if cfg.do_sample:
        if cfg.temperature is not None and cfg.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k is not None and cfg.top_k != 0:
            procs.append(TopKLogitsWarper(top_k=cfg.top_k, min_tokens_to_keep=1))
        if cfg.top_p is not None and cfg.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=cfg.top_p, min_tokens_to_keep=1))
    return procs


def apply_processors(procs: LogitsProcessorList, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``procs(ids, scores)`` without the list's per-call ``inspect.signature`` of every processor (about a
    tenth of a small model's decoding step): each processor built above takes exactly ``(input_ids, scores)``."""
    for proc in procs:
        scores = proc(ids, scores)
    return scores


def greedy_search(
    dec: SkipDecoder, prompt: torch.Tensor, s: SearchSettings, return_margins: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Greedy decoding, or multinomial sampling when the settings say ``do_sample``.

    Args:
        dec: the decoder.
        prompt: ``[rows, prompt_len]`` ids the logits processors see before the new tokens.
        s: the settings.
        return_margins: compute each row's decision margin (greedy only; see below).
        generator: the random source of sampling (torch's global one when None, as in ``generate()``).

    Returns ``(sequences [rows, len], steps [rows], margins [rows] or None)``; finished rows are padded.

    A row's margin is the smallest gap, over the steps it decoded (EOS included), between the score of the
    token it chose and the runner-up's (scores after the logits processors; the same gap in log-probabilities).
    It says how close the row came to decoding something else: a row whose every step has a positive gap
    decodes the same tokens under any change of its logits smaller than half of it. ``inf`` when only one
    token was ever allowed. Margins cost a few small operations per step, so they are computed only on request.
    """
    n_rows, device = prompt.shape[0], prompt.device
    procs = logits_processors(s, device)
    ids = torch.full((n_rows, s.max_length), s.pad if s.pad is not None else 0, dtype=torch.long, device=device)
    ids[:, : s.prompt_len] = prompt
    eos = torch.tensor(s.eos, device=device) if s.eos else None
    unfinished = torch.ones(n_rows, dtype=torch.bool, device=device)
    steps = torch.zeros(n_rows, dtype=torch.long, device=device)
    margins = torch.full((n_rows,), float("inf"), device=device) if return_margins and not s.do_sample else None
    cur = s.prompt_len
    logits = dec.prefill()
    while True:
        scores = apply_processors(procs, ids[:, :cur], logits.float()) if procs else logits.float()
        if margins is not None:
            top = scores.topk(2, dim=-1).values
            gap = torch.nan_to_num(top[:, 0] - top[:, 1], nan=float("inf"))
            margins = torch.where(unfinished, torch.minimum(margins, gap), margins)
        if s.do_sample:
            nxt = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
        else:
            nxt = scores.argmax(-1)
        if eos is not None:
            nxt = torch.where(unfinished, nxt, s.pad)
        ids[:, cur] = nxt
        steps += unfinished.long()
        cur += 1
        if eos is not None:
            unfinished &= ~torch.isin(nxt, eos)
        if cur >= s.max_length or not bool(unfinished.any()):
            break
        logits = dec.step(nxt)
    return ids[:, :cur], steps, margins


def beam_search(dec: SkipDecoder, prompt: torch.Tensor, s: SearchSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search over ``batch * num_beams`` rows (beams of one instance adjacent).

    ``prompt`` is ``[batch, prompt_len]``. Returns ``(sequences [batch, len], steps [batch])`` where ``steps``
    counts the decoding iterations until each instance's own search was done.
    """
    batch_size, prompt_len, device = prompt.shape[0], s.prompt_len, prompt.device
    k, cfg = s.num_beams, s.config
    lp, early = float(cfg.length_penalty), cfg.early_stopping
    procs = logits_processors(s, device)
    eos = torch.tensor(s.eos, device=device) if s.eos else None
    keep = max(2, 1 + len(s.eos)) * k
    top_mask = torch.arange(keep, device=device) < k
    fill = (s.pad or s.eos[0]) if s.eos else -1
    max_len, cur = s.max_length, prompt_len

    run_seq = torch.full((batch_size, k, max_len), fill, dtype=torch.long, device=device)
    run_seq[:, :, :prompt_len] = prompt[:, None, :]
    seqs = run_seq.clone()
    run_scores = torch.zeros(batch_size, k, device=device)
    run_scores[:, 1:] = -1e9
    beam_scores = torch.full((batch_size, k), -1e9, device=device)
    finished = torch.zeros(batch_size, k, dtype=torch.bool, device=device)
    improvable = torch.ones(batch_size, 1, dtype=torch.bool, device=device)
    run_bidx = torch.full((batch_size, k, max_len - prompt_len), -1, dtype=torch.long, device=device)
    bidx = run_bidx.clone()
    offset = (torch.arange(batch_size, device=device) * k).view(-1, 1)
    steps = torch.zeros(batch_size, dtype=torch.long, device=device)
    active = torch.ones(batch_size, dtype=torch.bool, device=device)

    def gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        while idx.dim() < t.dim():
            idx = idx.unsqueeze(-1)
        return torch.take_along_dim(t, idx, dim=1)

    logits = dec.prefill()
    while True:
        flat = run_seq[:, :, :cur].reshape(batch_size * k, cur)
        logp = torch.log_softmax(logits.float(), dim=-1)
        if procs:
            logp = apply_processors(procs, flat, logp)
        vocab = logp.shape[-1]
        logp = (logp.view(batch_size, k, vocab) + run_scores[:, :, None]).view(batch_size, k * vocab)

        # top continuations over all beams
        topk_logp, topk_idx = torch.topk(logp, keep)
        src_beam = topk_idx // vocab
        topk_bidx = gather(run_bidx, src_beam)
        topk_seq = gather(run_seq, src_beam)
        topk_seq[:, :, cur] = topk_idx % vocab
        topk_bidx[:, :, cur - prompt_len] = src_beam + offset

        # which continuations hit a stopping criterion (max length or EOS)
        hits = torch.full_like(top_mask.expand(batch_size, keep), cur + 1 >= max_len)
        if eos is not None:
            hits = hits | torch.isin(topk_seq[:, :, cur], eos)

        # the best unfinished continuations keep running
        run_logp = topk_logp + hits.float() * -1e9
        nxt = torch.topk(run_logp, k)[1]
        run_seq, run_scores, run_bidx = gather(topk_seq, nxt), gather(run_logp, nxt), gather(topk_bidx, nxt)

        # finished hypotheses among the top `k` enter the finished pool if they beat it
        just = hits & top_mask[None, :]
        fin_scores = topk_logp / ((cur + 1 - prompt_len) ** lp)
        fin_scores = fin_scores + (finished.all(-1, keepdim=True) & (early is True)).float() * -1e9
        fin_scores = fin_scores + (~improvable).float() * -1e9
        fin_scores = fin_scores + (~just).float() * -1e9
        m_seq = torch.cat((seqs, topk_seq), 1)
        m_scores = torch.cat((beam_scores, fin_scores), 1)
        m_bidx = torch.cat((bidx, topk_bidx), 1)
        m_fin = torch.cat((finished, just), 1)
        best = torch.topk(m_scores, k)[1]
        seqs, beam_scores, bidx, finished = gather(m_seq, best), gather(m_scores, best), gather(m_bidx, best), gather(m_fin, best)

        cur += 1
        best_len = (max_len - prompt_len) if (early == "never" and lp > 0.0) else (cur - prompt_len)
        best_running = run_scores[:, :1] / (best_len**lp)
        worst_fin = torch.where(finished, beam_scores.min(1, keepdim=True)[0], torch.tensor(-1e9, device=device))
        improvable = improvable & (best_running > worst_fin).any(-1, keepdim=True)

        steps += active.long()
        inst_done = ~improvable[:, 0] | (finished.all(-1) & (early is True)) | hits.all(-1)
        active &= ~inst_done
        all_done = not (
            bool(improvable.any()) and not (bool(finished.all()) and early is True) and not bool(hits.all())
        )
        if all_done:
            break
        # continue the cache of the chosen beams, then feed their last tokens
        dec.reorder(run_bidx[:, :, cur - 1 - prompt_len].reshape(-1))
        logits = dec.step(run_seq[:, :, cur - 1].reshape(-1))

    seqs, bidx = seqs[:, 0], bidx[:, 0]
    out_len = prompt_len + int((bidx + 1).bool().sum(1).max())
    return seqs[:, :out_len], steps
