"""Write manifests/install.yaml: the Helm chart rendered with its default values, as plain YAML.

    .venv/bin/python manifests/generate.py          # rewrite manifests/install.yaml
    .venv/bin/python manifests/generate.py --check  # exit 1 when install.yaml is stale

Rendered with Helm's own engine (helm-python-sdk), release `modelship` in namespace
`modelship-system`; the chart's CRDs come first, then a Namespace, then the templates.
tests/unit/test_manifests.py fails when the file drifts from the chart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import helm_python
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "modelship"
INSTALL = ROOT / "manifests" / "install.yaml"
RELEASE = "modelship"
NAMESPACE = "modelship-system"

# Apply order: what others refer to first.
_KIND_ORDER = [
    "CustomResourceDefinition",
    "Namespace",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "ConfigMap",
    "Service",
    "Deployment",
]


def render_chart(
    values: dict[str, Any] | None = None, namespace: str = NAMESPACE, release: str = RELEASE
) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` renders it (NOTES.txt included)."""
    chart = helm_python.Chart.load(CHART)
    return chart.render(values or {}, name=release, namespace=namespace, is_install=True)


def chart_objects(
    values: dict[str, Any] | None = None, namespace: str = NAMESPACE
) -> list[dict[str, Any]]:
    """Every object the chart installs (its crds/ and its templates), in apply order."""
    objects: list[dict[str, Any]] = []
    for path in sorted(CHART.glob("crds/*.yaml")):
        objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for name, text in sorted(render_chart(values, namespace).items()):
        if name.endswith(".txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]

    def rank(obj: dict[str, Any]) -> int:
        kind = str(obj.get("kind"))
        return _KIND_ORDER.index(kind) if kind in _KIND_ORDER else len(_KIND_ORDER)

    return sorted(objects, key=rank)  # stable: same-kind objects keep the chart's order


def install_yaml() -> str:
    """The text of manifests/install.yaml."""
    namespace = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": NAMESPACE, "labels": {"app.kubernetes.io/name": "modelship"}},
    }
    objects = chart_objects()
    crds = [o for o in objects if o["kind"] == "CustomResourceDefinition"]
    rest = [o for o in objects if o["kind"] != "CustomResourceDefinition"]
    header = (
        "# modelship: plain-YAML install, generated from helm/modelship with its default values by\n"
        "# `python manifests/generate.py` (do not edit; change the chart and regenerate).\n"
        "# Needs Karpenter, KEDA, prometheus-operator and LeaderWorkerSet CRDs for the default\n"
        "# integrations. Set MODELSHIP_CLUSTER_NAME and MODELSHIP_NODE_ROLE in the ConfigMap\n"
        "# modelship-config (the operator refuses to start without them, saying so), then apply\n"
        "# it in one go: kubectl apply --server-side -f install.yaml\n"
    )
    body = "---\n".join(
        yaml.safe_dump(obj, sort_keys=False, width=100) for obj in [*crds, namespace, *rest]
    )
    return header + "---\n" + body


def main(argv: list[str] | None = None) -> int:
    """Write install.yaml, or with --check report whether it is up to date."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when install.yaml is stale")
    args = parser.parse_args(argv)
    text = install_yaml()
    if args.check:
        if not INSTALL.exists() or INSTALL.read_text() != text:
            print(f"{INSTALL} is stale: run python manifests/generate.py", file=sys.stderr)
            return 1
        return 0
    INSTALL.write_text(text)
    print(f"wrote {INSTALL}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
