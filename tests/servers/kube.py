"""A Kubernetes API server for the operator's tests: KMock's KubernetesEmulator on 127.0.0.1.

KMock (kopf's companion mock server) keeps objects in memory and serves list, watch, fetch,
create, merge-patch and delete with finalizers, which is what kopf needs. Its documentation says
to inherit the emulator for anything it treats "simplistically"; `ModelshipKubeEmulator` adds the
few API-server behaviours modelship relies on:

- server-side apply (`PATCH application/apply-patch+yaml`) creates a missing object, as the real
  API server does (KMock answers 404 to a PATCH of a missing object);
- `metadata.uid`, `creationTimestamp`, `resourceVersion` and `metadata.generation` (bumped when
  `spec` changes), since owner references and `observedGeneration` need them;
- `metadata.generateName` (kopf posts Events with it);
- `labelSelector=k=v[,k=v]` on lists;
- a bounded request log and object history: KMock records every request and scans the log on
  each new one, which slows a long session (or the 1000-object benchmark) quadratically; only
  the requests still being served (watch streams among them) are kept;
- a by-name index for reads and writes of one object (KMock scans every stored object for each).

Not emulated (real API-server features the tests do not rely on): owner-reference garbage
collection (the operator prunes explicitly), field ownership of server-side apply (KMock merges
dicts and replaces lists), admission, and `resourceVersion` conflicts.

The server runs on its own event loop in a background thread, once per test session; the
`kube_api` fixture yields its URL, and `kubeconfig` points $KUBECONFIG at it so that kopf and the
`kubernetes` client both find it.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import os
import secrets
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
import pytest
import yaml
from kmock._internal import dicts, enums, rendering
from modelship.operator.apply import Kube, KubeApiError

# Resources the operator reads or writes: (group/version/plural, kind, namespaced, subresources).
RESOURCES: list[tuple[str, str, bool, tuple[str, ...]]] = [
    ("modelship.dev/v1alpha1/modeldeployments", "ModelDeployment", True, ("status", "scale")),
    ("apps/v1/deployments", "Deployment", True, ("status", "scale")),
    ("v1/services", "Service", True, ("status",)),
    ("v1/pods", "Pod", True, ("status",)),
    ("v1/events", "Event", True, ()),
    ("v1/configmaps", "ConfigMap", True, ()),
    ("v1/serviceaccounts", "ServiceAccount", True, ()),
    ("v1/namespaces", "Namespace", False, ("status",)),
    ("policy/v1/poddisruptionbudgets", "PodDisruptionBudget", True, ("status",)),
    ("autoscaling/v2/horizontalpodautoscalers", "HorizontalPodAutoscaler", True, ("status",)),
    ("keda.sh/v1alpha1/scaledobjects", "ScaledObject", True, ("status",)),
    ("monitoring.coreos.com/v1/podmonitors", "PodMonitor", True, ()),
    ("leaderworkerset.x-k8s.io/v1/leaderworkersets", "LeaderWorkerSet", True, ("status", "scale")),
    ("karpenter.sh/v1/nodepools", "NodePool", False, ("status",)),
    ("karpenter.sh/v1/nodeclaims", "NodeClaim", False, ("status",)),
    ("karpenter.k8s.aws/v1/ec2nodeclasses", "EC2NodeClass", False, ("status",)),
    ("kopf.dev/v1/clusterkopfpeerings", "ClusterKopfPeering", False, ()),
    ("kopf.dev/v1/kopfpeerings", "KopfPeering", True, ()),
]

APPLY_PATCH = "application/apply-patch+yaml"
KEEP_VERSIONS = 4  # recent versions kept per object


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, (part.strip() for part in selector.split(","))):
        key, _, value = term.partition("=")
        if labels.get(key) != value.lstrip("="):
            return False
    return True


@attrs.define(kw_only=True)
class ModelshipKubeEmulator(kmock.KubernetesEmulator):
    """KMock's emulator plus server-side-apply upserts, object metadata and label selectors."""

    _version_counter: int = attrs.field(default=0, init=False)
    _in_flight: set[int] = attrs.field(factory=set, init=False)
    _by_name: dict[str, set[Any]] = attrs.field(factory=dict, init=False)
    _indexed: int = attrs.field(default=0, init=False)

    def _KubernetesEmulator__get_objs(  # overrides KMock's name-mangled lookup
        self, request: rendering.Request, strict: bool
    ) -> list[Any]:
        """KMock's lookup scans every stored object; for one named object, look at the stored
        keys with that name only (an index of keys, rebuilt when keys were added)."""
        check = self._KubernetesEmulator__check
        if request.name is not None:
            if len(self._objects) != self._indexed:
                self._by_name.clear()
                for key in self._objects:
                    self._by_name.setdefault(key[2], set()).add(key)
                self._indexed = len(self._objects)
            found = [
                self._objects[key]
                for key in self._by_name.get(request.name, ())
                if key in self._objects and check(request, *key, strict=strict)
            ]
            if found:
                return found
        return [obj for key, obj in self._objects.items() if check(request, *key, strict=strict)]

    def _next_version(self) -> str:
        self._version_counter += 1
        return str(self._version_counter)

    def _stored(self, request: rendering.Request) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key in self.objects and not self.objects[key].deleted:
            return self.objects[key].raw
        return None

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and isinstance(request.data, dict):
            data = request.data
            if request.action == enums.action.CREATE:
                meta = data.setdefault("metadata", {})
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + secrets.token_hex(3)
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", _now())
                meta.setdefault("generation", 1)
                meta["resourceVersion"] = self._next_version()
            elif request.action == enums.action.UPDATE and request.subresource is None:
                stored = self._stored(request)
                content_type = request.headers.get("Content-Type", "")
                if stored is None and content_type.startswith(APPLY_PATCH):
                    # Server-side apply of a missing object creates it.
                    meta = data.setdefault("metadata", {})
                    meta.setdefault("name", request.name)
                    if request.namespace:
                        meta.setdefault("namespace", request.namespace)
                    meta.setdefault("uid", str(uuid.uuid4()))
                    meta.setdefault("creationTimestamp", _now())
                    meta["generation"] = 1
                    meta["resourceVersion"] = self._next_version()
                    async with self._lock:
                        key = (request.resource, request.namespace, request.name)
                        self.objects[key] = {}
                        self.objects[key].patch(copy.deepcopy(data))
                        await self._buses[request.resource].put(
                            {"type": "ADDED", "object": self.objects[key].raw}
                        )
                    # The patch below then re-applies the same data (a no-op merge).
                if stored is not None:
                    after = dicts.patch_dict(copy.deepcopy(stored), copy.deepcopy(data))
                    meta = data.setdefault("metadata", {})
                    if after.get("spec") != stored.get("spec"):
                        meta["generation"] = int(stored["metadata"].get("generation", 1)) + 1
                    if after != stored:  # a no-op patch keeps the version, as the API server does
                        meta["resourceVersion"] = self._next_version()
            elif request.action == enums.action.UPDATE:
                data.setdefault("metadata", {})["resourceVersion"] = self._next_version()
        if (
            request.resource is not None
            and request.action == enums.action.UPDATE
            and isinstance(request.data, list)
        ):
            # JSON patch: a failed `test` op is 422 Unprocessable Entity, as from the API server
            # (kopf guards finalizer and status patches with a resourceVersion test).
            stored = self._stored(request)
            if stored is not None:
                try:
                    jsonpatch.apply_patch(copy.deepcopy(stored), request.data)
                except jsonpatch.JsonPatchTestFailed as error:
                    # KMock's watch replays existing objects as ADDED after a list, so a
                    # watcher can act on a body older than one it already changed; re-send
                    # the current one (the API server would have streamed it in order).
                    await self._buses[request.resource].put({"type": "MODIFIED", "object": stored})
                    raise kmock.KubernetesError(
                        status=422, reason="Invalid", message=str(error)
                    ) from None
                request.data.append(
                    {
                        "op": "add",
                        "path": "/metadata/resourceVersion",
                        "value": self._next_version(),
                    }
                )
        # KMock keeps every request for assertions and scans them on each new request (by
        # identity, per reaction): quadratic over a long session. Keep only those in flight,
        # which the scan must still find.
        self._in_flight.add(id(request))
        self._requests[:] = [r for r in self._requests if id(r) in self._in_flight]
        try:
            response = await super()._handle(request)
        finally:
            self._in_flight.discard(id(request))
        if request.resource is not None and request.name is not None:
            key = (request.resource, request.namespace, request.name)
            if key in self.objects and len(self.objects[key].history) > 2 * KEEP_VERSIONS:
                del self.objects[key].history[:-KEEP_VERSIONS]
        return response

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        listing = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector and isinstance(listing, dict):
            listing["items"] = [
                item
                for item in listing["items"]
                if _matches((item.get("metadata") or {}).get("labels") or {}, selector)
            ]
        return listing


