"""FLOPs primitives against FlopCounterMode on the operations they describe (the per-family tables are
checked against the runtimes in test_contract.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from rlskip import flops as fl


def _count(fn) -> int:
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def _gqa_attention(a: fl.AttentionShape, x: torch.Tensor, kv: torch.Tensor, w) -> torch.Tensor:
    q = F.linear(x, w["q"]).view(1, -1, a.heads, a.head_dim).transpose(1, 2)
    k = F.linear(kv, w["k"]).view(1, -1, a.kv_heads, a.head_dim).transpose(1, 2)
    v = F.linear(kv, w["v"]).view(1, -1, a.kv_heads, a.head_dim).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return F.linear(o.transpose(1, 2).reshape(1, -1, a.heads * a.head_dim), w["o"])


def test_attention_with_separate_query_and_key_value_heads():
    a = fl.AttentionShape(d_model=48, heads=6, kv_heads=2, head_dim=10)
    w = {"q": torch.randn(60, 48), "k": torch.randn(20, 48), "v": torch.randn(20, 48), "o": torch.randn(48, 60)}
    x, mem = torch.randn(1, 7, 48), torch.randn(1, 11, 48)
    assert _count(lambda: _gqa_attention(a, x, mem, w)) == fl.attention(a, 7, 11)
    assert fl.attention(fl.AttentionShape.mha(64, 4), 5, 5) == 8 * 5 * 64 * 64 + 4 * 5 * 5 * 64


def test_cached_self_attention_is_the_sum_of_its_steps():
    a = fl.AttentionShape(d_model=32, heads=4, kv_heads=1, head_dim=8)
    steps, past = 9, 13
    explicit = sum(fl.attention(a, 1, past + t + 1, 1) for t in range(steps))
    assert fl.cached_self_attention(a, steps, past) == explicit
    assert fl.kv_projection(a, 3) == 2 * fl.linear(3, 32, 8)


def test_plain_and_gated_mlp_and_lm_head():
    x = torch.randn(5, 16)
    w1, w2, w3 = torch.randn(40, 16), torch.randn(16, 40), torch.randn(40, 16)
    assert _count(lambda: F.linear(F.relu(F.linear(x, w1)), w2)) == fl.mlp(5, 16, 40)
    assert _count(lambda: F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)) == fl.mlp(5, 16, 40, gated=True)
    assert _count(lambda: F.linear(x, torch.randn(100, 16))) == fl.lm_head(5, 16, 100)


def test_per_instance_lengths_and_plan_flops():
    n = fl.lengths([3, 4, 10])[0]
    a = fl.AttentionShape.mha(8, 2)
    got = fl.attention(a, n, n)
    assert got.dtype == torch.float64 and got.tolist() == [fl.attention(a, k, k) for k in (3, 4, 10)]
    fixed, per = torch.tensor([1.0, 2.0]), torch.tensor([[10.0, 100.0], [20.0, 200.0]])
    bits = torch.tensor([[True, False], [False, True]])
    assert fl.plan_flops(fixed, per, bits).tolist() == [11.0, 202.0]
    policy = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    assert fl.mlp_flops(policy, rows=2, tokens_per_row=5) == 2 * (32 + 12) * 2 * 5
