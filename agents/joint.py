"""Joint generator tuning: the generator learns its task loss under the plans the policy samples.

In ``generator.mode=joint`` the learner calls :meth:`GeneratorTuner.step` after each policy step with the
instances of that batch and their sampled plans, so the generator learns to work with exactly the
sub-layers the policy tends to remove. It has its own optimiser and learning rate.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rlskip.agents.warmup import encode_pairs, pad_rows
from rlskip.plan import Plan


class GeneratorTuner:
    """One AdamW step of teacher-forced task loss per call, under given per-instance plans.

    Args:
        runtime: the skip-aware runtime wrapping the generator (its weights are updated in place).
        tokenizer: the generator's tokenizer.
        examples: the environment's examples (indexed by the environment's instance indices).
        lr: the generator's learning rate.
        max_source_tokens: source truncation, as in the environment.
    """

    def __init__(self, runtime, tokenizer, examples: Sequence, lr: float, max_source_tokens: int) -> None:
        self.rt, self.tokenizer, self.examples = runtime, tokenizer, examples
        self.max_source_tokens = max_source_tokens
        self.optimizer = torch.optim.AdamW(runtime.model.parameters(), lr=lr)

    def step(self, indices: Sequence[int], bits: torch.Tensor, token_keep: torch.Tensor | None) -> float:
        model = self.rt.model
        batch = [self.examples[i] for i in indices]
        sources, targets = encode_pairs(self.tokenizer, batch)
        sources = [s[: self.max_source_tokens] for s in sources]
        ids = pad_rows(sources, self.tokenizer.pad_token_id)
        labels = pad_rows(targets, -100)
        mask = torch.arange(ids.shape[1])[None, :] < torch.tensor([len(s) for s in sources])[:, None]
        tk = None if token_keep is None or not self.rt.space.token_dropping else token_keep[:, : ids.shape[1]].bool()
        model.train()
        try:
            obs = self.rt.observe(ids, mask)
            _, loss = self.rt.forward(obs, Plan(self.rt.space, bits.bool(), tk), labels=labels)
            self.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            self.optimizer.step()
        finally:
            model.eval()
        return float(loss.detach())