@dataclass
class KubeApi:
    """A running emulator: its URL, and the emulator itself for direct inspection."""

    url: str
    emulator: ModelshipKubeEmulator
    loop: asyncio.AbstractEventLoop


def _serve(ready: threading.Event, holder: dict[str, Any], stop: threading.Event) -> None:
    async def main() -> None:
        emulator = ModelshipKubeEmulator()
        for resource, kind, namespaced, subresources in RESOURCES:
            emulator.resources[resource] = kmock.ResourceInfo(
                kind=kind,
                namespaced=namespaced,
                verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
                subresources=set(subresources),
            )
        async with emulator, kmock.Server(emulator, host="127.0.0.1") as server:
            holder["api"] = KubeApi(
                url=str(server.url).rstrip("/"), emulator=emulator, loop=asyncio.get_running_loop()
            )
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.1)

    try:
        asyncio.run(main())
    except BaseException as error:  # surfaced to the fixture instead of dying silently
        holder["error"] = error
        ready.set()


@pytest.fixture(scope="session")
def kube_api() -> Iterator[KubeApi]:
    """KMock's Kubernetes emulator on 127.0.0.1 with modelship's resources registered."""
    ready, stop = threading.Event(), threading.Event()
    holder: dict[str, Any] = {}
    thread = threading.Thread(target=_serve, args=(ready, holder, stop), daemon=True)
    thread.start()
    if not ready.wait(30) or "error" in holder:
        raise RuntimeError(f"KMock did not start: {holder.get('error')!r}")
    yield holder["api"]
    stop.set()
    thread.join(10)


