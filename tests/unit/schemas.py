"""Validate rendered Kubernetes objects against the real schemas, for any test that renders YAML.

- Built-in kinds (apps/v1, v1, policy/v1, autoscaling/v2, ...) go through `kubernetes_validate`
  (the Kubernetes OpenAPI schema, strict: unknown fields fail), for the oldest Kubernetes minor we
  support on EKS and for the newest one the installed package ships.
- Custom resources (Karpenter, KEDA, prometheus-operator, LeaderWorkerSet) go through the upstream
  CRD files in the folder MODELSHIP_CRD_SCHEMAS names (default ../shared/crd-schemas/ beside the
  checkout, when it is there): the served version's openAPIV3Schema, converted to JSON
  Schema (nullable, int-or-string, and unknown fields rejected where the API server would silently
  prune them), checked with jsonschema's Draft 2020-12 validator. The object's metadata is checked
  against the Kubernetes ObjectMeta schema.
- CEL rules (`x-kubernetes-validations`) are NOT evaluated: no Python CEL evaluator is installed
  (`cel-python` 0.5.0 exists on PyPI). `unchecked_cel_rules(obj)` lists the rules that apply to the
  fields an object sets, so a test can name what was not checked.

    from tests.unit.schemas import validate_object
    validate_object(obj)        # raises SchemaError naming the kind, name, field path and problem

A fresh clone has no ../shared: a test that needs a CRD schema then skips with one line saying how
to point at a copy; built-in kinds are still validated. `.ci/run` requires the folder.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version
from referencing import Registry, Resource

# EKS standard support starts at 1.33; the newest schema the installed package ships is checked too.
OLDEST_KUBERNETES = "1.33"
NEWEST_KUBERNETES = ".".join(latest_version().split(".")[:2])

REPO_ROOT = Path(__file__).resolve().parents[2]
# ../shared/crd-schemas beside the checkout (here /work/shared, in CI the checkout's sibling).
CRD_DIR_VARIABLE = "MODELSHIP_CRD_SCHEMAS"
CRD_DIR_EXPLICIT = bool(os.environ.get(CRD_DIR_VARIABLE))
CRD_DIR = Path(os.environ.get(CRD_DIR_VARIABLE) or REPO_ROOT.parent / "shared" / "crd-schemas")

_OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


class SchemaError(AssertionError):
    """A rendered object that the API server would reject (or silently change)."""


def _describe(obj: dict[str, Any]) -> str:
    name = (obj.get("metadata") or {}).get("name", "?")
    return f"{obj.get('apiVersion')} {obj.get('kind')} {name!r}"


def _convert(node: Any) -> Any:
    """OpenAPI v3 structural schema (as in CRDs) -> JSON Schema with the API server's meaning."""
    if isinstance(node, list):
        return [_convert(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "format", "description"):
            continue  # x-kubernetes-* drive server behaviour; handled below where they matter
        if key in ("properties", "patternProperties"):
            out[key] = {name: _convert(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = _convert(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_convert(sub) for sub in value]
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
    # The API server prunes unknown fields without an error; rejecting them here catches typos.
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _crd_schemas_present() -> bool:
    return CRD_DIR.is_dir() and any(CRD_DIR.glob("*.yaml"))


def require_crd_schemas() -> None:
    """Skip the calling test, in one line, when there are no CRD schemas to validate against.

    A folder named explicitly by MODELSHIP_CRD_SCHEMAS that is missing or empty is a mistake, not
    a fresh clone: that fails the test instead of skipping it."""
    if _crd_schemas_present():
        return
    if CRD_DIR_EXPLICIT:
        pytest.fail(f"{CRD_DIR_VARIABLE}={CRD_DIR} has no CRD *.yaml files.", pytrace=False)
    pytest.skip(
        f"needs the upstream CRD schemas (Karpenter, KEDA, prometheus-operator, LWS): none at "
        f"{CRD_DIR}; set {CRD_DIR_VARIABLE} to a folder of their CRD YAML files"
    )


@functools.cache
def _crd_documents() -> tuple[dict[str, Any], ...]:
    """Every CRD file, parsed once (libyaml when available: the LWS CRD is 1.3 MB)."""
    require_crd_schemas()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return tuple(
        yaml.load(path.read_text(), Loader=loader) for path in sorted(CRD_DIR.glob("*.yaml"))
    )


@functools.cache
def _crd_validators() -> dict[tuple[str, str], jsonschema.Draft202012Validator]:
    """(apiVersion, kind) -> validator, for every served version of every CRD file (loaded once)."""
    validators: dict[tuple[str, str], jsonschema.Draft202012Validator] = {}
    for crd in _crd_documents():
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served", False):
                continue
            schema = _convert(version["schema"]["openAPIV3Schema"])
            schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft202012Validator(
                schema
            )
    return validators


@functools.cache
def _raw_crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for crd in _crd_documents():
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", False):
                schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


@functools.cache
def _object_meta_validator() -> jsonschema.Draft202012Validator:
    """ObjectMeta from kubernetes_validate's own strict definitions for the oldest version."""
    base = resources.files("kubernetes_validate").joinpath("kubernetes-json-schema")
    folder = base.joinpath(f"v{OLDEST_KUBERNETES}.0-local-strict")
    definitions = json.loads(folder.joinpath("_definitions.json").read_text())
    registry: Registry = Resource.from_contents(definitions) @ Registry()
    schema = {"$ref": f"{definitions['$id']}#/$defs/{_OBJECT_META}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _fail(obj: dict[str, Any], error: jsonschema.ValidationError, schema_name: str) -> SchemaError:
    path = ".".join(str(part) for part in error.absolute_path) or "(root)"
    return SchemaError(f"{_describe(obj)} fails {schema_name} at {path}: {error.message}")


def is_custom_resource(obj: dict[str, Any]) -> bool:
    """True when a CRD schema in CRD_DIR covers the object's apiVersion and kind."""
    return (obj.get("apiVersion"), obj.get("kind")) in _crd_validators()


def validate_object(obj: dict[str, Any]) -> None:
    """Validate one Kubernetes object; raise SchemaError saying what is wrong and where."""
    if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
        raise SchemaError(f"not a Kubernetes object (needs apiVersion and kind): {obj!r:.200}")
    key = (obj["apiVersion"], obj["kind"])
    if not (_crd_schemas_present() or CRD_DIR_EXPLICIT) and _is_builtin(obj):
        # No CRD schemas here (a fresh clone): built-in kinds are still checked in full.
        _validate_builtin(obj)
        return
    validator = _crd_validators().get(key)
    if validator is not None:
        error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
        if error is not None:
            raise _fail(obj, error, f"the {obj['kind']} CRD schema ({CRD_DIR.name})")
        meta_error = jsonschema.exceptions.best_match(
            _object_meta_validator().iter_errors(obj.get("metadata", {}))
        )
        if meta_error is not None:
            raise _fail(obj, meta_error, "ObjectMeta (metadata)")
        return
    _validate_builtin(obj)


def _is_builtin(obj: dict[str, Any]) -> bool:
    """True when kubernetes_validate has a schema for the object's apiVersion and kind."""
    try:
        kubernetes_validate.validate(obj, OLDEST_KUBERNETES, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return False
    except kubernetes_validate.ValidationError:
        return True
    return True


def _validate_builtin(obj: dict[str, Any]) -> None:
    for version in dict.fromkeys((OLDEST_KUBERNETES, NEWEST_KUBERNETES)):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            raise SchemaError(
                f"{_describe(obj)}: no schema for it in Kubernetes {version} (kubernetes_validate) "
                f"nor in {CRD_DIR}; check apiVersion and kind."
            ) from None
        except kubernetes_validate.ValidationError as error:
            raise _fail(obj, error, f"the Kubernetes {version} OpenAPI schema (strict)") from None


def _walk_rules(schema: dict[str, Any], value: Any, path: str) -> Iterator[str]:
    for rule in schema.get("x-kubernetes-validations", []) or []:
        yield f"{path or '.'}: {rule['rule']}"
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in value:
                yield from _walk_rules(sub, value[name], f"{path}.{name}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name in value:
                yield from _walk_rules(extra, value[name], f"{path}.{name}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield from _walk_rules(schema["items"], item, f"{path}[{index}]")


def unchecked_cel_rules(obj: dict[str, Any]) -> list[str]:
    """The CRD's CEL rules (x-kubernetes-validations) on the fields `obj` sets; none are evaluated."""
    schema = _raw_crd_schemas().get((obj.get("apiVersion", ""), obj.get("kind", "")))
    return [] if schema is None else list(dict.fromkeys(_walk_rules(schema, obj, "")))
