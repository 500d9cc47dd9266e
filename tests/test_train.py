"""``python -m rlskip.train`` end to end on tiny setups: outputs, TensorBoard keys, resume, errors."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from rlskip.train import main

from conftest import DATA_DIR, tiny_bart_config

TINY = [
    "backbone.warmup.steps=20", "backbone.warmup.time_budget_s=0", "agent.iterations=4", "agent.n_envs=8",
    "env.task_kwargs.n_train=200", "+env.task_kwargs.n_eval=40", "env.max_new_tokens=30",
    "eval.limit=16", "eval.static_search_instances=8", "eval.latency_instances=8", "eval.latency_batch=4",
    "log.every=1", "log.latency_every=2", "log.checkpoint_every=2", "log.progress=false",
]


def _rows(run_dir: Path, name: str = "progress.csv") -> list[dict]:
    with open(run_dir / "tb" / name) as f:
        return list(csv.DictReader(f))


def _error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def test_default_pipeline_writes_run_directory_and_tensorboard(tmp_path):
    from rlskip.agents.trainer import select_policy
    from rlskip.checkpoint import load_checkpoint
    from rlskip.constraints import Lexicographic

    run = tmp_path / "run"
    assert main(TINY + [f"run_dir={run}"]) == 0
    for name in ("config.yaml", "skip_space.json", "last.json", "best.json", "summary.json"):
        assert (run / name).is_file(), name
    assert (run / "generator" / "config.json").is_file()
    summary = json.loads((run / "summary.json").read_text())
    for key in ("quality_full", "quality", "flops_ratio", "latency_ratio", "static_quality_at_equal_flops", "fidelity"):
        assert isinstance(summary[key], float), key
    assert summary["metrics"]["policy"] == {"exact_match": summary["quality"]}  # the task reports its one metric
    assert summary["metrics"]["full"] == {"exact_match": summary["quality_full"]}
    assert 0.0 <= summary["fidelity"] <= 1.0
    # the policy's most frequent plan given to every held-out instance
    assert isinstance(summary["modal_plan_quality"], float) and 0.0 < summary["modal_plan_share"] <= 1.0
    assert 0.0 < summary["modal_plan_flops_ratio"] <= 1.0 + 1e-9
    from rlskip.space import SkipSpace

    assert set(summary["modal_plan_skipped"]) <= set(SkipSpace.load(run / "skip_space.json").names)
    # steady-state throughput: iterations 2-4 of 8 instances each, in less time than the whole policy phase
    assert len(summary["train_instances_per_s"]) == 2
    assert min(summary["train_instances_per_s"]) > 3 * 8 / summary["seconds"]["policy"]

    # the default trains two policies, each in its own directory, and keeps the one calibration prefers
    rows = summary["policies"]
    assert [r["policy"] for r in rows] == [0, 1] and rows[0]["seed"] != rows[1]["seed"]
    assert summary["kept_policy"] == select_policy(Lexicographic(), rows)
    assert summary["calibration_confidence"] == pytest.approx(1 - 0.05 / 2)  # 0.95 split over two policies
    kept = run / "policies" / str(summary["kept_policy"])
    for c in (0, 1):
        cdir = run / "policies" / str(c)
        for name in ("last.json", "best.json", "tb/progress.csv"):
            assert (cdir / name).is_file(), (c, name)
        # the last checkpoint names the learner state it was written with, and only that one is kept
        files = load_checkpoint(cdir).extra["files"]
        assert [p.name for p in cdir.glob("trainer_state-*.pt")] == [files["state"]]
    last = load_checkpoint(run)
    assert last.extra["kept_policy"] == summary["kept_policy"] and last.extra["threshold"] == summary["threshold"]
    for k, v in load_checkpoint(kept).policy_state.items():
        assert torch.equal(v, last.policy_state[k]), k
    for k, v in load_checkpoint(kept, "best").policy_state.items():
        assert torch.equal(v, load_checkpoint(run, "best").policy_state[k]), k
    other = load_checkpoint(run / "policies" / str(1 - summary["kept_policy"]))
    assert any(not torch.equal(v, last.policy_state[k]) for k, v in other.policy_state.items())

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for c in (0, 1):
        ea = EventAccumulator(str(run / "policies" / str(c) / "tb"), size_guidance={"images": 0, "tensors": 0}).Reload()
        scalars = set(ea.Tags()["scalars"])
        expected = {
            "reward/mean", "quality/policy", "quality/full", "quality/margin", "cost/flops_ratio", "cost/latency_ratio", "constraint/lambda",
            "constraint/satisfied_rate", "tokens/keep_rate", "train/policy_loss", "train/entropy", "time/instances_per_s",
            "skip_rate/dec.0.ffn", "skip_rate/enc.1.attn",
        }
        assert expected <= scalars, expected - scalars
        assert "train/value_loss" not in scalars  # the default's leave-one-out baseline has no value head
        assert "skip_rate/heatmap" in ea.Tags()["images"]
        assert any("config" in t for t in ea.Tags()["tensors"])  # the resolved config as text


def test_select_policy_prefers_the_constraint_then_compute():
    from rlskip.agents.trainer import select_policy
    from rlskip.constraints import Budget, Lexicographic

    def row(sat, flops, q=0.99, bound=0.005):
        return {"satisfied": sat, "flops_ratio": flops, "quality": q, "drop_upper_bound": bound}

    lex = Lexicographic()
    assert select_policy(lex, [row(True, 0.6), row(True, 0.5), row(False, 0.3)]) == 1
    assert select_policy(lex, [row(False, 0.3, bound=0.03), row(False, 0.9, bound=0.02)]) == 1
    budget = Budget(0.5)
    assert select_policy(budget, [row(True, 0.5, q=0.90), row(True, 0.4, q=0.95), row(False, 0.7, q=1.0)]) == 1
    assert select_policy(budget, [row(False, 0.7), row(False, 0.6)]) == 1
    with pytest.raises(ValueError, match="no policies"):
        select_policy(lex, [])


@pytest.mark.parametrize(
    "setup",
    [
        ["agent.group_size=1", "agent.policies=1"],  # learned value baseline, one policy (flat run directory)
        ["agent.group_size=4", "agent.policies=1"],  # leave-one-out baseline
        ["agent.group_size=4", "agent.policies=2"],  # the default: stopped while training the second policy
    ],
    ids=["value", "loo", "loo-2-policies"],
)
def test_resume_continues_as_if_never_stopped(setup, tmp_path, monkeypatch):
    from rlskip.agents.reinforce import Reinforce

    two = "agent.policies=2" in setup
    straight = tmp_path / "straight"
    assert main(TINY + setup + [f"run_dir={straight}"]) == 0

    stopped = tmp_path / "stopped"
    original = Reinforce.train_iteration
    calls = []

    def crash_after_two(self, *a, **k):
        calls.append(self.iteration)
        # iteration 3 (of the second policy, with two) ran and logged, but its checkpoint was never written
        if self.iteration == 3 and (not two or len(calls) > 4):
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(Reinforce, "train_iteration", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        main(TINY + setup + [f"run_dir={stopped}"])
    monkeypatch.setattr(Reinforce, "train_iteration", original)
    assert main([f"resume={stopped}"]) == 0

    keys = ["reward/mean", "quality/policy", "cost/flops_ratio", "train/policy_loss"]
    sub = Path("policies/1") if two else Path(".")
    want = _rows(straight / sub)
    assert ("train/value_loss" in want[0]) == ("agent.group_size=1" in setup)  # only the value baseline has one
    got_first, got_rest = _rows(stopped / sub, "progress.0.csv"), _rows(stopped / sub)
    assert len(want) == 4 and len(got_rest) == 2  # iterations 3 and 4, resumed from the checkpoint of iteration 2
    for a, b in zip(want, got_first[:2] + got_rest):
        for k in keys:
            assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-6, abs=1e-9), k
    if two:  # the first policy had finished before the stop and is not trained again
        assert len(_rows(stopped / "policies/0")) == 4 and not (stopped / "policies/0/tb/progress.0.csv").exists()
    s1 = json.loads((straight / "summary.json").read_text())
    s2 = json.loads((stopped / "summary.json").read_text())
    assert s1["quality"] == s2["quality"] and s1["flops_ratio"] == pytest.approx(s2["flops_ratio"])
    assert s1["policies"] == s2["policies"]


def test_ppo_run_keeps_a_zip_that_ppo_load_opens(tmp_path):
    from stable_baselines3 import PPO

    run = tmp_path / "ppo"
    assert main(TINY + ["agent=ppo", "agent.n_steps=2", "agent.n_epochs=2", "agent.policies=2", f"run_dir={run}"]) == 0
    kept = json.loads((run / "summary.json").read_text())["kept_policy"]
    kept_dir = run / "policies" / str(kept)
    named = json.loads((kept_dir / "last.json").read_text())["extra"]["files"]["ppo"]
    assert (run / "ppo.zip").read_bytes() == (kept_dir / named).read_bytes()
    from rlskip.checkpoint import load_policy
    from rlskip.space import SkipSpace

    model = PPO.load(run / "ppo.zip", device="cpu")
    assert model.policy.skip_policy.n_bits == SkipSpace.load(run / "skip_space.json").n_bits
    # the policy checkpoint holds the same weights as SB3's zip
    native = load_policy(run)
    for k, v in native.state_dict().items():
        assert torch.equal(v, model.policy.skip_policy.state_dict()[k]), k


def test_joint_mode_tunes_and_saves_the_generator(tmp_path):
    """Each checkpoint names the generator it was tuned with (a content-named folder): last and best load with
    rlskip.load, and with two policies each tunes its own copy from the same start."""
    import rlskip
    from rlskip.checkpoint import backbone_hash
    from transformers import BartForConditionalGeneration

    run = tmp_path / "joint"
    assert main(TINY + ["generator.mode=joint", "generator.lr=1e-3", "constraint=lagrangian", f"run_dir={run}"]) == 0
    start = backbone_hash(BartForConditionalGeneration.from_pretrained(run / "generator"))  # the warmed-up start
    kept = json.loads((run / "summary.json").read_text())["kept_policy"]
    hashes = []
    for c in (0, 1):
        cdir = run / "policies" / str(c)
        cref = json.loads((cdir / "last.json").read_text())["backbone"]
        folder = Path(cref["name_or_path"])
        assert folder.parent == cdir.resolve() and folder.name.startswith("generator-")
        assert backbone_hash(BartForConditionalGeneration.from_pretrained(folder)) == cref["content_hash"]
        hashes.append(cref["content_hash"])
    assert start not in hashes and hashes[0] != hashes[1]
    for name in ("last", "best"):  # the run's checkpoints name the kept policy's generators, copied up
        ref = json.loads((run / f"{name}.json").read_text())["backbone"]
        assert Path(ref["name_or_path"]).parent == run.resolve()
        rlskip.load(run, name=name)  # the hash check passes
    assert json.loads((run / "last.json").read_text())["backbone"]["content_hash"] == hashes[kept]


def test_xsum_runs_a_few_steps_on_local_files(tmp_path, bart_tokenizer):
    data = DATA_DIR / "xsum" / "test_1000.jsonl"
    if not data.is_file():
        pytest.skip(f"XSum slice not found at {data}")
    from transformers import BartForConditionalGeneration

    folder = tmp_path / "tiny-bart"
    torch.manual_seed(0)
    BartForConditionalGeneration(tiny_bart_config(len(bart_tokenizer), max_position_embeddings=512)).save_pretrained(folder)
    bart_tokenizer.save_pretrained(folder)
    run = tmp_path / "xsum"
    args = [
        "env=xsum", f"env.data_files={data}", f"backbone.name_or_path={folder}", "env.limit=32", "env.max_source_tokens=128",
        "env.max_new_tokens=8", "agent.iterations=2", "agent.n_envs=4", "eval.limit=8", "eval.static_search_instances=4",
        "eval.latency_instances=4", "eval.latency_batch=4", "log.every=1", "log.latency_every=100", "log.checkpoint_every=1",
        "log.progress=false", f"run_dir={run}",
    ]
    assert main(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metric"].startswith("rouge") and 0.0 <= summary["quality"] <= 1.0


def test_a_tokens_only_policy_trains_on_a_causal_backbone_and_serves(tmp_path):
    """stories260K (real weights) on XSum prompts, warmed up on its own outputs with tail token drops, the policy
    deciding tokens only (with its token features): the run trains, calibrates and evaluates, and the loaded policy
    keeps every sub-layer while dropping prompt tokens."""
    from paths import STORIES_DIR

    import rlskip

    data = DATA_DIR / "xsum" / "test_1000.jsonl"
    if not data.is_file() or not (STORIES_DIR / "model.safetensors").is_file():
        pytest.skip(f"XSum slice or stories260K not found under {DATA_DIR.parent}")
    run = tmp_path / "tokens-only"
    args = [
        "env=xsum", "backbone=stories260k", f"backbone.name_or_path={STORIES_DIR}", f"env.data_files={data}",
        "env.limit=48", "env.max_source_tokens=64", "env.max_new_tokens=8", "agent.token_head=true",
        "agent.bit_head=false", "agent.token_features=true", "agent.token_lead_prior=0.5", "agent.iterations=3", "agent.n_envs=8", "agent.policies=1",
        "eval.limit=8", "eval.calibration_instances=8", "eval.static_search_instances=4", "eval.latency_instances=4",
        "eval.latency_batch=4", "log.every=1", "log.latency_every=100", "log.progress=false", f"run_dir={run}",
        "backbone.warmup.steps=3", "backbone.warmup.targets=own", "backbone.warmup.distill=1", "backbone.warmup.batch_size=4",
        "backbone.warmup.skip_prob=0", "backbone.warmup.token_drop=0.5", "backbone.warmup.token_drop_rule=tail",
    ]
    assert main(args) == 0
    assert (run / "generator" / "model.safetensors").is_file()  # the warmed-up generator, referenced by the policy
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metric"].startswith("rouge") and summary["flops_ratio"] > 0.0  # the policy costs 1-2% of this 260K model
    m = rlskip.load(run, threshold=0.5)
    assert m.policy.init_kwargs["bit_head"] is False and m.policy.token_features
    assert m.policy.init_kwargs["lead_prior"] == 0.5 and m.policy.token_lead is not None
    texts = [json.loads(line)["document"] for line in data.read_text().splitlines()[:4]]
    strict = rlskip.load(run, threshold=1 - 1e-6)  # keeps no droppable token, every sub-layer still
    plan = strict.decide(texts)
    assert plan.bits.all() and plan.token_keep is not None and not plan.token_keep.all()
    out = strict.generate(texts, return_details=True)
    assert len(out) == 4 and all(d["skipped"] == [] and d["flops_ratio"] < 0.9 for d in out)
    assert m.generate(texts) == [m.generate([t])[0] for t in texts]
    # the evaluation CLI at a threshold that drops tokens: the lead baseline at the policy's FLOPs beside it
    from rlskip.evaluate import main as evaluate_main

    out = tmp_path / "eval"
    assert evaluate_main([
        f"ckpt={run}", "threshold=0.99", "limit=8", "latency_instances=4", "latency_batch=4", "repeats=1",
        "static_search_instances=4", "thresholds=[0.5]", "progress=false", f"out={out}",
    ]) == 0
    methods = {r["method"]: r for r in json.loads((out / "eval.json").read_text())["methods"]}
    pol, lead = methods["policy"], methods["lead@policy"]
    assert pol["input_kept_ratio"] < 1.0 and 0.0 <= lead["fraction"] <= 1.0
    assert abs(lead["flops_ratio"] - pol["flops_ratio"]) < 0.05 and lead["latency_ratio_batched"] > 0


def test_bad_inputs_fail_in_one_line_and_keep_existing_runs(tmp_path, capsys, monkeypatch):
    assert main(["foo=1"]) == 2
    assert "unknown config key 'foo'" in _error_line(capsys)
    assert main(["env=xsum", "env.data_files=/nope/missing.jsonl", "backbone=synthetic_small", f"run_dir={tmp_path / 'a'}"]) == 2
    assert "/nope/missing.jsonl" in _error_line(capsys)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["env=xsum", f"run_dir={tmp_path / 'b'}"]) == 2
    line = _error_line(capsys)
    assert "env.data_files" in line and "backbone.name_or_path" in line
    assert main([f"resume={tmp_path / 'nope'}"]) == 2
    assert "run directory not found" in _error_line(capsys)
    # a run directory that already holds a run is never overwritten
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "summary.json").write_text("{}")
    assert main(TINY + [f"run_dir={keep}"]) == 2
    assert "not empty" in _error_line(capsys)
    assert (keep / "summary.json").read_text() == "{}"


def test_agent_and_constraint_values_are_validated_at_compose():
    """Each agent and constraint has its own schema: keys of another option are unknown, and ranges, divisors
    and combinations fail in one line naming the key."""
    from rlskip.config import compose

    cases = {
        ("agent.group_size=3",): "agent.group_size=3, expected a positive divisor of agent.n_envs=32",
        ("agent=ppo", "agent.group_size=4"): "unknown config key 'agent.group_size'",
        ("agent=ppo", "agent.lr_decay=0.5"): "unknown config key 'agent.lr_decay'",
        ("agent.policies=0",): "agent.policies=0, expected a finite number > 0",
        ("agent.self_critical=true", "agent.group_size=1"): "agent.self_critical=True, expected agent.group_size >= 2",
        ("agent.lr_decay=1.5",): "agent.lr_decay=1.5, expected a fraction",
        ("agent.bit_head=false",): "agent.bit_head=False, expected agent.token_head=true",
        ("agent.token_lead_prior=0.4",): "agent.token_lead_prior=0.4, expected null without agent.token_head=true",
        ("agent.token_head=true", "agent.token_lead_prior=0"): "agent.token_lead_prior=0.0, expected a fraction in (0, 1]",
        ("agent.lr=-1",): "agent.lr=-1.0, expected a finite number > 0",
        ("agent.n_envs=0",): "agent.n_envs=0",
        ("agent.iterations=-5",): "agent.iterations=-5",
        ("constraint.max_quality_drop=2",): "constraint.max_quality_drop=2.0, expected a quality drop in [0, 1]",
        ("constraint=budget", "constraint.budget=1.5"): "constraint.budget=1.5",
        ("constraint=budget", "constraint.penalty=3"): "unknown config key 'constraint.penalty'",
        ("constraint=lagrangian", "constraint.lr=-0.1"): "constraint.lr=-0.1",
        ("env.margin=1", "env.num_beams=4"): "env.margin=1.0, expected 0 with env.num_beams > 1",
        ("generator.mode=frozen-ish",): "generator.mode='frozen-ish'",
        ("env.cost=seconds",): "env.cost='seconds', expected flops, time or max",
        ("agent.iterations=abc",): "agent.iterations=abc: Value 'abc' of type 'str' could not be converted to Integer",
        ("env.cost=time", "constraint=budget"): "env.cost='time', expected flops with constraint=budget",
        ("env.cost=max", "constraint=budget"): "env.cost='max', expected flops with constraint=budget",
    }
    for overrides, message in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            compose(list(overrides))
    assert compose(["agent=ppo", "agent.policies=2"]).agent.policies == 2


SENTIMENT_WORDS = ("the", "movie", "film", "plot", "was", "is", "good", "great", "fine", "bad", "awful", "dull")


def _tiny_bert_classifier(folder: Path) -> None:
    """A tiny random BERT classifier and a WordPiece tokenizer of its own (no download)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *SENTIMENT_WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=2,
    )
    BertForSequenceClassification(cfg).save_pretrained(folder)


