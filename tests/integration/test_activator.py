"""The scale-from-zero activator (operator/activator.py) between a real aiohttp client and a real
aiohttp upstream, all on 127.0.0.1: passthrough, streaming, holding a request until the upstream
starts listening, and the answers it gives itself (503, 404, 400, 413)."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from modelship.operator.activator import (
    Activator,
    ModelRegistry,
    Upstream,
    pending_gauge,
)
from modelship.runtime.demo import free_port
from prometheus_client import CollectorRegistry
from yarl import URL

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

NS, NAME = "ns", "m"
GAUGE = "modelship_activator_pending_requests"
SSE_CHUNKS = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n"]
GZIPPED = gzip.compress(b'{"object": "list", "data": []}' * 50)


@dataclass
class Seen:
    method: str
    path: str  # raw, as it came on the wire
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeModel:
    """An upstream standing in for vLLM; it records what reached it."""

    seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    stream_done: bool = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.stream)
        app.router.add_get("/v1/teapot", self.teapot)
        app.router.add_get("/v1/gzipped", self.gzipped)
        app.router.add_get("/v1/broken", self.broken)
        app.router.add_get("/v1/files/{file_id}", self.file)
        return app

    async def record(self, request: web.Request) -> None:
        self.seen.append(
            Seen(
                request.method,
                request.rel_url.raw_path,
                request.rel_url.raw_query_string,
                dict(request.headers),
                await request.read(),
            )
        )

    async def completions(self, request: web.Request) -> web.Response:
        await self.record(request)
        return web.json_response(
            {"id": "cmpl-1", "choices": [{"text": "hello"}]},
            status=201,
            headers={"X-Upstream-Id": "fake-vllm"},
        )

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """SSE like `stream: true`; after the first event it waits until the test lets it go on."""
        await self.record(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(SSE_CHUNKS[0])
        await self.release.wait()
        for chunk in SSE_CHUNKS[1:]:
            await response.write(chunk)
        await response.write_eof()
        self.stream_done = True
        return response

    async def teapot(self, request: web.Request) -> web.Response:
        await self.record(request)
        return web.json_response({"error": "short and stout"}, status=418)

    async def file(self, request: web.Request) -> web.Response:
        await self.record(request)
        return web.json_response({"id": request.match_info["file_id"]})

    async def gzipped(self, request: web.Request) -> web.Response:
        await self.record(request)
        return web.Response(
            body=GZIPPED,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )

    async def broken(self, request: web.Request) -> web.StreamResponse:
        """Starts a chunked response, then drops the connection (a replica dying mid-stream)."""
        await self.record(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(SSE_CHUNKS[0])
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return response


@asynccontextmanager
async def serving(app: web.Application, port: int) -> AsyncIterator[None]:
    runner = web.AppRunner(app, shutdown_timeout=1)  # a test that failed mid-stream ends fast
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield
    finally:
        await runner.cleanup()


@dataclass
class Proxy:
    base: str  # http://127.0.0.1:<port>
    registry: CollectorRegistry
    client: aiohttp.ClientSession

    def pending(self) -> float | None:
        return self.registry.get_sample_value(GAUGE, {"namespace": NS, "model_deployment": NAME})

    def url(self, path: str) -> str:
        return self.base + path


@asynccontextmanager
async def activator(
    upstream_port: int,
    *,
    hold_seconds: float = 10.0,
    max_body_bytes: int = 32 * 1024 * 1024,
    resolve: Callable[[str, str], Upstream] | None = None,
) -> AsyncIterator[Proxy]:
    registry = CollectorRegistry()
    proxy = Activator(
        hold_seconds=hold_seconds,
        pending=pending_gauge(registry),
        resolve=resolve or (lambda namespace, name: Upstream("127.0.0.1", upstream_port)),
        retry_interval=0.05,
        max_body_bytes=max_body_bytes,
    )
    port = free_port()
    await proxy.start("127.0.0.1", port)
    try:
        # A client that sends only what a test names, so what reaches the upstream shows
        # whether the activator added anything.
        async with aiohttp.ClientSession(
            auto_decompress=False, skip_auto_headers=("Accept-Encoding", "User-Agent")
        ) as client:
            yield Proxy(f"http://127.0.0.1:{port}", registry, client)
    finally:
        await proxy.stop()


async def until(check: Callable[[], bool], seconds: float = 3.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def error_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    assert response.content_type == "application/json"
    body = json.loads(await response.read())
    error: dict[str, Any] = body["error"]
    assert error["code"] == response.status
    return error


async def test_passthrough_keeps_path_query_body_and_headers() -> None:
    model, port = FakeModel(), free_port()
    async with serving(model.app(), port), activator(port) as proxy:
        payload = json.dumps({"model": "m", "prompt": "hi"}).encode()
        async with proxy.client.post(
            URL(
                proxy.url(f"/models/{NS}/{NAME}/v1/completions?api-version=2&x=a%2Fb"), encoded=True
            ),
            data=payload,
            headers={
                "Content-Type": "application/json",
                "Authorization": "Bearer sk-test",
                "User-Agent": "OpenAI/Python 1.0",
                "Connection": "keep-alive, X-Hop",
                "X-Hop": "only for the activator",
                "Proxy-Authorization": "Basic eA==",
                "X-Forwarded-For": "10.0.0.9",
            },
        ) as response:
            assert response.status == 201
            assert response.headers["X-Upstream-Id"] == "fake-vllm"
            assert json.loads(await response.read()) == {
                "id": "cmpl-1",
                "choices": [{"text": "hello"}],
            }
        async with proxy.client.get(proxy.url(f"/models/{NS}/{NAME}/v1/teapot")) as teapot:
            assert teapot.status == 418  # an upstream error is the upstream's answer, passed on
            assert json.loads(await teapot.read()) == {"error": "short and stout"}
    seen = model.seen[0]
    assert (seen.method, seen.path, seen.query) == (
        "POST",
        "/v1/completions",
        "api-version=2&x=a%2Fb",
    )
    assert seen.body == payload
    assert seen.headers["Host"] == f"127.0.0.1:{port}"  # the upstream's, not the activator's
    assert seen.headers["Authorization"] == "Bearer sk-test"
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["X-Forwarded-For"] == "10.0.0.9, 127.0.0.1"
    assert seen.headers["X-Forwarded-Host"] == proxy.base.removeprefix("http://")
    assert seen.headers["X-Forwarded-Proto"] == "http"
    assert "X-Hop" not in seen.headers
    assert "Proxy-Authorization" not in seen.headers
    assert seen.headers["User-Agent"] == "OpenAI/Python 1.0"
    # aiohttp adds neither User-Agent nor Accept-Encoding for the activator on its own.
    assert "User-Agent" not in model.seen[1].headers
    assert "Accept-Encoding" not in model.seen[1].headers
    assert proxy.pending() is None  # nothing was ever held


async def test_percent_encoded_path_reaches_upstream_unchanged() -> None:
    model, port = FakeModel(), free_port()
    async with serving(model.app(), port), activator(port) as proxy:
        url = URL(proxy.url(f"/models/{NS}/{NAME}/v1/files/dir%2Ffile%20a"), encoded=True)
        async with proxy.client.get(url) as response:
            assert response.status == 200
            assert json.loads(await response.read()) == {"id": "dir/file a"}
    assert model.seen[0].path == "/v1/files/dir%2Ffile%20a"  # one segment, as the client sent it


async def test_compressed_body_passes_through_byte_for_byte() -> None:
    model, port = FakeModel(), free_port()
    async with (
        serving(model.app(), port),
        activator(port) as proxy,
        proxy.client.get(
            proxy.url(f"/models/{NS}/{NAME}/v1/gzipped"), headers={"Accept-Encoding": "gzip"}
        ) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Content-Length"] == str(len(GZIPPED))
        assert await response.read() == GZIPPED
    assert model.seen[0].headers["Accept-Encoding"] == "gzip"


async def test_sse_arrives_before_upstream_finishes() -> None:
    model, port = FakeModel(), free_port()
    async with serving(model.app(), port), activator(port) as proxy:
        try:
            async with asyncio.timeout(5):  # a buffering proxy would hang on the first read
                async with proxy.client.post(
                    proxy.url(f"/models/{NS}/{NAME}/v1/chat/completions"),
                    json={"model": "m", "stream": True, "messages": []},
                ) as response:
                    assert response.status == 200
                    assert response.content_type == "text/event-stream"
                    assert "Content-Length" not in response.headers
                    first = await response.content.readuntil(b"\n\n")
                    assert first == SSE_CHUNKS[0]
                    assert not model.stream_done  # the upstream is still waiting on us
                    model.release.set()
                    rest = await response.read()
        finally:
            model.release.set()  # lets the upstream end even when the test failed
    assert rest == b"".join(SSE_CHUNKS[1:])
    assert model.stream_done


async def test_upstream_breaking_mid_stream_cuts_the_client_off() -> None:
    model, port = FakeModel(), free_port()
    async with serving(model.app(), port), activator(port) as proxy:
        response = await proxy.client.get(proxy.url(f"/models/{NS}/{NAME}/v1/broken"))
        assert response.status == 200
        assert await response.content.readuntil(b"\n\n") == SSE_CHUNKS[0]
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()  # not a clean end: the client can tell it was cut
        response.close()


async def test_held_request_goes_through_once_upstream_listens(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="modelship.activator")
    model, port = FakeModel(), free_port()  # reserved, nobody listening: connection refused
    async with activator(port) as proxy:
        request = asyncio.create_task(
            proxy.client.post(proxy.url(f"/models/{NS}/{NAME}/v1/completions"), json={"p": 1})
        )
        await until(lambda: proxy.pending() == 1)
        await asyncio.sleep(0.2)  # several refused retries later, still held
        assert not request.done()
        assert proxy.pending() == 1
        async with serving(model.app(), port):
            response = await asyncio.wait_for(request, 5)
            assert response.status == 201
            assert json.loads(await response.read())["id"] == "cmpl-1"
            response.release()
        assert proxy.pending() == 0
    assert len(model.seen) == 1
    assert json.loads(model.seen[0].body) == {"p": 1}
    messages = [r.getMessage() for r in caplog.records if r.name == "modelship.activator"]
    assert any(m.startswith(f"holding POST /models/{NS}/{NAME}/v1/completions") for m in messages)
    assert any(m.startswith("released POST") and f"{NS}/{NAME} after" in m for m in messages)


async def test_hold_times_out_with_503_and_retry_after() -> None:
    port = free_port()
    async with activator(port, hold_seconds=1.0) as proxy:
        started = time.monotonic()
        async with proxy.client.post(
            proxy.url(f"/models/{NS}/{NAME}/v1/completions"), json={}
        ) as response:
            waited = time.monotonic() - started
            assert response.status == 503
            assert response.headers["Retry-After"] == "30"
            error = await error_of(response)
        assert proxy.pending() == 0
    assert 1.0 <= waited < 3.0
    assert error["message"] == (
        f"{NS}/{NAME} has no ready replica after 1s; it is scaling up from zero "
        f"(kubectl -n {NS} get modeldeployment {NAME}); retry later"
    )


async def test_missing_service_is_404_at_once() -> None:
    gone = Upstream("no-such-service.invalid", 8000)
    async with activator(0, resolve=lambda namespace, name: gone) as proxy:
        async with proxy.client.get(proxy.url(f"/models/{NS}/{NAME}/v1/models")) as response:
            assert response.status == 404
            error = await error_of(response)
        assert proxy.pending() is None  # never held
    assert error["message"] == f"no ModelDeployment {NS}/{NAME} (no Service {gone.host})"
    assert error["type"] == "invalid_request_error"


async def test_resolver_lookup_error_is_404() -> None:
    def unknown(namespace: str, name: str) -> Upstream:
        raise LookupError(name)

    async with activator(0, resolve=unknown) as proxy:
        response = await proxy.client.get(proxy.url(f"/models/{NS}/{NAME}/v1/models"))
        assert response.status == 404
        assert (await error_of(response))["message"] == f"no ModelDeployment {NS}/{NAME}"


async def test_bad_paths_and_healthz() -> None:
    async with activator(free_port()) as proxy:
        async with proxy.client.get(proxy.url("/models/Bad_NS/m/v1/models")) as bad_namespace:
            assert bad_namespace.status == 400
            error = await error_of(bad_namespace)
            assert error["type"] == "invalid_request_error"
            assert "namespace segment 'Bad_NS'" in error["message"]
            assert "/models/<namespace>/<name>/v1/..." in error["message"]
        async with proxy.client.post(proxy.url(f"/models/{NS}/-m/v1/completions")) as bad_name:
            assert bad_name.status == 400
            assert "name segment '-m'" in (await error_of(bad_name))["message"]
        long_name = "a" * 64
        async with proxy.client.get(proxy.url(f"/models/{NS}/{long_name}/v1")) as too_long:
            assert too_long.status == 400
        for outside in ("/v1/models", f"/models/{NS}/{NAME}", "/"):
            async with proxy.client.get(proxy.url(outside)) as response:
                assert response.status == 404, outside
                message = (await error_of(response))["message"]
                assert "/models/<namespace>/<name>/v1" in message
        async with proxy.client.get(proxy.url("/healthz")) as health:
            assert health.status == 200
            assert await health.text() == "ok"
        assert proxy.pending() is None


async def test_client_leaving_while_held_releases_the_gauge(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="modelship.activator")
    async with activator(free_port(), hold_seconds=5) as proxy:
        request = asyncio.create_task(
            proxy.client.post(proxy.url(f"/models/{NS}/{NAME}/v1/completions"), json={})
        )
        await until(lambda: proxy.pending() == 1)
        request.cancel()  # closes the client's connection
        with pytest.raises(asyncio.CancelledError):
            await request
        await until(lambda: proxy.pending() == 0, seconds=2)  # long before hold_seconds
    messages = [r.getMessage() for r in caplog.records if r.name == "modelship.activator"]
    assert any(m.startswith("client went away from POST") for m in messages)


async def test_body_over_the_limit_is_413() -> None:
    model, port = FakeModel(), free_port()
    async with serving(model.app(), port), activator(port, max_body_bytes=1024) as proxy:
        url = proxy.url(f"/models/{NS}/{NAME}/v1/completions")
        async with proxy.client.post(url, data=b"x" * 4096) as response:
            assert response.status == 413
            assert "1024 bytes" in (await error_of(response))["message"]

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length to refuse it early
            for _ in range(4):
                yield b"x" * 1024

        async with proxy.client.post(url, data=chunked()) as response:
            assert response.status == 413
        async with proxy.client.post(url, data=b"x" * 1024) as response:
            assert response.status == 201  # at the limit is fine
    assert len(model.seen) == 1


# --- not an open proxy: known models, OpenAI paths, bounded holding ------------------------------


def md_object(namespace: str, name: str, replicas_min: int) -> dict[str, Any]:
    return {
        "apiVersion": "modelship.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"model": {"uri": "s3://models/m/"}, "replicas": {"min": replicas_min}},
    }


def local_registry(port: int, items: list[dict[str, Any]]) -> ModelRegistry:
    """A registry whose Services are the fake model on 127.0.0.1:port."""
    registry = ModelRegistry(upstream=lambda namespace, name, domain: Upstream("127.0.0.1", port))
    registry.update(items)
    return registry


async def test_only_known_scale_to_zero_models_are_routed() -> None:
    model, port = FakeModel(), free_port()
    registry = local_registry(
        port, [md_object(NS, NAME, 0), md_object(NS, "always-on", 1), md_object("other", "x", 0)]
    )
    assert registry.known() == {(NS, NAME), ("other", "x")}
    async with serving(model.app(), port), activator(port, resolve=registry.resolve) as proxy:
        async with proxy.client.post(
            proxy.url(f"/models/{NS}/{NAME}/v1/completions"), json={}
        ) as response:
            assert response.status == 201
        # Not scaling to zero, or not a ModelDeployment at all (any Service in the cluster).
        for path in (f"/models/{NS}/always-on/v1/completions", "/models/kube-system/kube-dns/v1/x"):
            async with proxy.client.post(proxy.url(path), json={}) as response:
                assert response.status == 404, path
    assert [seen.path for seen in model.seen] == ["/v1/completions"]


async def test_only_the_openai_api_is_forwarded() -> None:
    model, port = FakeModel(), free_port()
    registry = local_registry(port, [md_object(NS, NAME, 0)])
    async with serving(model.app(), port), activator(port, resolve=registry.resolve) as proxy:
        base = f"/models/{NS}/{NAME}"
        for tail in (
            "/metrics",
            "/sleep",
            "/reset_prefix_cache",
            "/collective_rpc",
            "/v1/load_lora_adapter",
            "/v1/unload_lora_adapter",
            "/v1/x/../../sleep",
            "/v1/x%2F..%2F..%2Fsleep",
            "/v1%2F..%2Fsleep",
            "/v2/anything",
        ):
            url = URL(proxy.url(base + tail), encoded=True)
            async with proxy.client.post(url, json={}) as response:
                assert response.status == 404, tail
                assert "OpenAI API" in (await error_of(response))["message"]
        async with proxy.client.delete(proxy.url(base + "/v1/completions")) as response:
            assert response.status == 405
            assert response.headers["Allow"] == "GET, POST"
    assert model.seen == []  # nothing of the above reached the model


async def _held(proxy: Proxy, path: str, body: bytes = b"{}") -> asyncio.Task[Any]:
    return asyncio.create_task(proxy.client.post(proxy.url(path), data=body))


async def test_held_requests_are_capped_per_model_in_total_and_in_bytes() -> None:
    port = free_port()  # nothing listens: every request is held
    registry = CollectorRegistry()
    models = local_registry(port, [md_object(NS, NAME, 0), md_object(NS, "b", 0)])
    proxy_server = Activator(
        hold_seconds=30,
        pending=pending_gauge(registry),
        resolve=models.resolve,
        retry_interval=0.05,
        max_held_per_model=2,
        max_held_total=3,
        max_held_bytes=10_000,
    )
    listen = free_port()
    await proxy_server.start("127.0.0.1", listen)
    try:
        async with aiohttp.ClientSession() as client:
            proxy = Proxy(f"http://127.0.0.1:{listen}", registry, client)
            first = [await _held(proxy, f"/models/{NS}/{NAME}/v1/completions") for _ in range(2)]
            await until(lambda: proxy.pending() == 2)
            # A third for the same model: over the per-model cap.
            async with client.post(
                proxy.url(f"/models/{NS}/{NAME}/v1/completions"), data=b"{}"
            ) as r:
                assert r.status == 429
                assert r.headers["Retry-After"]
            # Another model may still wait, up to the total cap of 3 ...
            other = await _held(proxy, f"/models/{NS}/b/v1/completions", b"x" * 9_000)
            await until(
                lambda: (
                    registry.get_sample_value(GAUGE, {"namespace": NS, "model_deployment": "b"})
                    == 1
                )
            )
            async with client.post(proxy.url(f"/models/{NS}/b/v1/completions"), data=b"{}") as r:
                assert r.status == 503
                assert "requests" in (await error_of(r))["message"]
                assert r.headers["Retry-After"]
            for task in [*first, other]:
                task.cancel()
            await until(lambda: proxy.pending() == 0)
            # ... and in bytes: 9,000 held, 2,000 more would pass 10,000.
            other = await _held(proxy, f"/models/{NS}/b/v1/completions", b"x" * 9_000)
            await until(
                lambda: (
                    registry.get_sample_value(GAUGE, {"namespace": NS, "model_deployment": "b"})
                    == 1
                )
            )
            async with client.post(
                proxy.url(f"/models/{NS}/{NAME}/v1/completions"), data=b"y" * 2_000
            ) as r:
                assert r.status == 503
                assert "bytes" in (await error_of(r))["message"]
            other.cancel()
    finally:
        await proxy_server.stop()
