"""The scale-from-zero activator: a small HTTP reverse proxy that holds requests for a
ModelDeployment while it has no ready replica, and so wakes it up.

Why it exists. A ModelDeployment may scale to zero replicas (a KEDA ScaledObject with
idleReplicaCount 0). With no pod left, nothing sees an incoming request, so no metric of the
model's own can say "someone is waiting": scaling from zero needs a signal on the request side.
The activator is that signal. It runs as its own process (`modelship activator`, its own
Deployment in the chart: its own resources, an HPA if wanted, read-only RBAC), so a flood of
requests never starves the reconciler; it keeps no state beyond the requests it holds. Clients
use it as their OpenAI base URL:

    http://<activator-host>:8082/models/<namespace>/<name>/v1

A request to /models/<namespace>/<name>/<tail>?<query> goes to
http://<name>.<namespace>.svc.<cluster-domain>:8000/<tail>?<query>, the ModelDeployment's
Service. While the Service has no ready endpoint, connecting to it is refused; the activator then
holds the request, counts it in the gauge

    modelship_activator_pending_requests{namespace, model_deployment}

and tries to connect again every `retry_interval` seconds. KEDA's Prometheus trigger on that
gauge (summed over the operator replicas) sees a pending request and scales the deployment from
0 to 1; once the new replica is ready the connection succeeds and the held request goes through,
its response streamed back chunk by chunk (server-sent events arrive as they are produced). A
request that waits longer than `hold_seconds` gets 503 with Retry-After. A request for a Service
that does not exist gets 404 at once: holding it would never end well.

What it refuses, so that it is not an open proxy inside the cluster:
- a ModelDeployment it does not know: only those that scale to zero (spec.replicas.min 0), which
  it learns by listing ModelDeployments with read-only RBAC (ModelRegistry), get 404;
- any path but vLLM's OpenAI API (/v1/..., without the LoRA load/unload admin endpoints) and
  /health, and any method but GET and POST: 404 / 405, never forwarded;
- more held requests than `max_held_per_model` for one model (429) or `max_held_total` in all,
  or more held body bytes than `max_held_bytes` (503), each with Retry-After: a burst while a
  model wakes never grows the pod's memory without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry, Gauge
from yarl import URL

log = logging.getLogger("modelship.activator")

ACTIVATOR_PORT = 8082
UPSTREAM_PORT = 8000

URL_FORM = "/models/<namespace>/<name>/v1/..."
RETRY_AFTER_SECONDS = 30
# A replica that accepts connections answers a SYN at once; a longer wait means packets to the
# Service are dropped, not refused, which some CNIs do when it has no endpoint: try again then.
CONNECT_TIMEOUT_SECONDS = 5.0
# vLLM's uvicorn closes idle keep-alive connections after 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE).
# A POST sent on a connection it is closing fails and aiohttp never retries a POST, so the
# activator drops idle connections first.
KEEPALIVE_SECONDS = 4.0

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# vLLM's OpenAI-compatible API and its health check: the only paths forwarded. The LoRA
# endpoints change what the replica serves for everyone (and read adapters from disk).
_ALLOWED_TAIL = re.compile(r"^(v1(/[A-Za-z0-9._~:@!$&'()*+,;=%-]+)*|health)$")
_ADMIN_TAILS = ("v1/load_lora_adapter", "v1/unload_lora_adapter")
_ALLOWED_METHODS = frozenset({"GET", "POST"})
DEFAULT_MAX_HELD_PER_MODEL = 256
DEFAULT_MAX_HELD_TOTAL = 1024
DEFAULT_MAX_HELD_BYTES = 256 * 1024 * 1024
# RFC 9110 7.6.1: meant for one connection, never forwarded (plus any named in Connection).
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"}
)
# aiohttp sets these for the upstream request itself: Host from the URL, Content-Length from
# the body already read; Expect: 100-continue was answered by the activator's own server.
_NOT_FORWARDED = frozenset({"host", "content-length", "expect"})
# Without this aiohttp would add its own Accept-Encoding, User-Agent, ... to what the client
# sent; with auto_decompress off, the client could then get a gzip body it never asked for.
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
# Connecting failed before a byte of the request went out, so sending it again is safe.
_NOT_READY_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


@dataclass(frozen=True)
class Upstream:
    """Where the requests for one ModelDeployment go."""

    host: str
    port: int


def cluster_upstream(namespace: str, name: str, cluster_domain: str = "cluster.local") -> Upstream:
    """The ModelDeployment's Service, by its cluster DNS name."""
    return Upstream(f"{name}.{namespace}.svc.{cluster_domain}", UPSTREAM_PORT)


