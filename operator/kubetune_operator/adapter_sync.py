"""``python -m kubetune_operator.adapter_sync``: the sidecar beside each vLLM container.

It shares the adapter folder with vLLM and is the only thing that writes it: the operator tells
it which adapters its replica should serve, and it fetches them from the object store and
registers them with its vLLM (:class:`kubetune_runtime.adapters.ReplicaAdapters`). It keeps no
state of its own: the operator pushes the whole desired set when the replica becomes ready and
whenever the set changes, so a restarted sidecar or vLLM catches up on the next push.

HTTP API (JSON), on ``KUBETUNE_SERVING__ADAPTER_SYNC_HOST:…PORT`` (the chart's NetworkPolicy
lets only the operator in):

- ``GET /healthz``: ``ok`` (liveness).
- ``GET /readyz``: ``ok`` once the operator's first ``PUT /adapters`` was applied, 503 before
  (readiness: the pod takes traffic only once it holds its adapters).

On ``KUBETUNE_SERVING__METRICS_PORT`` (if set) it serves one more thing, alone: vLLM's
``GET /metrics``, relayed, so Prometheus scrapes there and never reaches vLLM's port.
- ``GET /adapters``: ``{base_model, loaded: [names], max_lora_rank, max_loras}``.
- ``PUT /adapters`` ``{adapters: [{name, org, job_id, base_model, step?}]}``: serve exactly
  these of kubetune's adapters (``step``: a checkpoint's, of which only the adapter files are
  fetched); answers ``{results: {name: {state, changed, seconds, code, message}},
  loaded}``. A rejected adapter is a result, not a failure of the call.
- ``PUT /adapters/{name}`` ``{org, job_id}``: serve one more adapter.
- ``DELETE /adapters/{name}``: stop serving one.

Errors are ``{"error": {"code", "message"}}``: 400 for a malformed request, 422 when the adapter
can never be served as it is (its rank above ``--max-lora-rank``…), 503 when vLLM or the
object store did not answer (try again).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import httpx
from aiohttp import web

from kubetune.settings import ServingSettings, Settings
from kubetune_runtime.adapters import (
    ADAPTER_NAME_PREFIX,
    AdapterRef,
    AdapterRejected,
    ReplicaAdapters,
    ServingError,
    ServingUnavailable,
)
from kubetune_runtime.objectstore import open_object_store

log = logging.getLogger("kubetune_operator.adapter_sync")

MAX_BODY_BYTES: Final = 4 << 20
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    """The request itself is malformed (400)."""


def error_response(status: int, code: str, message: str) -> web.Response:
    """An error in the sidecar's shape."""
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map the serving errors to 400/422/503 with a JSON body."""
    try:
        return await handler(request)
    except BadRequest as exc:
        return error_response(400, "invalid_request", str(exc))
    except AdapterRejected as exc:
        return error_response(422, exc.code, exc.message)
    except ServingUnavailable as exc:
        return error_response(503, exc.code, exc.message)
    except ServingError as exc:
        return error_response(500, exc.code, exc.message)


@dataclass
class Sidecar:
    """The HTTP handlers over one replica's adapters."""

    replica: ReplicaAdapters
    settings: ServingSettings
    synced: bool = False  # the operator's first whole-set sync has been applied

    def _check_ref(self, ref: AdapterRef) -> AdapterRef:
        if not ref.name.startswith(ADAPTER_NAME_PREFIX):
            raise BadRequest(f"adapter names start with {ADAPTER_NAME_PREFIX!r}: {ref.name!r}")
        base = self.settings.base_model
        if base is not None and ref.base_model != base:
            raise BadRequest(f"this replica serves {base}, not {ref.base_model} ({ref.name})")
        try:  # an org or job id that could escape its folder is refused here
            self.replica.layout.model_prefix(ref.org, ref.job_id, ref.step)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return ref

    async def _body(self, request: web.Request) -> Any:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise BadRequest("request body too large")
        try:
            return json.loads(await request.read())
        except ValueError as exc:
            raise BadRequest(f"the body is not JSON: {exc}") from None

    def _ref(self, data: Any, name: str | None = None) -> AdapterRef:
        if not isinstance(data, dict):
            raise BadRequest("an adapter is a JSON object {name, org, job_id, base_model}")
        fields = {"base_model": self.settings.base_model, **data}
        if name is not None:
            fields["name"] = name
        try:
            return self._check_ref(AdapterRef.from_json(fields))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(
                f"an adapter needs name, org, job_id, base_model (and a checkpoint's step): {exc}"
            ) from None

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness: the sidecar's own event loop answers."""
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        """Readiness: the operator's first sync has been applied, so the replica holds every
        adapter it should serve. Until then the pod is not Ready and its Service sends it no
        traffic — a new replica never answers 404 for a fine-tuned model the others serve.
        """
        if not self.synced:
            return web.Response(status=503, text="waiting for the operator's first sync\n")
        return web.Response(text="ok\n")

    async def list_adapters(self, request: web.Request) -> web.Response:
        """What vLLM serves now."""
        loaded = await asyncio.to_thread(self.replica.loaded)
        return web.json_response(
            {
                "base_model": self.settings.base_model,
                "loaded": sorted(loaded),
                "max_lora_rank": self.replica.max_lora_rank,
                "max_loras": self.settings.max_loras,
            }
        )

    async def sync(self, request: web.Request) -> web.Response:
        """Serve exactly the given set of kubetune's adapters."""
        data = await self._body(request)
        items = data.get("adapters") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise BadRequest('the body is {"adapters": [...]}')
        refs = [self._ref(item) for item in items]
        results = await asyncio.to_thread(self.replica.sync, refs)
        self.synced = True
        for name, result in results.items():
            if result.changed or result.message:
                log.info("%s: %s %s", name, result.state.value, result.message or "")
        loaded = await asyncio.to_thread(self.replica.loaded)
        return web.json_response(
            {
                "results": {name: r.to_json() for name, r in results.items()},
                "loaded": sorted(loaded),
            }
        )

    async def load(self, request: web.Request) -> web.Response:
        """Serve one adapter."""
        ref = self._ref(await self._body(request), request.match_info["name"])
        result = await asyncio.to_thread(self.replica.ensure_loaded, ref)
        log.info("%s: loaded (changed %s, %.3fs)", ref.name, result.changed, result.seconds)
        return web.json_response({"name": ref.name, **result.to_json()})

    async def unload(self, request: web.Request) -> web.Response:
        """Stop serving one adapter."""
        name = request.match_info["name"]
        if not name.startswith(ADAPTER_NAME_PREFIX):
            raise BadRequest(f"adapter names start with {ADAPTER_NAME_PREFIX!r}: {name!r}")
        result = await asyncio.to_thread(self.replica.ensure_unloaded, name)
        log.info("%s: unloaded (changed %s)", name, result.changed)
        return web.json_response({"name": name, **result.to_json()})


