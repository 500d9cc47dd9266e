"""The skip environments end to end on real benchmark files (local-file path) with the real BART tokenizer.

Tiny random BARTs stand in for trained ones: these tests are about data, tokenisation, execution, scoring and
the API, not about quality. They skip with a reason when ../shared/data is absent.
"""

from __future__ import annotations

import gc
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from rouge_score import rouge_scorer
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from transformers import BartForConditionalGeneration, BartForSequenceClassification

from rlskip.envs import SkipEnv, SkipVecEnv
from rlskip.envs.tasks import get_task

from conftest import tiny_bart_config

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MAX_SRC, MAX_NEW, LIMIT = 128, 8, 8
EXPECTED_WARNINGS = ("infinity", "unconventional shape")  # unbounded hidden states; the token-state matrix
INFO_KEYS = {"index", "quality", "quality_full", "cost", "reward", "plan_bits", "tokens_kept", "text", "text_full", "budget"}

# (task name, task arguments, file under ../shared/data)
TASKS = [
    ("xsum", {}, "xsum/test_1000.jsonl"),
    ("cnn_dailymail", {}, "cnn_dailymail/test_250.jsonl"),
    ("squad", {}, "squad/validation_super_bowl_50.jsonl"),
    ("glue", {"config": "sst2"}, "glue/sst2/validation.jsonl"),
    ("glue", {"config": "mrpc"}, "glue/mrpc/validation.jsonl"),
    ("glue", {"config": "rte"}, "glue/rte/validation.jsonl"),
]
IDS = ["xsum", "cnn_dailymail", "squad", "sst2", "mrpc", "rte"]


def data_file(relative: str) -> Path:
    path = DATA / relative
    if not path.is_file():
        pytest.skip(f"real data absent: {path}")
    return path


def model_for(task, tokenizer) -> torch.nn.Module:
    """A tiny random BART of the task's kind, with the real tokenizer's vocabulary."""
    torch.manual_seed(0)
    if task.kind == "classification":
        return BartForSequenceClassification(tiny_bart_config(len(tokenizer), num_labels=task.num_labels)).eval()
    model = BartForConditionalGeneration(tiny_bart_config(len(tokenizer), init_std=0.15)).eval()
    # Favour a few frequent English words so that generated text shares words with the references and
    # ROUGE / F1 are not trivially 0 (a random 50k-word output almost never matches a reference word).
    frequent = tokenizer([" the", " of", " to", " in", " a", " and", " said", " was"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.final_logits_bias[0, [ids[0] for ids in frequent]] += 4.0
    return model


def build(env_cls, name: str, task_kwargs: dict, relative: str, tokenizer, **kw):
    task = get_task(name, **task_kwargs)
    return env_cls(
        model_for(task, tokenizer), tokenizer, task, data_files=str(data_file(relative)), limit=LIMIT,
        max_source_tokens=MAX_SRC, max_new_tokens=MAX_NEW, **kw,
    )


@pytest.mark.parametrize("name, task_kwargs, relative", TASKS, ids=IDS)
def test_check_env_on_real_data(name, task_kwargs, relative, bart_tokenizer):
    env = build(SkipEnv, name, task_kwargs, relative, bart_tokenizer, seed=0, budget_in_obs=True)
    # the checkers step one instance twice and want the same reward: with the full model's output cached from the
    # start, both steps run the same rows (a missing one rides along in the first, and batch composition moves
    # the last float bits, which can flip a near-tie token of a random model)
    env.precompute_full()
    gc.collect()  # files other tests left to the garbage collector warn now, not inside the checkers
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env, skip_render_check=True)
        sb3_check_env(env)
    # what the checkers say about the env; a ResourceWarning is the collector closing some other test's file
    said = [w for w in caught if not issubclass(w.category, ResourceWarning)]
    assert not [str(w.message) for w in said if not any(e in str(w.message) for e in EXPECTED_WARNINGS)]


@pytest.mark.parametrize("name, task_kwargs, relative", TASKS, ids=IDS)
def test_batched_rollouts_on_real_data(name, task_kwargs, relative, bart_tokenizer):
    vec = build(SkipVecEnv, name, task_kwargs, relative, bart_tokenizer, num_envs=4, seed=1)
    task = vec.rollout.task
    obs = vec.reset()
    assert obs["tokens"].shape == (4, MAX_SRC, 32)
    for step in range(2):
        _, rewards, dones, infos = vec.step(np.stack([vec.action_space.sample() for _ in range(4)]))
        assert np.isfinite(rewards).all() and dones.all()
        for info in infos:
            assert INFO_KEYS <= set(info)
            assert 0.0 <= info["quality"] <= 1.0 and 0.0 <= info["quality_full"] <= 1.0
            assert 0.0 < info["cost"] <= 1.0 + 1e-9
            assert 2 <= info["tokens_kept"] <= len(vec.rollout.source_ids[info["index"]]) <= MAX_SRC
            assert info["plan_bits"].shape == (vec.rollout.space.n_bits,)
            if task.kind == "classification":
                assert info["text"] in range(task.num_labels)
                assert info["quality"] == float(info["text"] == vec.examples[info["index"]].label)
            else:
                assert isinstance(info["text"], str)
    assert {info["index"] for info in infos} <= set(vec.full_outputs)  # cached, not recomputed per step


def test_xsum_quality_is_rouge_score_on_the_generated_text(bart_tokenizer):
    vec = build(SkipVecEnv, "xsum", {}, "xsum/test_1000.jsonl", bart_tokenizer, num_envs=4, seed=2)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    vec.reset()
    qualities = []
    for _ in range(2):
        infos = vec.step(np.stack([vec.action_space.sample() for _ in range(4)]))[3]
        for info in infos:
            reference = vec.examples[info["index"]].targets[0]
            assert info["quality"] == scorer.score(reference, info["text"])["rougeL"].fmeasure
            assert info["quality_full"] == scorer.score(reference, info["text_full"])["rougeL"].fmeasure
            qualities.append(info["quality"])
    assert max(qualities) > 0, "the comparison should include non-zero ROUGE"


def test_truncation_is_logged_once_per_env(bart_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="rlskip.envs.skip_env"):
        vec = build(SkipVecEnv, "xsum", {}, "xsum/test_1000.jsonl", bart_tokenizer, num_envs=4, seed=3)
        vec.reset()
        for _ in range(2):
            vec.step(np.stack([vec.action_space.sample() for _ in range(4)]))
    truncation = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(truncation) == 1 and vec.rollout.n_truncated > 0
    assert f"{vec.rollout.n_truncated} of {LIMIT} sources" in truncation[0].getMessage()
