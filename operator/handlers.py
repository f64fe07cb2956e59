"""kopf handlers: parse, inspect, plan, render, apply, report. No business logic lives here.

- create / update (of spec) / resume: queue a reconcile. Reconciles run on threads of their own
  (RECONCILE_WORKERS), from the ModelDeployment as the index holds it when its turn comes, not
  in kopf's per-object handler machinery (which held a worker, its retries and a copy of every
  object in flight: a third of the operator's peak memory with 1000 created at once). The last
  good plan is kept in the cluster (`status.lastGood`: generation, spec and placement, written
  with the rest of the status), so any replica can restore children after a restart without
  reading the model again. A bad spec, an unreadable model or a plan with no placement is
  reported in status and a Warning Event; the running children are left as they are (the last
  good workload keeps serving) and nothing is retried until the spec changes. A model store or
  API server that fails for now is retried with backoff and shown in status meanwhile.
- Watches wake the owner, as controller-runtime's `Owns()` does: a child deleted or edited by
  hand is restored at once; a changed workload, pod or NodeClaim refreshes status (written only
  when it changed). Children and pods, the many objects, are watched by informers of our own
  (informer.py), which handle each event as they read it; ModelDeployments, compile Jobs,
  NodeClaims and pools by kopf. Pods, NodeClaims and ModelDeployments are read from the
  informers' store and kopf's indexes, so an idle ModelDeployment costs no requests. A slow resync (MODELSHIP_RESYNC_SECONDS; one thread,
  spread evenly over the period) is the safety net.
- Node pools are aggregates: the `pool_users` index maps each pool to the ModelDeployments that
  want it (current placement, and the previous one until the new workload is rolled out: make
  before break); a pool is applied as their combination, from one queue at most once a second
  per pool, and deleted when nobody wants it. A deleted NodePool is applied again.
- delete: delete children by name (no list a bad name could fail), leave the pools.

Settings: no kopf peering (operator/leader.py elects one replica with a Lease), finalizer
`modelship.dev/finalizer`, kopf's progress and diff-base kept in annotations, Events posted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import datetime
import functools
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import kopf

from . import compilejob
from .api import GROUP, PLURAL, VERSION, ModelDeploymentSpec, SpecError, check_name, load_spec
from .apply import (
    CHILD_KINDS,
    KARPENTER_POOL_LABEL,
    MD_LABEL,
    POD,
    REQUEST_TIMEOUT_SECONDS,
    WORKLOAD_KINDS,
    Kind,
    Kube,
    KubeApiError,
    Observation,
    apply_child,
    apply_children,
    delete_children,
    foreign_fields,
    kind_of,
    object_key,
    prune_children,
    sync_pool,
)
from .catalog import Catalog, load_catalog
from .config import ConfigError, OperatorConfig, check_operator_config, load_config
from .informer import Informer, Store
from .kvfeedback import PrometheusError, measured_kv_tokens
from .leader import LeaderElector, LeaseSettings
from .lru import Lru
from .modelinfo import ModelInfoError, inspect_model, s3_client
from .nodegroups import NodeGroups
from .nodepool import karpenter_objects, merge_node_pool_objects, pool_name
from .opmetrics import METRICS
from .plan import Placement, Plan
from .policy import refuse_disallowed_source
from .render import (
    GENERATION_ANNOTATION,
    ModelDeploymentRef,
    Rendered,
    RenderError,
    endpoint_url,
    render,
    replica_bounds,
)
from .sizing import make_plan
from .source import S3Source
from .status import Failure, ReconcileFacts, StatusUpdate, build_status
from .workqueue import Resyncer, WorkQueue

FINALIZER = "modelship.dev/finalizer"
LAST_GOOD = "modelship.dev/last-good"
RETRY_SECONDS = 10
MAX_RETRY_SECONDS = 300
# Threads that wait on the API, not on the CPU (apply.CONNECTIONS has a connection for each):
# kopf's, for its sync handlers (cleanup, compile Jobs, pool restores), and the reconciles'.
MAX_WORKERS = 16
RECONCILE_WORKERS = 16
RESTORE_WORKERS = 2
RENDERS_CACHED = 64
FACTS_CACHED = 4096  # ~1 KiB each
# Watch events ask for status refreshes through a queue (workqueue.py): each key waits this long,
# folding the burst of events a new or changing ModelDeployment brings into one refresh.
REFRESH_DELAY_SECONDS = 1.0
REFRESH_WORKERS = 8
# The reconciling clients of the running kopf (made at its start-up), halted when the Lease is
# lost (see run_elected).
_RECONCILING: list[Kube] = []
RESOURCE = (GROUP, VERSION, PLURAL)
MD_KIND = Kind(f"{GROUP}/{VERSION}", "ModelDeployment", PLURAL, True)
POOL_RESOURCES = ("nodepools.karpenter.sh", "ec2nodeclasses.karpenter.k8s.aws")
MANAGED = {"app.kubernetes.io/managed-by": "modelship"}
# Label selectors the API server applies to every watch but the ModelDeployments' own: the
# handlers below take only objects with these labels. kopf filters a handler's `labels` on its
# side, so without them it would watch every Job and NodeClaim of the cluster, decoding each
# event and keeping a memory of each object. Children and pods, the many objects, are watched by
# informers of our own (informer.py) with the selector INFORMER_SELECTOR.
INFORMER_SELECTOR = MD_LABEL
WATCH_SELECTORS: dict[tuple[str, ...], str] = {
    ("jobs.batch",): f"{MD_LABEL},{compilejob.ROLE_LABEL}=compile",
    ("nodeclaims.karpenter.sh",): KARPENTER_POOL_LABEL,
    **{
        (resource,): ",".join(f"{k}={v}" for k, v in MANAGED.items()) for resource in POOL_RESOURCES
    },
}
logger = logging.getLogger("modelship.operator")

Key = tuple[str, str]  # (namespace, name) of a ModelDeployment


@dataclass(frozen=True)
class Context:
    """What every handler needs, built once at start-up."""

    config: OperatorConfig
    catalog: Catalog
    kube: Kube
    node_groups: NodeGroups | None


@dataclass
class State:
    """Shared by every handler (kopf gives each object a shallow copy of the operator's memo, so
    these containers are the same objects everywhere)."""

    failures: dict[Key, Failure] = field(default_factory=dict)
    # What the change handlers last acted on: (generation, last good plan). Refreshes between
    # them use this rather than the watched object, whose annotation and status may lag.
    acted: dict[Key, tuple[int, LastGood | None]] = field(default_factory=dict)
    workloads: dict[Key, dict[str, Any]] = field(default_factory=dict)
    # (namespace, ModelDeployment) -> its pods (metadata, node, status), from the pod informer.
    pods: Store = field(default_factory=Store)
    # KV-cache tokens vLLM allocated, read from Prometheus at each resync (kvfeedback.py).
    measured_kv: dict[Key, int] = field(default_factory=dict)
    applied_pools: dict[str, dict[str, str]] = field(default_factory=dict)  # pool -> kind -> JSON
    # Pool applies in flight and the latest combination wanted of each (see sync_pools).
    pool_busy: set[str] = field(default_factory=set)
    pool_wanted: dict[str, tuple[list[dict[str, Any]], dict[str, str], bool]] = field(
        default_factory=dict
    )
    pool_guard: threading.Lock = field(default_factory=threading.Lock)
    # The status this process last wrote, with the resourceVersion the write returned. The
    # watched object lags behind our own writes; comparing with it made every child event in
    # that window rewrite the same status and post its Events again (~14 writes and ~28 Events
    # per new ModelDeployment on a real API server).
    written: dict[Key, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    # ModelDeployments whose status a refresh could not recompute (lock held): see refresh.
    dirty: set[Key] = field(default_factory=set)
    shares: dict[tuple[str, int], list[dict[str, Any]]] = field(default_factory=dict)
    rendered: Lru[tuple[str, str], Rendered] = field(default_factory=lambda: Lru(RENDERS_CACHED))
    facts: Lru[tuple[str, str], RenderFacts] = field(default_factory=lambda: Lru(FACTS_CACHED))
    # Transient failures in a row of the generation being retried: (generation, count).
    retries: dict[Key, tuple[int, int]] = field(default_factory=dict)
    # Reconciles asked for by the change handlers; refreshes asked for by watch events; and
    # kopf's indexes they read (the same live objects in every handler's kwargs).
    reconciles: WorkQueue | None = None
    queue: WorkQueue | None = None
    # Children to restore: (owner, child) -> (owner, the child as last seen, deleted).
    restores: WorkQueue | None = None
    restoring: dict[tuple[Key, Any], tuple[dict[str, Any], dict[str, Any], bool]] = field(
        default_factory=dict
    )
    informers: list[Informer] = field(default_factory=list)
    pool_queue: WorkQueue | None = None
    resyncer: Resyncer | None = None
    indexes: Mapping[str, Any] = field(default_factory=dict)
    _locks: dict[Key, threading.Lock] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def lock(self, key: Key) -> threading.Lock:
        """One lock per ModelDeployment: its handlers never interleave."""
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def forget(self, key: Key) -> None:
        self.failures.pop(key, None)
        self.retries.pop(key, None)
        self.acted.pop(key, None)
        self.measured_kv.pop(key, None)
        self.workloads.pop(key, None)
        self.written.pop(key, None)
        self.dirty.discard(key)
        with self._guard:
            self._locks.pop(key, None)


@dataclass(frozen=True)
class LastGood:
    """The last plan that applied: what the running children are made from. `draining` holds
    earlier placements whose pods may still serve until the new workload is rolled out."""

    generation: int
    spec: ModelDeploymentSpec
    placement: Placement
    draining: tuple[Placement, ...] = ()

    def annotation(self) -> str:
        return json.dumps(
            {
                "generation": self.generation,
                "spec": self.spec.to_k8s(),
                "placement": self.placement.to_json_dict(),
                "draining": [p.to_json_dict() for p in self.draining],
            },
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> LastGood | None:
        """From `status.lastGood`, or the annotation that earlier versions kept it in."""
        text = (body.get("status") or {}).get("lastGood") or (
            (body.get("metadata") or {}).get("annotations") or {}
        ).get(LAST_GOOD)
        return _parse_last_good(text) if text else None


@functools.lru_cache(maxsize=4096)
def _parse_last_good(text: str) -> LastGood | None:
    """The recorded plan. Cached by its text: the pool index and the handlers read it on every
    watch event of the ModelDeployment (JSON and three pydantic validations each time was a
    tenth of the event loop's CPU with 400 new ModelDeployments); a LastGood is never mutated."""
    try:
        data = json.loads(text)
        return LastGood(
            generation=int(data["generation"]),
            spec=ModelDeploymentSpec.model_validate(data["spec"]),
            placement=Placement.model_validate(data["placement"]),
            draining=tuple(Placement.model_validate(p) for p in data.get("draining") or []),
        )
    except (ValueError, KeyError, TypeError) as error:  # edited by hand: plan afresh
        logger.warning("ignoring an unreadable last good plan: %s", error)
        return None


class Rejected(Exception):
    """The spec cannot be acted on (now); carries the status failure."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def key_of(body: Mapping[str, Any]) -> Key:
    meta = body["metadata"]
    return str(meta["namespace"]), str(meta["name"])


def md_ref(
    body: Mapping[str, Any], spec: ModelDeploymentSpec, generation: int
) -> ModelDeploymentRef:
    meta = body["metadata"]
    return ModelDeploymentRef(
        name=meta["name"],
        namespace=meta["namespace"],
        uid=meta["uid"],
        generation=generation,
        spec=spec,
    )


def rendered_for(
    context: Context, state: State, body: Mapping[str, Any], last: LastGood
) -> Rendered:
    """The children of the last good plan (pure). Only the latest few are cached, for the
    renders of one reconcile: a whole render is ~36 KiB of Python objects (36 MiB held with
    1000 ModelDeployments) and takes ~2 ms; what the watches need of it is in render_facts."""
    cache_key = (str(body["metadata"]["uid"]), last.annotation())
    cached = state.rendered.get(cache_key)
    if cached is None:
        cached = render(md_ref(body, last.spec, last.generation), last.placement, context.config)
        state.rendered.put(cache_key, cached)
    return cached


@dataclass(frozen=True)
class RenderFacts:
    """What status and the drift check of every watch event need of a render (~1 KiB)."""

    pool_name: str
    node_group: str | None
    selector: str | None  # the workload's; None when the plan renders no workload
    # every child -> the replica count it fixes (None: the autoscaler's or none)
    replicas: Mapping[tuple[str, str, str, str], int | None]


def render_facts(
    context: Context, state: State, body: Mapping[str, Any], last: LastGood
) -> RenderFacts:
    """RenderFacts of the last good plan, cached per ModelDeployment and plan."""
    cache_key = (str(body["metadata"]["uid"]), last.annotation())
    cached = state.facts.get(cache_key)
    if cached is None:
        rendered = rendered_for(context, state, body, last)
        workload = next((c for c in rendered.children if kind_of(c) in WORKLOAD_KINDS), None)
        selector = None
        if workload is not None:
            match = (workload.get("spec") or {}).get("selector", {}).get("matchLabels") or {}
            selector = ",".join(f"{k}={v}" for k, v in match.items())
        cached = RenderFacts(
            pool_name=rendered.pool_name,
            node_group=rendered.node_group.name if rendered.node_group else None,
            selector=selector,
            replicas={
                object_key(c): (c.get("spec") or {}).get("replicas") for c in rendered.children
            },
        )
        state.facts.put(cache_key, cached)
    return cached


def pools_of(last: LastGood) -> list[tuple[str, Placement]]:
    """(pool, placement) this ModelDeployment wants: its current one, then those draining."""
    seen: dict[str, Placement] = {}
    for placement in (last.placement, *last.draining):
        seen.setdefault(pool_name(placement.instance_type, placement.capacity_type), placement)
    return list(seen.items())


def backoff_seconds(retry: int) -> float:
    return float(min(MAX_RETRY_SECONDS, RETRY_SECONDS * 2 ** min(retry, 6)))


# ---- indexes ----------------------------------------------------------------------------------


def _slim(body: Mapping[str, Any], keep_spec: Iterable[str] | None = ()) -> dict[str, Any]:
    """What the operator reads of a watched object; `keep_spec` None keeps the whole spec."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    if keep_spec is None:
        keep_spec = spec.keys()
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {
            k: meta[k]
            for k in ("name", "namespace", "uid", "generation", "deletionTimestamp", "annotations")
            if k in meta
        },
        "spec": {k: spec[k] for k in keep_spec if k in spec},
        "status": dict(body.get("status") or {}),
    }


