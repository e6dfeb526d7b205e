"""Inference through the API: chat completions and completions forwarded to vLLM.

vLLM has no notion of tenants, so clients never reach it directly. The API checks that the
caller may use the requested model — base models are everyone's, an ``ft:`` model and its
checkpoints (``ft:…:ckpt-step-N``) only its own org's (another org's answers 404, like
everywhere else) — then forwards the request, as sent, to the vLLM deployment of the model's
base (``settings.serving.vllm_urls``) and passes its answer back: a stream stays a stream, and
vLLM's errors keep their status and message.

A checkpoint's model is served on demand: the API records its use on the job (an annotation),
the replicas' sync loads the most recently used checkpoints (``serving.checkpoint_slots`` per
base model, the least recently used unloaded to make room), and the request waits until its
replica serves it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final

import httpx
from starlette.concurrency import run_in_threadpool

from kubetune.finetunejob import FineTuneJob, checkpoint_used_annotation, checkpoints_in_use
from kubetune.settings import Settings
from kubetune_api.auth import Principal
from kubetune_api.errors import InvalidRequest, NotFound, ServiceUnavailable, UpstreamError
from kubetune_api.protocol import InferenceRequest
from kubetune_api.services.jobs import JobService
from kubetune_runtime.adapters import adapter_ref

CHAT_COMPLETIONS: Final = "/v1/chat/completions"
CHECKPOINT_USE_REFRESH_SECONDS: Final = 60.0
CHECKPOINT_POLL_SECONDS: Final = 0.5
COMPLETIONS: Final = "/v1/completions"
_CONNECT_TIMEOUT: Final = 5.0


@dataclass(frozen=True)
class Target:
    """Where a model's requests go: its base model's vLLM; ``checkpoint``: a checkpoint's
    model, loaded on demand.
    """

    base: str
    checkpoint: bool = False


@dataclass
class Forwarded:
    """vLLM's answer: status, content type, and the body whole or as a stream of chunks."""

    status_code: int
    media_type: str
    body: bytes | None = None
    stream: AsyncIterator[bytes] | None = None


class InferenceService:
    """Checks access to a model and forwards inference requests to the vLLM that serves it."""

    def __init__(self, settings: Settings, jobs: JobService) -> None:
        self.settings = settings
        self.jobs = jobs
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        # Created on first use, inside the server's event loop that its connections belong to.
        if self._client is None:
            timeout = self.settings.serving.request_timeout_seconds
            key = self.settings.serving.vllm_api_key
            # vLLM's --api-key: the client's own key is for kubetune, never passed on.
            headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(timeout, connect=_CONNECT_TIMEOUT), headers=headers
            )
        return self._client

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def base_model_of(self, principal: Principal, model: str) -> str:
        """The base model behind ``model`` if the caller may use it, else 404."""
        return (await self._target(principal, model)).base

    async def _target(self, principal: Principal, model: str) -> Target:
        if self.jobs.base_model(model, principal.org) is not None:
            return Target(model)
        if not model.startswith("ft:"):
            raise NotFound(
                f"The model '{model}' does not exist", param="model", code="model_not_found"
            )
        job, step = await run_in_threadpool(self.jobs.fine_tuned_model, principal, model)
        if step is None:
            return Target(job.spec.base_model)
        await run_in_threadpool(self._use_checkpoint, job, model, step)
        return Target(job.spec.base_model, checkpoint=True)

    def _use_checkpoint(self, job: FineTuneJob, model: str, step: int) -> None:
        """Check that a checkpoint of ``job`` can be served and record that it is used: the
        annotation whose time the replicas' least-recently-used choice reads (refreshed at
        most once a minute, so a busy checkpoint costs no write per request).
        """
        why = None
        if adapter_ref(job) is None:
            why = "its job's model is not served on vLLM (a full fine-tune, or register off)"
        elif self.settings.serving.checkpoint_slots == 0:
            why = "this deployment serves no checkpoints (serving.checkpoint_slots is 0)"
        if why is not None:
            raise InvalidRequest(
                f"The model '{model}' is not being served: {why}.",
                param="model",
                code="model_not_served",
            )
        now = time.time()
        last = checkpoints_in_use(job.metadata.annotations).get(step)
        if last is None or not 0 <= now - last < CHECKPOINT_USE_REFRESH_SECONDS:
            self.jobs.backend.annotate(
                job.spec.org, job.metadata.name, {checkpoint_used_annotation(step): f"{now:.0f}"}
            )

    def _server_for(self, base: str, model: str) -> str:
        url = self.settings.serving.vllm_urls.get(base)
        if not url:
            # Not transient (a 503 would invite retries): the deployment serves no such base.
            raise InvalidRequest(
                f"The model '{model}' is not being served: no inference server is configured "
                f"for its base model {base}.",
                param="model",
                code="model_not_served",
            )
        return url.rstrip("/")

    async def forward(self, principal: Principal, path: str, body: InferenceRequest) -> Forwarded:
        """Forward one request (``path``: CHAT_COMPLETIONS or COMPLETIONS) to vLLM.

        A checkpoint's model is loaded on demand: until its replica has it, vLLM answers 404,
        and the request is sent again until it is served or ``checkpoint_load_seconds`` pass.
        """
        target = await self._target(principal, body.model)
        url = self._server_for(target.base, body.model) + path
        payload = body.model_dump(mode="json", exclude_unset=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.serving.checkpoint_load_seconds
        while True:
            try:
                return await self._send(url, payload, target.base, stream=bool(body.stream))
            except UpstreamError as exc:
                if not target.checkpoint or exc.status_code != HTTPStatus.NOT_FOUND:
                    raise
                if loop.time() >= deadline:
                    raise ServiceUnavailable(
                        f"The model '{body.model}' is still being loaded; try again shortly.",
                        code="model_loading",
                        headers={"retry-after": "5"},
                    ) from exc
            await asyncio.sleep(CHECKPOINT_POLL_SECONDS)

    async def _send(self, url: str, payload: Any, base: str, *, stream: bool) -> Forwarded:
        client = self._http()
        request = client.build_request("POST", url, json=payload)
        try:
            response = await client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise ServiceUnavailable(
                f"The inference server for {base} is unreachable; try again shortly "
                f"({type(exc).__name__}).",
                code="inference_unavailable",
            ) from exc
        media_type = response.headers.get("content-type", "application/json")
        if response.status_code >= 400:
            content = await _read_and_close(response)
            raise _upstream_error(response.status_code, content)
        if stream:
            return Forwarded(response.status_code, media_type, stream=_relay(response))
        return Forwarded(response.status_code, media_type, body=await _read_and_close(response))


async def _read_and_close(response: httpx.Response) -> bytes:
    try:
        return await response.aread()
    finally:
        await response.aclose()


async def _relay(response: httpx.Response) -> AsyncIterator[bytes]:
    """The upstream body chunk by chunk (server-sent events pass through unchanged)."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    finally:
        await response.aclose()


def _upstream_error(status_code: int, content: bytes) -> UpstreamError:
    """VLLM's error as an OpenAI error: its own envelope when it sent one, else its text."""
    error: dict[str, Any] = {}
    try:
        parsed = json.loads(content)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        inner = parsed.get("error", parsed)
        error = inner if isinstance(inner, dict) else {"message": str(inner)}
    message = str(error.get("message") or content.decode(errors="replace")[:1000] or "error")
    code = error.get("code")
    return UpstreamError(
        status_code,
        message,
        error_type=str(error["type"]) if error.get("type") else None,
        param=str(error["param"]) if error.get("param") else None,
        code=str(code) if code is not None else None,
    )
