"""Every example in manifests/examples plans offline to the hardware its `# plan:` comment names.

The examples' s3://, fsx:// and efs:// models cannot be read here, so each example is mapped to
the published config.json of its model (tests/unit/configs.py) and its spec.model.parameters."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from modelship.operator.api import load_manifest, load_spec
from modelship.operator.catalog import load_catalog
from modelship.operator.modelinfo import model_info_from_config
from modelship.operator.sizing import make_plan

from . import configs

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"
CONFIG_OF: dict[str, dict[str, Any]] = {
    "llama-3.1-8b-bf16": configs.LLAMA_3_1_8B,
    "llama-3.1-70b-8gpu": configs.LLAMA_3_70B,
    "llama-3.1-70b-int4": configs.LLAMA_3_70B,
    "mistral-7b-fsx": configs.MISTRAL_7B,
    "qwen2.5-7b-efs": configs.QWEN2_5_7B,
    "llama-3.1-8b-inferentia2": configs.LLAMA_3_1_8B,
    "llama-3-70b-trainium": configs.LLAMA_3_70B,
    "gte-qwen2-1.5b-embedding": configs.QWEN2_5_1_5B,  # gte-Qwen2 is a Qwen2 1.5B
    "llama-3.1-8b-autoscaling": configs.LLAMA_3_1_8B,
}
PLAN_COMMENT = re.compile(r"^# plan: (?P<instance>\S+) x(?P<count>\d+)", re.MULTILINE)
CATALOG = load_catalog()


def test_every_example_is_mapped() -> None:
    assert sorted(p.stem for p in EXAMPLES.glob("*.yaml")) == sorted(CONFIG_OF)


@pytest.mark.parametrize("name", sorted(CONFIG_OF))
def test_example_plans_to_its_stated_hardware(name: str) -> None:
    text = (EXAMPLES / f"{name}.yaml").read_text()
    expected = PLAN_COMMENT.search(text)
    assert expected, f"{name}.yaml: add a '# plan: <instance type> x<accelerators>' comment"
    document = yaml.safe_load(text)
    load_manifest(document)  # kind, apiVersion, metadata.name and the spec, as kubectl apply would
    spec = load_spec(document["spec"])
    assert spec.model.parameter_count, f"{name}.yaml: set spec.model.parameters"
    info = model_info_from_config(
        CONFIG_OF[name],
        weights=None,
        overrides=spec.model.architecture,
        parameters=spec.model.parameter_count,
        files=None,
    )
    plan = make_plan(info, spec, CATALOG)
    assert plan.chosen is not None, f"{name}: nothing fits: {plan.suggestions}"
    got = (plan.chosen.instance_type, plan.chosen.accelerator_count)
    assert got == (expected["instance"], int(expected["count"])), f"{name}: planned {got}"


def test_examples_cover_the_documented_cases() -> None:
    specs = {p.stem: yaml.safe_load(p.read_text())["spec"] for p in EXAMPLES.glob("*.yaml")}
    uris = [s["model"]["uri"] for s in specs.values()]
    assert any(u.startswith("fsx://") for u in uris) and any(u.startswith("efs://") for u in uris)
    families = {s.get("accelerator", {}).get("family") for s in specs.values()}
    assert {"inferentia", "trainium", "nvidia"} <= families
    assert any(s["model"].get("task") == "embed" for s in specs.values())
    assert any(s["model"].get("quantization", "").startswith("int4") for s in specs.values())
    assert any(s.get("replicas", {}).get("max", 1) > 1 for s in specs.values())
