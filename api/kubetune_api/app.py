"""The FastAPI application: wiring, middleware and health endpoints.

``create_app(settings)`` builds everything from one :class:`~kubetune.settings.Settings`;
``python -m kubetune_api`` serves it with uvicorn.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kubetune.settings import Mode, Settings
from kubetune.version import __version__
from kubetune_api.auth import ApiKeyEntry, KeyStore, Role, hash_key, new_api_key, write_private
from kubetune_api.backends.base import JobBackend
from kubetune_api.backends.local import JOBS_DATABASE, LocalJobBackend
from kubetune_api.deps import Services
from kubetune_api.errors import (
    ServiceUnavailable,
    install_error_handlers,
    unexpected_error,
)
from kubetune_api.guard import RequestGuard
from kubetune_api.metrics import HTTP_LATENCY, HTTP_REQUESTS
from kubetune_api.ratelimit import RateLimiter
from kubetune_api.routers import (
    files,
    fine_tuning,
    inference,
    models,
    uploads,
    usage,
    webhooks,
)
from kubetune_api.services.files import FileService
from kubetune_api.services.inference import InferenceService
from kubetune_api.services.jobs import JobService
from kubetune_api.services.models import ModelService
from kubetune_api.services.uploads import UploadService
from kubetune_api.sweeper import StoreSweeper
from kubetune_runtime.objectstore import open_object_store

log = logging.getLogger("kubetune.api")
UPLOAD_PATHS = ("/v1/files", "/v1/uploads")
MULTIPART_OVERHEAD = 64 * 1024


def _job_backend(settings: Settings) -> JobBackend:
    if settings.mode is Mode.LOCAL:
        return LocalJobBackend(settings.data_dir / JOBS_DATABASE)
    from kubernetes import config

    from kubetune_api.backends.kubernetes import KubernetesJobBackend

    if settings.kubernetes.kubeconfig is not None:
        client = config.new_client_from_config(config_file=str(settings.kubernetes.kubeconfig))  # type: ignore[no-untyped-call]
    else:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        from kubernetes.client import ApiClient

        client = ApiClient()
    return KubernetesJobBackend(client, settings.kubernetes.namespace)


def _key_store(settings: Settings) -> KeyStore:
    """Keys from the configured file; in local mode, a generated admin key on first start."""
    path = settings.api.api_keys_file
    if path is not None:
        return KeyStore.from_file(path)
    if settings.mode is not Mode.LOCAL:
        raise RuntimeError("KUBETUNE_API__API_KEYS_FILE is required outside local mode")
    path = settings.data_dir / "api_keys.json"
    if not path.exists():
        key = new_api_key()
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = ApiKeyEntry(name="local-admin", org="local", role=Role.ADMIN, sha256=hash_key(key))
        write_private(path, json.dumps([entry.model_dump(exclude_none=True)]))
        write_private(settings.data_dir / "api_key", key + "\n")
    return KeyStore.from_file(path)


def build_services(settings: Settings) -> Services:
    """Create the object store, the job backend and the services on top of them."""
    store = open_object_store(settings.object_store, root=settings.store_root())
    backend = _job_backend(settings)
    file_service = FileService(settings, store)
    job_service = JobService(settings, backend, store, file_service)
    file_service.results_lookup = job_service.results_file
    return Services(
        settings=settings,
        keys=_key_store(settings),
        store=store,
        backend=backend,
        files=file_service,
        jobs=job_service,
        models=ModelService(backend, job_service),
        uploads=UploadService(settings, store, file_service),
        limiter=RateLimiter(settings.api.requests_per_minute),
        inference=InferenceService(settings, job_service),
    )


def _sweeper(services: Services) -> StoreSweeper:
    api = services.settings.api
    return StoreSweeper(
        services.files,
        services.uploads,
        services.keys.orgs,
        interval=api.sweep_interval_seconds,
        grace_seconds=api.orphan_grace_seconds,
    )


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Work that lives as long as the server: the inference proxy's connections, the
    backend's watch, the store sweeper.
    """
    services: Services = app.state.services
    sweeper = _sweeper(services)
    sweeper.start()
    try:
        yield
    finally:
        await asyncio.to_thread(sweeper.stop)
        await services.inference.aclose()
        await asyncio.to_thread(services.backend.close)


def _route_template(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", "unmatched")


def _body_limit(settings: Settings, path: str) -> int:
    if path.startswith(UPLOAD_PATHS):
        return settings.limits.max_file_bytes + MULTIPART_OVERHEAD
    return settings.api.max_json_body_bytes


def _openapi_document(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document as the API behaves: bearer auth everywhere, and no 422s (request
    validation errors are answered as 400 in OpenAI's envelope).
    """
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.setdefault("components", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(name, None)
    components["securitySchemes"] = {"ApiKeyAuth": {"type": "http", "scheme": "bearer"}}
    schema["security"] = [{"ApiKeyAuth": []}]
    app.openapi_schema = schema
    return schema


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    """The kubetune API as an ASGI app."""
    settings = settings or Settings()
    app = FastAPI(
        lifespan=_lifespan,
        title="kubetune",
        version=__version__,
        description="OpenAI-compatible fine-tuning API on your own Kubernetes.",
    )
    app.state.services = services or build_services(settings)
    install_error_handlers(app)
    # Inside request_context (added after it, so it wraps this one): refusals get its request
    # id and metrics too.
    app.add_middleware(
        RequestGuard,
        authenticate=app.state.services.keys.authenticate,
        limit_for=lambda path: _body_limit(settings, path),
    )

    @app.middleware("http")
    async def request_context(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        request_id = "req_" + secrets.token_hex(16)
        start = time.perf_counter()
        try:
            response: Response = await call_next(request)
        except Exception as exc:
            # Answered here rather than by Starlette's outermost handler, so even a 500
            # carries the request id that ties it to the server's log line.
            failure = unexpected_error(exc)
            if failure.status_code == 503:
                log.warning("%s %s [%s]: %s", request.method, request.url.path, request_id, exc)
            else:
                log.exception(
                    "unhandled error in %s %s [%s]", request.method, request.url.path, request_id
                )
            response = JSONResponse(
                failure.body(), status_code=failure.status_code, headers=failure.headers
            )
        response.headers["x-request-id"] = request_id
        for name, value in getattr(request.state, "rate_limit_headers", {}).items():
            response.headers.setdefault(name, value)
        route = _route_template(request)
        HTTP_REQUESTS.labels(route=route, method=request.method, status=response.status_code).inc()
        HTTP_LATENCY.labels(route=route, method=request.method).observe(time.perf_counter() - start)
        return response

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    def readyz(request: Request) -> dict[str, str]:
        svc: Services = request.app.state.services
        try:
            svc.backend.ready()
            svc.store.exists("readyz-probe")
        except Exception as exc:
            raise ServiceUnavailable(f"not ready: {type(exc).__name__}") from exc
        return {"status": "ready"}

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.openapi = lambda: _openapi_document(app)  # type: ignore[method-assign]
    app.include_router(files.router)
    app.include_router(fine_tuning.router)
    app.include_router(models.router)
    app.include_router(uploads.router)
    app.include_router(webhooks.router)
    app.include_router(usage.router)
    app.include_router(inference.router)
    return app


def main() -> None:
    """Serve the API with uvicorn on the configured host and port."""
    import uvicorn

    settings = Settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = create_app(settings)
    key_file = settings.data_dir / "api_key"
    if settings.mode is Mode.LOCAL and Path(key_file).exists():
        log.info("local mode: API key in %s", key_file)
    uvicorn.run(
        app, host=settings.api.host, port=settings.api.port, log_level="info", access_log=False
    )
