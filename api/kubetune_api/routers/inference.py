"""``/v1/chat/completions`` and ``/v1/completions``, forwarded to vLLM."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response, StreamingResponse

from kubetune_api.deps import PrincipalDep, ServicesDep
from kubetune_api.protocol import InferenceRequest
from kubetune_api.routers.common import ERRORS
from kubetune_api.services.inference import CHAT_COMPLETIONS, COMPLETIONS, Forwarded

router = APIRouter(tags=["Inference"], responses=ERRORS)
# vLLM's answer as it is: one JSON object, or server-sent events when ``stream`` is true.
_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "text/event-stream": {}}}
}


def _response(forwarded: Forwarded) -> Response:
    if forwarded.stream is not None:
        return StreamingResponse(
            forwarded.stream,
            status_code=forwarded.status_code,
            media_type=forwarded.media_type,
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )
    return Response(
        forwarded.body or b"", status_code=forwarded.status_code, media_type=forwarded.media_type
    )


@router.post(CHAT_COMPLETIONS, operation_id="createChatCompletion", responses=_ANSWER)
async def create_chat_completion(
    principal: PrincipalDep, services: ServicesDep, body: InferenceRequest
) -> Response:
    """A chat completion from a base model or one of the org's fine-tuned models."""
    return _response(await services.inference.forward(principal, CHAT_COMPLETIONS, body))


@router.post(COMPLETIONS, operation_id="createCompletion", responses=_ANSWER)
async def create_completion(
    principal: PrincipalDep, services: ServicesDep, body: InferenceRequest
) -> Response:
    """A text completion from a base model or one of the org's fine-tuned models."""
    return _response(await services.inference.forward(principal, COMPLETIONS, body))
