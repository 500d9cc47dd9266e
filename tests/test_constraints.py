"""Constraint handlers: reward orderings, feasibility, multiplier dynamics, state round trips, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlskip.constraints import CONSTRAINTS, Budget, Fixed, Lagrangian, Lexicographic, make_constraint


def test_registry_and_factory():
    assert sorted(CONSTRAINTS) == ["budget", "fixed", "lagrangian", "lexicographic"]
    assert isinstance(make_constraint("lexicographic"), Lexicographic)
    assert isinstance(make_constraint("lagrangian", max_quality_drop=0.02, lr=0.1), Lagrangian)
    assert make_constraint("fixed", lam=0.3).lam == 0.3
    assert make_constraint("budget", budget=0.5).budget == 0.5
    with pytest.raises(ValueError, match=r"unknown constraint 'lexicografic'; expected one of \['budget', 'fixed'"):
        make_constraint("lexicografic")
    with pytest.raises(ValueError, match=r"'budget' got unexpected argument\(s\) \['max_quality_drop'\]; it accepts \['budget', 'budget_range'\]"):
        make_constraint("budget", budget=0.5, max_quality_drop=0.01)
    with pytest.raises(ValueError, match=r"'fixed' needs argument\(s\) \['lam'\]"):
        make_constraint("fixed")


def test_lexicographic_reward_values():
    q = np.array([0.9, 0.85, 0.5, 0.95])
    qf = np.array([0.9, 0.9, 0.9, 0.9])
    cost = np.array([0.4, 0.7, 0.1, 1.0])
    c = Lexicographic(max_quality_drop=0.1, penalty=1.0)
    np.testing.assert_allclose(c.reward(q, qf, cost), [1.6, 1.3, -0.3, 1.0])
    np.testing.assert_array_equal(c.satisfied(q, qf, cost), [True, True, False, True])
    assert c.reward(q, qf, cost).dtype == np.float64
    # the default penalty scales only the violating rewards
    assert Lexicographic().penalty == 50.0
    np.testing.assert_allclose(Lexicographic(max_quality_drop=0.1).reward(q, qf, cost), [1.6, 1.3, -15.0, 1.0])


def test_lexicographic_penalty_sets_the_price_of_violations_in_expectation():
    """A policy choosing between 'safe' (cost 0.8, never wrong) and 'greedy' (cost 0.4, wrong 2% of the time,
    exact-match quality): the greedy one has the higher expected reward at penalty 1, not at 50."""
    def expected(c, cost, wrong):
        return (1 - wrong) * c.reward([1.0], [1.0], [cost])[0] + wrong * c.reward([0.0], [1.0], [cost])[0]

    for penalty, greedy_wins in ((1.0, True), (50.0, False)):
        c = Lexicographic(max_quality_drop=0.01, penalty=penalty)
        assert bool(expected(c, 0.4, 0.02) > expected(c, 0.8, 0.0)) == greedy_wins


def test_lexicographic_ordering_exhaustive_on_a_grid():
    """Over every pair of outcomes on a grid: satisfying beats violating, then cost, then quality decides."""
    grid = np.linspace(0.0, 1.0, 11)
    costs = np.linspace(0.0, 1.2, 13)  # a ratio slightly above 1 happens: the policy's own cost on top
    for eps, penalty in ((0.0, 1.0), (0.05, 50.0), (0.3, 1.0), (0.3, 50.0)):
        c = Lexicographic(max_quality_drop=eps, penalty=penalty)
        q, qf, cost = (a.ravel() for a in np.meshgrid(grid, grid, costs, indexing="ij"))
        r = c.reward(q, qf, cost)
        ok = c.satisfied(q, qf, cost)
        assert ok.any() and (~ok).any()
        assert r[ok].min() > r[~ok].max()
        drop = qf - q
        # among satisfying: strictly lower cost -> strictly higher reward, whatever the quality
        s = np.nonzero(ok)[0]
        ci, cj = cost[s][:, None], cost[s][None, :]
        ri, rj = r[s][:, None], r[s][None, :]
        assert np.all((ri > rj)[ci < cj]) and np.all((ri == rj)[ci == cj])
        # among violating: strictly smaller drop -> strictly higher reward, whatever the cost
        v = np.nonzero(~ok)[0]
        di, dj = drop[v][:, None], drop[v][None, :]
        ri, rj = r[v][:, None], r[v][None, :]
        assert np.all((ri > rj)[di < dj - 1e-12])


def test_lexicographic_lam_is_the_violating_fraction():
    c = Lexicographic(max_quality_drop=0.05)
    assert c.lam == 0.0
    c.update([0.9, 0.5, 0.88, 0.2], [0.9, 0.9, 0.9, 0.9], [0.5, 0.5, 0.5, 0.5])
    assert c.lam == pytest.approx(0.5)
    c.update([0.9], [0.9], [0.1])
    assert c.lam == 0.0


def test_lexicographic_rejects_costs_that_break_the_ordering():
    with pytest.raises(ValueError, match="cost .* below 2, got 2.5"):
        Lexicographic().reward([0.5], [0.5], [2.5])


def test_lagrangian_reward_is_the_negated_lagrangian():
    c = Lagrangian(max_quality_drop=0.1, lam_init=2.0, lr=0.1)
    r = c.reward(np.array([0.8, 0.5]), np.array([0.9, 0.9]), np.array([0.3, 0.6]))
    # -cost - lam * (drop - eps)
    np.testing.assert_allclose(r, [-0.3 - 2.0 * (0.1 - 0.1), -0.6 - 2.0 * (0.4 - 0.1)])
    # at equal cost, higher quality wins; at equal quality, lower cost wins
    assert c.reward(0.9, 0.9, 0.5) > c.reward(0.7, 0.9, 0.5)
    assert c.reward(0.8, 0.9, 0.2) > c.reward(0.8, 0.9, 0.5)


def test_lagrangian_multiplier_rises_under_violation_and_falls_to_zero_under_slack():
    c = Lagrangian(max_quality_drop=0.05, lam_init=1.0, lr=0.5)
    violating = (np.full(8, 0.6), np.full(8, 0.9), np.full(8, 0.4))  # drop 0.3 > 0.05
    history = [c.lam]
    for _ in range(10):
        c.update(*violating)
        history.append(c.lam)
    assert all(b > a for a, b in zip(history, history[1:]))
    np.testing.assert_allclose(history[-1], 1.0 + 10 * 0.5 * 0.25)
    slack = (np.full(8, 0.9), np.full(8, 0.9), np.full(8, 0.4))  # drop 0 < 0.05
    before = c.lam
    c.update(*slack)
    assert c.lam < before
    for _ in range(200):
        c.update(*slack)
    assert c.lam == 0.0  # projected onto lam >= 0, never negative


def test_fixed_is_a_weighted_sum_that_never_changes():
    c = Fixed(lam=0.5, max_quality_drop=0.1)
    np.testing.assert_allclose(c.reward([0.8, 0.8], [0.9, 0.9], [0.2, 0.6]), [0.7, 0.5])
    c.update([0.0], [1.0], [1.0])
    assert c.lam == 0.5
    np.testing.assert_array_equal(c.satisfied([0.85, 0.7], [0.9, 0.9], [1.0, 0.0]), [True, False])


def test_budget_ordering():
    c = Budget(budget=0.5)
    q = np.array([0.2, 0.9, 1.0, 1.0, 0.0])
    cost = np.array([0.5, 0.3, 0.6, 0.9, 0.6])
    r = c.reward(q, np.ones(5), cost)
    np.testing.assert_allclose(r, [0.2, 0.9, -0.1, -0.4, -0.1])
    ok = c.satisfied(q, np.ones(5), cost)
    np.testing.assert_array_equal(ok, [True, True, False, False, False])
    assert r[ok].min() > r[~ok].max()  # even quality 0 within budget beats quality 1 over it
    assert r[2] == r[4]  # over budget, quality earns nothing
    c.update(q, np.ones(5), cost)
    assert c.lam == pytest.approx(0.6)


@pytest.mark.parametrize(
    "name, kw", [("lexicographic", {}), ("lagrangian", {"lr": 0.3}), ("fixed", {"lam": 0.2}), ("budget", {"budget": 0.4})]
)
def test_state_dict_round_trip_through_json(name, kw):
    a = make_constraint(name, **kw)
    a.update([0.2, 0.9, 0.5], [0.9, 0.9, 0.9], [0.3, 0.9, 0.6])
    state = json.loads(json.dumps(a.state_dict()))  # it is stored in checkpoint metadata
    b = make_constraint(name, **kw)
    b.load_state_dict(state)
    assert b.lam == a.lam and b.state_dict() == a.state_dict()
    args = ([0.3, 0.8], [0.9, 0.8], [0.2, 0.35])
    np.testing.assert_array_equal(b.reward(*args), a.reward(*args))


def test_state_of_another_handler_is_refused():
    with pytest.raises(ValueError, match="cannot load the state of constraint 'lagrangian' into a 'budget' constraint"):
        Budget(0.5).load_state_dict(Lagrangian().state_dict())
    with pytest.raises(ValueError, match="lacks the field 'lam'"):
        Lagrangian().load_state_dict({"name": "lagrangian"})


@pytest.mark.parametrize(
    "args, match",
    [
        (([np.nan], [0.9], [0.5]), "quality contains NaN"),
        (([0.5], [0.9], [np.inf]), "cost contains NaN or inf"),
        (([1.5], [0.9], [0.5]), r"quality must lie in \[0, 1\]"),
        (([0.5], [-0.1], [0.5]), r"quality_full must lie in \[0, 1\]"),
        (([0.5], [0.9], [-0.2]), "cost .* must be >= 0"),
        (([0.5, 0.4], [0.9, 0.9, 0.9], [0.5]), "broadcastable shapes"),
    ],
)
@pytest.mark.parametrize("name, kw", [("lexicographic", {}), ("lagrangian", {}), ("fixed", {"lam": 1.0}), ("budget", {"budget": 0.5})])
def test_bad_inputs_are_one_clear_error(name, kw, args, match):
    c = make_constraint(name, **kw)
    with pytest.raises(ValueError, match=match):
        c.reward(*args)


@pytest.mark.parametrize(
    "name, kw, match",
    [
        ("lexicographic", {"max_quality_drop": 1.5}, r"max_quality_drop must lie in \[0, 1\]"),
        ("lexicographic", {"penalty": 0.0}, "penalty must be a finite number > 0, got 0.0"),
        ("lexicographic", {"penalty": float("inf")}, "penalty must be a finite number > 0"),
        ("lagrangian", {"lam_init": -1.0}, "lam_init must be"),
        ("lagrangian", {"lr": 0.0}, "lr must be"),
        ("fixed", {"lam": float("nan")}, "lam must be"),
        ("budget", {"budget": 0.0}, "budget must be"),
    ],
)
def test_bad_arguments_are_one_clear_error(name, kw, match):
    with pytest.raises(ValueError, match=match):
        make_constraint(name, **kw)


def test_scalars_and_arrays_broadcast():
    c = Lexicographic(max_quality_drop=0.0, penalty=1.0)
    r = c.reward(np.array([[0.5, 0.6]]), 0.6, 0.5)
    assert r.shape == (1, 2)
    np.testing.assert_allclose(r, [[-0.1, 1.5]])
    np.testing.assert_array_equal(c.satisfied([0.5, 0.6], 0.6, 0.5), [False, True])