def _sst2_file(path: Path, n: int) -> Path:
    """SST-2-shaped rows whose label is whether the sentence's adjective is a positive one."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        noun, verb = ("movie", "film", "plot")[i % 3], ("was", "is")[i % 2]
        adj = SENTIMENT_WORDS[6 + int(torch.randint(6, (1,), generator=g))]
        rows.append({"sentence": f"the {noun} {verb} {adj}", "label": int(adj in ("good", "great", "fine")), "idx": i})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GLUE_TINY = [
    "env=glue", "env.task=sst2", "env.max_source_tokens=16", "backbone.warmup.steps=10", "backbone.warmup.time_budget_s=0",
    "backbone.warmup.batch_size=8", "backbone.warmup.lr=1e-3", "agent.iterations=4", "agent.n_envs=8", "agent.policies=1",
    "agent.token_head=true", "eval.limit=16", "eval.calibration_instances=16", "eval.static_search_instances=8",
    "eval.latency_instances=8", "eval.latency_batch=4", "log.every=1", "log.latency_every=2", "log.checkpoint_every=2",
    "log.progress=false", "constraint=lagrangian",
]


def test_joint_mode_tunes_a_classifier_with_the_sandwich_rule(tmp_path):
    """generator.mode=joint on a BERT classifier (GLUE): the tuned classifier is saved beside the policy, differs
    from the warmed-up start, and the run's checkpoint loads and classifies."""
    import rlskip
    from rlskip.checkpoint import backbone_hash
    from transformers import BertForSequenceClassification

    folder = tmp_path / "tiny-bert"
    _tiny_bert_classifier(folder)
    data = _sst2_file(tmp_path / "sst2.jsonl", 96)
    run = tmp_path / "joint-glue"
    args = GLUE_TINY + [
        f"backbone.name_or_path={folder}", f"env.data_files={data}", "generator.mode=joint", "generator.distill=1",
        "generator.lr=1e-3", f"run_dir={run}",
    ]
    assert main(args) == 0
    start = backbone_hash(BertForSequenceClassification.from_pretrained(run / "generator"))
    ref = json.loads((run / "last.json").read_text())["backbone"]  # one policy: its files are the run's
    tuned = BertForSequenceClassification.from_pretrained(ref["name_or_path"])
    assert backbone_hash(tuned) == ref["content_hash"] != start
    rows = _rows(run)
    assert all(float(r["train/generator_loss"]) > 0 for r in rows if r.get("train/generator_loss"))
    summary = json.loads((run / "summary.json").read_text())
    # the warmed-up classifier's own held-out accuracy: what a frozen run on it reports as its full model's
    frozen = tmp_path / "frozen-glue"
    assert main(GLUE_TINY + [
        f"backbone.name_or_path={run / 'generator'}", "backbone.warmup.steps=null", f"env.data_files={data}", f"run_dir={frozen}",
    ]) == 0
    assert summary["quality_full_start"] == json.loads((frozen / "summary.json").read_text())["quality_full"]
    labels = rlskip.load(run).classify(["the movie was good", "the plot is awful"])
    assert len(labels) == 2


