"""A kopf operator that creates the same children as modelship, with no planning at all: the
floor for an operator that does modelship's job, which bench/reconcile_bench.py times beside
the no-op one (bench/noop_operator.py) and modelship.

The benchmark renders one ModelDeployment of the round's model with `modelship render` and
gives this operator the documents (BENCH_CHILDREN_TEMPLATE: a JSON object of the documents
and the placeholders they were rendered with for the name, namespace and uid). For each
ModelDeployment labelled `bench.modelship.dev/operator: children` it creates those children
(Deployment, Service, PodMonitor) with the ModelDeployment's name, namespace and uid, the node
pool once, then writes `status.benchNoop`. It is tuned as a kopf user would tune it: the
kubernetes client's typed create calls without decoding the answers (`_preload_content=False`),
as many handler threads and pooled connections as modelship has (16), standalone (no peering).

    BENCH_CHILDREN_TEMPLATE=children.json kopf run --standalone --all-namespaces \\
        bench/children_operator.py
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import kopf
import kubernetes

LABEL = "bench.modelship.dev/operator"
WORKERS = 16
PLURALS = {"PodMonitor": "podmonitors", "NodePool": "nodepools", "EC2NodeClass": "ec2nodeclasses"}
_pools_created = threading.Event()
_pools_lock = threading.Lock()


def template() -> tuple[str, list[dict[str, Any]], dict[str, str]]:
    """(the namespaced children as JSON text, the cluster-scoped pool, the placeholders the
    benchmark rendered them with: name, namespace and uid)."""
    with open(os.environ["BENCH_CHILDREN_TEMPLATE"]) as source:
        given = json.load(source)
    documents = given["documents"]
    children = [d for d in documents if d["kind"] in ("Deployment", "Service", "PodMonitor")]
    pools = [d for d in documents if d["kind"] in ("NodePool", "EC2NodeClass")]
    return json.dumps(children), pools, given["placeholders"]


TEMPLATE: tuple[str, list[dict[str, Any]], dict[str, str]] | None = None


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    global TEMPLATE
    settings.execution.max_workers = WORKERS
    kubernetes.config.load_kube_config()
    configuration = kubernetes.client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = WORKERS
    kubernetes.client.Configuration.set_default(configuration)
    TEMPLATE = template()


def create(namespace: str, document: dict[str, Any]) -> None:
    """Create one child; one that exists already (a resumed object) is left as it is."""
    kind = document["kind"]
    try:
        if kind == "Deployment":
            kubernetes.client.AppsV1Api().create_namespaced_deployment(
                namespace, document, _preload_content=False
            )
        elif kind == "Service":
            kubernetes.client.CoreV1Api().create_namespaced_service(
                namespace, document, _preload_content=False
            )
        else:
            group, version = document["apiVersion"].split("/")
            kubernetes.client.CustomObjectsApi().create_namespaced_custom_object(
                group, version, namespace, PLURALS[kind], document, _preload_content=False
            )
    except kubernetes.client.ApiException as error:
        if error.status != 409:
            raise


def create_pools(pools: list[dict[str, Any]]) -> None:
    """The shared node pool, once per process."""
    with _pools_lock:
        if _pools_created.is_set():
            return
        for document in pools:
            group, version = document["apiVersion"].split("/")
            try:
                kubernetes.client.CustomObjectsApi().create_cluster_custom_object(
                    group, version, PLURALS[document["kind"]], document,
                    _preload_content=False,
                )  # fmt: skip
            except kubernetes.client.ApiException as error:
                if error.status != 409:
                    raise
        _pools_created.set()


@kopf.on.resume("modelship.dev", "v1alpha1", "modeldeployments", labels={LABEL: "children"})
@kopf.on.create("modelship.dev", "v1alpha1", "modeldeployments", labels={LABEL: "children"})
def reconcile(name: str, namespace: str, uid: str, patch: kopf.Patch, **_: Any) -> None:
    """Create the children, then mark the object reconciled."""
    assert TEMPLATE is not None
    children, pools, placeholders = TEMPLATE
    create_pools(pools)
    text = children
    for placeholder, value in (
        (placeholders["name"], name),
        (placeholders["namespace"], namespace),
        (placeholders["uid"], uid),
    ):
        text = text.replace(placeholder, value)
    for document in json.loads(text):
        create(namespace, document)
    patch.status["benchNoop"] = "reconciled"
