"""kopf handlers: parse, inspect, plan, render, apply, report. No business logic lives here.

- create / update (of spec) / resume: reconcile. A bad spec, an unreadable model or a plan with
  no placement is reported in status conditions and a Warning Event, and raised as
  kopf.PermanentError (no retry storm); the running children are left exactly as they are, so
  the last good workload keeps serving.
- a timer (every MODELSHIP_RESYNC_SECONDS, default 20) re-applies the last good children
  (restoring what someone deleted or edited) and refreshes status and phase.
- delete: prune every child, release the shared node pool / node group (deleted when unused).

Settings: peering `modelship` (leader election between replicas; optional, so a cluster
without kopf's peering CRDs still runs), finalizer `modelship.dev/finalizer`, kopf's progress
and diff-base kept in annotations (status holds only what status.py writes), Events posted.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import threading
from dataclasses import dataclass
from typing import Any

import kopf

from .activator import Activator
from .api import GROUP, PLURAL, VERSION, SpecError, load_spec
from .apply import (
    DEPLOYMENT,
    LEADER_WORKER_SET,
    Kube,
    KubeApiError,
    apply_children,
    apply_node_pool,
    kind_of,
    observe,
    prune_children,
    release_node_pools,
)
from .catalog import Catalog, load_catalog
from .config import OperatorConfig, load_config
from .modelinfo import ModelInfoError, inspect_model
from .nodegroups import NodeGroups
from .opmetrics import METRICS
from .plan import Placement
from .policy import refuse_disallowed_source
from .render import ModelDeploymentRef, Rendered, RenderError, endpoint_url, render
from .sizing import make_plan
from .status import Failure, ReconcileFacts, build_status

FINALIZER = "modelship.dev/finalizer"
PEERING_NAME = "modelship"
# The timer interval is fixed when kopf registers the handler, so it is read at import.
RESYNC_SECONDS = load_config().resync_seconds
RETRY_SECONDS = 10
RESOURCE = (GROUP, VERSION, PLURAL)


@dataclass(frozen=True)
class Context:
    """What every handler needs, built once at start-up."""

    config: OperatorConfig
    catalog: Catalog
    kube: Kube
    node_groups: NodeGroups | None


@dataclass(frozen=True)
class LastGood:
    """The last reconcile that applied: what the running children were made from."""

    generation: int
    placement: Placement
    rendered: Rendered
    endpoint: str


class Rejected(Exception):
    """The spec cannot be acted on; carries the status failure."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


_memo_lock = threading.Lock()


def _object_lock(memo: Any) -> threading.Lock:
    """One lock per ModelDeployment: the timer and the change handlers never interleave."""
    with _memo_lock:
        if not hasattr(memo, "lock"):
            memo.lock = threading.Lock()
        return memo.lock


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Load and check the configuration and catalog; configure kopf; serve the activator."""
    config = load_config()
    settings.peering.name = PEERING_NAME
    settings.peering.mandatory = False
    settings.peering.clusterwide = not config.namespaces
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="modelship.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="modelship.dev", key="last-handled-configuration"
    )
    settings.posting.enabled = True
    settings.posting.level = logging.WARNING  # our own Events are posted explicitly
    settings.execution.max_workers = 32  # sync handlers wait on the API, not on the CPU
    node_groups = NodeGroups(config) if config.node_pool_mode == "eks-nodegroup" else None
    memo.context = Context(
        config=config,
        catalog=load_catalog(config.catalog_path),
        kube=Kube.from_environment(),
        node_groups=node_groups,
    )
    # The activator (operator/activator.py) runs on every replica, leader or not: it keeps no
    # state, and a standby replica behind the Service answers too.
    if config.activator_port:
        activator = Activator(
            hold_seconds=config.activator_hold_seconds, pending=METRICS.activator_pending
        )
        await activator.start("0.0.0.0", config.activator_port)
        memo.activator = activator


@kopf.on.cleanup()
async def stop_activator(memo: kopf.Memo, **_: Any) -> None:
    activator = memo.get("activator")
    if activator is not None:
        await activator.stop()


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The pod's service account in a cluster, else $KUBECONFIG (read now, not at import)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def plan_and_render(context: Context, body: kopf.Body) -> tuple[Placement, Rendered, str]:
    """Parse the spec, inspect the model, plan and render; Rejected when it cannot be served."""
    meta = body["metadata"]
    try:
        spec = load_spec(dict(body.get("spec") or {}))
        refuse_disallowed_source(spec, context.config)  # before anything reads the model
        info = inspect_model(
            spec.model.source,
            overrides=spec.model.architecture,
            parameters=spec.model.parameter_count,
            endpoint_url=context.config.s3_endpoint_url,
        )
        plan = make_plan(info, spec, context.catalog)
        if plan.chosen is None:
            raise Rejected(Failure("NoPlacement", "nothing fits: " + "; ".join(plan.suggestions)))
        md = ModelDeploymentRef(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta["uid"],
            generation=int(meta.get("generation") or 1),
            spec=spec,
        )
        return (
            plan.chosen,
            render(md, plan.chosen, context.config),
            endpoint_url(md, context.config),
        )
    except SpecError as error:
        raise Rejected(Failure("InvalidSpec", str(error))) from None
    except ModelInfoError as error:
        raise Rejected(Failure("ModelUnreadable", f"spec.model.uri: {error}")) from None
    except RenderError as error:
        raise Rejected(Failure("RenderFailed", str(error))) from None


def apply_rendered(context: Context, name: str, namespace: str, rendered: Rendered) -> str | None:
    """Apply node pool (or node group) and children; returns the node group's status."""
    node_group_status = None
    if rendered.node_group is not None and context.node_groups is not None:
        state = context.node_groups.ensure(rendered.node_group, namespace, name)
        context.node_groups.release(namespace, name, keep=rendered.node_group.name)
        node_group_status = state.status
    apply_node_pool(context.kube, namespace, name, rendered.node_pool_objects)
    apply_children(context.kube, name, namespace, rendered.children)
    return node_group_status


