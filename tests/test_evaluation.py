"""The evaluation arithmetic: normalized accuracy and deltas against the references, and the metric cache."""

from __future__ import annotations

import pytest

from mlflow_taskvec.evaluation import MetricCache, References, derived_metrics


def test_normalized_accuracy_is_the_composite_over_the_fine_tune_and_delta_is_against_the_base():
    composite = {"a.accuracy": 0.45, "b.accuracy": 0.8, "control.c.accuracy": 0.7, "mean.accuracy": 0.625}
    refs = References(base={"a": {"accuracy": 0.3}, "b": {"accuracy": 0.5}, "c": {"accuracy": 0.75}}, finetuned={"a": {"accuracy": 0.9}, "b": {"accuracy": 0.8}})

    out = derived_metrics(composite, refs, ["a", "b"], ["c"])

    assert out == pytest.approx(
        {
            "a.base_accuracy": 0.3, "a.delta_accuracy": 0.15, "a.finetuned_accuracy": 0.9, "a.normalized_accuracy": 0.5,
            "b.base_accuracy": 0.5, "b.delta_accuracy": 0.3, "b.finetuned_accuracy": 0.8, "b.normalized_accuracy": 1.0,
            "control.c.base_accuracy": 0.75, "control.c.delta_accuracy": -0.05,
            "mean.base_accuracy": 0.4, "mean.delta_accuracy": 0.225, "mean.finetuned_accuracy": 0.85, "mean.normalized_accuracy": 0.75,
        }
    )


def test_a_task_without_a_fine_tune_gets_no_normalized_metric_and_is_left_out_of_its_mean():
    composite = {"a.accuracy": 0.5, "novel.accuracy": 0.4}
    refs = References(base={"a": {"accuracy": 0.25}, "novel": {"accuracy": 0.1}}, finetuned={"a": {"accuracy": 1.0}})

    out = derived_metrics(composite, refs, ["a", "novel"])

    assert "novel.normalized_accuracy" not in out
    assert out["novel.delta_accuracy"] == pytest.approx(0.3)
    assert out["mean.normalized_accuracy"] == pytest.approx(0.5)
    assert out["mean.delta_accuracy"] == pytest.approx((0.25 + 0.3) / 2)


def test_a_fine_tune_scoring_zero_gives_no_normalized_metric_rather_than_a_division_by_zero():
    out = derived_metrics({"a.loss": 0.2}, References(base={"a": {"loss": 0.5}}, finetuned={"a": {"loss": 0.0}}), ["a"])

    assert out["a.finetuned_loss"] == 0.0 and "a.normalized_loss" not in out


def test_the_metric_cache_keys_by_fingerprint_evaluator_task_and_split(tmp_path):
    cache = MetricCache(tmp_path / "metrics")
    cache.put("fp1", "ev@1", "rotate", "test", {"accuracy": 0.5})

    assert cache.get("fp1", "ev@1", "rotate", "test") == {"accuracy": 0.5}
    assert cache.get("fp2", "ev@1", "rotate", "test") is None
    assert cache.get("fp1", "ev@2", "rotate", "test") is None
    assert cache.get("fp1", "ev@1", "rotate", "validation") is None
    assert cache.get("fp1", "ev@1", "flip", "test") is None
    assert (cache.hits, cache.misses) == (1, 4)
    assert [p.name for p in (tmp_path / "metrics").iterdir() if p.name.startswith(".")] == []