def pending_gauge(registry: CollectorRegistry) -> Gauge:
    """The gauge KEDA's Prometheus trigger watches; register it on the operator's registry."""
    return Gauge(
        "modelship_activator_pending_requests",
        "Requests the activator holds while a ModelDeployment has no ready replica (KEDA wakes it from zero on this).",
        ["namespace", "model_deployment"],
        registry=registry,
    )


class _Refusal(Exception):
    """A request the activator answers itself, with an OpenAI-style JSON error."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers

    def response(self) -> web.Response:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "code": self.status}}
        return web.json_response(body, status=self.status, headers=self.headers)


@dataclass(frozen=True)
class _Target:
    namespace: str
    name: str
    tail: str  # the path after /models/<namespace>/<name>/, still percent-encoded
    query: str  # the raw query string, without '?'

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _check_route(request: web.Request, target: _Target) -> None:
    """Only vLLM's OpenAI paths, and only GET and POST, are forwarded."""
    tail = target.tail
    # The upstream routes on the decoded path: check that one too, so neither a dot segment nor
    # an encoded '/' (v1/x%2F..%2F..%2Fsleep) reaches anything but the OpenAI API.
    decoded = unquote(tail)
    if (
        not _ALLOWED_TAIL.match(tail)
        or any(segment in (".", "..") for segment in decoded.split("/"))
        or not (decoded == "health" or decoded == "v1" or decoded.startswith("v1/"))
        or decoded.rstrip("/") in _ADMIN_TAILS
    ):
        raise _Refusal(
            404,
            f"no route for /{tail} of {target.key}: the activator forwards only vLLM's OpenAI "
            "API (/v1/...) and /health",
        )
    if request.method not in _ALLOWED_METHODS:
        raise _Refusal(
            405,
            f"method {request.method} is not forwarded; the OpenAI API takes GET and POST",
            headers={"Allow": "GET, POST"},
        )


def _parse_target(request: web.Request) -> _Target:
    path = request.rel_url.raw_path
    prefix = "/models/"
    parts = path[len(prefix) :].split("/", 2) if path.startswith(prefix) else []
    if len(parts) < 3:
        raise _Refusal(
            404,
            f"no route for {path}: the activator serves {URL_FORM} "
            f"(use http://<activator>:{ACTIVATOR_PORT}/models/<namespace>/<name>/v1 as the OpenAI base URL)",
        )
    namespace, name, tail = parts
    for segment, value in (("namespace", namespace), ("name", name)):
        if not _DNS_LABEL.fullmatch(value):
            raise _Refusal(
                400,
                f"the {segment} segment {value!r} of {path} is not a valid Kubernetes name "
                "(lowercase letters, digits and '-', at most 63, starting and ending with a "
                f"letter or digit); the URL must look like {URL_FORM}",
            )
    return _Target(namespace, name, tail, request.rel_url.raw_query_string)


def _hop_by_hop(headers: Mapping[str, str]) -> set[str]:
    named = headers.get("Connection", "")
    return set(_HOP_BY_HOP) | {token.strip().lower() for token in named.split(",") if token}


def _end_to_end(headers: Mapping[str, str], drop: set[str]) -> CIMultiDict[str]:
    kept: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        lower = key.lower()
        if lower not in drop and not lower.startswith("proxy-"):
            kept.add(key, value)
    return kept


