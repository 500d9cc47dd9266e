"""The embedded ``synthetic`` task, its tokenizer and small BART config, and the generator warm-up."""

from __future__ import annotations

import pytest
import torch

from rlskip.envs.tasks.base import get_task
from rlskip.envs.tasks.synthetic import DEFAULT_OPS, OPS, SyntheticTask, small_bart_config, synthetic_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return synthetic_tokenizer()


def test_registered_with_kind_and_metric():
    task = get_task("synthetic", seed=3, n_train=10, n_eval=5)
    assert isinstance(task, SyntheticTask)
    assert (task.kind, task.metric) == ("generation", "exact_match")


def test_same_seed_same_instances_different_seed_different():
    a = SyntheticTask(seed=1, n_train=200, n_eval=50)
    b = SyntheticTask(seed=1, n_train=200, n_eval=50)
    c = SyntheticTask(seed=2, n_train=200, n_eval=50)
    for split in ("train", "validation", "test"):
        assert a.load(split) == b.load(split)
        assert [e.source for e in a.load(split)] != [e.source for e in c.load(split)]


def test_splits_are_disjoint_and_sized():
    task = SyntheticTask(seed=0, n_train=3000, n_eval=300)
    sources = {s: {e.source for e in task.load(s)} for s in ("train", "validation", "test")}
    assert len(task.load("train")) == 3000 and len(task.load("validation")) == 300 and len(task.load("test", limit=7)) == 7
    assert not sources["train"] & sources["validation"]
    assert not sources["train"] & sources["test"]
    assert not sources["validation"] & sources["test"]


def test_groups_lengths_and_targets_are_correct():
    assert {e.group for e in SyntheticTask(n_train=300).load("train")} == set(DEFAULT_OPS)
    exs = SyntheticTask(seed=0, n_train=2000, n_eval=10, ops=OPS).load("train")
    assert {e.group for e in exs} == set(OPS)
    for op in OPS:
        lengths = [e.meta["length"] for e in exs if e.group == op]
        assert min(lengths) == 4 and max(lengths) == 24  # the full spread of lengths in every group
    for e in exs:
        op, *operands = e.source.split()
        assert op == e.group
        target = e.targets[0].split()
        if op == "copy":
            assert target == operands
        elif op == "reverse":
            assert target == operands[::-1]
        elif op == "sort":
            assert target == sorted(operands)
        else:  # column pairs a0 b0 a1 b1 ..., least significant first; the sum least significant first
            a, b = (int("".join(operands[i::2][::-1])) for i in (0, 1))
            assert int("".join(target[::-1])) == a + b
            assert operands[-1] != "0" and operands[-2] != "0"  # no leading zeros


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="ops"):
        SyntheticTask(ops=("copy", "divide"))
    with pytest.raises(ValueError, match="min_len"):
        SyntheticTask(min_len=1)
    with pytest.raises(ValueError, match="split"):
        SyntheticTask().load("dev")
    with pytest.raises(ValueError, match="data files"):
        SyntheticTask().load("train", data_files="x.jsonl")


def test_exact_match_scoring():
    task = SyntheticTask(n_train=0, n_eval=3)
    exs = task.load("validation")
    preds = [exs[0].targets[0], "  " + "  ".join(exs[1].targets[0].split()) + " ", exs[2].targets[0] + " 0"]
    assert task.score(preds, exs) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="predictions"):
        task.score(preds[:2], exs)


def test_tokenizer_special_ids_and_round_trip(tokenizer):
    assert tokenizer.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    ids = tokenizer("reverse 3 9 1 4")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and len(ids) == 7
    assert tokenizer.decode(tokenizer("3 9 x")["input_ids"])  # unknown words map to <unk>, no crash
    assert tokenizer("x")["input_ids"][1] == 3
    for e in SyntheticTask(seed=5, n_train=300, n_eval=1).load("train"):
        for text in (e.source, e.targets[0]):
            assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_small_bart_config_matches_tokenizer(tokenizer):
    cfg = small_bart_config(len(tokenizer))
    assert cfg.vocab_size == len(tokenizer)
    assert (cfg.bos_token_id, cfg.pad_token_id, cfg.eos_token_id, cfg.decoder_start_token_id) == (0, 1, 2, 2)
    longest = SyntheticTask(n_train=0, n_eval=0).max_len + 3  # op word, <s>, </s>
    assert longest <= cfg.max_position_embeddings <= 128


def test_train_generator_lowers_loss_of_a_tiny_model(tokenizer):
    from transformers import BartForConditionalGeneration

    from rlskip.agents.warmup import train_generator
    from rlskip.encoding import Encoder
    from rlskip.evaluation import EvalData, run_method
    from rlskip.execute import Executor
    from rlskip.methods import planned, random_plans
    from rlskip.runtime import get_runtime

    torch.manual_seed(0)
    cfg = small_bart_config(len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=64,
                            decoder_ffn_dim=64)
    model = BartForConditionalGeneration(cfg)
    task = SyntheticTask(seed=0, n_train=500, n_eval=20, max_len=8)
    encoder = Encoder(tokenizer, 64)
    stats = train_generator(model, encoder, task.load("train"), steps=60, batch_size=16, lr=1e-2, skip_prob=0.25,
                            progress=False)
    assert stats.steps == 60 and len(stats.losses) == 60 and stats.seconds > 0
    first, last = sum(stats.losses[:10]) / 10, sum(stats.losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    assert not model.training
    ex = Executor(get_runtime(model), encoder, "generation", {"max_new_tokens": 12})
    validation = task.load("validation")
    res = run_method(ex, task, EvalData.encode(ex, validation), planned(random_plans(ex.space, 0.5)))
    assert set(res.by_group) == {e.group for e in validation}
    assert all(0.0 <= v <= 1.0 for v in res.by_group.values())


def test_train_generator_rejects_bad_settings(tokenizer):
    from transformers import BartForConditionalGeneration

    from rlskip.agents.warmup import train_generator

    from rlskip.encoding import Encoder

    model = BartForConditionalGeneration(small_bart_config(len(tokenizer), d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64))
    exs = SyntheticTask(n_train=10, n_eval=1).load("train")
    encoder = Encoder(tokenizer, 64)
    with pytest.raises(ValueError, match="steps or time_budget"):
        train_generator(model, encoder, exs)
    with pytest.raises(ValueError, match="skip_prob"):
        train_generator(model, encoder, exs, steps=1, skip_prob=1.0)
    with pytest.raises(ValueError, match="at least one example"):
        train_generator(model, encoder, [], steps=1)
