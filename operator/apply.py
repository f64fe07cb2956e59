"""The only code that writes a ModelDeployment's children to the cluster.

- Children (Deployment or LeaderWorkerSet, Service, PodDisruptionBudget, ScaledObject or HPA,
  PodMonitor) are written with server-side apply (`PATCH application/apply-patch+yaml`, field
  manager `modelship`, `force=true`); render has already set their owner references and the label
  `modelship.dev/model-deployment=<name>`. Applying the same objects twice changes nothing.
- A child someone edited by hand is restored to exactly its render: server-side apply alone
  would keep a foreign list entry merged in (a second Service port: every apply then fails with
  422), so a child whose managedFields show fields owned by another manager, or whose apply is
  rejected as invalid, is replaced (PUT) and applied again (`apply_child`).
- When a workload stops setting spec.replicas (an autoscaler takes over), a handover manager
  co-owns the current count first, so the apply does not reset it to one replica.
- Pruning lists the kinds render makes with that label and deletes what the plan no longer
  wants and the ModelDeployment owns; deletion of a ModelDeployment deletes its children by
  name, so no list (which a name that is no valid label value would fail) stands in its way.
- Shared node pools (cluster-scoped Karpenter NodePool + EC2NodeClass) are aggregates: the
  operator computes each from all ModelDeployments that want its hardware (a kopf index over
  them) and `sync_pool` applies that combination, or deletes the pool when nobody wants it.

Everything goes through `Kube`, a thin REST layer over `kubernetes.client.ApiClient` (which
brings the kubeconfig / in-cluster credentials and TLS).
"""

from __future__ import annotations

import copy
import json
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

FIELD_MANAGER = "modelship"
MD_LABEL = "modelship.dev/model-deployment"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
# Co-owns spec.replicas while it is handed from the fixed count to an autoscaler.
HANDOVER_MANAGER = "modelship-handover"
KARPENTER_POOL_LABEL = "karpenter.sh/nodepool"
# One API request, at most: a hung connection fails (and is retried), it is not waited on.
REQUEST_TIMEOUT_SECONDS = 30.0


def error_message(data: bytes) -> str:
    """The message of an error answer: a Status object's, or the plain text an API group
    nobody serves (its CRD is not installed) answers: "404 page not found"."""
    try:
        decoded = json.loads(data) if data else None
    except ValueError:
        return data.decode(errors="replace").strip()
    return str(decoded.get("message", "")) if isinstance(decoded, dict) else ""


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
# A Neuron compile Job (operator/compilejob.py): owned by its ModelDeployment, never pruned.
JOB = Kind("batch/v1", "Job", "jobs", True)

# Kinds render may produce as namespaced children: the set pruning looks through.
CHILD_KINDS: tuple[Kind, ...] = (
    DEPLOYMENT,
    LEADER_WORKER_SET,
    SERVICE,
    PDB,
    SCALED_OBJECT,
    HPA,
    POD_MONITOR,
)
# Shared pool kinds, in deletion order (a NodePool goes before the EC2NodeClass it refers to).
POOL_KINDS: tuple[Kind, ...] = (NODE_POOL, EC2_NODE_CLASS)
WORKLOAD_KINDS: tuple[Kind, ...] = (DEPLOYMENT, LEADER_WORKER_SET)
_KINDS = {(k.api_version, k.kind): k for k in (*CHILD_KINDS, *POOL_KINDS, POD, NODE_CLAIM, JOB)}

# Shared pools are read, merged with every user's share and applied whole. Two reconciles doing
# that at once would each apply a merge without the other's share (the last one wins), so pool
# changes are serialized. One lock suffices: only the elected operator replica reconciles, and
# a pool change is a handful of API calls.
_POOL_LOCK = threading.RLock()
# HTTP connections to the API server: one per thread that makes requests (handlers.py: kopf's
# MAX_WORKERS handler threads, RECONCILE_WORKERS and REFRESH_WORKERS).
CONNECTIONS = 40


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

    def __init__(self, api_client: Any, timeout_seconds: float = REQUEST_TIMEOUT_SECONDS) -> None:
        self.api_client = api_client
        self.timeout_seconds = timeout_seconds
        self._halted = threading.Event()

    def halt(self) -> None:
        """Refuse every later request at once. A replica that lost its Lease halts its client so
        that a handler thread finishes within one request timeout, not one per request it
        still had to make: kopf waits for handler threads before it stops."""
        self._halted.set()

    @property
    def halted(self) -> bool:
        return self._halted.is_set()

    def check_not_halted(self, what: str) -> None:
        if self._halted.is_set():
            raise KubeApiError(0, "Halted", "this replica is not the leader any more", what)

    @classmethod
    def from_environment(cls, timeout_seconds: float = REQUEST_TIMEOUT_SECONDS) -> Kube:
        """Credentials from the pod's service account, else from $KUBECONFIG / ~/.kube/config."""
        import kubernetes

        try:
            configuration = kubernetes.client.Configuration()
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            # $KUBECONFIG is read now, not when the kubernetes package was imported.
            config_file = os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0]
            configuration = kubernetes.client.Configuration()
            kubernetes.config.load_kube_config(
                config_file=config_file, client_configuration=configuration
            )
        # As many connections as handler threads: a smaller pool makes them queue for sockets.
        configuration.connection_pool_maxsize = CONNECTIONS
        return cls(kubernetes.client.ApiClient(configuration), timeout_seconds)

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
        self.check_not_halted(what)
        try:
            response = self.api_client.call_api(*params, _request_timeout=self.timeout_seconds)
            data = response.read()
        except urllib3.exceptions.HTTPError as error:
            raise KubeApiError(0, "Unreachable", str(error), what) from error
        except Exception as error:  # ApiException from the client's own checks
            status = int(getattr(error, "status", 0) or 0)
            raise KubeApiError(
                status, str(getattr(error, "reason", "")), str(error), what
            ) from error
        if response.status >= 400:
            raise KubeApiError(response.status, str(response.reason), error_message(data), what)
        return json.loads(data) if data else None

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
    restored: list[str] = field(default_factory=list)


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


