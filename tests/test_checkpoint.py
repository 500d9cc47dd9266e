"""Checkpoint I/O: round trip, atomic saves that survive a crash, and one-line errors for bad files."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import safetensors.torch
import torch

from rlskip import checkpoint as ck
from rlskip.policy import SkipPolicy
from rlskip.checkpoint import (
    atomic_write_text,
    backbone_hash,
    load_checkpoint,
    load_policy,
    make_backbone_ref,
    save_checkpoint,
    verify_backbone,
)
from rlskip.space import SkipSpace

from conftest import tiny_bart_config


def _bart(seed: int = 0, enc: int = 3, dec: int = 2):
    from transformers import BartForConditionalGeneration

    torch.manual_seed(seed)
    return BartForConditionalGeneration(tiny_bart_config(vocab_size=64, enc=enc, dec=dec)).eval()


@pytest.fixture(scope="module")
def bart():
    return _bart()


@pytest.fixture(scope="module")
def space():
    return SkipSpace.encoder_decoder("bart", 3, 2)


@pytest.fixture(scope="module")
def ref(bart):
    return make_backbone_ref(bart, "bart", name_or_path="tiny-bart")


def _policy(space, seed=0):
    torch.manual_seed(seed)
    return SkipPolicy(32, space.n_bits, hidden=8, budget_input=True, init_keep_logit=2.0)


def _files(d):
    return sorted(p.name for p in d.iterdir())


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_round_trip(tmp_path, space, ref):
    pol = _policy(space)
    meta = save_checkpoint(tmp_path, pol, space, ref, step=120, extra={"quality": 0.81, "constraint": {"name": "x"}})
    assert meta == tmp_path / "last.json"
    weights = [n for n in _files(tmp_path) if n.endswith(".safetensors")]
    assert _files(tmp_path) == sorted(["last.json", "skip_space.json", *weights]) and len(weights) == 1
    c = load_checkpoint(tmp_path)
    assert c.step == 120 and c.extra == {"quality": 0.81, "constraint": {"name": "x"}}
    assert c.space == space and c.backbone_ref == ref and c.policy_kwargs == pol.init_kwargs
    for k, v in pol.state_dict().items():
        assert torch.equal(c.policy_state[k], v)
    again = load_policy(tmp_path)
    assert not again.training
    x, toks, budget = torch.randn(2, 32), torch.randn(2, 5, 32), torch.tensor([0.3, 0.7])
    for a, b in zip(pol(x, toks, budget=budget), again(x, toks, budget=budget)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert SkipSpace.load(tmp_path / "skip_space.json") == space


def test_saving_again_replaces_the_checkpoint_and_keeps_others(tmp_path, space, ref):
    save_checkpoint(tmp_path, _policy(space, 0), space, ref, step=1)
    save_checkpoint(tmp_path, _policy(space, 1), space, ref, step=1, name="best")
    save_checkpoint(tmp_path, _policy(space, 2), space, ref, step=2)
    assert load_checkpoint(tmp_path).step == 2 and load_checkpoint(tmp_path, "best").step == 1
    # the superseded weights of "last" are gone; "best" keeps its own
    assert len([n for n in _files(tmp_path) if n.startswith("last-")]) == 1
    assert len([n for n in _files(tmp_path) if n.startswith("best-")]) == 1
    assert ck.list_checkpoints(tmp_path) == ["best", "last"]


@pytest.mark.parametrize("fail_at", [1, 2])
def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, space, ref, monkeypatch, fail_at):
    """os.replace fails at the weights (1) or at the metadata (2): the old checkpoint loads unchanged."""
    old = _policy(space, 0)
    save_checkpoint(tmp_path, old, space, ref, step=7)
    before = {n: (tmp_path / n).read_bytes() for n in _files(tmp_path)}
    calls = {"n": 0}
    real_replace = os.replace

    def crashing_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, _policy(space, 1), space, ref, step=8)
    monkeypatch.undo()
    for name, data in before.items():
        assert (tmp_path / name).read_bytes() == data
    assert not [n for n in _files(tmp_path) if n.endswith(".tmp")]
    # anything new under a final name is complete (the new weights, unreferenced yet), never partial
    for name in set(_files(tmp_path)) - set(before):
        new = _policy(space, 1).state_dict()
        loaded = safetensors.torch.load_file(tmp_path / name)
        assert all(torch.equal(loaded[k], v) for k, v in new.items())
    c = load_checkpoint(tmp_path)
    assert c.step == 7
    for k, v in old.state_dict().items():
        assert torch.equal(c.policy_state[k], v)
    # and the next save succeeds and cleans up the orphan
    save_checkpoint(tmp_path, _policy(space, 1), space, ref, step=8)
    assert load_checkpoint(tmp_path).step == 8
    assert len([n for n in _files(tmp_path) if n.startswith("last-")]) == 1


def test_crash_mid_write_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    atomic_write_text(target, '{"v": 1}')

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, '{"v": 2, "much": "longer"}')
    assert _files(tmp_path) == ["summary.json"] and json.loads(target.read_text()) == {"v": 1}


def test_first_save_crashing_leaves_no_checkpoint(tmp_path, space, ref, monkeypatch):
    def crash(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "run", _policy(space), space, ref, step=1)
    monkeypatch.undo()
    assert _files(tmp_path / "run") == []
    with pytest.raises(FileNotFoundError, match=r"checkpoint 'last' not found in .*run \(no last.json\); available: \[\]"):
        load_checkpoint(tmp_path / "run")


def test_truncated_weights_are_one_line_error(tmp_path, space, ref):
    save_checkpoint(tmp_path, _policy(space), space, ref, step=1)
    (w,) = tmp_path.glob("last-*.safetensors")
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as e:
        load_checkpoint(tmp_path)
    assert w.name in _one_line(e) and "truncated or corrupted" in str(e.value)
    # a file whose recorded hash was rewritten too still fails in the safetensors parser, as one line
    meta = json.loads((tmp_path / "last.json").read_text())
    meta["weights_sha256"] = hashlib.sha256(w.read_bytes()).hexdigest()
    (tmp_path / "last.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError) as e:
        load_checkpoint(tmp_path)
    assert w.name in _one_line(e) and "truncated or corrupted" in str(e.value)


def test_truncated_or_bad_json_is_one_line_error(tmp_path, space, ref):
    save_checkpoint(tmp_path, _policy(space), space, ref, step=1)
    meta = tmp_path / "last.json"
    text = meta.read_text()
    meta.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"last.json is truncated or corrupted: not valid JSON") as e:
        load_checkpoint(tmp_path)
    _one_line(e)
    meta.write_text(json.dumps({"step": 1}))
    with pytest.raises(ValueError, match=r"last.json is corrupted or not an rlskip checkpoint: missing field"):
        load_checkpoint(tmp_path)
    d = json.loads(text)
    d["weights"] = "../elsewhere.safetensors"
    meta.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="weights file name '../elsewhere.safetensors' is not last-<hash>"):
        load_checkpoint(tmp_path)
    meta.write_text(text)
    (tmp_path / "skip_space.json").write_text('{"family": "bart", "candi')
    with pytest.raises(ValueError, match=r"skip_space.json is truncated or corrupted") as e:
        load_checkpoint(tmp_path)
    _one_line(e)


def test_missing_directory_checkpoint_or_file(tmp_path, space, ref):
    missing = tmp_path / "no-such-run"
    with pytest.raises(FileNotFoundError, match=f"run directory not found: {missing}"):
        load_checkpoint(missing)
    save_checkpoint(tmp_path, _policy(space), space, ref, step=1)
    with pytest.raises(FileNotFoundError, match=r"checkpoint 'best' not found in .*available: \['last'\]"):
        load_checkpoint(tmp_path, "best")
    (w,) = tmp_path.glob("last-*.safetensors")
    w.unlink()
    with pytest.raises(FileNotFoundError, match=f"checkpoint weights file missing: .*{w.name}"):
        load_checkpoint(tmp_path)


def test_bad_save_arguments_write_nothing(tmp_path, space, ref):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="policy has 4 bits but the bart SkipSpace .* has 10"):
        save_checkpoint(run, SkipPolicy(32, 4), space, ref, step=1)
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        save_checkpoint(run, _policy(space), space, ref, step=1, extra={"t": torch.ones(1)})
    with pytest.raises(ValueError, match=r"backbone_ref lacks \['content_hash'"):
        save_checkpoint(run, _policy(space), space, {"name_or_path": "x"}, step=1)
    with pytest.raises(ValueError, match="checkpoint name must use only"):
        save_checkpoint(run, _policy(space), space, ref, step=1, name="../x")
    with pytest.raises(ValueError, match="checkpoint name must .* not be 'skip_space'"):
        save_checkpoint(run, _policy(space), space, ref, step=1, name="skip_space")
    assert not run.exists()
    save_checkpoint(run, _policy(space), space, ref, step=1)
    before = {n: (run / n).read_bytes() for n in _files(run)}
    other = SkipSpace.encoder_decoder("bart", 6, 6)
    with pytest.raises(ValueError, match=r"holds checkpoints for a bart SkipSpace \(3 encoder.*not a bart SkipSpace \(6 encoder"):
        save_checkpoint(run, SkipPolicy(32, other.n_bits), other, ref, step=2)
    assert {n: (run / n).read_bytes() for n in _files(run)} == before


def test_backbone_hash_tracks_the_weights(bart):
    h = backbone_hash(bart)
    assert len(h) == 64 and backbone_hash(bart) == h
    assert backbone_hash(_bart(seed=0)) == h  # same weights, another object
    twin = _bart(seed=0)
    with torch.no_grad():
        twin.model.encoder.layers[1].fc1.weight[0, 0] += 1e-3
    assert backbone_hash(twin) != h


def test_verify_backbone(tmp_path, bart, space, ref):
    save_checkpoint(tmp_path, _policy(space), space, ref, step=1)
    c = load_checkpoint(tmp_path)
    verify_backbone(c, bart)
    other = _bart(seed=1)
    with pytest.raises(ValueError) as e:
        verify_backbone(c, other)
    msg = _one_line(e)
    assert msg.startswith(f"checkpoint was trained on backbone tiny-bart (hash {ref['content_hash'][:16]})")
    assert f"the given model has hash {backbone_hash(other)[:16]}" in msg and "pass backbone=<path>" in msg
    with pytest.raises(ValueError, match=r"checkpoint was made for a bart SkipSpace \(3 encoder.*has a bart SkipSpace \(2 encoder"):
        verify_backbone(c, _bart(enc=2))


def test_backbone_ref_is_json_and_names_the_model(bart, ref):
    assert ref["name_or_path"] == "tiny-bart" and ref["family"] == "bart"
    assert ref["config"]["d_model"] == 32 and ref["content_hash"] == backbone_hash(bart)
    assert json.loads(json.dumps(ref)) == ref
    assert make_backbone_ref(bart, "bart", revision="abc123")["revision"] == "abc123"


def test_a_tokens_only_policy_with_token_features_round_trips(tmp_path, space, ref):
    torch.manual_seed(0)
    pol = SkipPolicy(32, space.n_bits, hidden=8, token_head=True, token_features=True, bit_head=False, init_keep_logit=0.0)
    torch.nn.init.normal_(pol.token_out.weight)
    save_checkpoint(tmp_path, pol, space, ref, step=3)
    again = load_policy(tmp_path)
    assert again.init_kwargs == pol.init_kwargs and not again.bit_head and again.token_features
    x, toks, mask = torch.randn(2, 32), torch.randn(2, 5, 32), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    for a, b in zip(pol(x, toks, mask), again(x, toks, mask)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