def write_kubeconfig(url: str, path: Path) -> Path:
    """A kubeconfig for an unauthenticated API server at `url`."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": url}}],
        "users": [{"name": "kmock", "user": {"token": "kmock"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
        "current-context": "kmock",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def kubeconfig(kube_api: KubeApi, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """$KUBECONFIG pointing at the emulator for the rest of the session (kopf and the client)."""
    path = write_kubeconfig(kube_api.url, tmp_path_factory.mktemp("kube") / "config")
    previous = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("KUBECONFIG", None)
    else:
        os.environ["KUBECONFIG"] = previous


PEERING = "modelship"


def ensure_cluster_peering(kube: Kube, name: str = PEERING) -> None:
    """Create kopf's ClusterKopfPeering once per emulator: several modules run the operator
    against the same session-wide API server, and a second POST would be a 409."""
    try:
        kube.request("GET", f"/apis/kopf.dev/v1/clusterkopfpeerings/{name}")
        return
    except KubeApiError as error:
        if error.status != 404:
            raise
    kube.request(
        "POST",
        "/apis/kopf.dev/v1/clusterkopfpeerings",
        body={
            "apiVersion": "kopf.dev/v1",
            "kind": "ClusterKopfPeering",
            "metadata": {"name": name},
        },
    )
