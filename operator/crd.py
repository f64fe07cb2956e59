"""Generate the ModelDeployment CustomResourceDefinition from the pydantic API models.

`modelship crd > crds/modeldeployments.modelship.dev.yaml` writes it; a test fails when the
committed file differs from what the models generate. The JSON schema pydantic produces is turned
into a Kubernetes structural schema: references inlined, optional fields without `null`
branches, OpenAPI v3.0 keywords, descriptions everywhere (for `kubectl explain`).
"""

from __future__ import annotations

from typing import Any

import yaml

from . import api

_DROP = {"title", "additionalProperties", "$defs"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    node = dict(node)
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if node.get("x-kubernetes-int-or-string"):
            pass  # int-or-string carries no type of its own
        elif len(branches) == 1:
            node = {**branches[0], **node}
        else:
            raise ValueError(f"cannot express anyOf {branches} in a structural schema")
        if node.get("default", 0) is None:
            node.pop("default")
        if "$ref" in node:
            return _structural(node, defs)
    if "exclusiveMinimum" in node and not isinstance(node["exclusiveMinimum"], bool):
        node["minimum"] = node.pop("exclusiveMinimum")
        node["exclusiveMinimum"] = True
    if "exclusiveMaximum" in node and not isinstance(node["exclusiveMaximum"], bool):
        node["maximum"] = node.pop("exclusiveMaximum")
        node["exclusiveMaximum"] = True
    if node.get("default", 0) is None:
        node.pop("default")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {name: _structural(prop, defs) for name, prop in value.items()}
        else:
            out[key] = _structural(value, defs)
    return out


def _schema(model: type[api.BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    schema = _structural(raw, raw.get("$defs", {}))
    assert isinstance(schema, dict)
    return schema


def _require_descriptions(schema: dict[str, Any], path: str) -> None:
    for name, prop in schema.get("properties", {}).items():
        if not prop.get("description"):
            raise ValueError(f"{path}.{name} has no description; add Field(description=...)")
        _require_descriptions(prop, f"{path}.{name}")
        if "items" in prop:
            _require_descriptions(prop["items"], f"{path}.{name}[]")


PRINTER_COLUMNS = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.uri"},
    {"name": "Accelerator", "type": "string", "jsonPath": ".status.plan.acceleratorType"},
    {"name": "Instance", "type": "string", "jsonPath": ".status.plan.instanceType"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "Desired", "type": "integer", "jsonPath": ".status.replicas"},
    {"name": "Cost/h", "type": "string", "jsonPath": ".status.plan.costPerHourUsd"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition object for ModelDeployment."""
    spec = _schema(api.ModelDeploymentSpec)
    spec["description"] = (
        "What to serve (model), how (serving), on what hardware (accelerator) and how many "
        "replicas; the operator sizes and provisions the rest."
    )
    spec["x-kubernetes-validations"] = api.SPEC_CEL_RULES
    # `kubectl scale` reads and writes .spec.replicas.min: default the object so that path exists
    # on every ModelDeployment (structural defaulting then fills min's own default).
    spec["properties"]["replicas"]["default"] = {}
    status = _schema(api.ModelDeploymentStatus)
    status["description"] = "Observed state, written by the operator."
    # kopf records handler progress under status; keep what it writes instead of pruning it.
    status["x-kubernetes-preserve-unknown-fields"] = True
    _require_descriptions(spec, "spec")
    _require_descriptions(status, "status")
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": ["modelship"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas.min",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": (
                                "A language model served with vLLM on hardware the operator "
                                "sizes and provisions."
                            ),
                            "required": ["spec"],
                            "x-kubernetes-validations": api.NAME_CEL_RULES,
                            "properties": {
                                "apiVersion": {
                                    "type": "string",
                                    "description": "modelship.dev/v1alpha1",
                                },
                                "kind": {"type": "string", "description": "ModelDeployment"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `modelship crd` from operator/api.py; do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100)
