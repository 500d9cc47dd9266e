"""Plan-aware batching (rlskip.batching): the grouping rule's properties, order restored, padding cut, and the
same outputs as FIFO batching through ``rlskip.load(...).generate``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rlskip.batching import concat_plans, fifo_batches, grouping_bits, kept_lengths, merge, plan_batches, take
from rlskip.execute import Executed
from rlskip.plan import Plan
from rlskip.runtime.base import Observation
from rlskip.space import SkipSpace

from test_inference import one_thread, trained_run  # noqa: F401  (one_thread: autouse)

SPACE = SkipSpace.encoder_decoder("bart", 3, 3)


def _bits(plan_ids: list[int], n_plans: int = 5, seed: int = 0) -> torch.Tensor:
    """Rows drawn from ``n_plans`` distinct random plans: row i takes plan ``plan_ids[i]``."""
    g = torch.Generator().manual_seed(seed)
    plans = torch.rand(n_plans, SPACE.n_bits, generator=g) < 0.5
    plans[:, 0] = torch.arange(n_plans) % 2 == 0  # distinct even if the draw repeats one
    plans[:, 1] = torch.arange(n_plans) // 2 % 2 == 0
    plans[:, 2] = torch.arange(n_plans) // 4 % 2 == 0
    return plans[torch.tensor(plan_ids)]


@pytest.mark.parametrize("max_batch", [1, 3, 4, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_aware_batches_partition_the_pool_into_as_many_batches_as_fifo(max_batch, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.multinomial(torch.tensor([8.0, 4.0, 2.0, 1.0, 1.0]), 37, replacement=True, generator=g).tolist()
    bits = _bits(ids)
    batches = plan_batches(bits, max_batch)
    assert sorted(i for b in batches for i in b) == list(range(37))
    assert all(1 <= len(b) <= max_batch for b in batches)
    assert len(batches) == len(fifo_batches(37, max_batch)) == math.ceil(37 / max_batch)
    # every group fills as many whole batches of its own plan as it can
    homogeneous = [b for b in batches if len({ids[i] for i in b}) == 1 and len(b) == max_batch]
    for plan in set(ids):
        assert sum(1 for b in homogeneous if ids[b[0]] == plan) >= ids.count(plan) // max_batch


def test_identical_plans_are_batched_together_and_fifo_is_consecutive():
    ids = [0, 1, 0, 2, 1, 0, 1, 0, 2, 0, 1, 0]  # plan 0: 6 rows, plan 1: 4, plan 2: 2
    bits = _bits(ids)
    batches = plan_batches(bits, 4)
    assert [sorted({ids[i] for i in b}) for b in batches[:2]] == [[0], [1]]  # largest group first
    assert batches[0] == [0, 2, 5, 7]  # in arrival order within a group
    assert batches[2:] == [[9, 11, 3, 8]]  # the remainders, each kept whole, largest (then earliest) first
    assert plan_batches(bits, 4, plan_aware=False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(ValueError, match="max_batch"):
        plan_batches(bits, 0)


def test_plans_that_differ_only_in_the_encoder_share_a_group():
    """A decoding step pays for every sub-layer any row keeps, an encoder sub-layer runs once on the rows that
    keep it: an encoder-decoder pool is grouped by its decoder bits; a single stack's by every bit."""
    assert [SPACE.name(i) for i in SPACE.step_bits] == [f"dec.{i}.{p}" for i in range(3) for p in ("self_attn", "cross_attn", "ffn")]
    stack = SkipSpace.single_stack("llama", 4)
    assert stack.step_bits == list(range(stack.n_bits))
    base = torch.ones(SPACE.n_bits, dtype=torch.bool)
    enc_off, dec_off = base.clone(), base.clone()
    enc_off[SPACE.bit("enc.1.ffn")] = False
    dec_off[SPACE.bit("dec.2.ffn")] = False
    plan = Plan(SPACE, torch.stack([base, dec_off, enc_off, base, dec_off, enc_off]))
    key = grouping_bits(plan)
    assert key.shape == (6, 9) and torch.equal(key[0], key[2]) and not torch.equal(key[0], key[1])
    assert plan_batches(key, 4) == [[0, 2, 3, 5], [1, 4]]  # the whole plans would give three groups
    assert plan_batches(plan.bits, 4) != plan_batches(key, 4)
    one = Plan(stack, torch.eye(stack.n_bits, dtype=torch.bool)[:3])
    assert torch.equal(grouping_bits(one), one.bits)


def test_with_lengths_each_group_is_cut_shortest_first_and_the_partition_is_kept():
    ids = [0, 1, 0, 2, 1, 0, 1, 0, 2, 0, 1, 0]  # as above: plan 0 has rows 0 2 5 7 9 11, plan 1 rows 1 4 6 10
    lengths = [9, 3, 4, 8, 7, 12, 5, 2, 1, 6, 3, 30]
    batches = plan_batches(_bits(ids), 4, lengths=lengths)
    assert batches[0] == [7, 2, 9, 0]  # plan 0's four shortest (2, 4, 6, 9 tokens)
    assert batches[1] == [1, 10, 6, 4]  # plan 1, shortest first; equal lengths (1 and 10: 3) in arrival order
    assert batches[2] == [8, 3, 5, 11]  # the leftovers (plan 0's two longest, plan 2's rows) by length
    assert sorted(i for b in batches for i in b) == list(range(12))
    # the full model's pool (one plan) becomes batches of similar lengths
    ones = torch.ones(12, SPACE.n_bits, dtype=torch.bool)
    cut = plan_batches(ones, 4, lengths=torch.tensor(lengths))
    assert [[lengths[i] for i in b] for b in cut] == [[1, 2, 3, 3], [4, 5, 6, 7], [8, 9, 12, 30]]
    assert plan_batches(ones, 4, plan_aware=False, lengths=lengths) == fifo_batches(12, 4)
    with pytest.raises(ValueError, match="lengths has 3 entries for 12 instances"):
        plan_batches(ones, 4, lengths=[1, 2, 3])


