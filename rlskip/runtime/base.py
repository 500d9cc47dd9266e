"""The runtime contract: execute one backbone under a batch of per-instance plans, and count its FLOPs.

One small abstract class; one implementation per model family (``bart.py``, ...), registered by name in
:mod:`rlskip.runtime`. The runtime knows nothing of reinforcement learning: it observes inputs, executes
plans and counts FLOPs. Backbones come in three **kinds**:

- ``seq2seq`` (BART, T5): an encoder reads the source, a decoder generates; the encoder's first layer is fixed on;
- ``causal`` (Llama layout): one stack reads the prompt and generates; its first layer is fixed on;
- ``encoder`` (BERT layout): one stack reads the input and a head classifies; its first layer is fixed on.

A family implements which models it accepts (:meth:`Runtime.accepts`), its :class:`~rlskip.space.SkipSpace`,
:meth:`observe` (embeddings + the fixed-on first layer), :meth:`decoder` (the per-step pieces the shared
search needs: prefill, step, cache reorder), :meth:`forward` (teacher-forced, differentiable),
:meth:`classify`, and :meth:`flops_table`. Generation itself -- greedy, sampling and beam search -- is written
once, here and in :mod:`rlskip.runtime.search`, as are row gather/scatter (:mod:`~rlskip.runtime.rows`) and the
row-compact KV cache (:mod:`~rlskip.runtime.cache`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from rlskip.flops import plan_flops
from rlskip.plan import Plan
from rlskip.runtime.search import SearchSettings, SkipDecoder, beam_search, greedy_search, resolve_settings
from rlskip.space import SkipSpace

KINDS = ("seq2seq", "causal", "encoder")


@dataclass(frozen=True)
class ModelDims:
    """What callers outside a family may read of a backbone's shape."""

    d_model: int  # width of the hidden states the policy reads
    vocab: int
    max_positions: int | None  # longest input the model accepts (None: no absolute limit, e.g. relative positions)


