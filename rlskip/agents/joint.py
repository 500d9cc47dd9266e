"""Joint generator tuning: the generator learns its task loss under the plans the policy samples.

In ``generator.mode=joint`` the learner calls :meth:`GeneratorTuner.step` after each policy step with the
instances of that batch and their sampled plans, so the generator learns to work with exactly the
sub-layers the policy tends to remove. It has its own optimiser and learning rate.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rlskip.plan import Plan


class GeneratorTuner:
    """One AdamW step of teacher-forced task loss per call, under given per-instance plans.

    Args:
        runtime: the skip-aware runtime wrapping the generator (its weights are updated in place).
        encoder: the environment's encoder (:class:`rlskip.encoding.Encoder`), so the generator is tuned on
            exactly the inputs the policy sees.
        examples: the environment's examples (indexed by the environment's instance indices).
        lr: the generator's learning rate.
    """

    def __init__(self, runtime, encoder, examples: Sequence, lr: float) -> None:
        self.rt, self.encoder, self.examples = runtime, encoder, examples
        self.optimizer = torch.optim.AdamW(runtime.model.parameters(), lr=lr)

    def step(self, indices: Sequence[int], bits: torch.Tensor, token_keep: torch.Tensor | None) -> float:
        model = self.rt.model
        ids, mask, protected, labels = self.encoder.training_batch([self.examples[i] for i in indices])
        tk = None
        if token_keep is not None and self.rt.space.token_dropping:
            # the plan's keep-mask covers the input; a decoder-only row also holds the answer, always kept
            tk = torch.ones(ids.shape, dtype=torch.bool)
            width = min(ids.shape[1], token_keep.shape[1])
            tk[:, :width] = token_keep[:, :width].bool()
        model.train()
        try:
            obs = self.rt.observe(ids, mask, protected)
            _, loss = self.rt.forward(obs, Plan(self.rt.space, bits.bool(), tk), labels=labels)
            self.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            self.optimizer.step()
        finally:
            model.eval()
        return float(loss.detach())
