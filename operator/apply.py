"""The only code that writes a ModelDeployment's children to the cluster.

- Children (Deployment or LeaderWorkerSet, Service, PodDisruptionBudget, ScaledObject or HPA,
  PodMonitor) are written with server-side apply (`PATCH application/apply-patch+yaml`, field
  manager `modelship`, `force=true`); render has already set their owner references and the label
  `modelship.dev/model-deployment=<name>`. Applying the same objects twice changes nothing.
- Pruning lists every kind modelship renders with that label and deletes what the plan no longer
  wants (a kind whose CRD is not installed is skipped: there is nothing of it to prune).
- Shared node pools (cluster-scoped Karpenter NodePool + EC2NodeClass) are applied like children
  but have no owner: each ModelDeployment that uses a pool adds its own annotation
  `users.modelship.dev/<hash of namespace/name>: {"user": "ns/name", "object": <its render>}`
  with a JSON merge patch (one key per user, so concurrent reconciles never overwrite each other,
  and the keys are not owned by the `modelship` apply manager, so the next apply keeps them).
  The pool applied is every user's render combined (`nodepool.merge_node_pool_objects`: limits
  add up). Two users applying at the same moment may each apply a combination missing the
  other; the next periodic reconcile corrects it. A pool is deleted when its last user leaves.

Everything goes through `Kube`, a thin REST layer over `kubernetes.client.ApiClient` (which
brings the kubeconfig / in-cluster credentials and TLS).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

FIELD_MANAGER = "modelship"
MD_LABEL = "modelship.dev/model-deployment"
POOL_USER_PREFIX = "users.modelship.dev/"
KARPENTER_POOL_LABEL = "karpenter.sh/nodepool"


class KubeApiError(Exception):
    """A Kubernetes API call that failed; `status` is the HTTP status (0: no answer)."""

    def __init__(self, status: int, reason: str, message: str, what: str) -> None:
        super().__init__(f"{what}: HTTP {status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def transient(self) -> bool:
        """Worth retrying: the API server was unreachable, overloaded, or raced us."""
        return self.status in (0, 409, 429) or self.status >= 500


@dataclass(frozen=True)
class Kind:
    """One Kubernetes resource kind and where it lives in the API."""

    api_version: str
    kind: str
    plural: str
    namespaced: bool

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        """The REST path of the collection, or of one object when `name` is given."""
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        return f"{base}/{quote(name, safe='')}" if name else base


DEPLOYMENT = Kind("apps/v1", "Deployment", "deployments", True)
LEADER_WORKER_SET = Kind("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", "leaderworkersets", True)
SERVICE = Kind("v1", "Service", "services", True)
POD = Kind("v1", "Pod", "pods", True)
PDB = Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets", True)
SCALED_OBJECT = Kind("keda.sh/v1alpha1", "ScaledObject", "scaledobjects", True)
HPA = Kind("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers", True)
POD_MONITOR = Kind("monitoring.coreos.com/v1", "PodMonitor", "podmonitors", True)
CONFIG_MAP = Kind("v1", "ConfigMap", "configmaps", True)
NODE_POOL = Kind("karpenter.sh/v1", "NodePool", "nodepools", False)
NODE_CLAIM = Kind("karpenter.sh/v1", "NodeClaim", "nodeclaims", False)
EC2_NODE_CLASS = Kind("karpenter.k8s.aws/v1", "EC2NodeClass", "ec2nodeclasses", False)

# Kinds render may produce as namespaced children: the set pruning looks through.
CHILD_KINDS: tuple[Kind, ...] = (
    DEPLOYMENT,
    LEADER_WORKER_SET,
    SERVICE,
    PDB,
    SCALED_OBJECT,
    HPA,
    POD_MONITOR,
    CONFIG_MAP,
)
# Shared pool kinds, in deletion order (a NodePool goes before the EC2NodeClass it refers to).
POOL_KINDS: tuple[Kind, ...] = (NODE_POOL, EC2_NODE_CLASS)
WORKLOAD_KINDS: tuple[Kind, ...] = (DEPLOYMENT, LEADER_WORKER_SET)
_KINDS = {(k.api_version, k.kind): k for k in (*CHILD_KINDS, *POOL_KINDS, POD, NODE_CLAIM)}

# Shared pools are read, merged with every user's share and applied whole. Two reconciles doing
# that at once would each apply a merge without the other's share (the last one wins), so pool
# changes are serialized. One lock suffices: only the elected operator replica reconciles, and
# a pool change is a handful of API calls.
_POOL_LOCK = threading.RLock()


def kind_of(obj: Mapping[str, Any]) -> Kind:
    """The Kind of a rendered object; a kind modelship does not know is a programming error."""
    key = (str(obj.get("apiVersion")), str(obj.get("kind")))
    if key not in _KINDS:
        raise ValueError(f"modelship does not apply {key[1]} ({key[0]}); add it to apply.py")
    return _KINDS[key]


def object_key(obj: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """(apiVersion, kind, namespace, name): how an object is told apart from the others."""
    meta = obj.get("metadata") or {}
    return (
        str(obj.get("apiVersion")),
        str(obj.get("kind")),
        str(meta.get("namespace") or ""),
        str(meta.get("name")),
    )


def describe(obj: Mapping[str, Any]) -> str:
    """'Deployment ns/name' for messages and logs."""
    _, kind, namespace, name = object_key(obj)
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


class Kube:
    """A thin REST layer over `kubernetes.client.ApiClient`: JSON in, JSON out, errors raised."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client

    @classmethod
    def from_environment(cls) -> Kube:
        """Credentials from the pod's service account, else from $KUBECONFIG / ~/.kube/config."""
        import kubernetes

        try:
            kubernetes.config.load_incluster_config()
            return cls(kubernetes.client.ApiClient())
        except kubernetes.config.ConfigException:
            # $KUBECONFIG is read now, not when the kubernetes package was imported.
            config_file = os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0]
            return cls(kubernetes.config.new_client_from_config(config_file=config_file))

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        """One API call; returns the decoded JSON answer or raises KubeApiError."""
        import urllib3

        headers = {"Accept": "application/json", "Content-Type": content_type}
        params = self.api_client.param_serialize(
            method,
            path,
            query_params=list(query),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        what = f"{method} {path}"
        try:
            response = self.api_client.call_api(*params, _request_timeout=30)
            data = response.read()
        except urllib3.exceptions.HTTPError as error:
            raise KubeApiError(0, "Unreachable", str(error), what) from error
        except Exception as error:  # ApiException from the client's own checks
            status = int(getattr(error, "status", 0) or 0)
            raise KubeApiError(
                status, str(getattr(error, "reason", "")), str(error), what
            ) from error
        decoded = json.loads(data) if data else None
        if response.status >= 400:
            status_message = decoded.get("message", "") if isinstance(decoded, dict) else ""
            raise KubeApiError(response.status, str(response.reason), status_message, what)
        return decoded

    def get(self, kind: Kind, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return dict(self.request("GET", kind.path(namespace, name)))
        except KubeApiError as error:
            if error.status == 404:
                return None
            raise

    def list(
        self, kind: Kind, namespace: str | None = None, selector: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """Objects of a kind (matching `selector`); [] when the kind is not installed."""
        query = []
        if selector:
            query.append(("labelSelector", ",".join(f"{k}={v}" for k, v in selector.items())))
        try:
            listing = self.request("GET", kind.path(namespace), query=query)
        except KubeApiError as error:
            if error.status == 404:  # the CRD is not installed: nothing of that kind exists
                return []
            raise
        items = list((listing or {}).get("items") or [])
        # The result drives deletions, so check the labels again rather than trust the filter.
        return [item for item in items if _labels_match(item, selector or {})]

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply as the `modelship` field manager, taking over conflicting fields."""
        kind = kind_of(obj)
        _, _, namespace, name = object_key(obj)
        return dict(
            self.request(
                "PATCH",
                kind.path(namespace or None, name),
                query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
                body=dict(obj),
                content_type="application/apply-patch+yaml",
            )
        )

    def merge_patch(
        self,
        kind: Kind,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """A JSON merge patch (None values remove keys)."""
        path = kind.path(namespace, name) + (f"/{subresource}" if subresource else "")
        return dict(
            self.request(
                "PATCH",
                path,
                query=[("fieldManager", FIELD_MANAGER)],
                body=dict(patch),
                content_type="application/merge-patch+json",
            )
        )

    def delete(self, kind: Kind, namespace: str | None, name: str) -> bool:
        """Delete with background propagation; False when it was already gone."""
        try:
            self.request(
                "DELETE",
                kind.path(namespace, name),
                body={
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "propagationPolicy": "Background",
                },
            )
            return True
        except KubeApiError as error:
            if error.status == 404:
                return False
            raise


def _labels_match(obj: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(key) == value for key, value in selector.items())


@dataclass
class ApplyResult:
    """What one apply pass did, as 'Kind namespace/name' strings."""

    applied: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    pools_released: list[str] = field(default_factory=list)


def _essence(obj: Mapping[str, Any] | None) -> Any:
    """An object without the fields the server maintains, to tell whether an apply changed it."""
    if obj is None:
        return None
    data = {key: value for key, value in obj.items() if key != "status"}
    meta = {
        key: value
        for key, value in (obj.get("metadata") or {}).items()
        if key not in ("resourceVersion", "managedFields", "generation", "uid", "creationTimestamp")
    }
    data["metadata"] = meta
    return data


def apply_children(
    kube: Kube,
    md_name: str,
    namespace: str,
    children: Iterable[Mapping[str, Any]],
    detect_changes: bool = True,
) -> ApplyResult:
    """Apply every child, then prune the children (by label) that are no longer wanted.

    With detect_changes, each child is read first so that `changed` lists what the apply
    altered (one more request per child)."""
    result = ApplyResult()
    keep: set[tuple[str, str, str, str]] = set()
    for child in children:
        labels = (child.get("metadata") or {}).get("labels") or {}
        if labels.get(MD_LABEL) != md_name:
            raise ValueError(
                f"{describe(child)} lacks the label {MD_LABEL}={md_name}; render sets it"
            )
        kind = kind_of(child)
        _, _, child_namespace, name = object_key(child)
        before = kube.get(kind, child_namespace or None, name) if detect_changes else None
        after = kube.apply(child)
        result.applied.append(describe(child))
        if detect_changes and _essence(before) != _essence(after):
            result.changed.append(describe(child))
        keep.add(object_key(child))
    result.pruned = prune_children(kube, md_name, namespace, keep)
    return result


def prune_children(
    kube: Kube, md_name: str, namespace: str, keep: set[tuple[str, str, str, str]] | None = None
) -> list[str]:
    """Delete the labelled children of `md_name` not in `keep` (all of them when keep is empty)."""
    pruned = []
    for kind in CHILD_KINDS:
        for obj in kube.list(kind, namespace, {MD_LABEL: md_name}):
            obj.setdefault("apiVersion", kind.api_version)
            obj.setdefault("kind", kind.kind)
            if object_key(obj) in (keep or set()):
                continue
            name = str(obj["metadata"]["name"])
            if kube.delete(kind, namespace, name):
                pruned.append(describe(obj))
    return pruned


def pool_user_key(namespace: str, name: str) -> str:
    """The annotation key one ModelDeployment writes on each shared pool object it uses."""
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:24]
    return POOL_USER_PREFIX + digest


def pool_contributions(obj: Mapping[str, Any], exclude: str | None = None) -> dict[str, Any]:
    """{user annotation key: {'user': 'ns/name', 'object': its own render}} recorded on a pool."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    found = {}
    for key, value in annotations.items():
        if key.startswith(POOL_USER_PREFIX) and key != exclude:
            try:
                found[key] = json.loads(value)
            except ValueError:  # written by hand: count the user, contribute nothing
                found[key] = {"user": str(value), "object": None}
    return found


def pool_users(obj: Mapping[str, Any]) -> list[str]:
    """'namespace/name' of every ModelDeployment recorded as using a pool object."""
    return sorted(str(c.get("user")) for c in pool_contributions(obj).values())


def _merged_pool_object(
    mine: Mapping[str, Any] | None, live: Mapping[str, Any] | None, exclude: str
) -> dict[str, Any] | None:
    """This render of a pool object combined with the other users' recorded renders."""
    from .nodepool import merge_node_pool_objects

    renders = [[dict(mine)]] if mine is not None else []
    for contribution in pool_contributions(live or {}, exclude=exclude).values():
        if contribution.get("object"):
            renders.append([contribution["object"]])
    if not renders:
        return None
    merged = merge_node_pool_objects(renders)[0]
    merged.get("metadata", {}).pop("annotations", None)  # user keys are written by merge patch
    return merged


def apply_node_pool(
    kube: Kube, md_namespace: str, md_name: str, pool_objects: Sequence[Mapping[str, Any]]
) -> ApplyResult:
    """Apply the shared pool objects (combined with the other users' needs), record this
    ModelDeployment as a user with its own render, and release the pools it no longer uses."""
    with _POOL_LOCK:
        return _apply_node_pool(kube, md_namespace, md_name, pool_objects)


def _apply_node_pool(
    kube: Kube, md_namespace: str, md_name: str, pool_objects: Sequence[Mapping[str, Any]]
) -> ApplyResult:
    result = ApplyResult()
    user_key = pool_user_key(md_namespace, md_name)
    keep: set[tuple[str, str]] = set()
    for obj in pool_objects:
        kind = kind_of(obj)
        _, _, _, name = object_key(obj)
        before = kube.get(kind, None, name)
        merged = _merged_pool_object(obj, before, exclude=user_key)
        assert merged is not None  # `obj` itself is one of the renders
        after = kube.apply(merged)
        record = json.dumps(
            {"user": f"{md_namespace}/{md_name}", "object": dict(obj)}, separators=(",", ":")
        )
        kube.merge_patch(kind, None, name, {"metadata": {"annotations": {user_key: record}}})
        result.applied.append(describe(obj))
        if _essence(before) != _essence(after):
            result.changed.append(describe(obj))
        keep.add((kind.kind, name))
    result.pools_released = _release_node_pools(kube, md_namespace, md_name, keep)
    return result


def release_node_pools(
    kube: Kube, md_namespace: str, md_name: str, keep: set[tuple[str, str]] | None = None
) -> list[str]:
    """Drop this ModelDeployment from the pools it no longer uses: delete a pool left without
    users, or shrink it to what the remaining users asked for. Returns the pools deleted."""
    with _POOL_LOCK:
        return _release_node_pools(kube, md_namespace, md_name, keep)


def _release_node_pools(
    kube: Kube, md_namespace: str, md_name: str, keep: set[tuple[str, str]] | None
) -> list[str]:
    user_key = pool_user_key(md_namespace, md_name)
    deleted = []
    for kind in POOL_KINDS:
        for obj in kube.list(kind):
            name = str(obj["metadata"]["name"])
            annotations = obj["metadata"].get("annotations") or {}
            if user_key not in annotations or (kind.kind, name) in (keep or set()):
                continue
            remaining = kube.merge_patch(
                kind, None, name, {"metadata": {"annotations": {user_key: None}}}
            )
            if not pool_users(remaining):
                if kube.delete(kind, None, name):
                    deleted.append(f"{kind.kind} {name}")
                continue
            merged = _merged_pool_object(None, remaining, exclude=user_key)
            if merged is not None:
                kube.apply(merged)
    return deleted


@dataclass(frozen=True)
class Observation:
    """What the cluster says about one ModelDeployment's workload (input of status.py)."""

    workload: dict[str, Any] | None
    pods: list[dict[str, Any]]
    node_claims: list[dict[str, Any]]
    node_group_status: str | None = None


def observe(
    kube: Kube,
    namespace: str,
    md_name: str,
    workload: Mapping[str, Any] | None,
    pool_name: str | None,
    node_group_status: str | None = None,
) -> Observation:
    """Read the workload's live object, its pods and the pool's node claims."""
    live = None
    if workload is not None:
        _, _, _, name = object_key(workload)
        live = kube.get(kind_of(workload), namespace, name)
    pods = kube.list(POD, namespace, {MD_LABEL: md_name})
    claims = kube.list(NODE_CLAIM, None, {KARPENTER_POOL_LABEL: pool_name}) if pool_name else []
    return Observation(
        workload=live, pods=pods, node_claims=claims, node_group_status=node_group_status
    )