def _request_headers(request: web.Request) -> CIMultiDict[str]:
    headers = _end_to_end(request.headers, _hop_by_hop(request.headers) | _NOT_FORWARDED)
    chain = [*headers.popall("X-Forwarded-For", []), *([request.remote] if request.remote else [])]
    if chain:
        headers["X-Forwarded-For"] = ", ".join(chain)
    # A proxy in front of the activator (an ingress) knows the host the client really used.
    headers.setdefault("X-Forwarded-Host", request.host)
    headers.setdefault("X-Forwarded-Proto", request.scheme)
    return headers


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class Activator:
    """The reverse proxy; one per operator process, serving every ModelDeployment."""

    def __init__(
        self,
        *,
        hold_seconds: float,
        pending: Gauge,
        resolve: Callable[[str, str], Upstream] = cluster_upstream,
        retry_interval: float = 1.0,
        max_body_bytes: int = 32 * 1024 * 1024,
        max_held_per_model: int = DEFAULT_MAX_HELD_PER_MODEL,
        max_held_total: int = DEFAULT_MAX_HELD_TOTAL,
        max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
    ) -> None:
        """`resolve(namespace, name)` names the upstream; it raises LookupError for a
        ModelDeployment the activator must not serve (answered 404): ModelRegistry.resolve."""
        self.hold_seconds = hold_seconds
        self.pending = pending
        self.resolve = resolve
        self.retry_interval = retry_interval
        self.max_body_bytes = max_body_bytes
        self.max_held_per_model = max_held_per_model
        self.max_held_total = max_held_total
        self.max_held_bytes = max_held_bytes
        self._held_per_model: dict[str, int] = {}
        self._held_total = 0
        self._held_bytes = 0
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_get("/healthz", _healthz)
        app.router.add_route("*", "/{path:.*}", self._handle)
        return app

    async def start(self, host: str, port: int) -> None:
        """Serve on host:port in the running loop (returns once listening)."""
        self._client()
        # Cancel a handler whose client went away: a held request stops counting as pending,
        # and a streamed generation stops upstream as its connection closes.
        runner = web.AppRunner(self.app(), handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        self._runner = runner
        log.info("activator listening on %s:%d (%s)", host, port, URL_FORM)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                # limit=0: a generation holds its connection for minutes; no pool-wide cap.
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_SECONDS),
                # No total or read timeout: generations stream for minutes.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_SECONDS),
                auto_decompress=False,  # bytes pass through as sent, Content-Encoding kept
                cookie_jar=aiohttp.DummyCookieJar(),  # one client's cookies never reach another
                skip_auto_headers=_NO_AUTO_HEADERS,
            )
        return self._session

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            target = _parse_target(request)
            _check_route(request, target)
            body = await self._read_body(request)
            upstream = await self._open(request, target, body)
        except _Refusal as refusal:
            return refusal.response()
        return await _relay(request, target, upstream)

    async def _read_body(self, request: web.Request) -> bytes:
        # The body is read whole so that a held request can be sent again as it was.
        too_large = _Refusal(
            413, f"request body over {self.max_body_bytes} bytes, the activator's limit"
        )
        if (request.content_length or 0) > self.max_body_bytes:
            raise too_large
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:  # a chunked body that ran past client_max_size
            raise too_large from None

    async def _open(
        self, request: web.Request, target: _Target, body: bytes
    ) -> aiohttp.ClientResponse:
        """Send the request upstream, holding it while the Service refuses connections."""
        try:
            upstream = self.resolve(target.namespace, target.name)
        except LookupError:
            raise _Refusal(404, f"no ModelDeployment {target.key}") from None
        url = URL.build(
            scheme="http",
            host=upstream.host,
            port=upstream.port,
            path="/" + target.tail,
            query_string=target.query,
            encoded=True,
        )
        headers = _request_headers(request)

        async def send() -> aiohttp.ClientResponse:
            try:
                return await self._client().request(
                    request.method, url, headers=headers, data=body or None, allow_redirects=False
                )
            except aiohttp.ClientConnectorDNSError:
                raise _Refusal(
                    404, f"no ModelDeployment {target.key} (no Service {upstream.host})"
                ) from None

        try:
            try:
                return await send()
            except _NOT_READY_ERRORS as exc:
                with self._holding(target, len(body)):
                    return await self._hold(request, target, send, exc)
        except aiohttp.ClientError as exc:  # connected, then the upstream failed us
            raise _Refusal(502, f"{target.key} failed to answer: {exc!r}") from None

    @contextlib.contextmanager
    def _holding(self, target: _Target, body_bytes: int) -> Iterator[None]:
        """Count a held request against the caps, or refuse it with Retry-After."""
        retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        held_here = self._held_per_model.get(target.key, 0)
        if held_here >= self.max_held_per_model:
            raise _Refusal(
                429,
                f"{target.key} is scaling up from zero and already holds {held_here} requests, "
                "the activator's limit per model; retry later",
                headers=retry,
            )
        if self._held_total >= self.max_held_total:
            raise _Refusal(
                503,
                f"the activator already holds {self._held_total} requests for models scaling up "
                "from zero, its limit; retry later",
                headers=retry,
            )
        if self._held_bytes + body_bytes > self.max_held_bytes:
            raise _Refusal(
                503,
                f"the activator already holds {self._held_bytes} bytes of request bodies for "
                "models scaling up from zero, its limit; retry later",
                headers=retry,
            )
        self._held_per_model[target.key] = held_here + 1
        self._held_total += 1
        self._held_bytes += body_bytes
        try:
            yield
        finally:
            self._held_total -= 1
            self._held_bytes -= body_bytes
            remaining = self._held_per_model[target.key] - 1
            if remaining:
                self._held_per_model[target.key] = remaining
            else:
                del self._held_per_model[target.key]

    async def _hold(
        self,
        request: web.Request,
        target: _Target,
        send: Callable[[], Awaitable[aiohttp.ClientResponse]],
        first: Exception,
    ) -> aiohttp.ClientResponse:
        """Retry `send` every retry_interval until it connects or hold_seconds pass, counted
        in the pending gauge all along so that KEDA scales the ModelDeployment up."""
        pending = self.pending.labels(namespace=target.namespace, model_deployment=target.name)
        started = time.monotonic()
        deadline = started + self.hold_seconds
        outcome = "stopped holding"  # the Service vanished, or the upstream failed once connected
        pending.inc()
        log.info(
            "holding %s %s for %s: no ready replica (%s); waiting up to %gs",
            request.method,
            request.rel_url.raw_path,
            target.key,
            first,
            self.hold_seconds,
        )
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                await asyncio.sleep(min(self.retry_interval, remaining))
                if _client_gone(request):  # when served without handler_cancellation
                    outcome = "client went away from"
                    raise _Refusal(499, "client closed the request")
                try:
                    response = await send()
                except _NOT_READY_ERRORS:
                    continue
                outcome = "released"
                return response
            outcome = "gave up"
            raise _Refusal(
                503,
                f"{target.key} has no ready replica after {self.hold_seconds:g}s; it is scaling "
                f"up from zero (kubectl -n {target.namespace} get modeldeployment {target.name}); "
                "retry later",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        except asyncio.CancelledError:  # handler_cancellation: the client went away
            outcome = "client went away from"
            raise
        finally:
            pending.dec()
            log.info(
                "%s %s %s for %s after %.1fs",
                outcome,
                request.method,
                request.rel_url.raw_path,
                target.key,
                time.monotonic() - started,
            )


async def _relay(
    request: web.Request, target: _Target, upstream: aiohttp.ClientResponse
) -> web.StreamResponse:
    """Stream the upstream response back as it arrives (server-sent events included)."""
    headers = _end_to_end(upstream.headers, _hop_by_hop(upstream.headers))
    # Content-Length and Content-Encoding stay: the bytes pass through undecoded and uncounted.
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    complete = False
    try:
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        complete = True
    except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
        if not _client_gone(request):
            # Headers are out; closing is the only way left to tell the client the response
            # is cut short rather than let it look complete.
            log.warning("%s broke off its response to %s: %r", target.key, request.path, exc)
            if request.transport is not None:
                request.transport.close()
    finally:
        if complete:
            upstream.release()
        else:
            upstream.close()  # a generation nobody reads any more stops upstream
    return response


async def _healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


class ModelRegistry:
    """The ModelDeployments the activator may route to: those that scale to zero. Filled from
    the Kubernetes API (read-only list of ModelDeployments); anything else is 404."""

    def __init__(
        self,
        cluster_domain: str = "cluster.local",
        upstream: Callable[[str, str, str], Upstream] = cluster_upstream,
    ) -> None:
        self.cluster_domain = cluster_domain
        self.upstream = upstream  # (namespace, name, cluster domain) -> where to send requests
        self._known: frozenset[tuple[str, str]] = frozenset()
        self._lock = threading.Lock()
        self.synced = False

    def update(self, items: Iterable[Mapping[str, Any]]) -> None:
        """Replace what is known with the ModelDeployments in `items` that scale to zero."""
        known = set()
        for item in items:
            metadata = item.get("metadata") or {}
            replicas = (item.get("spec") or {}).get("replicas") or {}
            if replicas.get("min", 1) == 0 and metadata.get("name") and metadata.get("namespace"):
                known.add((str(metadata["namespace"]), str(metadata["name"])))
        with self._lock:
            self._known = frozenset(known)
            self.synced = True

    def known(self) -> frozenset[tuple[str, str]]:
        with self._lock:
            return self._known

    def resolve(self, namespace: str, name: str) -> Upstream:
        """The Service of a known scale-to-zero ModelDeployment; LookupError otherwise."""
        if (namespace, name) not in self.known():
            raise LookupError(f"{namespace}/{name}")
        return self.upstream(namespace, name, self.cluster_domain)


def list_model_deployments(kube: Any, namespaces: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Every ModelDeployment (in `namespaces`, or cluster-wide), read with `kube` (apply.Kube)."""
    from .api import API_VERSION, PLURAL

    base = f"/apis/{API_VERSION}"
    paths = [f"{base}/namespaces/{namespace}/{PLURAL}" for namespace in namespaces] or [
        f"{base}/{PLURAL}"
    ]
    items: list[dict[str, Any]] = []
    for path in paths:
        items += kube.request("GET", path).get("items", [])
    return items


async def keep_registry_synced(
    registry: ModelRegistry,
    read: Callable[[], list[dict[str, Any]]],
    interval_seconds: float,
) -> None:
    """Re-read the ModelDeployments every `interval_seconds`; a failed read keeps the last
    good list (the activator keeps serving what it knew) and is logged."""
    while True:
        try:
            registry.update(await asyncio.to_thread(read))
        except Exception as error:  # an API hiccup must not stop the activator
            log.warning("could not list ModelDeployments (keeping the last list): %s", error)
        await asyncio.sleep(interval_seconds)


async def serve_forever(
    config: Any, *, metrics_port: int, kube: Any = None, stop: asyncio.Event | None = None
) -> None:
    """The `modelship activator` process: list ModelDeployments, serve the activator and its
    metrics until `stop` is set (or forever)."""
    from prometheus_client import start_http_server

    from .apply import Kube

    registry = CollectorRegistry()
    models = ModelRegistry()
    kube = kube or Kube.from_environment()
    sync = asyncio.create_task(
        keep_registry_synced(
            models,
            lambda: list_model_deployments(kube, config.namespaces),
            config.activator_sync_seconds,
        )
    )
    activator = Activator(
        hold_seconds=config.activator_hold_seconds,
        pending=pending_gauge(registry),
        resolve=models.resolve,
        max_held_per_model=config.activator_max_held_per_model,
        max_held_total=config.activator_max_held_total,
        max_held_bytes=config.activator_max_held_bytes,
        max_body_bytes=min(32 * 1024 * 1024, config.activator_max_held_bytes),
    )
    start_http_server(metrics_port, registry=registry)
    await activator.start("0.0.0.0", config.activator_port)
    try:
        await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        sync.cancel()
        await activator.stop()


def main(argv: list[str] | None = None) -> int:
    """`modelship activator`: the scale-from-zero proxy as its own process."""
    import argparse

    from .config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="modelship activator", description=__doc__.split("\n")[0])
    parser.add_argument("--metrics-port", type=int, default=8083, help="Prometheus /metrics port.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = load_config()
    except ConfigError as error:
        print(f"modelship activator: {error}")
        return 2
    if not config.activator_port:
        print("modelship activator: MODELSHIP_ACTIVATOR_PORT is 0; give the port to listen on")
        return 2
    asyncio.run(serve_forever(config, metrics_port=args.metrics_port))
    return 0