def build_app(sidecar: Sidecar) -> web.Application:
    """The sidecar's aiohttp application."""
    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_BODY_BYTES)
    app.router.add_get("/healthz", sidecar.healthz)
    app.router.add_get("/readyz", sidecar.readyz)
    app.router.add_get("/adapters", sidecar.list_adapters)
    app.router.add_put("/adapters", sidecar.sync)
    # Model ids may hold "/" (a base model named after its Hugging Face repository).
    app.router.add_put("/adapters/{name:.+}", sidecar.load)
    app.router.add_delete("/adapters/{name:.+}", sidecar.unload)
    return app


def build_metrics_app(vllm_url: str, timeout: float) -> web.Application:
    """The app relaying vLLM's ``GET /metrics`` on a port of its own: Prometheus scrapes there and
    never reaches vLLM's port, which runs inference and loads adapters.
    """

    async def metrics(request: web.Request) -> web.Response:
        try:
            async with httpx.AsyncClient(timeout=timeout) as client:
                upstream = await client.get(f"{vllm_url.rstrip('/')}/metrics")
        except httpx.HTTPError as exc:
            return web.Response(status=503, text=f"vLLM did not answer: {exc}\n")
        content_type = upstream.headers.get("content-type", "text/plain; version=0.0.4")
        return web.Response(
            body=upstream.content,
            status=upstream.status_code,
            headers={"Content-Type": content_type},
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


def serve_metrics_beside(app: web.Application, serving: ServingSettings) -> None:
    """Run the metrics relay on ``serving.metrics_port`` for as long as ``app`` runs."""
    port = serving.metrics_port
    if port is None:
        return
    key = web.AppKey("metrics_runner", web.AppRunner)

    async def start(_: web.Application) -> None:
        runner = web.AppRunner(
            build_metrics_app(serving.vllm_url, serving.request_timeout_seconds), access_log=None
        )
        await runner.setup()
        await web.TCPSite(runner, serving.adapter_sync_host, port).start()
        app[key] = runner

    async def stop(_: web.Application) -> None:
        await app[key].cleanup()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)


def build_sidecar(settings: Settings) -> Sidecar:
    """The sidecar for ``settings`` (object store, vLLM URL, adapter folder, limits)."""
    serving = settings.serving
    store = open_object_store(settings.object_store, root=settings.store_root())
    replica = ReplicaAdapters(
        store,
        settings.object_store.layout(),
        serving.vllm_url,
        serving.adapter_dir,
        serving.vllm_model,
        serving.max_lora_rank,
        timeout=serving.request_timeout_seconds,
        api_key=serving.vllm_api_key.get_secret_value() if serving.vllm_api_key else None,
    )
    return Sidecar(replica, serving)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT."""
    del argv  # every setting comes from KUBETUNE_* variables
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per call to vLLM otherwise
    settings = Settings()
    sidecar = build_sidecar(settings)
    serving = settings.serving
    log.info(
        "adapter-sync: %s on %s, adapters in %s, max LoRA rank %s",
        serving.base_model,
        serving.vllm_url,
        serving.adapter_dir,
        serving.max_lora_rank,
    )
    app = build_app(sidecar)
    serve_metrics_beside(app, serving)
    try:
        web.run_app(
            app,
            host=serving.adapter_sync_host,
            port=serving.adapter_sync_port,
            access_log=None,
            print=None,
        )
    finally:
        sidecar.replica.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
