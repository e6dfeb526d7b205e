"""``/v1/webhooks/endpoints``: an org's webhook endpoints (admin keys only)."""

from __future__ import annotations

from fastapi import APIRouter

from kubetune_api.deps import PrincipalDep, ServicesDep
from kubetune_api.protocol import (
    CreateWebhookEndpointRequest,
    DeleteWebhookEndpointResponse,
    ListWebhookEndpointsResponse,
    WebhookEndpointObject,
)
from kubetune_api.routers.common import ERRORS
from kubetune_api.services.webhooks import WebhookService

router = APIRouter(prefix="/v1/webhooks/endpoints", tags=["Webhooks"], responses=ERRORS)


def _service(services: ServicesDep) -> WebhookService:
    # Built per request from the shared settings and store: it holds no state of its own.
    return WebhookService(services.settings, services.store)


@router.post("", response_model=WebhookEndpointObject, operation_id="createWebhookEndpoint")
def create_endpoint(
    principal: PrincipalDep, services: ServicesDep, body: CreateWebhookEndpointRequest
) -> WebhookEndpointObject:
    """Register an endpoint; the answer holds its signing secret, shown only this once."""
    return _service(services).create(principal, body)


@router.get("", response_model=ListWebhookEndpointsResponse, operation_id="listWebhookEndpoints")
def list_endpoints(principal: PrincipalDep, services: ServicesDep) -> ListWebhookEndpointsResponse:
    """The org's endpoints, without their secrets."""
    return _service(services).list(principal)


@router.delete(
    "/{endpoint_id}",
    response_model=DeleteWebhookEndpointResponse,
    operation_id="deleteWebhookEndpoint",
)
def delete_endpoint(
    principal: PrincipalDep, services: ServicesDep, endpoint_id: str
) -> DeleteWebhookEndpointResponse:
    """Delete an endpoint; deliveries not yet made to it are dropped."""
    return _service(services).delete(principal, endpoint_id)