def report(
    body: kopf.Body,
    patch: kopf.Patch,
    context: Context,
    last_good: LastGood | None,
    failure: Failure | None,
    generation: int,
    node_group_status: str | None = None,
) -> str:
    """Observe the workload, write status, post an Event per transition; returns the phase."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    workload: dict[str, Any] = (
        next(
            c for c in last_good.rendered.children if kind_of(c) in (DEPLOYMENT, LEADER_WORKER_SET)
        )
        if last_good
        else {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name}}
    )
    if (
        node_group_status is None
        and last_good
        and last_good.rendered.node_group
        and context.node_groups
    ):
        state = context.node_groups.state(last_good.rendered.node_group.name)
        node_group_status = state.status if state else None
    observation = observe(
        context.kube,
        namespace,
        name,
        workload,
        last_good.rendered.pool_name if last_good else None,
        node_group_status,
    )
    spec: dict[str, Any] = workload.get("spec") or {}
    match_labels: dict[str, str] = (spec.get("selector") or {}).get("matchLabels") or {}
    selector = ",".join(f"{k}={v}" for k, v in match_labels.items())
    update = build_status(
        ReconcileFacts(
            generation=generation,
            failure=failure,
            placement=last_good.placement if last_good else None,
            pool_name=last_good.rendered.pool_name if last_good else None,
            observation=observation,
            endpoint=last_good.endpoint if last_good else None,
            selector=selector or None,
        ),
        body.get("status"),
        datetime.datetime.now(tz=datetime.UTC),
    )
    patch.status.update(update.status)
    for event in update.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
    METRICS.set_phase(f"{namespace}/{name}", update.status["phase"])
    return str(update.status["phase"])


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
def reconcile(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Parse, inspect, plan, render, apply, report."""
    context: Context = memo.context
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    generation = int(body["metadata"].get("generation") or 1)
    with METRICS.reconcile() as outcome, _object_lock(memo):
        try:
            placement, rendered, endpoint = plan_and_render(context, body)
        except Rejected as rejected:
            memo.failure, memo.observed_generation = rejected.failure, generation
            report(body, patch, context, getattr(memo, "last_good", None), memo.failure, generation)
            outcome[0] = "rejected"
            raise kopf.PermanentError(rejected.failure.message) from None
        try:
            node_group_status = apply_rendered(context, name, namespace, rendered)
        except KubeApiError as error:
            outcome[0] = "retry"
            delay = RETRY_SECONDS if error.transient else 60
            raise kopf.TemporaryError(str(error), delay=delay) from None
        except Exception as error:  # boto3 (node groups): network or throttling, retried
            outcome[0] = "retry"
            raise kopf.TemporaryError(f"node group: {error}", delay=RETRY_SECONDS * 3) from None
        memo.last_good = LastGood(generation, placement, rendered, endpoint)
        memo.failure, memo.observed_generation = None, generation
        METRICS.set_plan(namespace, name, placement)
        report(body, patch, context, memo.last_good, None, generation, node_group_status)
        outcome[0] = "success"


@kopf.timer(*RESOURCE, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
def resync(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Restore children that were deleted or edited; refresh status and phase."""
    context: Context = memo.context
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    lock = _object_lock(memo)
    if not lock.acquire(blocking=False):
        return  # a change handler is reconciling this object right now; it writes the status
    try:
        generation: int | None = getattr(memo, "observed_generation", None)
        if generation is None:
            return  # the change handlers have not acted yet; they write the first status
        last_good: LastGood | None = getattr(memo, "last_good", None)
        if last_good is not None:
            children = last_good.rendered.children
            apply_children(context.kube, name, namespace, children, detect_changes=False)
        report(body, patch, context, last_good, memo.failure, generation)
    except KubeApiError as error:
        raise kopf.TemporaryError(str(error), delay=RETRY_SECONDS) from None
    finally:
        lock.release()


@kopf.on.delete(*RESOURCE)
def cleanup(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Remove every child and this ModelDeployment's claim on shared node pools / groups."""
    context: Context = memo.context
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    with _object_lock(memo):
        try:
            prune_children(context.kube, name, namespace)
            release_node_pools(context.kube, namespace, name)
            if context.node_groups is not None:
                context.node_groups.release(namespace, name)
        except KubeApiError as error:
            raise kopf.TemporaryError(str(error), delay=RETRY_SECONDS) from None
    METRICS.set_phase(f"{namespace}/{name}", None)
    METRICS.set_plan(namespace, name, None)


@kopf.on.probe(id="modelDeployments")
def count_model_deployments(**_: Any) -> int:
    """Liveness/health payload: ModelDeployments this operator reports on."""
    return len(METRICS._phases)


def run_operator(argv: list[str] | None = None) -> int:
    """`modelship operator`: run kopf with the configured namespaces and serve /metrics."""
    parser = argparse.ArgumentParser(prog="modelship operator")
    parser.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics port")
    parser.add_argument(
        "--liveness",
        default="http://0.0.0.0:8081/healthz",
        help="kopf's health endpoint for the Deployment's probes",
    )
    parser.add_argument("--standalone", action="store_true", help="no peering (single replica)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv or [])
    config = load_config()
    kopf.configure(verbose=args.verbose)
    if args.metrics_port:
        METRICS.serve(args.metrics_port)
    kopf.run(
        clusterwide=not config.namespaces,
        namespaces=list(config.namespaces),
        liveness_endpoint=args.liveness or None,
        peering_name=PEERING_NAME,
        standalone=args.standalone,
    )
    return 0
