"""SkipSpace layout, bit <-> name map, JSON round trip, and Plan validation."""

from __future__ import annotations

import pytest
import torch

from rlskip.plan import Plan
from rlskip.space import SkipSpace


def test_encoder_decoder_layout_and_bit_map():
    s = SkipSpace.encoder_decoder("bart", 3, 2)
    assert s.fixed == ("enc.0.attn", "enc.0.ffn")
    assert s.names == (
        "enc.1.attn", "enc.1.ffn", "enc.2.attn", "enc.2.ffn",
        "dec.0.self_attn", "dec.0.cross_attn", "dec.0.ffn", "dec.1.self_attn", "dec.1.cross_attn", "dec.1.ffn",
    )
    assert s.n_bits == 10
    for i, name in enumerate(s.names):
        assert s.bit(name) == i and s.name(i) == name
    assert s.bits_of_kind("dec_ffn") == [6, 9]
    with pytest.raises(ValueError, match="fixed on"):
        s.bit("enc.0.attn")
    with pytest.raises(ValueError, match="unknown candidate"):
        s.bit("enc.9.attn")


def test_json_round_trip_and_equality(tmp_path):
    s = SkipSpace.encoder_decoder("bart", 6, 6)
    assert SkipSpace.from_json(s.to_json()) == s
    s.save(tmp_path / "space.json")
    assert SkipSpace.load(tmp_path / "space.json") == s
    assert s != SkipSpace.encoder_decoder("bart", 6, 5)
    assert s != SkipSpace.encoder_decoder("t5", 6, 6)
    assert hash(s) == hash(SkipSpace.from_json(s.to_json()))


def test_bad_space_json_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not valid JSON"):
        SkipSpace.from_json("{oops")
    with pytest.raises(ValueError, match="missing or malformed field"):
        SkipSpace.from_json('{"family": "bart"}')
    with pytest.raises(FileNotFoundError, match="SkipSpace file not found"):
        SkipSpace.load(tmp_path / "nope.json")


def test_check_compatible_names_both_layouts():
    a, b = SkipSpace.encoder_decoder("bart", 6, 6), SkipSpace.encoder_decoder("bart", 12, 12)
    with pytest.raises(ValueError, match=r"6 encoder \+ 6 decoder.*12 encoder \+ 12 decoder"):
        b.check_compatible(a)


def test_plan_validation_names_what_was_expected():
    s = SkipSpace.encoder_decoder("bart", 3, 2)
    with pytest.raises(ValueError, match=r"bool tensor \[batch, 10\], got torch.float32"):
        Plan(s, torch.ones(2, 10))
    with pytest.raises(ValueError, match=r"shape \[batch, 10\].*got \[2, 9\]"):
        Plan(s, torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_keep must be a bool tensor"):
        Plan(s, torch.ones(2, 10, dtype=torch.bool), torch.ones(3, 5, dtype=torch.bool))
    p = Plan.from_skips(s, [["dec.1.ffn"], []])
    assert p.skipped_names(0) == ["dec.1.ffn"] and p.skipped_names(1) == []
