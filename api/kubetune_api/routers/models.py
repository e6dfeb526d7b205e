"""``/v1/models``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from starlette.convertors import Convertor, register_url_convertor

from kubetune_api.deps import PrincipalDep, ServicesDep
from kubetune_api.protocol import (
    CreateBaseModelRequest,
    DeleteModelResponse,
    ListModelsResponse,
    Model,
    ModelContentFormat,
    RegisteredModel,
)
from kubetune_api.routers.common import ERRORS, content_disposition


class ModelIdConvertor(Convertor[str]):
    """A model id in a path: any text (ids may hold "/"), except one ending in "/content",
    which is the download's path, so each path has one route and ``Allow`` tells the truth.
    """

    regex = r".+(?<!/content)"

    def convert(self, value: str) -> str:
        """The id as it is."""
        return value

    def to_string(self, value: str) -> str:
        """The id as it is."""
        return value


register_url_convertor("model_id", ModelIdConvertor())

router = APIRouter(prefix="/v1/models", tags=["Models"], responses=ERRORS)


@router.get("", response_model=ListModelsResponse, operation_id="listModels")
def list_models(principal: PrincipalDep, services: ServicesDep) -> ListModelsResponse:
    """Base models and the org's fine-tuned models."""
    return services.models.list(principal)


@router.post("", response_model=RegisteredModel, status_code=201, operation_id="registerBaseModel")
def register_base_model(
    principal: PrincipalDep, services: ServicesDep, body: CreateBaseModelRequest
) -> RegisteredModel:
    """Register a model folder as a base model of the org (admin keys): checked, then listed."""
    return services.models.register(principal, body)


@router.get(
    "/{model:path}/content",
    operation_id="downloadModel",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {"schema": {"type": "string"}}}}},
)
def download_model(
    principal: PrincipalDep,
    services: ServicesDep,
    model: str,
    weights: Annotated[
        ModelContentFormat,
        Query(alias="format", description="adapter (LoRA) or merged (the whole model)."),
    ] = ModelContentFormat.ADAPTER,
) -> StreamingResponse:
    """The weights of a fine-tuned model or of one of its checkpoints, as a tar archive."""
    archive = services.models.content(principal, model, weights)
    return StreamingResponse(
        archive.chunks,
        media_type="application/x-tar",
        headers={
            "content-disposition": content_disposition(archive.filename),
            "content-length": str(archive.length),
        },
    )


@router.get(
    "/{model:model_id}", response_model=RegisteredModel | Model, operation_id="retrieveModel"
)
def retrieve_model(principal: PrincipalDep, services: ServicesDep, model: str) -> Model:
    """One model (or a registered base model, with its check's outcome)."""
    return services.models.retrieve(principal, model)


@router.delete("/{model:model_id}", response_model=DeleteModelResponse, operation_id="deleteModel")
def delete_model(principal: PrincipalDep, services: ServicesDep, model: str) -> DeleteModelResponse:
    """Delete a fine-tuned model and unload it from serving, or forget a registered base model."""
    return services.models.delete(principal, model)
