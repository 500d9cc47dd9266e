"""Joint generator tuning: the generator learns its task loss under the plans the policy samples.

In ``generator.mode=joint`` the learner calls :meth:`GeneratorTuner.step` after each policy step with the
instances of that batch and their sampled plans, so the generator (or classifier) learns to work with exactly
the sub-layers and tokens the policy tends to remove. It has its own optimiser and learning rate, whose state the learner
saves with its own, so a resumed joint run continues exactly.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rlskip.agents.warmup import plan_loss
from rlskip.distributed import Dist, average_gradients
from rlskip.plan import Plan


class GeneratorTuner:
    """One AdamW step of task loss per call, under given per-instance plans: teacher-forced targets for a
    generator, the class for a classifier (e.g. a BERT encoder on GLUE).

    Args:
        env: the learner's environment (a :class:`rlskip.envs.SkipVecEnv`): its runtime wraps the generator
            (updated in place), its encoder makes the inputs the policy sees, its instance indices name the
            examples; its cache of full-model outputs is cleared after each step (the full model changed), and
            the learner then observes the next instances (REINFORCE draws them after the step, ``advance``; PPO
            observes its held ones again, ``observe_again``), so the next step's policy input and execution come
            from the tuned generator, as after a resume.
        lr: the generator's learning rate.
        dist: this process's place in a data-parallel job: gradients are averaged over the ranks, so every rank
            keeps the same generator.
        distill: 0 trains each instance on its target under its sampled plan alone. > 0 is the sandwich rule of
            the warm-up (:func:`rlskip.agents.warmup.plan_loss`): each instance also runs under the all-ones plan,
            trained on its target, and the sampled plan's row is trained toward that row's prediction with this
            weight, so the full model stays anchored to the task while the policy's sub-networks learn to agree
            with it (what the quality constraint measures). A step then executes twice the rows.
    """

    def __init__(self, env, lr: float, dist: Dist | None = None, distill: float = 0.0) -> None:
        self.env, self.dist, self.distill = env, dist or Dist(), float(distill)
        self.rt, self.encoder = env.rollout.runtime, env.rollout.executor.encoder
        self.model = self.rt.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr)

    def step(self, indices: Sequence[int], bits: torch.Tensor, token_keep: torch.Tensor | None) -> float:
        model = self.rt.model
        examples = [self.env.examples[i] for i in indices]
        pairs = self.distill > 0.0
        if pairs:  # the all-ones rows first, then the same instances under their sampled plans
            examples = examples + examples
        if self.rt.head == "classifier":
            ids, mask, protected = self.encoder.encode(examples)
            targets = torch.tensor([ex.label for ex in examples])
        else:
            ids, mask, protected, targets = self.encoder.training_batch(examples)
        n = len(indices)
        plan_bits = bits.bool()
        tk = None
        if token_keep is not None and self.rt.space.token_dropping:
            # the plan's keep-mask covers the input; a decoder-only row also holds the answer, always kept
            tk = torch.ones(ids.shape, dtype=torch.bool)
            width = min(ids.shape[1], token_keep.shape[1])
            tk[-n:, :width] = token_keep[:, :width].bool()
        if pairs:
            plan_bits = torch.cat([torch.ones_like(plan_bits), plan_bits])
        device = next(model.parameters()).device
        ids, mask, targets = ids.to(device), mask.to(device), targets.to(device)
        model.train()
        try:
            obs = self.rt.observe(ids, mask, protected)
            loss = plan_loss(self.rt, obs, Plan(self.rt.space, plan_bits, tk), targets, self.distill)
            if not torch.isfinite(loss):
                raise ValueError(f"the generator diverged: its loss is {loss.item()}; lower generator.lr")
            self.optimizer.zero_grad()
            loss.backward()
            average_gradients([p for p in model.parameters() if p.requires_grad], self.dist)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            self.optimizer.step()
        finally:
            model.eval()
        self.env.full_outputs = {}  # the full model changed: its cached outputs are stale
        return float(loss.detach())

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
