"""The faster paths of the engine keep every bit: shared-pass trim rules and tie budgets
against the two-pass radix select plus its tie-planning pass."""

from __future__ import annotations

import pytest
import torch

from mlflow_taskvec.engine.methods import trim
from mlflow_taskvec.engine.methods.trim import TrimThreshold, top_k_rules, trim_threshold


def _reference_rule(chunks, k):
    rule = trim_threshold(lambda: (c for _, c in chunks()), k, torch.float32)
    if not rule.keeps_every_tie:
        rule.plan_ties(chunks())
    return rule


def _tied_input(numel: int, seed: int) -> torch.Tensor:
    """Few distinct magnitudes (16-bit deltas tie a lot), some exact zeros, both signs."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(numel, generator=g) * 1e-3).to(torch.bfloat16).float()
    x[torch.rand(numel, generator=g) < 0.1] = 0.0
    return x


@pytest.mark.parametrize("keep_low_bits", [1 << 16, 0])  # 0: no chunk keeps its low bits (the tie-planning pass)
def test_shared_pass_rules_equal_the_reference(monkeypatch, keep_low_bits):
    monkeypatch.setattr(trim, "_KEEP_LOW_BITS", keep_low_bits)
    x = _tied_input(50_000, 3)
    chunk = 7_000
    chunks = lambda: ((a, x[a : a + chunk]) for a in range(0, x.numel(), chunk))
    ks = [1, 37, 5_000, 10_000, 25_001, 44_000, 50_000]
    rules = top_k_rules(chunks, ks, torch.float32)
    assert any(not r.keeps_every_tie for r in rules)  # the tie budgets are exercised
    for k, rule in zip(ks, rules):
        ref = _reference_rule(chunks, k)
        assert (rule.value, rule.ties_to_keep, rule.ties_total, rule.tie_budget) == (ref.value, ref.ties_to_keep, ref.ties_total, ref.tie_budget)
        kept = torch.cat([rule.apply(c, a) for a, c in chunks()])
        assert int(kept.ne(0).sum()) == int(torch.sort(x.abs(), descending=True).values[:k].ne(0).sum())  # exactly the top k


def test_the_first_ties_in_order_are_kept():
    rule = TrimThreshold(2.0, ties_to_keep=2, ties_total=4)
    chunk = torch.tensor([2.0, -3.0, -2.0, 1.0, 2.0, 2.0, -0.5])
    assert rule.apply(chunk).tolist() == [2.0, -3.0, -2.0, 0.0, 0.0, 0.0, 0.0]
    assert rule.keep_mask(chunk).tolist() == [True, True, True, False, False, False, False]


def test_a_chunk_with_a_tie_budget_is_trimmed_bit_for_bit_like_the_mask():
    """Dropped entries are +0.0 (as torch.where writes them), kept ones unchanged, ties by position."""
    x = _tied_input(20_000, 5)
    x[:50] = -0.0
    rule = trim_threshold(lambda: (x,), 6_000, torch.float32)
    assert not rule.keeps_every_tie and rule.value > 0
    for start, budget in ((0, rule.ties_to_keep), (0, 1), (0, rule.ties_total)):
        rule.tie_budget = {start: budget}
        expected = torch.where(rule.keep_mask(x, start), x, 0.0)
        got = rule.apply(x, start)
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))  # the bits, zeros' signs included
        assert int(got.ne(0).sum()) == int(x.abs().gt(rule.value).sum()) + budget