@kopf.index(*RESOURCE)
def model_deployments(
    body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> dict[Key, Any]:
    """(namespace, name) -> the ModelDeployment (metadata, spec, status): what a queued
    reconcile acts on when its turn comes."""
    return {(namespace or "", name): _slim(body, keep_spec=None)}


@kopf.index(*RESOURCE)
def pool_users(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[str, Any]:
    """pool -> {user, placement, maxReplicas} for every pool a ModelDeployment wants."""
    last = LastGood.from_body(body)
    if last is None or body["metadata"].get("deletionTimestamp"):
        return {}  # a ModelDeployment being deleted wants no pool: it is not restored for it
    high = replica_bounds(md_ref(body, last.spec, last.generation))[1]
    return {
        pool: {"user": f"{namespace}/{name}", "placement": placement_key(p), "maxReplicas": high}
        for pool, p in pools_of(last)
    }


@kopf.index("nodeclaims.karpenter.sh", labels={KARPENTER_POOL_LABEL: kopf.PRESENT})
def node_claims(body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, Any]:
    """Karpenter pool -> its NodeClaims (metadata, status)."""
    return {labels[KARPENTER_POOL_LABEL]: _slim(body)}


@kopf.index("jobs.batch", labels={MD_LABEL: kopf.PRESENT, compilejob.ROLE_LABEL: "compile"})
def compile_jobs(
    body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any
) -> dict[Key, Any]:
    """(namespace, ModelDeployment) -> its Neuron compile Jobs (metadata, status)."""
    return {(namespace or "", labels[MD_LABEL]): _slim(body)}


def _index_list(index: Any, key: Any) -> list[dict[str, Any]]:
    """Copies of the values one of kopf's indexes holds for `key`. Threads (reconciles, the
    resync, the pool queue) read indexes that the event loop changes meanwhile; iterating a
    store while it changes raises, so a read that was overtaken is read again."""
    while index is not None:
        try:
            return [dict(item) for item in index.get(key, [])]
        except RuntimeError:  # "changed size during iteration": the event loop got there first
            continue
    return []


# ---- pools ------------------------------------------------------------------------------------


def placement_key(placement: Placement) -> str:
    """A placement as a canonical string: equal placements share one rendered pool share."""
    return json.dumps(placement.to_json_dict(), sort_keys=True, separators=(",", ":"))


def _share(context: Context, state: State, key: str, max_replicas: int) -> list[dict[str, Any]]:
    """One user's pool objects, rendered once per distinct (placement, max replicas): a pool
    with a thousand users of the same hardware costs one render, not a thousand."""
    cached = state.shares.get((key, max_replicas))
    if cached is None:
        if len(state.shares) > 4096:
            state.shares.clear()
        placement = Placement.model_validate_json(key)
        cached = karpenter_objects(placement, context.config, max_replicas)
        state.shares[(key, max_replicas)] = cached
    return cached


def sync_pools(
    context: Context,
    state: State,
    index: Any,
    pools: Iterable[str],
    user: str,
    mine: Mapping[str, tuple[Placement, int]] | None,
    force: bool = False,
) -> None:
    """Apply each pool as the combination of everyone who wants it, with `user`'s own share
    replaced by `mine` (the index may not have seen this user's latest plan yet). A pool whose
    combination did not change since this process applied it costs no request."""
    if context.config.node_pool_mode != "karpenter":
        return
    for pool in pools:
        shares = [
            _share(context, state, str(item["placement"]), int(item["maxReplicas"]))
            for item in _index_list(index, pool)
            if item["user"] != user
        ]
        if mine and pool in mine:
            placement, high = mine[pool]
            shares.append(_share(context, state, placement_key(placement), high))
        merged = merge_node_pool_objects(shares)
        prints = {str(obj["kind"]): json.dumps(obj, sort_keys=True) for obj in merged}
        if not force and state.applied_pools.get(pool) == prints:
            continue
        # A shared pool changes with every new user (its limits add up). Applies of one pool
        # are coalesced: while a thread applies it, others leave their newer combination and
        # go on; the applying thread applies the latest before it lets go. Every user waiting
        # on a global lock for its own apply serialized reconciles (1000 created at once: ~20
        # of the 32 workers parked there).
        with state.pool_guard:
            earlier = state.pool_wanted.get(pool)  # a forced restore is not dropped
            state.pool_wanted[pool] = (merged, prints, force or bool(earlier and earlier[2]))
            if pool in state.pool_busy:
                continue
            state.pool_busy.add(pool)
        try:
            while True:
                with state.pool_guard:
                    wanted = state.pool_wanted.pop(pool, None)
                    if wanted is None:
                        state.pool_busy.discard(pool)
                        break
                objects, printed, forced = wanted
                applied = state.applied_pools.get(pool)
                if forced or applied != printed:
                    # Only what changed: a new user moves the NodePool's limits, never its
                    # EC2NodeClass (1000 new users sent it 490 times over, unchanged).
                    changed = [
                        obj
                        for obj in objects
                        if forced or (applied or {}).get(obj["kind"]) != printed[obj["kind"]]
                    ]
                    if changed or not objects:  # no objects: nobody wants the pool, delete it
                        sync_pool(context.kube, pool, changed)
                    state.applied_pools[pool] = printed
        except BaseException:
            with state.pool_guard:
                state.pool_busy.discard(pool)
            raise


def my_pools(last: LastGood | None) -> dict[str, tuple[Placement, int]]:
    if last is None:
        return {}
    high = (
        last.spec.replicas.max
        if last.spec.replicas.max is not None
        else max(last.spec.replicas.min, 1)
    )
    return {pool: (placement, high) for pool, placement in pools_of(last)}


# ---- status -----------------------------------------------------------------------------------


def compute_status(
    context: Context,
    state: State,
    body: Mapping[str, Any],
    last: LastGood | None,
    failure: Failure | None,
    generation: int,
    indexes: Mapping[str, Any],
) -> tuple[Mapping[str, Any] | None, StatusUpdate]:
    """The newest status known (previous_status) and the status to write, from what the watches
    have seen (no requests)."""
    key = key_of(body)
    previous = previous_status(state, key, body)
    claims_index, jobs_index = indexes.get("node_claims"), indexes.get("compile_jobs")
    facts = render_facts(context, state, body, last) if last else None
    selector = facts.selector if facts else None
    node_group_status = None
    if facts and facts.node_group and context.node_groups:
        node_group = context.node_groups.state(facts.node_group)
        node_group_status = node_group.status if node_group else None
    observation = Observation(
        workload=state.workloads.get(key) if selector is not None else None,
        pods=_index_list(state.pods, key),
        node_claims=_index_list(claims_index, facts.pool_name) if facts else [],
        node_group_status=node_group_status,
    )
    md = md_ref(body, last.spec, last.generation) if last else None
    update = build_status(
        ReconcileFacts(
            generation=generation,
            failure=failure,
            placement=last.placement if last else None,
            pool_name=facts.pool_name if facts else None,
            observation=observation,
            endpoint=endpoint_url(md, context.config) if md else None,
            selector=selector or None,
            measured_kv_cache_tokens=state.measured_kv.get(key) if last else None,
            compile=compilejob.progress(
                md,
                last.placement,
                context.config,
                (body.get("metadata") or {}).get("annotations") or {},
                _index_list(jobs_index, key),
            )
            if md and last
            else None,
        ),
        previous,
        datetime.datetime.now(tz=datetime.UTC),
    )
    if last is not None:  # kept with the status: no request of its own
        update.status["lastGood"] = last.annotation()
    return previous, update


def _as_body(obj: Mapping[str, Any]) -> kopf.Body:
    """A kopf Body of a plain dict (Events name their object through it)."""
    return kopf.Body(cast(kopf.RawBody, dict(obj)))


def post_events(body: Mapping[str, Any], update: StatusUpdate) -> None:
    for event in update.events:
        kopf.event(_as_body(body), type=event.type, reason=event.reason, message=event.message)
    meta = body["metadata"]
    METRICS.set_phase(f"{meta['namespace']}/{meta['name']}", update.status["phase"])


def _resource_version(obj: Mapping[str, Any]) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:  # opaque by contract; etcd's are integers
        return 0


def previous_status(state: State, key: Key, body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The newest status known: the watched object's, unless our own later write is not in it
    yet (a hand edit after our write is newer and is used)."""
    written = state.written.get(key)
    if written is None or _resource_version(body) >= written[0]:
        return body.get("status")
    return written[1]


def write_status(context: Context, state: State, key: Key, status: dict[str, Any]) -> None:
    """Patch the status subresource and remember what was written (see State.written)."""
    answer = context.kube.merge_patch(MD_KIND, key[0], key[1], {"status": status}, "status")
    state.written[key] = (_resource_version(answer), answer.get("status") or status)


def _status_changed(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    old = old or {}
    return any(old.get(key) != value for key, value in new.items())


def rollout_done(workload: Mapping[str, Any] | None, generation: int) -> bool:
    """The workload of `generation` serves every replica and no older pod is left."""
    if not workload:
        return False
    meta, spec, status = (
        workload["metadata"],
        workload.get("spec") or {},
        workload.get("status") or {},
    )
    if (meta.get("annotations") or {}).get(GENERATION_ANNOTATION) != str(generation):
        return False
    if int(status.get("observedGeneration") or 0) < int(meta.get("generation") or 0):
        return False
    wanted = int(spec.get("replicas", 1))
    return (
        int(status.get("updatedReplicas") or 0) >= wanted
        and int(status.get("readyReplicas") or 0) >= wanted
        and int(status.get("replicas") or 0) <= int(status.get("updatedReplicas") or 0)
    )


def refresh(context: Context, state: State, key: Key, indexes: Mapping[str, Any]) -> None:
    """Recompute a ModelDeployment's status from the watches; write it only when it changed.
    Release a draining pool once the new workload is rolled out (make before break).

    Never waits for the lock: a worker thread blocked here is one fewer for reconciles (with 100
    new ModelDeployments, child events held all 32 workers for seconds each and reconciles
    starved). The key is marked first; whoever holds the lock refreshes when releasing it
    (`holding`), so a change seen meanwhile is not lost."""
    lock = state.lock(key)
    state.dirty.add(key)
    while key in state.dirty and lock.acquire(blocking=False):
        try:
            state.dirty.discard(key)
            _refresh_locked(context, state, key, indexes)
        finally:
            lock.release()


def from_kopf(state: State, indexes: Mapping[str, Any]) -> None:
    """Called by kopf's handlers: keep its indexes (the same live objects in every handler's
    kwargs), and the first time, its context, which holds what kopf.event() needs (its settings,
    its Event queue and loop; start-up handlers see only the settings). The queues' threads run
    in it."""
    state.indexes = indexes
    for queue in (state.reconciles, state.queue, state.restores):
        if queue is not None and queue.context is None:
            queue.context = contextvars.copy_context()


def wake(state: State, key: Key, indexes: Mapping[str, Any] | None = None) -> None:
    """Ask for a refresh of `key` soon (see REFRESH_DELAY_SECONDS); never waits. `indexes`:
    called from a kopf handler (see from_kopf)."""
    if indexes is not None:
        from_kopf(state, indexes)
    if state.queue is not None:
        state.queue.add(key)


@contextlib.contextmanager
def holding(context: Context, state: State, key: Key, indexes: Mapping[str, Any]) -> Iterator[None]:
    """A ModelDeployment's lock; on release, the refreshes that found it held run."""
    try:
        with state.lock(key):
            yield
    finally:
        if key in state.dirty:
            refresh(context, state, key, indexes)


def _refresh_locked(context: Context, state: State, key: Key, indexes: Mapping[str, Any]) -> None:
    try:
        acted = state.acted.get(key)
        mds = _index_list(indexes["model_deployments"], key)
        if acted is None or not mds or mds[0]["metadata"].get("deletionTimestamp"):
            return  # not acted on yet (the change handlers write the first status), or going
        generation, last = acted
        body = mds[0]
        released: LastGood | None = None
        if last and last.draining and rollout_done(state.workloads.get(key), last.generation):
            released, last = last, LastGood(last.generation, last.spec, last.placement)
        previous, update = compute_status(
            context, state, body, last, state.failures.get(key), generation, indexes
        )
        if _status_changed(previous, update.status):
            write_status(context, state, key, update.status)
            post_events(body, update)
        if released is not None:  # recorded without the draining placements: let them go
            state.acted[key] = (generation, last)
            sync_pools(
                context,
                state,
                indexes["pool_users"],
                [pool for pool, _ in pools_of(released)],
                f"{key[0]}/{key[1]}",
                my_pools(last),
            )
    except KubeApiError as error:
        logger.warning("could not refresh %s/%s: %s", key[0], key[1], error)


def _indexes(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {
        name: kwargs.get(name)
        for name in (
            "model_deployments",
            "pool_users",
            "node_claims",
            "compile_jobs",
        )
    }


# ---- start-up ---------------------------------------------------------------------------------


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Load and check the configuration and catalog; configure kopf."""
    config = load_config()
    check_operator_config(config)
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="modelship.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="modelship.dev", key="last-handled-configuration"
    )
    # kopf waits this long for the watch to deliver its own patch before it runs the change
    # handlers on the object as it has it; past 5 s (the default) it runs create again on the
    # older copy. With 100 ModelDeployments created at once the watch lagged longer than that
    # and half of them were reconciled twice; at 1000 on a busy machine it lagged past 60 s
    # and 431 were. The patch always arrives (every event is processed in order), so waiting
    # longer only waits for it.
    settings.persistence.consistency_timeout = 600
    settings.posting.enabled = True
    settings.posting.level = logging.WARNING  # our own Events are posted explicitly
    settings.execution.max_workers = MAX_WORKERS
    for resource, selector in WATCH_SELECTORS.items():
        # the same tuples as the handlers take, which kopf parses the same way
        settings.watching.label_selectors[cast(Any, resource)] = selector
    node_groups = NodeGroups(config) if config.node_pool_mode == "eks-nodegroup" else None
    kube = Kube.from_environment()
    _RECONCILING.append(kube)
    memo.context = Context(
        config=config,
        catalog=load_catalog(config.catalog_path),
        kube=kube,
        node_groups=node_groups,
    )
    state = memo.state = State()
    context = memo.context
    state.reconciles = WorkQueue(
        lambda key: run_reconcile(context, state, cast(Key, key)),
        delay=0.0,
        workers=RECONCILE_WORKERS,
        name="reconcile",
    )
    state.queue = WorkQueue(
        lambda key: refresh(context, state, cast(Key, key), state.indexes),
        delay=REFRESH_DELAY_SECONDS,
        workers=REFRESH_WORKERS,
    )
    state.restores = WorkQueue(
        lambda item: restore_child(context, state, cast(tuple[Key, Any], item)),
        delay=0.0,
        workers=RESTORE_WORKERS,
        name="restore",
    )
    # Children and pods are watched by informers of our own (informer.py), with a client of
    # their own: each holds its connection for as long as it watches.
    watcher = Kube.from_environment()
    _RECONCILING.append(watcher)
    state.informers = [
        Informer(watcher, kind, INFORMER_SELECTOR, handle, namespace).start()
        for kind, handle in (
            *((kind, functools.partial(child_event, context, state)) for kind in CHILD_KINDS),
            (POD, functools.partial(pod_event, state)),
        )
        for namespace in (config.namespaces or (None,))
    ]
    # A pool's users change in bursts (a thousand new ModelDeployments of one instance type):
    # its combination is applied at most once per delay, from one thread.
    state.pool_queue = WorkQueue(
        lambda pool: combine_pool(context, state, str(pool)),
        delay=REFRESH_DELAY_SECONDS,
        workers=1,
        name="pool",
    )
    state.resyncer = Resyncer(
        lambda key: resync_in_kopf_context(context, state, cast(Key, key)),
        lambda: index_keys(state, "model_deployments"),
        config.resync_seconds,
    )
    # The activator is not served here: it runs as its own Deployment (`modelship activator`,
    # helm/modelship/templates/activator.yaml), so a flood of requests cannot starve reconciles.


# kopf's own HTTP session has no connection limit: with 1000 ModelDeployments created at once it
# opened ~1050 TLS connections to the API server (one per concurrent patch and Event), each with
# its 128 KiB asyncio TLS buffer plus OpenSSL's own state, and held them: ~600 MiB of the
# operator's RSS. Its watches (one per watched kind, ~16) keep a connection each for as long as
# they stream, so the limit leaves room for all of them and as many requests as kopf has workers.
KOPF_CONNECTIONS = 64


@kopf.on.cleanup()
async def stop_refreshing(memo: kopf.Memo, **_: Any) -> None:
    """kopf stops (SIGTERM, or the Lease was lost): its reconcile and refresh threads stop with
    it (after what they are running)."""
    state: State | None = getattr(memo, "state", None)
    if state is None:
        return
    for informer in state.informers:
        informer.stop()
    for queue in (state.reconciles, state.queue, state.pool_queue, state.restores):
        if queue is not None:
            queue.close()
    if state is not None and state.resyncer is not None:
        state.resyncer.stop()


@kopf.on.login()
async def login(**kwargs: Any) -> kopf.AiohttpSession | None:
    """The pod's service account in a cluster, else $KUBECONFIG (read now, not at import),
    through a session whose connection pool is bounded (KOPF_CONNECTIONS)."""
    import aiohttp

    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is None:
        return None
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=KOPF_CONNECTIONS, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),
        proxy=info.proxy_url,
        trust_env=info.trust_env,
    )
    return kopf.AiohttpSession(
        server=info.server,
        default_namespace=info.default_namespace,
        expiration=info.expiration,
        priority=info.priority,
        aiohttp_session=session,
    )


# ---- reconcile --------------------------------------------------------------------------------


_S3_CLIENTS: dict[str | None, Any] = {}
_S3_GUARD = threading.Lock()


def s3_client_for(endpoint_url: str | None) -> Any:
    """One boto3 S3 client per endpoint for the whole process. Building one loads botocore's
    service model (~0.1 CPU-s and several MiB), more than the rest of a reconcile; a client is
    thread-safe and refreshes its credentials (IRSA, Pod Identity) itself."""
    with _S3_GUARD:
        client = _S3_CLIENTS.get(endpoint_url)
        if client is None:
            client = s3_client(endpoint_url)
            # A client built without credentials keeps failing after they appear: not kept, so
            # the next reconcile looks again (and the error says what to configure meanwhile).
            if getattr(getattr(client, "_request_signer", None), "_credentials", None):
                _S3_CLIENTS[endpoint_url] = client
        return client


_PLANS: Lru[tuple[int, str, str, bool], Plan] = Lru(256)


def plan(context: Context, body: Mapping[str, Any]) -> tuple[ModelDeploymentSpec, Placement]:
    """Parse the spec, inspect the model and plan; Rejected when it cannot be served (now)."""
    try:
        check_name(body["metadata"]["name"])
        spec = load_spec(dict(body.get("spec") or {}))
        refuse_disallowed_source(spec, context.config)  # before anything reads the model
        info = inspect_model(
            spec.model.source,
            overrides=spec.model.architecture,
            parameters=spec.model.parameter_count,
            endpoint_url=context.config.s3_endpoint_url,
            client=(
                s3_client_for(context.config.s3_endpoint_url)
                if isinstance(spec.model.source, S3Source)
                else None
            ),
        )
        compile_step = compilejob.compile_step_problem(context.config) is None
        # Sizing is pure and takes ~5 ms over the catalog: the same model and spec plan once.
        key = (id(context.catalog), info.model_dump_json(), spec.model_dump_json(), compile_step)
        result = _PLANS.get(key)
        if result is None:
            result = make_plan(info, spec, context.catalog, compile_step=compile_step)
            _PLANS.put(key, result)
        if result.chosen is None:
            raise Rejected(Failure("NoPlacement", "nothing fits: " + "; ".join(result.suggestions)))
        return spec, result.chosen
    except SpecError as error:
        raise Rejected(Failure("InvalidSpec", str(error))) from None
    except ModelInfoError as error:
        message = f"spec.model.uri: {error}"
        if error.transient:
            raise Rejected(Failure("ModelUnreachable", message)) from None
        raise Rejected(Failure("ModelUnreadable", message)) from None


def apply_last_good(
    context: Context, state: State, body: Mapping[str, Any], last: LastGood, prune: bool
) -> Rendered:
    """Apply the node group and children of a plan, prune what it no longer renders, and queue
    its pools. A pool is applied from the pool queue as the combination of the users the index
    holds: a new plan joins it when the index has it (model_deployment_changed), which is what
    the queue waits for; applied here with the new user added, a pool that a thousand new
    ModelDeployments share was patched hundreds of times a minute."""
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    rendered = rendered_for(context, state, body, last)
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    md = md_ref(body, last.spec, last.generation)
    step = compilejob.ensure(context.kube, md, last.placement, context.config, annotations)
    if step is not None and step.state != "Compiled":
        return rendered  # the serving workload waits for the compile Job (compile_job_changed)
    if rendered.node_group is not None and context.node_groups is not None:
        context.node_groups.ensure(rendered.node_group, namespace, name)
        context.node_groups.release(namespace, name, keep=rendered.node_group.name)
    if state.pool_queue is not None:
        for pool in my_pools(last):
            state.pool_queue.add(pool)
    uid = str(body["metadata"]["uid"])
    if prune:
        apply_children(context.kube, name, namespace, rendered.children, False, owner_uid=uid)
    else:
        for child in rendered.children:
            apply_child(context.kube, child)
    return rendered


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
async def reconcile(memo: kopf.Memo, namespace: str | None, name: str, **kwargs: Any) -> None:
    """Queue a reconcile (run_reconcile), at once: a new spec does not wait out the backoff of
    a retry of the old one. Runs on kopf's event loop; its context is what kopf.event() needs
    (see wake), so the reconcile threads run in it."""
    state: State = memo.state
    from_kopf(state, _indexes(kwargs))
    if state.reconciles is not None:
        state.reconciles.add((namespace or "", name), delay=0.0)


def run_reconcile(context: Context, state: State, key: Key) -> None:
    """Parse, inspect, plan, render, apply, report: on the ModelDeployment as the index holds it
    now, under its lock. One being deleted (or gone) is cleanup's, and is left alone."""
    indexes = state.indexes
    with holding(context, state, key, indexes):
        mds = _index_list(indexes.get("model_deployments"), key)
        if not mds or mds[0]["metadata"].get("deletionTimestamp"):
            state.retries.pop(key, None)
            return
        body = mds[0]
        generation = int(body["metadata"].get("generation") or 1)
        with METRICS.reconcile() as outcome:
            failure = _reconcile_locked(context, state, key, body, generation, indexes)
            if failure is None:
                state.retries.pop(key, None)
                outcome[0] = "success"
            elif failure.transient:
                retried, count = state.retries.get(key, (generation, 0))
                count = count if retried == generation else 0
                state.retries[key] = (generation, count + 1)
                if state.reconciles is not None:
                    state.reconciles.add(key, delay=backoff_seconds(count))
                outcome[0] = "retry"
                logger.warning(
                    "%s/%s: %s (retrying in %.0fs)", *key, failure.message, backoff_seconds(count)
                )
            else:  # acted on again when the spec changes
                state.retries.pop(key, None)
                outcome[0] = "rejected"
                logger.error("%s/%s: %s", *key, failure.message)


def _reconcile_locked(
    context: Context,
    state: State,
    key: Key,
    body: Mapping[str, Any],
    generation: int,
    indexes: Mapping[str, Any],
) -> Failure | None:
    """One reconcile; returns why it did not apply (None: it did). Status is written here, under
    the lock, with the plan that applied: a refresh that ran in between would otherwise be
    overwritten by an older view."""
    # What this process last acted on is newer than the watched object while our own status
    # write is on its way; after a restart the object is all there is.
    acted = state.acted.get(key)
    last = acted[1] if acted is not None else LastGood.from_body(body)
    failure: Failure | None = None
    try:
        if last is not None and last.generation == generation:
            spec, placement = last.spec, last.placement  # a restart: no need to read the model
        else:
            spec, placement = plan(context, body)
    except Rejected as rejected:
        failure = rejected.failure
    except RenderError as error:
        failure = Failure("RenderFailed", str(error))
    if failure is None:
        draining = tuple(
            p
            for p in ((last.placement, *last.draining) if last else ())
            if pool_name(p.instance_type, p.capacity_type)
            != pool_name(placement.instance_type, placement.capacity_type)
        )
        candidate = LastGood(generation, spec, placement, draining)
        try:
            rendered_for(context, state, body, candidate)  # render errors are the spec's
            # A new ModelDeployment (generation 1, never applied) has nothing to prune: that
            # skips 7 list requests of the ~21 its first reconcile costs.
            apply_last_good(
                context, state, body, candidate, prune=last is not None or generation > 1
            )
            last = candidate
            METRICS.set_plan(key[0], key[1], placement)
        except RenderError as error:
            failure = Failure("RenderFailed", str(error))
        except KubeApiError as error:
            failure = Failure("ApplyFailed", str(error))
        except Exception as error:  # boto3 (node groups): network or throttling
            failure = Failure("ApplyFailed", f"node group: {error}")
    elif last is not None:
        # Whatever is wrong with the new spec, what serves stays as it was (restored).
        with contextlib.suppress(KubeApiError, RenderError):
            apply_last_good(context, state, body, last, prune=False)
    if failure is None:
        state.failures.pop(key, None)
    else:
        state.failures[key] = failure
    state.acted[key] = (generation, last)
    _, update = compute_status(context, state, body, last, failure, generation, indexes)
    try:
        write_status(context, state, key, update.status)
    except KubeApiError as error:
        # The plan that applied is not recorded yet: try again (this process restores children
        # from memory meanwhile).
        logger.warning("could not write the status of %s/%s: %s", key[0], key[1], error)
        return failure or Failure("ApplyFailed", f"status: {error}")
    post_events(body, update)
    return failure


def resync(context: Context, state: State, key: Key) -> None:
    """The safety net: re-apply the last good children and pools, refresh status."""
    indexes = state.indexes
    mds = _index_list(indexes.get("model_deployments"), key)
    if not mds or mds[0]["metadata"].get("deletionTimestamp"):
        return  # gone, or being deleted: cleanup owns it now
    last = state.acted.get(key, (0, None))[1]
    lock = state.lock(key)
    if last is not None and lock.acquire(blocking=False):
        try:
            apply_last_good(context, state, mds[0], last, prune=False)
        except (KubeApiError, RenderError) as error:
            logger.warning("resync of %s/%s: %s", key[0], key[1], error)
        finally:
            lock.release()
    if last is not None and context.config.prometheus_url:
        try:
            measured = measured_kv_tokens(context.config.prometheus_url, *key)
        except PrometheusError as error:
            logger.debug("no measured KV cache for %s/%s: %s", key[0], key[1], error)
            measured = None
        if measured is not None:
            state.measured_kv[key] = measured
            METRICS.set_measured_kv(key[0], key[1], measured)
    refresh(context, state, key, indexes)


def resync_in_kopf_context(context: Context, state: State, key: Key) -> None:
    """kopf.event() needs the context of kopf's handlers, which the refresh queue captured from
    the first watch event (before any, there is no ModelDeployment to resync)."""
    kopf_context = state.queue.context if state.queue is not None else None
    if kopf_context is not None:
        kopf_context.copy().run(resync, context, state, key)
    else:
        resync(context, state, key)


def index_keys(state: State, name: str) -> list[Any]:
    """The keys of one of kopf's indexes, read from another thread."""
    index = state.indexes.get(name)
    while index is not None:
        try:
            return sorted(index.keys())
        except RuntimeError:  # the event loop changed the index meanwhile: read it again
            continue
    return []


# ---- watches of children, pods, node claims and pools -----------------------------------------


def owner_of(body: Mapping[str, Any]) -> Key | None:
    """The ModelDeployment a labelled child or pod belongs to, or None."""
    meta = body.get("metadata") or {}
    owner = (meta.get("labels") or {}).get(MD_LABEL)
    return (str(meta.get("namespace") or ""), str(owner)) if owner else None


def child_event(context: Context, state: State, event: str | None, body: dict[str, Any]) -> None:
    """A child changed or went (informer thread): keep its workload's status, queue a restore
    if it drifted from its render or was deleted, refresh its owner's status."""
    key = owner_of(body)
    if key is None:
        return
    deleted = event == "DELETED"
    if kind_of(body) in WORKLOAD_KINDS:
        if deleted:
            state.workloads.pop(key, None)
        else:
            state.workloads[key] = _slim(body, keep_spec=("replicas",))
    mds = _index_list(state.indexes.get("model_deployments"), key)
    live_md = mds[0] if mds and not mds[0]["metadata"].get("deletionTimestamp") else None
    if (
        live_md is not None
        and event is not None  # the first listing: what exists is resynced, not restored
        and (deleted or _maybe_drifted(context, state, key, live_md, body))
        and state.restores is not None
    ):
        item = (key, object_key(body))
        state.restoring[item] = (live_md, body, deleted)
        state.restores.add(item)
    wake(state, key)


def pod_event(state: State, event: str | None, body: dict[str, Any]) -> None:
    """A runtime pod changed or went (informer thread): its ModelDeployment's phase may move."""
    key = owner_of(body)
    if key is None:
        return
    uid = str(body["metadata"].get("uid"))
    if event == "DELETED":
        state.pods.remove(key, uid)
    else:
        state.pods.put(key, uid, _slim(body, keep_spec=("nodeName",)))
    if event is not None:
        wake(state, key)


def _maybe_drifted(
    context: Context, state: State, key: Key, md: Mapping[str, Any], live: Mapping[str, Any]
) -> bool:
    """Worth a look under the lock: edited by another manager, or off the current render."""
    if foreign_fields(live):
        return True
    last = state.acted.get(key, (0, None))[1]
    if last is None:
        return False
    replicas = render_facts(context, state, md, last).replicas
    child = object_key(live)
    return child in replicas and _drifted(live, {"spec": {"replicas": replicas[child]}})


def _wanted(
    context: Context, state: State, md: Mapping[str, Any], last: LastGood, live: Mapping[str, Any]
) -> dict[str, Any] | None:
    rendered = rendered_for(context, state, md, last)
    return next((c for c in rendered.children if object_key(c) == object_key(live)), None)


def restore_child(context: Context, state: State, item: tuple[Key, Any]) -> None:
    """Apply a drifted or deleted child again (the restore queue), and say so in an Event.

    Decided under the lock, against the plan acted on by then: a child deleted while its first
    reconcile is still writing status (the plan not yet recorded) is restored once that reconcile
    ends, and one that changed during a reconcile of a new generation gets the new render, not
    the one it was compared with."""
    key = item[0]
    with state.lock(key):
        seen = state.restoring.pop(item, None)
        if seen is None:
            return
        md, live, deleted = seen
        last = state.acted.get(key, (0, None))[1]
        wanted = _wanted(context, state, md, last, live) if last is not None else None
        if wanted is None or not (deleted or _drifted(live, wanted)):
            return
        try:
            _, why = apply_child(context.kube, wanted)
        except KubeApiError as error:
            logger.warning("could not restore a child of %s/%s: %s", *key, error)
            return
    reason = "deleted" if deleted else (why or "changed by hand")
    kopf.event(
        _as_body(md),
        type="Normal",
        reason="ChildRestored",
        message=f"{live.get('kind')} {key[0]}/{live['metadata']['name']} restored ({reason})",
    )


def _drifted(live: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Edited by another manager, or a fixed replica count changed (through `kubectl scale`)."""
    if foreign_fields(live):
        return True
    wanted_replicas = (wanted.get("spec") or {}).get("replicas")
    return (
        wanted_replicas is not None and (live.get("spec") or {}).get("replicas") != wanted_replicas
    )


@kopf.on.event(*RESOURCE)
async def model_deployment_changed(
    event: kopf.RawEvent,
    body: kopf.Body,
    namespace: str | None,
    name: str,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    """The ModelDeployment itself changed (its last good plan, or status another handler
    wrote before the watches caught up): recompute status; nothing is written if it holds.
    Its pools are combined again once the index holds its plan: two users reconciled at the
    same moment each applied the pool without the other (the index had neither yet)."""
    if event.get("type") is None:
        return
    state: State = memo.state
    wake(state, (namespace or "", name), _indexes(kwargs))
    last = LastGood.from_body(body)
    if last is not None and state.pool_queue is not None:
        for pool, _ in pools_of(last):
            state.pool_queue.add(pool)


def combine_pool(context: Context, state: State, pool: str) -> None:
    """Apply `pool` as the combination of the users the index holds now (nothing is sent if
    this process applied that combination already; a pool nobody wants is cleanup's)."""
    index = state.indexes.get("pool_users")
    if not _index_list(index, pool):
        return
    try:
        sync_pools(context, state, index, [pool], "", None)
    except KubeApiError as error:
        logger.warning("could not apply pool %s: %s", pool, error)


@kopf.on.event("jobs.batch", labels={MD_LABEL: kopf.PRESENT, compilejob.ROLE_LABEL: "compile"})
def compile_job_changed(
    event: kopf.RawEvent,
    body: kopf.Body,
    namespace: str | None,
    labels: kopf.Labels,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    """A Neuron compile Job changed: once it has finished, apply the last good plan again (the
    compile step records success and releases its pool, then the serving workload is applied);
    refresh status."""
    context: Context = memo.context
    state: State = memo.state
    key = (namespace or "", labels[MD_LABEL])
    indexes = _indexes(kwargs)
    mds = _index_list(indexes["model_deployments"], key)
    last = state.acted.get(key, (0, None))[1]
    going = not mds or mds[0]["metadata"].get("deletionTimestamp")
    if (
        event.get("type") not in (None, "DELETED")
        and last
        and not going
        and compilejob.finished(body)
    ):
        with holding(context, state, key, indexes):
            try:
                apply_last_good(context, state, mds[0], last, prune=True)
            except (KubeApiError, RenderError) as error:
                logger.warning("after the compile Job of %s/%s: %s", *key, error)
    wake(state, key, indexes)


@kopf.on.event("nodeclaims.karpenter.sh", labels={KARPENTER_POOL_LABEL: kopf.PRESENT})
async def node_claim_changed(
    event: kopf.RawEvent, labels: kopf.Labels, memo: kopf.Memo, **kwargs: Any
) -> None:
    """A node of a pool is being made or became ready: refresh the pool's users."""
    if event.get("type") is None:
        return
    indexes = _indexes(kwargs)
    for item in _index_list(indexes["pool_users"], labels[KARPENTER_POOL_LABEL]):
        namespace, _, name = str(item["user"]).partition("/")
        wake(memo.state, (namespace, name), indexes)


def pool_changed(
    event: kopf.RawEvent, body: kopf.Body, name: str, memo: kopf.Memo, **kwargs: Any
) -> None:
    """A pool object was deleted or edited by hand: apply it again for the users that want it."""
    if event.get("type") is None:
        return
    if event.get("type") != "DELETED" and not foreign_fields(body):
        return
    context: Context = memo.context
    state: State = memo.state
    index = _indexes(kwargs)["pool_users"]
    if _index_list(index, name):
        try:
            sync_pools(context, state, index, [name], "", None, force=True)
        except KubeApiError as error:
            logger.warning("could not restore pool %s: %s", name, error)


for _pool_resource in POOL_RESOURCES:
    kopf.on.event(_pool_resource, labels=MANAGED)(pool_changed)


@kopf.on.delete(*RESOURCE)
def cleanup(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    """Remove every child and this ModelDeployment's share of the shared node pools."""
    context: Context = memo.context
    state: State = memo.state
    key = key_of(body)
    with state.lock(key):
        acted = state.acted.get(key)  # newer than the object while our status write is on its way
        last = acted[1] if acted is not None else LastGood.from_body(body)
        try:
            if last is not None:
                with contextlib.suppress(RenderError):
                    delete_children(context.kube, rendered_for(context, state, body, last).children)
            # Leftovers of earlier plans; a list that cannot be made (a bad name) holds nothing.
            prune_children(context.kube, key[1], key[0], owner_uid=str(body["metadata"]["uid"]))
            user = f"{key[0]}/{key[1]}"
            sync_pools(context, state, kwargs.get("pool_users"), my_pools(last), user, None)
            if context.node_groups is not None:
                context.node_groups.release(*key)
            if last is not None and compilejob.needs_compile_step(last.placement):
                compilejob.release(context.kube, md_ref(body, last.spec, last.generation))
        except KubeApiError as error:
            raise kopf.TemporaryError(str(error), delay=RETRY_SECONDS) from None
    state.forget(key)
    METRICS.set_phase(f"{key[0]}/{key[1]}", None)
    METRICS.set_plan(key[0], key[1], None)


# ---- the process: leader election around kopf -------------------------------------------------


def _own_namespace() -> str:
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    with contextlib.suppress(OSError), open(path) as file:
        return file.read().strip()
    return "modelship-system"


class _Health:
    """/healthz for the Deployment's probes, for the leader and the standby alike."""

    def __init__(self) -> None:
        self.leader = False
        self.runner: Any = None

    async def start(self, address: str, port: int) -> None:
        from aiohttp import web

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"ok": True, "leader": self.leader})

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, address, port).start()


async def run_elected(config: OperatorConfig, health_address: str | None, health_port: int) -> None:
    """Wait for the Lease, run kopf while holding it, step down when it is lost (and stand by
    again); on SIGTERM/SIGINT stop kopf and release the Lease."""
    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    lease = LeaseSettings(
        namespace=config.lease_namespace or _own_namespace(),
        name=config.lease_name,
        identity=identity,
        lease_seconds=config.lease_seconds,
        renew_deadline_seconds=config.lease_seconds * 2 / 3,
        retry_seconds=max(0.5, config.lease_seconds / 7.5),
    )
    # Lease calls give up quickly: a leader must notice within its renew deadline that it can
    # no longer renew, even when the API server hangs rather than refuses.
    elector = LeaderElector(Kube.from_environment(timeout_seconds=lease.retry_seconds), lease)
    health = _Health()
    if health_port:
        await health.start(health_address or "0.0.0.0", health_port)
    shutdown = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        shutdown.set()

    while not shutdown.is_set():
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        acquiring = asyncio.create_task(elector.acquire())
        stopping = asyncio.create_task(shutdown.wait())
        await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if shutdown.is_set():
            acquiring.cancel()
            break
        stopping.cancel()
        health.leader = True
        holding = asyncio.create_task(elector.hold())
        stop_flag: asyncio.Future[Any] = loop.create_future()
        running = asyncio.create_task(
            kopf.operator(
                standalone=True,
                clusterwide=not config.namespaces,
                namespaces=list(config.namespaces),
                stop_flag=stop_flag,
            )
        )
        await asyncio.wait({holding, running}, return_when=asyncio.FIRST_COMPLETED)
        health.leader = False
        if running.done():  # kopf stopped: a signal (kopf handles them while it runs) or a crash
            holding.cancel()
            await asyncio.to_thread(elector.release)
            running.result()
            return
        logger.warning("stopping reconciliation: leadership lost")
        stop_flag.set_result(None)
        # kopf waits for its handler threads before it stops, and one may be blocked on an
        # unreachable API server. Halting their client bounds that to the request in flight
        # (its timeout); the refresh threads stop with kopf's cleanup.
        while _RECONCILING:
            _RECONCILING.pop().halt()
        # A replica that neither reconciles nor stands by helps nobody: past the bound, exit and
        # let the Deployment restart it as a candidate (the Lease is not ours any more anyway).
        bound = REQUEST_TIMEOUT_SECONDS + max(10.0, 2 * lease.lease_seconds)
        done, _ = await asyncio.wait({running}, timeout=bound)
        if not done:
            logger.error("kopf did not stop within %.0fs of losing the Lease; exiting", bound)
            logging.shutdown()
            os._exit(1)
        with contextlib.suppress(Exception):
            running.result()
    await asyncio.to_thread(elector.release)


EVENT_HANDLERS = tuple(
    getattr(handler, "__name__", "")
    for handler in (
        model_deployment_changed,
        node_claim_changed,
        pool_changed,
        compile_job_changed,
    )
)


class _Routine(logging.Filter):
    """Drops the lines that say nothing happened: kopf's "Handler 'x' succeeded." for the event
    handlers that wake owners (one per watch event of every child and pod: ~17 lines per new
    ModelDeployment, most of the log and a share of the event loop's CPU), and the probes'
    /healthz access lines. What the change handlers did, every warning and error stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if record.name == "aiohttp.access":
            return "/healthz" not in record.getMessage()
        return not (
            record.levelno <= logging.INFO
            and message.startswith("Handler '")
            and message.endswith("succeeded.")
            and any(f"'{name}'" in message for name in EVENT_HANDLERS)
        )


def quiet_routine_logs() -> None:
    routine = _Routine()
    for name in ("kopf.objects", "aiohttp.access"):
        logging.getLogger(name).addFilter(routine)


def run_operator(argv: list[str] | None = None) -> int:
    """`modelship operator`: elect a leader, run kopf on it, serve /metrics and /healthz."""
    parser = argparse.ArgumentParser(prog="modelship operator")
    parser.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics port")
    parser.add_argument(
        "--health-port", type=int, default=8081, help="/healthz port for the probes (0: none)"
    )
    parser.add_argument("--verbose", action="store_true", help="log every kopf step")
    args = parser.parse_args(argv or [])
    try:
        config = load_config()
        check_operator_config(config)
    except ConfigError as error:
        parser.exit(2, f"modelship operator: {error}\n")
    kopf.configure(verbose=args.verbose)
    if not args.verbose:
        quiet_routine_logs()
    if args.metrics_port:
        METRICS.serve(args.metrics_port)
    asyncio.run(run_elected(config, None, args.health_port))
    return 0
