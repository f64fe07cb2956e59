"""Measured against predicted KV cache (operator/kvfeedback.py), the condition it drives in
status.py, and the catalog override that closes the loop in sizing."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from modelship.operator.api import load_spec
from modelship.operator.catalog import GIB, load_catalog
from modelship.operator.kvfeedback import verdict
from modelship.operator.sizing import make_plan
from modelship.operator.status import ReconcileFacts, build_status

from .test_render import LLAMA_8B_L4
from .test_sizing import LLAMA_3_8B

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def test_within_ten_percent_is_as_predicted() -> None:
    predicted = LLAMA_8B_L4.kv_cache_tokens
    kv = verdict(LLAMA_8B_L4, int(predicted * 0.95))
    assert (kv.status, kv.reason) == ("True", "AsPredicted")
    assert str(predicted) in kv.message


def test_below_plan_names_the_overhead_to_record() -> None:
    predicted = LLAMA_8B_L4.kv_cache_tokens
    measured = predicted // 2
    kv = verdict(LLAMA_8B_L4, measured)
    assert (kv.status, kv.reason) == ("False", "BelowPlan")
    missing_gib = (predicted - measured) * LLAMA_8B_L4.kv_cache_bytes_per_token / GIB
    assert f"extraOverheadGiB: {missing_gib:.2f}" in kv.message


def test_above_plan_and_not_measured() -> None:
    assert verdict(LLAMA_8B_L4, LLAMA_8B_L4.kv_cache_tokens * 2).reason == "AbovePlan"
    assert verdict(LLAMA_8B_L4, None).status == "Unknown"


def test_status_carries_both_figures_and_a_warning_when_apart() -> None:
    facts = ReconcileFacts(
        generation=1,
        placement=LLAMA_8B_L4,
        measured_kv_cache_tokens=LLAMA_8B_L4.kv_cache_tokens // 2,
    )
    update = build_status(facts, None, NOW)
    assert update.status["kvCache"] == {
        "predictedTokens": LLAMA_8B_L4.kv_cache_tokens,
        "measuredTokens": LLAMA_8B_L4.kv_cache_tokens // 2,
    }
    conditions = {c["type"]: c for c in update.status["conditions"]}
    assert conditions["KVCacheAsPredicted"]["status"] == "False"
    assert conditions["Degraded"]["status"] == "False", "the plan being off is not a degradation"
    warnings = [e for e in update.events if e.reason == "BelowPlan"]
    assert warnings and warnings[0].type == "Warning"


def test_a_recorded_overhead_shrinks_later_plans_by_exactly_that(tmp_path: Path) -> None:
    override = tmp_path / "catalog.yaml"
    # Only the field measured: the override keeps the accelerator's other facts.
    override.write_text("accelerators:\n  nvidia-l4: {extraOverheadGiB: 0.5}\n")
    spec = load_spec(
        {
            "model": {"uri": "s3://models/llama"},
            "serving": {"maxModelLen": 2048},
            "accelerator": {"instanceTypes": ["g6.xlarge"]},
        }
    )
    before = make_plan(LLAMA_3_8B, spec, load_catalog()).chosen
    after = make_plan(LLAMA_3_8B, spec, load_catalog(override)).chosen
    assert before is not None and after is not None
    assert load_catalog(override).accelerators["nvidia-l4"].model == "NVIDIA L4"
    lost_tokens = before.kv_cache_tokens - after.kv_cache_tokens
    expected = 0.5 * GIB / before.kv_cache_bytes_per_token
    assert lost_tokens == pytest.approx(expected, rel=0.02)
