"""The runtime contract, checked for every registered family (tests/families/): Hugging Face's own
``generate()`` and logits as the judge of the all-ones plan, each row alone as the judge of a batch of
distinct plans, an independent identity-substituting reference as the judge of skipping, and
``torch.utils.flop_counter.FlopCounterMode`` as the judge of the FLOPs count."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import families
import families.bart  # noqa: F401  (registers its cases)
import families.llama  # noqa: F401  (registers its cases)
import families.bert  # noqa: F401
import families.t5  # noqa: F401
from rlskip.plan import Plan
from rlskip.runtime import RUNTIMES, get_runtime
from rlskip.space import SkipSpace

CASES = families.CASES
LM = [c for c in CASES.values() if c.head == "lm"]


def _ids(cases):
    return pytest.mark.parametrize("case", cases, ids=[c.id for c in cases])


def _runtime(case):
    return get_runtime(case.model)


def _plan(rt, obs, p_keep=0.6, seed=1, tokens=True):
    g = torch.Generator().manual_seed(seed)
    bits = torch.rand(obs.batch_size, rt.space.n_bits, generator=g) < p_keep
    bits[0] = True  # one all-ones row among the distinct plans
    tk = None
    if tokens and rt.space.token_dropping:
        tk = torch.rand(obs.input_ids.shape, generator=g) < 0.7
    return Plan(rt.space, bits, tk)


def _row(obs_mask, i, x):
    """Row ``i`` of a batch tensor as that instance alone: its real input positions only, when ``x`` is as wide
    as the input."""
    x = x[i : i + 1]
    return x[:, obs_mask[i]] if x.dim() >= 2 and x.shape[1] == obs_mask.shape[1] else x


def _logits(rt, obs, plan, kwargs):
    with torch.no_grad():
        if rt.head == "classifier":
            return rt.classify(obs, plan).logits
        return rt.forward(obs, plan, **kwargs)[0]


def _count(fn) -> int:
    # FlopCounterMode has no formula for the CPU flash-attention kernel; the math backend decomposes SDPA
    # into the matmuls it does count
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def test_every_registered_family_has_a_case():
    assert {get_runtime(c.model).family for c in CASES.values()} >= set(RUNTIMES), "a registered family has no contract case"


@_ids(LM)
def test_all_ones_generation_equals_hf_generate(case):
    rt = _runtime(case)
    ids, mask = case.inputs()
    obs = rt.observe(ids, mask)
    ones = Plan.all_ones(rt.space, obs.batch_size)
    lengths = set()
    for kw in case.gen_settings:
        hf = case.hf_generate(ids, mask, **kw)
        out = rt.generate(obs, ones, **kw)
        assert torch.equal(out.sequences, hf), kw
        assert torch.allclose(out.flops_ratio, torch.ones_like(out.flops_ratio))
        lengths |= set(out.steps.tolist())
    assert len(lengths) > 1, "the inputs should make rows stop at different steps"


@_ids(list(CASES.values()))
def test_all_ones_logits_equal_hf(case):
    rt = _runtime(case)
    obs_ids, obs_mask, kwargs, hf, valid = case.teacher_forced(*case.inputs())
    obs = rt.observe(obs_ids, obs_mask)
    logits = _logits(rt, obs, Plan.all_ones(rt.space, obs.batch_size), kwargs)
    if valid is not None:
        logits, hf = logits[valid], hf[valid]
    scale = hf.abs().max().item()
    assert (logits - hf).abs().max().item() <= case.atol * max(1.0, scale)


@_ids(LM)
@pytest.mark.parametrize("setting", [0, -1], ids=["first", "last"])
def test_distinct_plans_in_a_batch_equal_each_row_alone(case, setting):
    rt = _runtime(case)
    ids, mask = case.inputs()
    obs = rt.observe(ids, mask)
    plan = _plan(rt, obs)
    kw = case.gen_settings[setting]
    out = rt.generate(obs, plan, **kw)
    cfg = case.model.generation_config
    eos = kw.get("eos_token_id", cfg.eos_token_id)
    eos = eos if isinstance(eos, list) else [eos]
    # finished rows are padded as generate() pads them: beam search falls back to EOS when pad is 0 or unset
    pad = cfg.pad_token_id if kw.get("num_beams", 1) == 1 else (cfg.pad_token_id or eos[0])
    for i in range(obs.batch_size):
        alone_obs = rt.observe(_row(mask, i, ids), _row(mask, i, mask))
        tk = None if plan.token_keep is None else _row(mask, i, plan.token_keep)
        alone = rt.generate(alone_obs, Plan(rt.space, plan.bits[i : i + 1], tk), **kw)
        new = alone.new_tokens[0]
        assert torch.equal(out.new_tokens[i, : new.shape[0]], new), i
        assert pad is None or (out.new_tokens[i, new.shape[0] :] == pad).all()
        assert out.steps[i] == alone.steps[0] and out.input_kept[i] == alone.input_kept[0]
        assert torch.allclose(out.flops[i], alone.flops[0], rtol=1e-12)


@_ids(list(CASES.values()))
def test_distinct_plans_logits_equal_each_row_alone(case):
    rt = _runtime(case)
    obs_ids, obs_mask, kwargs, _, _ = case.teacher_forced(*case.inputs(), seed=3)
    obs = rt.observe(obs_ids, obs_mask)
    plan = _plan(rt, obs, seed=5)
    logits = _logits(rt, obs, plan, kwargs)
    for i in range(obs.batch_size):
        alone_obs = rt.observe(_row(obs_mask, i, obs_ids), _row(obs_mask, i, obs_mask))
        tk = None if plan.token_keep is None else _row(obs_mask, i, plan.token_keep)
        row_kwargs = {k: _row(obs_mask, i, v) for k, v in kwargs.items()}
        alone = _logits(rt, alone_obs, Plan(rt.space, plan.bits[i : i + 1], tk), row_kwargs)
        mine = _row(obs_mask, i, logits)
        assert (mine - alone).abs().max().item() <= case.atol * max(1.0, alone.abs().max().item()), i


@_ids(list(CASES.values()))
def test_skipped_sublayers_and_dropped_tokens_equal_the_identity_reference(case):
    rt = _runtime(case)
    obs_ids, obs_mask, kwargs, _, _ = case.teacher_forced(*case.inputs(), seed=7)
    obs = rt.observe(obs_ids, obs_mask)
    plan = _plan(rt, obs, p_keep=0.5, seed=7)
    logits = _logits(rt, obs, plan, kwargs)
    with torch.no_grad():
        for i in range(obs.batch_size):
            skip = set(plan.skipped_names(i))
            keep = None if plan.token_keep is None else _row(obs_mask, i, plan.token_keep | obs.always_keep)[0]
            ref = case.reference(_row(obs_mask, i, obs_ids), skip, keep, {k: _row(obs_mask, i, v) for k, v in kwargs.items()})
            mine = _row(obs_mask, i, logits)
            assert (mine - ref).abs().max().item() <= case.atol * max(1.0, ref.abs().max().item()), i


@_ids(LM)
def test_greedy_generation_under_plans_equals_redecoding_with_the_reference(case):
    """The cached, row-compact decoding equals greedy re-decoding with the no-cache reference (EOS banned by
    min_new_tokens; a forced EOS at the last step where the model's config asks for one)."""
    rt = _runtime(case)
    ids, mask = case.inputs()
    obs = rt.observe(ids, mask)
    plan = _plan(rt, obs, p_keep=0.5, seed=11)
    n_new = 6
    out = rt.generate(obs, plan, max_new_tokens=n_new, min_new_tokens=n_new)
    cfg = case.model.generation_config
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    with torch.no_grad():
        for i in range(obs.batch_size):
            skip = set(plan.skipped_names(i))
            keep = None if plan.token_keep is None else _row(mask, i, plan.token_keep | obs.always_keep)[0]
            new: list[int] = []
            for t in range(n_new):
                nxt = case.reference_next(_row(mask, i, ids), skip, keep, new).clone()
                nxt[[e for e in eos if e is not None]] = float("-inf")
                forced = t == n_new - 1 and cfg.forced_eos_token_id is not None
                new.append(int(cfg.forced_eos_token_id) if forced else int(nxt.argmax()))
            assert out.new_tokens[i].tolist() == new, i


@_ids(LM)
def test_greedy_margins_equal_the_gap_in_hf_generate_scores(case):
    """A row's margin is the smallest top-1 minus top-2 score over the steps it decoded, as HF scores them."""
    rt = _runtime(case)
    ids, mask = case.inputs()
    obs = rt.observe(ids, mask)
    kw = dict(max_new_tokens=20, min_new_tokens=3)
    hf = case.model.generate(input_ids=ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True, **kw)
    ones = Plan.all_ones(rt.space, obs.batch_size)
    out = rt.generate(obs, ones, return_margins=True, **kw)
    assert torch.equal(out.sequences, hf.sequences)
    top = torch.stack(hf.scores, 1).float().topk(2, dim=-1).values
    gaps = top[..., 0] - top[..., 1]
    expected = torch.stack([gaps[r, : int(out.steps[r])].min() for r in range(obs.batch_size)])
    assert torch.allclose(out.margins, expected, atol=1e-4)
    plain = rt.generate(obs, ones, **kw)  # not asked for: not computed, and the tokens are the same
    assert plain.margins is None and torch.equal(plain.sequences, out.sequences)
    beams = [kw for kw in case.gen_settings if kw.get("num_beams", 1) > 1][:1]
    for kw in beams:
        assert rt.generate(obs, ones, return_margins=True, **kw).margins is None


@_ids([c for c in CASES.values() if c.flops_model])
def test_analytic_flops_are_what_the_runtime_executes(case):
    """FlopCounterMode on the runtime itself equals the analytic count (observation included) under distinct
    plans and token dropping, so a skipped sub-layer and a dropped token really cost nothing. Each instance runs
    alone: the analytic count is per instance at its own length, and a padded batch also computes its padding."""
    rt = _runtime(case)
    ids, mask = case.inputs()
    plan = _plan(rt, rt.observe(ids, mask), p_keep=0.5, seed=13)
    settings = [None] if rt.head == "classifier" else [
        dict(max_new_tokens=7, min_new_tokens=7), dict(max_new_tokens=7, min_new_tokens=7, num_beams=3)
    ]
    dropped = 0
    for i in range(ids.shape[0]):
        row_ids, row_mask = _row(mask, i, ids), _row(mask, i, mask)
        obs = rt.observe(row_ids, row_mask)
        tk = None if plan.token_keep is None else _row(mask, i, plan.token_keep)
        row_plan = Plan(rt.space, plan.bits[i : i + 1], tk)
        first = _count(lambda: rt.observe(row_ids, row_mask))
        for kw in settings:
            box = {}
            run = (lambda: rt.classify(obs, row_plan)) if kw is None else (lambda: rt.generate(obs, row_plan, **kw))
            measured = _count(lambda: box.update(out=run()))
            out = box["out"]
            analytic = out.flops.item()
            assert abs(analytic - (measured + first)) / analytic < 1e-6, (i, kw)
            assert i == 0 or out.flops.item() < out.full_flops.item()  # row 0 executes everything
            dropped += int(out.input_kept.item() < obs.lengths.item())
    assert plan.token_keep is None or dropped > 0


@_ids([c for c in CASES.values() if c.flops_model])
def test_full_model_flops_within_2_percent_of_flop_counter_on_hugging_face(case):
    """The analytic count of the full model against FlopCounterMode on Hugging Face's own forward or
    ``generate()``, instance by instance (a padded batch would also count its padding)."""
    rt = _runtime(case)
    ids, mask = case.inputs()
    measured = analytic = 0.0
    kw = dict(max_new_tokens=7, min_new_tokens=7)
    with torch.no_grad():
        for i in range(ids.shape[0]):
            row_ids, row_mask = _row(mask, i, ids), _row(mask, i, mask)
            obs = rt.observe(row_ids, row_mask)
            ones = Plan.all_ones(rt.space, 1)
            if rt.head == "classifier":
                measured += _count(lambda: case.model(input_ids=row_ids, attention_mask=row_mask.long()))
                analytic += rt.classify(obs, ones).full_flops.item()
            else:
                measured += _count(lambda: case.hf_generate(row_ids, row_mask, **kw))
                analytic += rt.generate(obs, ones, **kw).full_flops.item()
    assert abs(analytic - measured) / measured < 0.02


@_ids(list(CASES.values()))
def test_wrong_plans_fail_with_a_clear_error(case):
    rt = _runtime(case)
    obs = rt.observe(*case.inputs())
    other = SkipSpace.encoder_decoder("other", 7, 5)
    run = (lambda p: rt.classify(obs, p)) if rt.head == "classifier" else (lambda p: rt.generate(obs, p, max_new_tokens=2))
    with pytest.raises(ValueError, match="plan was made for a other SkipSpace"):
        run(Plan.all_ones(other, obs.batch_size))
    with pytest.raises(ValueError, match=f"plan has 1 rows but the observation has {obs.batch_size}"):
        run(Plan.all_ones(rt.space, 1))
    if rt.space.token_dropping:
        with pytest.raises(ValueError, match="token_keep has 3 positions"):
            run(Plan(rt.space, torch.ones(obs.batch_size, rt.space.n_bits, dtype=torch.bool), torch.ones(obs.batch_size, 3, dtype=torch.bool)))
    with pytest.raises(ValueError, match="expected an rlskip.Plan"):
        run(torch.ones(obs.batch_size, rt.space.n_bits, dtype=torch.bool))


@_ids(list(CASES.values()))
def test_the_other_heads_calls_fail_with_a_clear_error(case):
    rt = _runtime(case)
    obs = rt.observe(*case.inputs())
    ones = Plan.all_ones(rt.space, obs.batch_size)
    calls = [lambda: rt.classify(obs, ones)] if rt.head == "lm" else [
        lambda: rt.generate(obs, ones, max_new_tokens=2), lambda: rt.forward(obs, ones, labels=obs.input_ids),
    ]
    for call in calls:
        with pytest.raises(ValueError) as e:
            call()
        assert "\n" not in str(e.value) and str(e.value)


@_ids(list(CASES.values()))
def test_runtime_shares_weights_and_keeps_special_tokens(case):
    rt = _runtime(case)
    assert rt.model is case.model
    assert not any(isinstance(v, torch.nn.Parameter) for v in vars(rt).values())
    ids, mask = case.inputs()
    obs = rt.observe(ids, mask)
    assert not (obs.always_keep & ~obs.attention_mask).any()
    assert obs.always_keep.any(1).all(), "every input has tokens no plan may drop"
    if rt.space.token_dropping:  # dropping everything droppable leaves exactly the always-kept tokens
        drop_all = Plan(rt.space, torch.ones(obs.batch_size, rt.space.n_bits, dtype=torch.bool), torch.zeros_like(mask))
        out = rt.classify(obs, drop_all) if rt.head == "classifier" else rt.generate(obs, drop_all, max_new_tokens=3)
        assert torch.equal(out.input_kept, obs.always_keep.sum(1))
