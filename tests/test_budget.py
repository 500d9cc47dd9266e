"""One budget-conditioned policy for every budget: trained over a range, calibrated per budget, nested plans at
inference (a lower budget never costs more), per-budget TensorBoard curves, the curve in rlskip.evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlskip.train import main

from test_train import TINY

# two policies, as the default trains: the kept one is selected at the run's own budget and copied up
BUDGET = TINY + ["agent.policies=2", "constraint=budget", "constraint.budget=0.7", "constraint.budget_range=[0.4,1.0]"]
TEXTS = ["reverse 1 2 3 4 5", "copy 7 1 1 2 1 7 5 6", "sort 3 1 2 9 0", "copy 4 4 2", "sort 9 8 7 6 5 4 3 2 1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("budget") / "run"
    assert main(BUDGET + [f"run_dir={run}"]) == 0
    return run


def test_calibration_gives_a_threshold_per_budget_and_the_summary_keeps_the_table(run):
    extra = json.loads((run / "last.json").read_text())["extra"]
    grid = {float(b) for b in extra["thresholds"]}
    assert min(grid) == 0.4 and max(grid) == 1.0 and len(grid) == 13  # steps of 0.05
    summary = json.loads((run / "summary.json").read_text())
    assert [r["budget"] for r in summary["calibration"]] == sorted(grid)
    for row in summary["calibration"]:
        assert row["satisfied"] == (row["flops_upper_bound"] <= row["budget"] or row["budget"] == 1.0)


def test_lower_budgets_never_cost_more_and_outside_the_range_is_refused(run):
    """Plans are nested: a lower budget keeps a subset of the units, so at the same input and output lengths its
    plan never costs more (the generated length itself may change with the plan)."""
    import rlskip

    m = rlskip.load(run)
    obs = m.observe(TEXTS)
    steps = m.run(TEXTS, budget=1.0).steps
    previous, costs = None, []
    for b in (1.0, 0.9, 0.77, 0.7, 0.55, 0.42, 0.4):
        plan = m.source(b)(obs)[0]
        costs.append(m.runtime.flops(plan, obs.lengths, steps=steps)[0])
        if previous is not None:
            assert (plan.bits <= previous).all()
            assert (costs[-1] <= costs[-2]).all()
        previous = plan.bits
    assert (costs[-1] < costs[0]).any()  # and the budgets do cut
    for bad in (0.3, 1.5):
        with pytest.raises(ValueError, match="budget"):
            m.generate(TEXTS, budget=bad)
    with pytest.raises(ValueError, match="budget-conditioned: pass budget"):
        m.generate(TEXTS)


def test_tensorboard_has_curves_per_budget_bucket(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    kept = json.loads((run / "summary.json").read_text())["kept_policy"]  # each policy logs in its own directory
    tags = set(EventAccumulator(str(run / "policies" / str(kept) / "tb")).Reload().Tags()["scalars"])
    buckets = {t for t in tags if t.startswith("budget/")}
    assert {"budget/0.6-0.7/quality", "budget/0.6-0.7/flops_ratio"} <= buckets, sorted(buckets)


def test_evaluate_draws_the_policy_at_each_budget_beside_a_compared_policy(run, tmp_path, capsys):
    from rlskip.evaluate import main as evaluate

    fixed = tmp_path / "fixed"  # a policy trained for budget 0.7 alone, on the same generator
    same = [f"backbone.name_or_path={run / 'generator'}", "backbone.warmup.steps=null", "backbone.warmup.time_budget_s=0"]
    assert main(TINY + same + ["agent.policies=1", "constraint=budget", "constraint.budget=0.7", f"run_dir={fixed}"]) == 0
    out = tmp_path / "eval"
    args = [f"ckpt={run}", f"out={out}", "limit=8", "latency_instances=4", "latency_batch=4", "repeats=1",
            "static_search_instances=4", "progress=false", "thresholds=[2]", "budgets=[0.4,0.7,1.0]"]
    assert evaluate(args + [f"compare=[{fixed}]"]) == 0
    methods = {m["method"]: m for m in json.loads((out / "eval.json").read_text())["methods"]}
    assert {"policy@b=0.4", "policy@b=0.7", "policy@b=1", "policy:fixed", "static@b=0.7", "modal@b=0.7", "early_exit@2"} <= set(methods)
    assert evaluate(args + [f"compare=[{run}]"]) == 2
    assert "budget-conditioned" in capsys.readouterr().err
