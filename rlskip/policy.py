"""SkipPolicy: reads the first layer's hidden states and decides, per instance, what to skip.

Two heads share one trunk over the pooled features:

- the **bit head** gives one Bernoulli logit per skippable candidate (keep = 1) from the pooled vector;
- the **token head** gives one Bernoulli logit per source token (keep = 1) from that token's hidden state
  plus the trunk's context vector, so whether a token may go can depend on the document and the budget.

With ``budget_input`` a compute budget in [0, 1] is concatenated to the pooled features, so one policy
serves several budgets chosen at inference. With ``length_input`` so is ``log(1 + n)``, ``n`` the number of
source tokens, special ones included (``token_mask.sum()``): a mean over tokens keeps little of how many
there were, and length is the first thing difficulty and cost depend on.

With ``token_features`` the token head also reads two scalars per token that its LayerNorm would otherwise
hide: the token's relative position among the real tokens (0 first, 1 last; a rotary-position model's first
layer carries little absolute position) and the log of its hidden state's RMS relative to the row's mean
(some tokens' states are far larger than the rest). Without ``bit_head`` every candidate is always kept (a
constant logit, nothing learned): the policy only drops tokens.

With ``lead_prior`` f the token logit gets a learned term ``w * position + b`` that starts as
``_LEAD_SLOPE * (f - position)``: at the start the policy keeps about the first f of each document's droppable
tokens (the lead-of-input plan, a strong prior for news summarisation) and training moves the cut, its
sharpness, and, through the content term (whose bias then starts at 0), which tokens past it survive.

Every output layer starts with tiny weights and a bias of ``init_keep_logit``: at the start nearly
everything is kept (sigmoid(3) ~ 0.95) whatever the input, so early rollouts run close to the full model
and early rewards are informative (the same reason Stable-Baselines3 initialises its action head with
gain 0.01).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Bernoulli

from rlskip.flops import mlp_flops
from rlskip.runtime.base import Observation

# output weights start this small so initial logits are ~init_keep_logit for any input
_OUT_GAIN = 0.01
# the bit logit of a policy without a bit head: sigmoid is 1.0 in float32, above every calibration threshold
_ALWAYS_KEEP = 40.0
# initial slope of the lead prior over relative position: 0.1 of a document past the cut is logit -2 (keep ~12%)
_LEAD_SLOPE = 20.0


def observation_inputs(obs: Observation) -> dict[str, torch.Tensor]:
    """The policy's inputs from a runtime observation: ``pooled``, ``tokens`` and ``token_mask``.

    The same inputs the environment's observation carries (``rlskip.envs.SkipEnv``): the mask marks the real
    tokens, special ones included, so a policy decides at inference exactly as it learned to (its length
    input counts the same tokens). The runtime keeps special tokens and removes padding whatever the token
    head says there.

    Args:
        obs: what :meth:`rlskip.runtime.base.Runtime.observe` returned.
    """
    return {"pooled": obs.pooled(), "tokens": obs.hidden, "token_mask": obs.attention_mask.clone()}


class SkipPolicy(nn.Module):
    """Bernoulli keep/skip policy over the candidates of a SkipSpace and over input tokens.

    Args:
        d_model: width of the backbone's hidden states.
        n_bits: number of skippable candidates (``SkipSpace.n_bits``).
        hidden: width of the trunk and of the token head.
        token_head: whether to decide per token (token dropping); without it token outputs are None.
        budget_input: whether a compute budget in [0, 1] is an input (then it is required).
        init_keep_logit: initial logit of every keep decision; 3.0 keeps ~95% at the start.
        length_input: whether ``log(1 + source length)`` is an input (then ``token_mask`` is required).
        token_features: whether the token head also reads each token's relative position and relative log-RMS.
        bit_head: whether the policy decides the candidates; without it every candidate is kept.
        lead_prior: the fraction f in (0, 1] of droppable tokens the token head starts by keeping, the first
            ones (see the module docstring); None: no position term.
    """

    def __init__(
        self,
        d_model: int,
        n_bits: int,
        hidden: int = 64,
        token_head: bool = True,
        budget_input: bool = False,
        init_keep_logit: float = 3.0,
        length_input: bool = False,
        token_features: bool = False,
        bit_head: bool = True,
        lead_prior: float | None = None,
    ) -> None:
        super().__init__()
        for label, v in (("d_model", d_model), ("n_bits", n_bits), ("hidden", hidden)):
            if int(v) != v or v < 1:
                raise ValueError(f"SkipPolicy {label} must be a positive integer, got {v}")
        self.init_kwargs = {
            "d_model": int(d_model), "n_bits": int(n_bits), "hidden": int(hidden), "token_head": bool(token_head),
            "budget_input": bool(budget_input), "init_keep_logit": float(init_keep_logit),
            "length_input": bool(length_input), "token_features": bool(token_features), "bit_head": bool(bit_head),
            "lead_prior": None if lead_prior is None else float(lead_prior),
        }
        if lead_prior is not None:
            if not token_head:
                raise ValueError("SkipPolicy lead_prior needs token_head=True: it shapes the token decisions")
            if not (math.isfinite(lead_prior) and 0.0 < lead_prior <= 1.0):
                raise ValueError(f"SkipPolicy lead_prior must be a fraction in (0, 1], got {lead_prior}")
        if not (token_head or bit_head):
            raise ValueError("SkipPolicy needs a bit head or a token head: it would decide nothing")
        self.d_model, self.n_bits = int(d_model), int(n_bits)
        self.budget_input = bool(budget_input)
        self.length_input = bool(length_input)
        # hidden states of different backbones (and layers) differ in scale by orders of magnitude
        self.pooled_norm = nn.LayerNorm(d_model)
        self.trunk = nn.Sequential(nn.Linear(d_model + int(budget_input) + int(length_input), hidden), nn.Tanh())
        self.bit_head = bool(bit_head)
        if self.bit_head:
            self.bit_out = nn.Linear(hidden, n_bits)
            self._init_out(self.bit_out, init_keep_logit)
        self.token_head = bool(token_head)
        self.token_features = bool(token_features) and self.token_head
        if self.token_head:
            self.token_norm = nn.LayerNorm(d_model)
            self.token_in = nn.Linear(d_model + 2 * int(self.token_features), hidden)
            self.token_ctx = nn.Linear(hidden, hidden, bias=False)  # once per row: document and budget context
            self.token_out = nn.Linear(hidden, 1)
            self._init_out(self.token_out, init_keep_logit if lead_prior is None else 0.0)
            self.token_lead = None
            if lead_prior is not None:
                self.token_lead = nn.Linear(1, 1)
                nn.init.constant_(self.token_lead.weight, -_LEAD_SLOPE)
                nn.init.constant_(self.token_lead.bias, _LEAD_SLOPE * float(lead_prior))

    @staticmethod
    def _init_out(layer: nn.Linear, bias: float) -> None:
        nn.init.orthogonal_(layer.weight, gain=_OUT_GAIN)
        nn.init.constant_(layer.bias, bias)

    # ------------------------------------------------------------------------------------------------
    def _check(self, pooled, tokens, token_mask, budget) -> None:
        if pooled.dim() != 2 or pooled.shape[1] != self.d_model:
            raise ValueError(f"SkipPolicy expects pooled [batch, {self.d_model}], got {list(pooled.shape)}")
        b = pooled.shape[0]
        if tokens is not None and (tokens.dim() != 3 or tokens.shape[0] != b or tokens.shape[2] != self.d_model):
            raise ValueError(f"SkipPolicy expects tokens [{b}, source_len, {self.d_model}], got {list(tokens.shape)}")
        if token_mask is not None:
            if tokens is None:
                raise ValueError("SkipPolicy got a token_mask without tokens")
            if token_mask.dtype != torch.bool or token_mask.shape != tokens.shape[:2]:
                raise ValueError(
                    f"SkipPolicy expects token_mask as a bool tensor {list(tokens.shape[:2])}, "
                    f"got {token_mask.dtype} {list(token_mask.shape)}"
                )
        if self.budget_input:
            if budget is None:
                raise ValueError("this SkipPolicy was built with budget_input=True: pass budget [batch] in [0, 1]")
            if budget.shape != (b,):
                raise ValueError(f"SkipPolicy expects budget [{b}], got {list(budget.shape)}")
            if not bool(((budget >= 0) & (budget <= 1)).all()):
                raise ValueError(f"budget must lie in [0, 1], got {budget.min().item():.4g}..{budget.max().item():.4g}")
        elif budget is not None:
            raise ValueError("this SkipPolicy was built without budget_input: it takes no budget")
        if self.length_input and token_mask is None:
            raise ValueError("this SkipPolicy was built with length_input=True: pass tokens and token_mask")

    def forward(
        self,
        pooled: torch.Tensor,
        tokens: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        budget: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keep logits: ``(bit_logits [B, n_bits], token_logits [B, S] or None)``.

        Args:
            pooled: ``[B, d_model]`` pooled first-layer hidden states.
            tokens: ``[B, S, d_model]`` per-token hidden states; None (or no token head) gives no token logits.
            token_mask: ``[B, S]`` bool, True where a token decision counts; logits elsewhere are 0 and
                carry no gradient (see :meth:`evaluate_actions`).
            budget: ``[B]`` compute budget in [0, 1]; required exactly when ``budget_input`` is set.
        """
        self._check(pooled, tokens, token_mask, budget)
        x = self.pooled_norm(pooled)
        if self.budget_input:
            x = torch.cat([x, budget.to(x.dtype).unsqueeze(1)], dim=1)
        if self.length_input:
            x = torch.cat([x, torch.log1p(token_mask.sum(1, keepdim=True).to(x.dtype))], dim=1)
        z = self.trunk(x)
        if self.bit_head:
            bit_logits = self.bit_out(z)
        else:
            bit_logits = torch.full((z.shape[0], self.n_bits), _ALWAYS_KEEP, dtype=z.dtype, device=z.device)
        token_logits = None
        if self.token_head and tokens is not None:
            t = self.token_norm(tokens)
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if token_mask is None else token_mask
            position = self._relative_position(mask, tokens.dtype) if self.token_features or self.token_lead is not None else None
            if self.token_features:
                t = torch.cat([t, position.unsqueeze(-1), self._relative_log_rms(tokens, mask).unsqueeze(-1)], dim=-1)
            t = torch.tanh(self.token_in(t) + self.token_ctx(z).unsqueeze(1))
            token_logits = self.token_out(t).squeeze(-1)
            if self.token_lead is not None:
                token_logits = token_logits + self.token_lead(position.unsqueeze(-1)).squeeze(-1)
            if token_mask is not None:
                # whatever sits at padded positions (even NaN) must not leak into sampling or log-probs
                token_logits = torch.where(token_mask, token_logits, torch.zeros_like(token_logits))
        # NaN hidden states (or diverged weights) would otherwise surface later as an opaque sampling error
        if not all(bool(x.isfinite().all()) for x in (bit_logits, token_logits) if x is not None):
            raise ValueError("SkipPolicy produced non-finite logits: NaN or inf in the hidden states or the policy weights")
        return bit_logits, token_logits

    @staticmethod
    def _relative_position(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[B, S]``: each token's place among the row's real tokens (``mask``), 0 first and 1 last; 0 elsewhere."""
        mf = mask.to(dtype)
        n = mf.sum(1, keepdim=True)
        return ((mf.cumsum(1) - 1).clamp_min(0) / (n - 1).clamp_min(1)) * mf

    @staticmethod
    def _relative_log_rms(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, S]``: each real token's log-RMS minus the row's mean log-RMS; 0 elsewhere."""
        mf = mask.to(tokens.dtype)
        n = mf.sum(1, keepdim=True)
        log_rms = 0.5 * torch.log(tokens.detach().pow(2).mean(-1).clamp_min(1e-12))
        log_rms = torch.where(mask, log_rms, torch.zeros_like(log_rms))
        return (log_rms - log_rms.sum(1, keepdim=True) / n.clamp_min(1)) * mf

    def evaluate_actions(
        self,
        pooled: torch.Tensor,
        bits: torch.Tensor,
        tokens: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        token_keep: torch.Tensor | None = None,
        budget: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability and entropy of given decisions, summed per instance: ``(log_prob [B], entropy [B])``.

        Token positions outside ``token_mask`` contribute neither log-probability nor entropy.

        Args:
            pooled, tokens, token_mask, budget: as in :meth:`forward`; ``token_mask`` None = every position counts.
            bits: ``[B, n_bits]`` keep decisions (bool or 0/1).
            token_keep: ``[B, S]`` token keep decisions; required when token logits are produced.
        """
        bit_logits, token_logits = self(pooled, tokens, token_mask, budget)
        if bits.shape != bit_logits.shape:
            raise ValueError(f"evaluate_actions needs bits {list(bit_logits.shape)}, got {list(bits.shape)}")
        if token_logits is not None and (token_keep is None or token_keep.shape != token_logits.shape):
            got = None if token_keep is None else list(token_keep.shape)
            raise ValueError(f"evaluate_actions needs token_keep {list(token_logits.shape)}, got {got}")
        return self._score(bit_logits, token_logits, bits, token_keep, token_mask)

    def sample(
        self,
        pooled: torch.Tensor,
        tokens: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        budget: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Sample decisions: ``(bits [B, n_bits] bool, token_keep [B, S] bool or None, log_prob [B], entropy [B])``.

        ``log_prob`` and ``entropy`` carry gradients (a REINFORCE step needs no second forward pass).
        Positions outside ``token_mask`` are set to keep: the policy decides nothing there.

        Args:
            pooled, tokens, token_mask, budget: as in :meth:`forward`.
            generator: random generator for reproducible sampling.
            noise: ``(uniforms [B, n_bits], uniforms [B, S] or None)`` in [0, 1) to decide with (keep where a
                uniform falls below the keep probability) instead of drawing: a data-parallel rank passes its rows
                of the whole batch's draw, so it samples exactly what one process would for those rows.
        """
        bit_logits, token_logits = self(pooled, tokens, token_mask, budget)
        with torch.no_grad():
            if noise is None:
                noise = (torch.rand(bit_logits.shape, generator=generator, device=bit_logits.device), None)
                if token_logits is not None:
                    noise = (noise[0], torch.rand(token_logits.shape, generator=generator, device=token_logits.device))
            bits = noise[0].to(bit_logits.device) < torch.sigmoid(bit_logits)
            token_keep = None
            if token_logits is not None:
                token_keep = noise[1].to(token_logits.device) < torch.sigmoid(token_logits)
                if token_mask is not None:
                    token_keep |= ~token_mask
        log_prob, entropy = self._score(bit_logits, token_logits, bits, token_keep, token_mask)
        return bits, token_keep, log_prob, entropy

    @staticmethod
    def _score(bit_logits, token_logits, bits, token_keep, token_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-instance sums of Bernoulli log-probabilities and entropies, token positions masked."""
        bit_dist = Bernoulli(logits=bit_logits)
        log_prob = bit_dist.log_prob(bits.to(bit_logits.dtype)).sum(1)
        entropy = bit_dist.entropy().sum(1)
        if token_logits is not None:
            tok_dist = Bernoulli(logits=token_logits)
            m = torch.ones_like(token_logits) if token_mask is None else token_mask.to(token_logits.dtype)
            log_prob = log_prob + (tok_dist.log_prob(token_keep.to(token_logits.dtype)) * m).sum(1)
            entropy = entropy + (tok_dist.entropy() * m).sum(1)
        return log_prob, entropy

    @torch.no_grad()
    def decide(
        self,
        pooled: torch.Tensor,
        tokens: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        budget: torch.Tensor | None = None,
        threshold: float = 0.5,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Deterministic decisions for inference: keep where ``sigmoid(logit) >= threshold``.

        Returns ``(bits [B, n_bits] bool, token_keep [B, S] bool or None)``; positions outside ``token_mask``
        are kept.

        Args:
            pooled, tokens, token_mask, budget: as in :meth:`forward`.
            threshold: keep probability at or above which a unit is kept, in (0, 1).
        """
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
        bit_logits, token_logits = self(pooled, tokens, token_mask, budget)
        # compared as logits: a float32 sigmoid rounds every probability within ~6e-8 of 1 to 1.0
        cut = math.log(threshold) - math.log1p(-threshold)
        bits = bit_logits >= cut
        if token_logits is None:
            return bits, None
        token_keep = token_logits >= cut
        if token_mask is not None:
            token_keep |= ~token_mask
        return bits, token_keep

    def flops(self, source_len: int | torch.Tensor) -> float | torch.Tensor:
        """FLOPs of one decision for an instance of ``source_len`` tokens (add it to the plan's cost).

        The trunk, bit head and token context run once per instance; the token head once per token.
        LayerNorms (and the token features' RMS) are not counted, as in :mod:`rlskip.flops`.

        Args:
            source_len: source tokens the token head reads (the full source: it runs before dropping); a
                tensor of lengths gives each instance's FLOPs (float64) in one call.
        """
        if torch.is_tensor(source_len):  # float64: counts stay exact integers
            source_len = source_len.to("cpu", torch.float64)
        per_row = mlp_flops(self.trunk) + (mlp_flops(self.bit_out) if self.bit_head else 0.0)
        per_token = 0.0
        if self.token_head:
            per_row += mlp_flops(self.token_ctx)
            heads = [self.token_in, self.token_out] + ([self.token_lead] if self.token_lead is not None else [])
            per_token = sum(mlp_flops(m) for m in heads)
        return per_row + per_token * source_len
