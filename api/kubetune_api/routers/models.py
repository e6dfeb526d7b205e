"""``/v1/models``."""

from __future__ import annotations

from fastapi import APIRouter

from kubetune_api.deps import PrincipalDep, ServicesDep
from kubetune_api.protocol import DeleteModelResponse, ListModelsResponse, Model
from kubetune_api.routers.common import ERRORS

router = APIRouter(prefix="/v1/models", tags=["Models"], responses=ERRORS)


@router.get("", response_model=ListModelsResponse, operation_id="listModels")
def list_models(principal: PrincipalDep, services: ServicesDep) -> ListModelsResponse:
    """Base models and the org's fine-tuned models."""
    return services.models.list(principal)


@router.get("/{model:path}", response_model=Model, operation_id="retrieveModel")
def retrieve_model(principal: PrincipalDep, services: ServicesDep, model: str) -> Model:
    """One model."""
    return services.models.retrieve(principal, model)


@router.delete("/{model:path}", response_model=DeleteModelResponse, operation_id="deleteModel")
def delete_model(principal: PrincipalDep, services: ServicesDep, model: str) -> DeleteModelResponse:
    """Delete a fine-tuned model and unload it from serving."""
    return services.models.delete(principal, model)
