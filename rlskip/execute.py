"""The one plan-execution path: tokenise -> observe -> plan -> execute -> outputs with FLOPs and margins.

The environment, evaluation, inference, serving and the baselines all run a batch through an
:class:`Executor`, so an instance is encoded, executed, decoded and costed the same way wherever it goes.
What decides the plan is the caller's: the policy, a baseline (:mod:`rlskip.baselines`), or the learner's
sampled actions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from rlskip.encoding import Encoder
from rlskip.plan import Plan
from rlskip.runtime.base import ClassifyOutput, GenerateOutput, Observation, Runtime

TASK_KINDS = ("generation", "classification")


@dataclass
class Executed:
    """Outputs of one executed batch.

    Attributes:
        predictions: generated texts, or class ids.
        flops: ``[batch]`` executed FLOPs (float64), the decision's own cost included.
        full_flops: ``[batch]`` FLOPs of the full model on the same input and output lengths.
        input_kept: ``[batch]`` input tokens left after token dropping.
        margins: ``[batch]`` decision margins when asked for (greedy decoding: the smallest top-1 minus top-2
            score gap over the steps; classification: the gap between the top two class logits), else None.
        plan: the plan that was executed (None for methods that do not execute plans, such as early exit).
        steps: ``[batch]`` new tokens per instance (None for classification).
    """

    predictions: list
    flops: torch.Tensor
    full_flops: torch.Tensor
    input_kept: torch.Tensor
    margins: torch.Tensor | None = None
    plan: Plan | None = None
    steps: torch.Tensor | None = None

    @property
    def flops_ratio(self) -> torch.Tensor:
        return self.flops / self.full_flops


class Executor:
    """Runs batches of one task kind through one runtime.

    Classification runs a classifier's head, or, on a backbone with an LM head, scores the first token of each
    label word as the next token after the prompt (the class is the best-scoring word).

    Args:
        runtime: the backbone's runtime.
        encoder: the backbone's :class:`~rlskip.encoding.Encoder`.
        task_kind: ``"generation"`` or ``"classification"``.
        gen_kwargs: generation options for every batch (``max_new_tokens``, ``num_beams``, ...).
        label_words: one word per class, for classification with an LM head.
    """

    def __init__(
        self, runtime: Runtime, encoder: Encoder, task_kind: str, gen_kwargs: dict[str, Any] | None = None,
        label_words: Sequence[str] | None = None,
    ):
        if task_kind not in TASK_KINDS:
            raise ValueError(f"task kind must be one of {list(TASK_KINDS)}, got {task_kind!r}")
        if task_kind == "generation" and runtime.head != "lm":
            raise ValueError("a generation task needs a generator, but the backbone is a sequence classifier")
        self.label_ids = None
        if task_kind == "classification" and runtime.head == "lm":
            if not label_words:
                raise ValueError("a classification task on a backbone with an LM head scores label words: none were given")
            self.label_ids = encoder.label_token_ids(label_words)
        self.runtime, self.encoder, self.task_kind = runtime, encoder, task_kind
        self.gen_kwargs = dict(gen_kwargs or {})
        self.device = next(runtime.model.parameters()).device

    @property
    def space(self):
        return self.runtime.space

    def observe(self, rows: Sequence[Sequence[int]]) -> Observation:
        """One batched ``observe`` of token-id rows (right-padded to the longest)."""
        ids, mask, protected = self.encoder.batch(rows)
        with torch.inference_mode():
            return self.runtime.observe(ids.to(self.device), mask.to(self.device), protected)

    def run(
        self, obs: Observation, plan: Plan, decision_flops: torch.Tensor | float | None = None, return_margins: bool = False,
        **gen_kwargs,
    ) -> Executed:
        """Execute ``plan`` on ``obs``: generate (with the executor's options, overridden by ``gen_kwargs``) or
        classify. ``decision_flops`` (per instance, or one number for all) is added to the executed FLOPs."""
        with torch.inference_mode():
            if self.task_kind == "classification":
                out = self.runtime.classify(obs, plan) if self.label_ids is None else self._score_label_words(obs, plan)
            else:
                out = self.runtime.generate(obs, plan, return_margins=return_margins, **{**self.gen_kwargs, **gen_kwargs})
        return self.finish(out, plan, decision_flops, return_margins)

    def _score_label_words(self, obs: Observation, plan: Plan) -> ClassifyOutput:
        """The LM's logits of each label word's first token as the first new token (one prefill, no decoding)."""
        rt = self.runtime
        rt.check_plan(obs, plan)
        dec, kept = rt.decoder(obs, plan, 1, obs.input_ids.shape[1] + 1)
        logits = dec.prefill()[:, self.label_ids]
        executed, full = rt.flops(plan, obs.lengths.cpu(), kept.cpu(), steps=torch.ones(obs.batch_size, dtype=torch.long))
        return ClassifyOutput(logits, None, executed, full, kept)

    def finish(
        self, out: GenerateOutput | ClassifyOutput, plan: Plan | None, decision_flops=None, return_margins: bool = False
    ) -> Executed:
        """Decode a runtime output into predictions and account its FLOPs."""
        extra = 0.0 if decision_flops is None else torch.as_tensor(decision_flops, dtype=torch.float64)
        if isinstance(out, ClassifyOutput):
            logits = out.logits.float()
            preds = logits.argmax(-1).tolist()
            margins = None
            if return_margins:
                top = logits.topk(min(2, logits.shape[-1]), dim=-1).values
                margins = top[:, 0] - top[:, -1] if top.shape[-1] == 2 else torch.full_like(top[:, 0], float("inf"))
            return Executed(preds, out.flops + extra, out.full_flops, out.input_kept.cpu(), margins, plan)
        return Executed(
            self.encoder.decode(out.new_tokens), out.flops + extra, out.full_flops, out.input_kept.cpu(), out.margins,
            plan, out.steps.cpu(),
        )
