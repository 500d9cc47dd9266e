"""Backbone warm-up: task training of the backbone with random sub-layer (and token) dropping.

Before a policy can learn what to skip, the backbone must solve the task and tolerate missing sub-layers:
a generator learns its targets by teacher forcing, a classifier its labels (e.g. fine-tuning an encoder's
classification head and body on GLUE). Each training instance gets its own random plan in which every skippable sub-layer is
dropped with probability ``skip_prob`` (LayerDrop, but per sub-layer and per instance); the plan is executed
by the skip-aware runtime, so training sees exactly the computation that inference with a plan runs.

With ``distill > 0`` a step trains the full model and its sub-networks together (the sandwich rule with
in-place distillation of slimmable networks, Yu & Huang 2019; DynaBERT applies it to BERT's depth and width):
each drawn instance appears twice in one batch, once under the all-ones plan, trained on its label or target,
and once under a random plan, trained toward the all-ones row's own (detached) prediction. What a policy is
held to is agreement with the full model, and this teaches the sub-networks exactly that.

With ``token_drop > 0`` (a space with token dropping) the random plans also drop input tokens after the first
layer: each instance draws a rate uniformly in ``[0, token_drop]`` and loses each droppable token (real, not
always kept) with that probability, so the backbone learns to work from the shortened inputs a token head
makes (token-dropping training of BERT, Hou et al. 2022, in the spirit of LayerDrop). The ``"tail"`` rule drops a
random-length tail instead, the truncation a lead-keeping token head makes.

A generator can also be warmed up on its own outputs (:func:`own_targets`) instead of the references: with the
sandwich rule that is self-distillation, which leaves the full model where it was and teaches its sub-networks
to say what it says.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rlskip.encoding import Encoder
from rlskip.plan import Plan
from rlskip.runtime import get_runtime


@dataclass
class WarmupStats:
    """What :func:`train_generator` did.

    Attributes:
        loss: mean training loss over the last 10% of steps (at least one step).
        steps: optimiser steps taken.
        seconds: wall-clock training time.
        losses: loss of every step, in order.
    """

    loss: float
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)


def random_plan(space, batch_size: int, skip_prob: float, generator: torch.Generator | None = None) -> Plan:
    """A plan per instance in which each skippable sub-layer is dropped independently with ``skip_prob``."""
    bits = torch.rand(batch_size, space.n_bits, generator=generator) >= skip_prob
    return Plan(space, bits)


TOKEN_DROP_RULES = ("random", "tail")


def random_token_keep(obs, token_drop: float, generator: torch.Generator | None = None, rule: str = "random") -> torch.Tensor:
    """A keep-mask over ``obs``'s input: per instance a drop rate drawn uniformly in ``[0, token_drop]``. Rule
    ``"random"`` drops each droppable token with that probability; ``"tail"`` drops that share of the droppable
    tokens from the end, keeping a lead of random length (the truncation a lead-keeping token head makes).
    Padding is never kept, always-kept tokens always are."""
    if rule not in TOKEN_DROP_RULES:
        raise ValueError(f"token drop rule must be one of {list(TOKEN_DROP_RULES)}, got {rule!r}")
    mask = obs.attention_mask.bool().cpu()
    droppable = mask & ~obs.always_keep.bool().cpu()
    rate = torch.rand(obs.batch_size, 1, generator=generator) * token_drop
    if rule == "tail":
        rank = droppable.long().cumsum(1)
        return mask & (~droppable | (rank <= torch.ceil(droppable.sum(1, keepdim=True) * (1.0 - rate))))
    dropped = droppable & (torch.rand(mask.shape, generator=generator) < rate)
    return mask & ~dropped


def own_targets(model, encoder: Encoder, examples: list, gen_kwargs: dict, batch_size: int = 16, progress: bool = True) -> list:
    """``examples`` with each target replaced by the full model's own output for it under ``gen_kwargs`` (the run's
    decoding settings).

    A warm-up on them is self-distillation (sequence-level knowledge distillation, Kim & Rush 2016, from the
    model to its own sub-networks): the all-ones rows learn what the model already says, so the full model stays
    where it was, while the sub-networks learn to say it too. What a policy is held to is then the model the
    user brought, not one fine-tuned toward the references.
    """
    from rlskip.execute import Executor

    if not examples or any(not getattr(ex, "targets", None) for ex in examples):
        raise ValueError("own targets need generation examples: the full model's outputs replace their targets")
    rt = get_runtime(model)
    ex = Executor(rt, encoder, "generation", gen_kwargs)
    rows, _ = encoder.inputs(examples)
    model.eval()
    outputs: list[str] = []
    for i in tqdm(range(0, len(rows), batch_size), disable=not progress, desc="own targets", unit="batch"):
        obs = ex.observe(rows[i : i + batch_size])
        outputs += ex.run(obs, Plan.all_ones(rt.space, obs.batch_size)).predictions
    return [_with_target(e, p) for e, p in zip(examples, outputs)]


def _with_target(example, target: str):
    if dataclasses.is_dataclass(example):
        return dataclasses.replace(example, targets=[target])
    return SimpleNamespace(**{**vars(example), "targets": [target]})


def train_generator(
    model,
    encoder: Encoder,
    examples: list,
    *,
    steps: int | None = None,
    time_budget: float | None = None,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 0.01,
    warmup_frac: float = 0.05,
    skip_prob: float = 0.0,
    distill: float = 0.0,
    token_drop: float = 0.0,
    token_drop_rule: str = "random",
    seed: int = 0,
    progress: bool = True,
) -> WarmupStats:
    """Train ``model`` (in place) on ``examples`` under random per-instance plans: teacher forcing for a
    generator, cross-entropy on the class for a classifier.

    Args:
        model: a generator or classifier some runtime supports.
        encoder: its :class:`~rlskip.encoding.Encoder` (inputs cut to its ``max_tokens``, as everywhere else).
        examples: training instances; a generator learns the first target of each, a classifier its label.
        steps: number of optimiser steps. With ``time_budget`` too, training stops at whichever comes first.
        time_budget: seconds of training; the learning-rate schedule follows elapsed time when it binds.
        batch_size: instances per step, drawn uniformly at random with replacement.
        lr: peak AdamW learning rate; linear warm-up over ``warmup_frac`` of training, then linear decay to 0.
        weight_decay: AdamW weight decay.
        warmup_frac: fraction of training spent warming the learning rate up.
        skip_prob: probability that each skippable sub-layer is dropped, per instance and step.
        distill: weight of the in-place distillation loss (KL from the all-ones row's prediction to the
            random-plan row's); 0 trains every row on its labels alone. When > 0, a step draws
            ``batch_size // 2`` instances and runs each under both plans, so a step costs what it costs without.
        token_drop: the largest per-instance rate at which random plans drop droppable input tokens (see
            :func:`random_token_keep`); the all-ones rows of distillation keep every token. Needs a space with
            token dropping.
        token_drop_rule: ``"random"`` (tokens anywhere) or ``"tail"`` (a lead of random length kept).
        seed: seeds batch sampling and plans (and nothing global).
        progress: show a tqdm progress bar.

    Returns:
        :class:`WarmupStats` with the final loss, steps and seconds.
    """
    if steps is None and time_budget is None:
        raise ValueError("train_generator needs steps or time_budget (or both)")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if time_budget is not None and time_budget <= 0:
        raise ValueError(f"time_budget must be > 0 seconds, got {time_budget}")
    if not 0.0 <= skip_prob < 1.0:
        raise ValueError(f"skip_prob must be in [0, 1), got {skip_prob}")
    if not (math.isfinite(distill) and distill >= 0.0):
        raise ValueError(f"distill must be a weight >= 0, got {distill}")
    if distill > 0.0 and batch_size < 2:
        raise ValueError(f"distillation pairs each instance's full and sub-network rows: batch_size must be >= 2, got {batch_size}")
    if not 0.0 <= token_drop < 1.0:
        raise ValueError(f"token_drop must be a rate in [0, 1), got {token_drop}")
    if token_drop_rule not in TOKEN_DROP_RULES:
        raise ValueError(f"token_drop_rule must be one of {list(TOKEN_DROP_RULES)}, got {token_drop_rule!r}")
    rt = get_runtime(model)
    if token_drop > 0.0 and not rt.space.token_dropping:
        raise ValueError(f"token_drop needs a space with token dropping, got a {rt.space.describe()}")
    classifier = rt.head == "classifier"
    if not examples:
        raise ValueError("training needs at least one example")
    src, _ = encoder.inputs(examples)
    tgt = [ex.label for ex in examples] if classifier else encoder.labels(examples)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)

    def progress_frac(step: int, elapsed: float) -> float:
        by_steps = step / steps if steps is not None else 0.0
        by_time = elapsed / time_budget if time_budget is not None else 0.0
        return max(by_steps, by_time)

    model.train()
    losses: list[float] = []
    bar = tqdm(total=steps, disable=not progress, desc="warm-up", unit="step")
    start = time.perf_counter()
    step = 0
    try:
        while True:
            frac = progress_frac(step, time.perf_counter() - start)
            if frac >= 1.0:
                break
            scale = frac / warmup_frac if frac < warmup_frac else (1.0 - frac) / (1.0 - warmup_frac)
            for group in opt.param_groups:
                group["lr"] = lr * max(scale, 0.0)
            half = batch_size // 2 if distill > 0.0 else 0
            if distill > 0.0:
                idx = torch.randint(len(src), (half,), generator=gen).tolist() * 2
                bits = random_plan(rt.space, 2 * half, skip_prob, gen).bits
                bits[:half] = True
            else:
                idx = torch.randint(len(src), (batch_size,), generator=gen).tolist()
                bits = random_plan(rt.space, batch_size, skip_prob, gen).bits
            if classifier:
                obs = rt.observe(*encoder.batch([src[i] for i in idx]))
                y = torch.tensor([tgt[i] for i in idx])
            else:
                input_ids, mask, protected, y = encoder.training_rows([src[i] for i in idx], [tgt[i] for i in idx])
                obs = rt.observe(input_ids, mask, protected)
            keep = None
            if token_drop > 0.0:
                keep = random_token_keep(obs, token_drop, gen, token_drop_rule)
                keep[:half] = obs.attention_mask[:half].bool().cpu()  # the sandwich's full rows keep every token
            loss = plan_loss(rt, obs, Plan(rt.space, bits, keep), y, distill)
            if not math.isfinite(loss.item()):
                raise ValueError(f"the generator warm-up diverged: its loss became {loss.item()} at step {step}; lower backbone.warmup.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        bar.close()
        model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    return WarmupStats(loss=sum(tail) / len(tail), steps=step, seconds=time.perf_counter() - start, losses=losses)


def plan_loss(rt, obs, plan: Plan, targets: torch.Tensor, distill: float = 0.0) -> torch.Tensor:
    """The task loss of a batch executed under ``plan``: cross-entropy on the class for a classifier, on the
    teacher-forced targets (``-100`` ignored) for a generator.

    With ``distill > 0`` the batch is pairs (the sandwich rule): its first half runs under the all-ones plan and
    is trained on ``targets``, its second half is the same instances under sub-network plans, trained toward the
    first half's own (detached) prediction, weighted by ``distill``.
    """
    if distill <= 0.0:
        if rt.head == "classifier":
            return rt.classify(obs, plan, labels=targets).loss
        return rt.forward(obs, plan, labels=targets)[1]
    half = obs.batch_size // 2
    if rt.head == "classifier":
        logits = rt.classify(obs, plan).logits
        return F.cross_entropy(logits[:half], targets[:half]) + distill * _kl(logits[half:], logits[:half])
    logits, _ = rt.forward(obs, plan, labels=targets)  # (a seq2seq model reads its decoder inputs from them)
    target = rt.logit_targets(targets)
    ce = F.cross_entropy(logits[:half].flatten(0, 1), target[:half].flatten(), ignore_index=-100)
    scored = target[half:] != -100
    return ce + distill * _kl(logits[half:][scored], logits[:half][scored])


def _kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(teacher || student) between the softmaxes of ``[rows, classes]`` logits, the
    teacher's detached."""
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher.detach(), -1), log_target=True, reduction="batchmean")
