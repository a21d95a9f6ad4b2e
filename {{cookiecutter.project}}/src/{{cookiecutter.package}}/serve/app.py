"""The HTTP app: GET /health, GET /metrics, and the model's routes (added by its backend).

Every request is counted and timed by route and status; bodies over `server.max_body_bytes` are
refused before they are read whole; any error a request causes is a JSON body naming the field.
"""

import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .batching import Batcher
from .cache import ResultCache
from .metrics import Metrics
from .validation import BadRequest

log = logging.getLogger(__name__)


@dataclass
class Serving:
    """What a backend's routes use: the batcher in front of its model, the metrics, the cache."""

    batcher: Batcher
    metrics: Metrics
    cache: ResultCache | None

    async def cached(
        self, route: str, key_request: dict[str, Any] | None, compute: Callable[[], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any]:
        """compute(), through the cache when there is one and the request is deterministic
        (`key_request` is not None); the answer says whether it came from the cache."""
        if self.cache is None or key_request is None:
            return {**await compute(), "cached": False}
        key = self.cache.key(route, key_request)
        hit = await self.cache.get(route, key)
        if hit is not None:
            return {**hit, "cached": True}
        result = await compute()
        await self.cache.set(key, result)
        return {**result, "cached": False}


class Backend(Protocol):
    """A served model: serve/generate.py (a GPT) or serve/embed.py (a CLIP)."""

    kind: str
    batch_route: str  # the serve_batch_size label of its batches

    def run_batch(self, items: list[Any]) -> list[Any]: ...

    def warmup(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...

    def add_routes(self, app: FastAPI, serving: Serving) -> None: ...


class Observe:
    """ASGI middleware: request counts and latency by route template and status, and the body limit
    (413 from the Content-Length header, or as soon as a streamed body passes the limit)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: set[str], max_body_bytes: int) -> None:
        self.app, self.metrics, self.routes, self.max_body_bytes = app, metrics, routes, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"  # bounded label values
        status = 500
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                await self._too_large(send_status)
                return
            received = 0

            async def limited_receive() -> Message:
                nonlocal received
                message = await receive()
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BadRequest("body", f"over the {self.max_body_bytes}-byte limit", status=413)
                return message

            await self.app(scope, limited_receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    async def _too_large(self, send: Send) -> None:
        response = JSONResponse(
            BadRequest("body", f"over the {self.max_body_bytes}-byte limit", status=413).body(), status_code=413
        )
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def build_app(backend: Backend, server: Any, metrics: Metrics, cache: ResultCache | None) -> FastAPI:
    """server: the `server:` block of configs/serve.yaml (max_batch_size, max_wait_ms, max_body_bytes)."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    batcher = Batcher(
        backend.run_batch,
        server.max_batch_size,
        server.max_wait_ms / 1000,
        executor,
        on_batch=metrics.batch_size.labels(backend.batch_route).observe,
    )
    serving = Serving(batcher, metrics, cache)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        batcher.start()
        if cache is not None:
            log.info("result cache at %s: %s", cache.url, await cache.status())
        yield
        await batcher.stop()
        if cache is not None:
            await cache.close()
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="model server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, error: BadRequest) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:  # 404, 405
        message = f"{request.method} {request.url.path}: {error.detail}"
        return JSONResponse({"error": message, "field": None}, error.status_code)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        cache_status = "off" if cache is None else await cache.status()
        return {"status": "ok", **backend.describe(), "cache": cache_status}

    @app.get("/metrics")
    async def metrics_route() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    backend.add_routes(app, serving)
    routes = {route.path for route in app.routes if hasattr(route, "path")}
    app.add_middleware(Observe, metrics=metrics, routes=routes, max_body_bytes=server.max_body_bytes)
    return app