def _leaf_paths(
    fields: Mapping[str, Any], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """The owned leaves of a managedFields fieldsV1 tree (`.` marks an owned list entry)."""
    children = {key: value for key, value in fields.items() if key != "."}
    if not children:
        yield prefix
        return
    if "." in fields:
        yield prefix
    for key, value in children.items():
        yield from _leaf_paths(value if isinstance(value, Mapping) else {}, (*prefix, key))


def foreign_fields(live: Mapping[str, Any]) -> list[str]:
    """Managers other than modelship owning desired-state fields (anything outside metadata and
    status) that modelship's apply does not own: a hand edit (which takes the field's ownership),
    or a list entry someone added, which server-side apply would otherwise keep merged in.
    Writers through a subresource (status, scale: kubelets, controllers, autoscalers) and the
    replicas handover manager do not count. Returns the managers, sorted."""
    ours: set[tuple[str, ...]] = set()
    theirs: dict[str, set[tuple[str, ...]]] = {}
    for entry in (live.get("metadata") or {}).get("managedFields") or []:
        if entry.get("subresource") or entry.get("manager") == HANDOVER_MANAGER:
            continue
        fields = {
            key: value
            for key, value in (entry.get("fieldsV1") or {}).items()
            if key not in ("f:metadata", "f:status")
        }
        paths = set(_leaf_paths(fields)) if fields else set()
        if entry.get("manager") == FIELD_MANAGER:
            ours |= paths
        else:
            theirs.setdefault(str(entry.get("manager")), set()).update(paths)
    return sorted(
        manager
        for manager, paths in theirs.items()
        if any(not any(path[: len(own)] == own for own in ours) for path in paths)
    )


def _owns_replicas(live: Mapping[str, Any]) -> bool:
    return any(
        entry.get("manager") == FIELD_MANAGER
        and entry.get("operation") == "Apply"
        and "f:replicas" in ((entry.get("fieldsV1") or {}).get("f:spec") or {})
        for entry in (live.get("metadata") or {}).get("managedFields") or []
    )


def _hand_over_replicas(kube: Kube, obj: Mapping[str, Any], live: Mapping[str, Any]) -> None:
    """Before an apply that stops setting spec.replicas (the autoscaler takes over), let a second
    manager co-own the current value: otherwise server-side apply removes the field and the
    workload drops to its default of one replica (Kubernetes docs, "Transferring ownership")."""
    replicas = (live.get("spec") or {}).get("replicas")
    _, _, namespace, name = object_key(obj)
    kind = kind_of(obj)
    kube.request(
        "PATCH",
        kind.path(namespace or None, name),
        query=[("fieldManager", HANDOVER_MANAGER), ("force", "true")],
        body={
            "apiVersion": obj["apiVersion"],
            "kind": obj["kind"],
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": replicas},
        },
        content_type="application/apply-patch+yaml",
    )


def replace_child(kube: Kube, obj: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    """Make the object exactly `obj` (PUT with the live resourceVersion), then apply it so that
    modelship's apply manager owns every field again. Values the server allocates (a Service's
    cluster IP) are kept by the server; an autoscaler's replica count is kept."""
    kind = kind_of(obj)
    _, _, namespace, name = object_key(obj)
    body = copy.deepcopy(dict(obj))
    body["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
    live_spec = live.get("spec") or {}
    keeps_replicas = kind in WORKLOAD_KINDS and "replicas" not in body.get("spec", {})
    if keeps_replicas and live_spec.get("replicas") is not None:
        body["spec"]["replicas"] = live_spec["replicas"]
    if kind == SERVICE:
        for key in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
            if key in live_spec and key not in body["spec"]:
                body["spec"][key] = live_spec[key]
    kube.request(
        "PUT",
        kind.path(namespace or None, name),
        query=[("fieldManager", FIELD_MANAGER)],
        body=body,
    )
    return kube.apply(obj)


def apply_child(
    kube: Kube, obj: Mapping[str, Any], live: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], str | None]:
    """Apply one child and restore it to exactly what render produced.

    Returns the object after the apply, and why it had to be replaced (None when the apply
    alone made it right). `live` is the current object when the caller has it already."""
    kind = kind_of(obj)
    _, _, namespace, name = object_key(obj)
    hands_over = kind in WORKLOAD_KINDS and "replicas" not in (obj.get("spec") or {})
    if hands_over and live is None:
        live = kube.get(kind, namespace or None, name)
    if hands_over and live is not None and _owns_replicas(live):
        _hand_over_replicas(kube, obj, live)
    try:
        after = kube.apply(obj)
    except KubeApiError as error:
        # A hand-edited list merged with ours can be invalid (a port name twice): 422.
        if error.status != 422:
            raise
        current = kube.get(kind, namespace or None, name)
        if current is None:
            raise
        return replace_child(kube, obj, current), f"apply failed ({error.message})"
    managers = foreign_fields(after)
    if managers:
        return replace_child(kube, obj, after), f"edited by {', '.join(managers)}"
    return after, None


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    """Whether the object names `uid` among its owners."""
    owners = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(owner.get("uid") == uid for owner in owners)


def apply_children(
    kube: Kube,
    md_name: str,
    namespace: str,
    children: Iterable[Mapping[str, Any]],
    detect_changes: bool = True,
    owner_uid: str | None = None,
) -> ApplyResult:
    """Apply every child (restoring hand edits), then prune the children of `md_name` that are
    no longer wanted: only objects owned by `owner_uid` (when given), only kinds render makes.

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
        after, replaced = apply_child(kube, child, before)
        result.applied.append(describe(child))
        if replaced:
            result.restored.append(f"{describe(child)}: {replaced}")
        if detect_changes and _essence(before) != _essence(after):
            result.changed.append(describe(child))
        keep.add(object_key(child))
    result.pruned = prune_children(kube, md_name, namespace, keep, owner_uid)
    return result


def delete_children(kube: Kube, children: Iterable[Mapping[str, Any]]) -> list[str]:
    """Delete the named children (no list: works for any name). Returns what was deleted."""
    deleted = []
    for child in children:
        _, _, namespace, name = object_key(child)
        if kube.delete(kind_of(child), namespace or None, name):
            deleted.append(describe(child))
    return deleted


def prune_children(
    kube: Kube,
    md_name: str,
    namespace: str,
    keep: set[tuple[str, str, str, str]] | None = None,
    owner_uid: str | None = None,
) -> list[str]:
    """Delete the labelled children of `md_name` not in `keep` (all when keep is empty) that
    `owner_uid` owns (when given): an object someone else labelled is never touched."""
    pruned: list[str] = []
    for kind in CHILD_KINDS:
        try:
            found = kube.list(kind, namespace, {MD_LABEL: md_name})
        except KubeApiError as error:
            if error.status == 400:  # not a valid label value: no object can carry it
                return pruned
            raise
        for obj in found:
            obj.setdefault("apiVersion", kind.api_version)
            obj.setdefault("kind", kind.kind)
            if object_key(obj) in (keep or set()):
                continue
            if owner_uid is not None and not owned_by(obj, owner_uid):
                continue
            name = str(obj["metadata"]["name"])
            if kube.delete(kind, namespace, name):
                pruned.append(describe(obj))
    return pruned


def sync_pool(kube: Kube, pool_name: str, objects: Sequence[Mapping[str, Any]]) -> list[str]:
    """Make one shared pool exactly `objects` (every user's share combined, by the caller, from
    an index of the ModelDeployments that want it); delete it when `objects` is empty.

    The pool is an aggregate, never edited per user, so it needs no bookkeeping on the object
    and a deleted pool is simply applied again. Returns what was applied or deleted."""
    done = []
    with _POOL_LOCK:
        if not objects:
            for kind in POOL_KINDS:  # NodePool first: it refers to the EC2NodeClass
                live = kube.get(kind, None, pool_name)
                labels = ((live or {}).get("metadata") or {}).get("labels") or {}
                if live is not None and labels.get(MANAGED_BY_LABEL) == "modelship":
                    kube.delete(kind, None, pool_name)
                    done.append(f"deleted {kind.kind} {pool_name}")
            return done
        for obj in objects:
            kube.apply(obj)
            done.append(f"applied {describe(obj)}")
    return done


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