def test_plan_loss_sandwich_is_the_label_loss_when_every_row_runs_the_full_model():
    """With distill > 0 and the sub-network rows under the all-ones plan too, the distillation term is zero: the
    loss is the first half's cross-entropy on its labels; a sub-network plan adds a positive KL term."""
    import torch.nn.functional as F
    from transformers import BertConfig, BertForSequenceClassification

    from rlskip.agents.warmup import plan_loss
    from rlskip.plan import Plan
    from rlskip.runtime import get_runtime

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, num_labels=2,
        initializer_range=0.5,
    )).eval()
    rt = get_runtime(model)
    ids = torch.randint(5, 40, (3, 7))
    ids[:, 0], ids[:, -1] = 2, 3
    ids = torch.cat([ids, ids])
    mask = torch.ones_like(ids, dtype=torch.bool)
    y = torch.tensor([0, 1, 1, 0, 1, 1])
    with torch.no_grad():
        obs = rt.observe(ids, mask)
        ones = Plan.all_ones(rt.space, 6)
        full = rt.classify(obs, ones).logits
        assert torch.allclose(plan_loss(rt, obs, ones, y, 1.0), F.cross_entropy(full[:3], y[:3]), atol=1e-6)
        bits = ones.bits.clone()
        bits[3:, :2] = False
        mixed = rt.classify(obs, Plan(rt.space, bits)).logits
        teacher, student = full[:3].softmax(-1), mixed[3:].log_softmax(-1)
        kl = (teacher * (teacher.log() - student)).sum(-1).mean()
        assert kl > 1e-4
        sub = plan_loss(rt, obs, Plan(rt.space, bits), y, 0.5)
        assert torch.allclose(sub, F.cross_entropy(full[:3], y[:3]) + 0.5 * kl, atol=1e-6)
        assert torch.allclose(plan_loss(rt, obs, ones, y, 0.0), F.cross_entropy(full, y), atol=1e-6)
