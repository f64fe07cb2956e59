"""manifests/install.yaml is the chart rendered with default values, and every object is valid."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

from tests.unit.schemas import validate_object

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "manifests_generate", ROOT / "manifests" / "generate.py"
)
assert _spec is not None and _spec.loader is not None
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)


def test_install_yaml_matches_the_chart() -> None:
    assert generate.INSTALL.read_text() == generate.install_yaml(), (
        "manifests/install.yaml drifted from helm/modelship: run .venv/bin/python manifests/generate.py"
    )
    assert generate.main(["--check"]) == 0


def test_install_yaml_objects_are_valid_and_namespaced_in_order() -> None:
    documents = [d for d in yaml.safe_load_all(generate.INSTALL.read_text()) if d]
    kinds = [d["kind"] for d in documents]
    # One CRD (ModelDeployment) and no object of a kind it defines: one apply works on a fresh
    # cluster (tests/integration/test_operator_real.py applies it with the real kubectl).
    assert kinds[:2] == ["CustomResourceDefinition", "Namespace"]
    assert kinds.index("Namespace") < kinds.index("Deployment")
    assert "ModelDeployment" not in kinds
    for document in documents:
        validate_object(document)
        namespace = document["metadata"].get("namespace")
        assert namespace in (None, generate.NAMESPACE), document["metadata"]


def test_reference_docs_match_the_api() -> None:
    from modelship.operator import docgen

    assert docgen.REFERENCE.read_text() == docgen.reference_markdown(), (
        "docs/reference.md drifted from operator/api.py: run python -m modelship.operator.docgen"
    )