def test_kept_lengths_count_the_tokens_a_plan_keeps():
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    always = torch.zeros(3, 5, dtype=torch.bool)
    always[:, 0] = True  # e.g. a special token no plan may drop
    obs = Observation(torch.randn(3, 5, 4), mask, torch.arange(15).view(3, 5), always, torch.arange(5).expand(3, 5))
    bits = torch.ones(3, SPACE.n_bits, dtype=torch.bool)
    assert kept_lengths(obs, Plan(SPACE, bits)).tolist() == [4, 2, 5]
    keep = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)  # padding says nothing
    assert kept_lengths(obs, Plan(SPACE, bits, keep)).tolist() == [3, 1, 3]


def test_leftovers_are_chained_by_plan_similarity():
    base = torch.ones(4, SPACE.n_bits, dtype=torch.bool)
    base[1, :6] = False  # far from plan 0
    base[2, :1] = False  # one bit from plan 0
    base[3, :5] = False  # one bit from plan 1
    bits = base[torch.tensor([0, 0, 1, 2, 3])]
    flat = [i for b in plan_batches(bits, 16) for i in b]
    assert flat == [0, 1, 3, 4, 2]  # plan 0 (largest), then its nearest (2), then 3, then 1
    # by length first, and inputs of equal length stay in the chain's order
    assert [i for b in plan_batches(bits, 16, lengths=[5] * 5) for i in b] == flat
    assert [i for b in plan_batches(bits, 16, lengths=[5, 5, 1, 5, 9]) for i in b] == [2, 0, 1, 3, 4]


def test_merge_restores_pool_order_and_take_cuts_padding():
    n = 6
    batches = plan_batches(_bits([0, 1, 0, 1, 2, 0]), 2)
    parts = []
    for index in batches:
        t = torch.tensor(index, dtype=torch.float64)
        parts.append((index, Executed([f"out{i}" for i in index], t * 10, t + 100, t.long(), None, None, t.long() + 1)))
    out = merge(n, parts)
    assert out.predictions == [f"out{i}" for i in range(n)]
    assert out.flops.tolist() == [10.0 * i for i in range(n)] and out.steps.tolist() == [i + 1 for i in range(n)]
    assert out.margins is None
    with pytest.raises(ValueError, match="each of the pool"):
        merge(n + 1, parts)

    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    obs = Observation(
        torch.randn(3, 5, 4), mask, torch.arange(15).view(3, 5), torch.zeros(3, 5, dtype=torch.bool),
        torch.arange(5).expand(3, 5), state={"keys": torch.randn(3, 5, 2, 2)},
    )
    plan = Plan(SPACE, torch.ones(3, SPACE.n_bits, dtype=torch.bool), torch.rand(3, 5) < 0.5)
    sub, sub_plan = take(obs, plan, [2, 1])
    assert sub.input_ids.tolist() == [[10, 11, 12], [5, 6, 7]] and sub.state["keys"].shape == (2, 3, 2, 2)
    assert torch.equal(sub.hidden, obs.hidden[[2, 1], :3]) and torch.equal(sub_plan.token_keep, plan.token_keep[[2, 1], :3])
    full, _ = take(obs, plan, [0, 1])
    assert full.input_ids.shape == (2, 4)  # the longest of these rows

    wide = concat_plans([plan, Plan(SPACE, plan.bits[:1], plan.token_keep[:1, :2])])
    assert wide.token_keep.shape == (4, 5) and bool(wide.token_keep[3, 2:].all())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory)


def test_plan_aware_and_fifo_batching_give_each_input_what_it_gets_alone(run_dir):
    import rlskip
    from rlskip.policy import observation_inputs

    texts = [f"{op} {' '.join(str((7 * i + j) % 10) for j in range(3 + i % 5))}" for i, op in enumerate(["copy", "reverse", "sort"] * 6)]
    m = rlskip.load(run_dir, batch_size=3)
    with torch.no_grad():  # a threshold amid the policy's keep probabilities on these inputs: several plans
        m.threshold = float(torch.sigmoid(m.policy(**observation_inputs(m.observe(texts)))[0]).median())
    plans = m.decide(texts)
    assert len({tuple(r) for r in plans.bits.tolist()}) > 2, "the check needs several distinct plans"
    assert plan_batches(grouping_bits(plans), 3) != fifo_batches(len(texts), 3), "plan-aware batches should differ from FIFO"
    got_aware = m.generate(texts, return_details=True)
    m.plan_aware = False
    got_fifo = m.generate(texts, return_details=True)
    for i, text in enumerate(texts):
        alone = m.generate([text], return_details=True)[0]
        for got in (got_aware[i], got_fifo[i]):
            assert got["text"] == text and got["generation"] == alone["generation"]
            assert got["skipped"] == alone["skipped"] == plans.skipped_names(i)
            assert got["flops_ratio"] == pytest.approx(alone["flops_ratio"], rel=1e-9)