@dataclass
class Observation:
    """What :meth:`Runtime.observe` computed: the first layer's output, kept so the plan does not redo it.

    Inputs may be right- or left-padded; ``attention_mask`` says which positions are real.

    Attributes:
        hidden: ``[batch, len, d_model]`` hidden states after the fixed-on first layer.
        attention_mask: ``[batch, len]`` bool, True on real tokens.
        input_ids: ``[batch, len]`` the input ids as given.
        always_keep: ``[batch, len]`` bool, True on tokens no plan may drop (special and template tokens, and
            for a decoder-only model the last prompt token).
        positions: ``[batch, len]`` each token's position (what positional embeddings read), kept through
            token dropping.
        state: family-specific tensors with the batch as first dimension (e.g. the first layer's keys and values
            of a decoder-only prompt), carried along by :meth:`rows`.
    """

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    input_ids: torch.Tensor
    always_keep: torch.Tensor
    positions: torch.Tensor
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """Number of real input tokens per instance."""
        return self.attention_mask.sum(1)

    def pooled(self) -> torch.Tensor:
        """Mean of the hidden states over real tokens: ``[batch, d_model]``, the policy's summary input."""
        m = self.attention_mask.unsqueeze(-1).to(self.hidden.dtype)
        return (self.hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def keep_mask(self, token_keep: torch.Tensor | None) -> torch.Tensor | None:
        """``[batch, len]`` the input tokens that survive a plan's token keep-mask (None when it has none): the
        mask on real tokens, plus every token no plan may drop."""
        if token_keep is None:
            return None
        return (token_keep.to(self.attention_mask.device) & self.attention_mask) | self.always_keep

    def rows(self, index: torch.Tensor | list[int]) -> "Observation":
        """The observation of a subset of instances, in the given order (padding columns kept)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.hidden.device)
        return Observation(
            *(getattr(self, f.name)[idx] for f in fields(self) if f.name != "state"),
            state={k: v[idx] for k, v in self.state.items()},
        )


@dataclass
class GenerateOutput:
    """Result of :meth:`Runtime.generate`.

    Attributes:
        sequences: ``[batch, len]`` token ids as Hugging Face ``generate()`` returns them: the prompt (a
            decoder-only model's input as given, or an encoder-decoder's start token) then the new tokens,
            finished rows padded.
        prompt_len: width of the prompt part of ``sequences``.
        steps: ``[batch]`` new tokens each instance needed (its own length, EOS included).
        flops: ``[batch]`` analytic FLOPs executed for each instance under its plan.
        full_flops: ``[batch]`` FLOPs of the full model on the same input length, steps and beams.
        input_kept: ``[batch]`` input tokens left after token dropping.
        margins: ``[batch]`` when asked for (``return_margins=True``) under greedy decoding, the smallest gap over
            each row's steps between the chosen token's score and the runner-up's
            (:func:`rlskip.runtime.search.greedy_search`); None otherwise.
    """

    sequences: torch.Tensor
    prompt_len: int
    steps: torch.Tensor
    flops: torch.Tensor
    full_flops: torch.Tensor
    input_kept: torch.Tensor
    margins: torch.Tensor | None = None

    @property
    def new_tokens(self) -> torch.Tensor:
        """``[batch, len - prompt_len]`` the generated part of ``sequences``."""
        return self.sequences[:, self.prompt_len :]

    @property
    def flops_ratio(self) -> torch.Tensor:
        return self.flops / self.full_flops


@dataclass
class ClassifyOutput:
    """Result of :meth:`Runtime.classify`: ``logits [batch, classes]``, the loss when labels were given, and
    FLOPs as in :class:`GenerateOutput`."""

    logits: torch.Tensor
    loss: torch.Tensor | None
    flops: torch.Tensor
    full_flops: torch.Tensor
    input_kept: torch.Tensor

    @property
    def flops_ratio(self) -> torch.Tensor:
        return self.flops / self.full_flops


class Runtime(ABC):
    """Executes one backbone under plans. Subclasses wrap a Hugging Face model without copying weights.

    Attributes set by a family: ``family`` (registry name), ``kind`` (one of :data:`KINDS`), ``space``,
    ``dims``, ``model``, and ``head``: ``"lm"`` for a model that generates, ``"classifier"`` for a model
    with a classification head.
    """

    family: ClassVar[str]
    kind: ClassVar[str]
    space: SkipSpace
    dims: ModelDims
    model: torch.nn.Module
    head: str

    @classmethod
    @abstractmethod
    def accepts(cls, model: torch.nn.Module) -> bool:
        """Whether this family can run ``model``."""

    @abstractmethod
    def observe(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, protected: torch.Tensor | None = None
    ) -> Observation:
        """Run the embeddings and the fixed-on first layer. ``protected`` (``[batch, len]`` bool) marks input
        positions no plan may drop beyond the family's own rule (prompt-template tokens); the observation's
        ``always_keep`` holds both."""

    @abstractmethod
    def decoder(self, obs: Observation, plan: Plan, beams: int, capacity: int) -> tuple[SkipDecoder, torch.Tensor]:
        """A decoder for :mod:`rlskip.runtime.search` over ``batch * beams`` rows with each instance's plan held
        for every step, caches sized for ``capacity`` positions; and ``[batch]`` the input tokens it kept."""

    @abstractmethod
    def forward(
        self, obs: Observation, plan: Plan, labels: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced forward under plans: ``(logits, loss or None)``, differentiable w.r.t. the weights.

        Labels are padded with -100. A seq2seq model reads ``decoder_input_ids`` (default: the labels shifted
        right); a decoder-only model's labels align with its ``input_ids`` (the observation covers prompt and
        target) and are shifted inside, as Hugging Face does.
        """

    def logit_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """The token each of :meth:`forward`'s logit positions predicts (-100: none) for ``labels`` as
        :meth:`forward` takes them: the labels themselves for a seq2seq model."""
        return labels

    @abstractmethod
    def classify(self, obs: Observation, plan: Plan, labels: torch.Tensor | None = None) -> ClassifyOutput:
        """Sequence classification under plans (models with a classification head)."""

    @abstractmethod
    def flops_table(
        self, lengths: torch.Tensor, kept: torch.Tensor, steps: torch.Tensor | None, beams: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fixed [batch], per_candidate [batch, n_bits])`` FLOPs (see :mod:`rlskip.flops`) for inputs of
        ``lengths`` tokens of which ``kept`` survive token dropping, and ``steps`` new tokens per instance over
        ``beams`` rows (``steps=None``: classification, one pass over the input)."""

    def sublayer_influence(self, obs: Observation) -> torch.Tensor:
        """``[batch, n_bits]`` how much each skippable sub-layer changes the residual stream on these inputs
        (ShortGPT's block influence), for static pruning without search; families that measure it override this."""
        raise ValueError(f"the {self.family} family does not measure sub-layer influence; use eval.static_search=greedy")

    def generation_config(self):
        """The generation defaults ``generate()`` starts from (the model's own)."""
        return self.model.generation_config

    # ------------------------------------------------------------------------------------------------
    def prompt(self, obs: Observation) -> torch.Tensor:
        """The ids the logits processors see before the new tokens: a decoder-only model's input, left-aligned
        as ``generate()`` takes it (a right-padded batch is moved, pads first, so every row's prompt ends where
        its new tokens begin); an encoder-decoder's start token."""
        if self.kind == "causal":
            ids, mask = obs.input_ids, obs.attention_mask
            if bool(mask[:, -1].all()):
                return ids
            order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices  # padding first, then the prompt
            return ids.gather(1, order)
        cfg = self.generation_config()
        start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.bos_token_id
        if start is None:
            raise ValueError("the generation config has no decoder_start_token_id")
        return torch.full((obs.batch_size, 1), int(start), dtype=torch.long, device=obs.input_ids.device)

    def search_settings(self, obs: Observation, prompt: torch.Tensor, **gen_kwargs) -> SearchSettings:
        """Generation options merged over the model's defaults for this batch's prompt."""
        s = resolve_settings(self.generation_config(), prompt.shape[1], **gen_kwargs)
        if self.kind == "causal":  # the prompt is left-aligned: each row starts with its padding
            s.prompt_padding = prompt.shape[1] - obs.lengths
        return s

    def generate(
        self, obs: Observation, plan: Plan, return_margins: bool = False, generator: torch.Generator | None = None,
        **gen_kwargs,
    ) -> GenerateOutput:
        """Greedy, sampled or beam-search generation with each instance's plan held for every step and beam.

        Keyword arguments are Hugging Face generation options (``max_new_tokens``, ``num_beams``,
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``no_repeat_ngram_size``, ...) merged over the
        model's ``generation_config``. With an all-ones plan the tokens equal ``model.generate()``'s.
        ``return_margins``: fill ``GenerateOutput.margins`` (greedy decoding only). ``generator``: the random
        source of sampling (torch's global one when None, as in ``generate()``).
        """
        self.check_plan(obs, plan)
        if self.head != "lm":
            raise ValueError(f"this {self.family} runtime wraps a classifier: use classify(), not generate()")
        prompt = self.prompt(obs)
        s = self.search_settings(obs, prompt, **gen_kwargs)
        with torch.no_grad():
            dec, kept = self.decoder(obs, plan, s.num_beams, s.max_length)
            margins = None
            if s.num_beams == 1:
                seqs, steps, margins = greedy_search(dec, prompt, s, return_margins, generator)
            else:
                seqs, steps = beam_search(dec, prompt, s)
        (fixed, per), (full_fixed, full_per) = self.flops_tables(obs.batch_size, obs.lengths, kept, steps, s.num_beams)
        return GenerateOutput(
            seqs, s.prompt_len, steps, plan_flops(fixed, per, plan.bits), full_fixed + full_per.sum(1), kept, margins
        )

    def flops(self, plan: Plan, lengths, kept=None, steps=None, beams: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Analytic ``(executed [b], full [b])`` FLOPs of ``plan`` for inputs of ``lengths`` tokens (ints or
        ``[b]``) with ``kept`` left after token dropping (default: all) and ``steps`` new tokens (None:
        classification)."""
        (fixed, per), (ffixed, fper) = self.flops_tables(plan.batch_size, lengths, kept, steps, beams)
        return plan_flops(fixed, per, plan.bits), ffixed + fper.sum(1)

    def flops_tables(self, b: int, lengths, kept=None, steps=None, beams: int = 1):
        """:meth:`flops_table` of ``b`` instances as executed (``kept`` input tokens, default all) and of the
        full model on the same lengths: ``((fixed, per_candidate), (full_fixed, full_per_candidate))``."""
        full_len = torch.as_tensor(lengths).expand(b)
        kept = full_len if kept is None else torch.as_tensor(kept).expand(b)
        n = None if steps is None else torch.as_tensor(steps).expand(b)
        executed = self.flops_table(full_len, kept, n, beams)
        if kept is full_len or (kept.device == full_len.device and bool((kept == full_len).all())):
            return executed, executed  # no token dropped: one table serves both
        return executed, self.flops_table(full_len, full_len, n, beams)

    def check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The boolean attention mask of valid ``observe`` inputs; a one-line ValueError for anything else."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError("input_ids must be a long tensor [batch, len]")
        limit = self.dims.max_positions
        if limit is not None and input_ids.shape[1] > limit:
            raise ValueError(f"input of {input_ids.shape[1]} tokens exceeds the model's {limit} positions")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {list(mask.shape)}, expected {list(input_ids.shape)}")
        if not bool(mask.any(1).all()):
            raise ValueError("every input must have at least one real token (an empty row was given)")
        return mask

    def check_plan(self, obs: Observation, plan: Plan) -> None:
        """Raise a ValueError naming what was expected unless ``plan`` fits this backbone and batch."""
        if not isinstance(plan, Plan):
            raise ValueError(f"expected an rlskip.Plan for a {self.space.describe()}, got {type(plan).__name__}")
        self.space.check_compatible(plan.space)
        if plan.batch_size != obs.batch_size:
            raise ValueError(f"plan has {plan.batch_size} rows but the observation has {obs.batch_size} instances")
        if plan.token_keep is not None and plan.token_keep.shape[1] != obs.input_ids.shape[1]:
            raise ValueError(
                f"Plan.token_keep has {plan.token_keep.shape[1]} positions, expected the input length "
                f"{obs.input_ids.shape[1]}"
            )

    @staticmethod
    def always_keep(mask: torch.Tensor, *rules: torch.Tensor | None) -> torch.Tensor:
        """``[batch, len]`` the real tokens any of ``rules`` (bool masks, None ignored) protects from dropping."""
        keep = torch.zeros_like(mask)
        for rule in rules:
            if rule is not None:
                keep |= rule.to(mask.device).bool()
        return keep & mask

    def keep_mask(self, obs: Observation, plan: Plan) -> torch.Tensor | None:
        """``[batch, len]`` the input tokens that survive the plan (None when it drops none): the plan's keep
        mask on real tokens, plus every token no plan may drop."""
        return obs.keep_mask(plan.token_keep)
