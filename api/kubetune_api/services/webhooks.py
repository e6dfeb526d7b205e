"""Webhook endpoints of an org: registered by its admins, stored with kubetune_runtime.webhooks.

The signing secret is generated here and returned once, in the answer to the creation (as
OpenAI shows a webhook secret once); listings never include it.
"""

from __future__ import annotations

from kubetune.settings import Settings
from kubetune_api.auth import Principal, Role
from kubetune_api.errors import Conflict, InvalidRequest, NotFound, PermissionDenied
from kubetune_api.protocol import (
    CreateWebhookEndpointRequest,
    DeleteWebhookEndpointResponse,
    ListWebhookEndpointsResponse,
    WebhookEndpointObject,
)
from kubetune_runtime.objectstore import ObjectStore
from kubetune_runtime.webhooks import (
    InvalidWebhookTarget,
    WebhookEndpoint,
    WebhookEventType,
    create_endpoint,
    delete_endpoint,
    list_endpoints,
    static_endpoints,
)


def _view(endpoint: WebhookEndpoint, *, with_secret: bool = False) -> WebhookEndpointObject:
    return WebhookEndpointObject(
        id=endpoint.id,
        url=endpoint.url,
        event_types=[t.value for t in endpoint.event_types],
        created_at=endpoint.created_at,
        static=endpoint.static,
        secret=endpoint.secret.get_secret_value() if with_secret else None,
    )


def _require_admin(principal: Principal) -> None:
    if principal.role is not Role.ADMIN:
        raise PermissionDenied("Managing webhook endpoints needs an admin API key.")


def _not_found(endpoint_id: str) -> NotFound:
    return NotFound(f"No webhook endpoint found with id {endpoint_id}", param="endpoint_id")


class WebhookService:
    """Create, list and delete an org's webhook endpoints (admins only)."""

    def __init__(self, settings: Settings, store: ObjectStore) -> None:
        self.opts = settings.webhooks
        self.store = store
        self.layout = settings.object_store.layout()

    def create(
        self, principal: Principal, request: CreateWebhookEndpointRequest
    ) -> WebhookEndpointObject:
        """Register an endpoint; the answer carries its secret, this once."""
        _require_admin(principal)
        types = [WebhookEventType(t) for t in request.event_types or []]
        try:
            endpoint = create_endpoint(
                self.store,
                self.layout,
                principal.org,
                request.url,
                self.opts,
                event_types=types,
            )
        except InvalidWebhookTarget as exc:
            raise InvalidRequest(f"Invalid webhook URL: {exc}", param="url") from None
        except OverflowError as exc:
            raise Conflict(str(exc), code="too_many_endpoints") from None
        return _view(endpoint, with_secret=True)

    def list(self, principal: Principal) -> ListWebhookEndpointsResponse:
        """The org's endpoints: configured ones first, then registered ones, oldest first."""
        _require_admin(principal)
        endpoints = [
            *static_endpoints(self.opts, principal.org),
            *list_endpoints(self.store, self.layout, principal.org),
        ]
        return ListWebhookEndpointsResponse(data=[_view(e) for e in endpoints])

    def delete(self, principal: Principal, endpoint_id: str) -> DeleteWebhookEndpointResponse:
        """Delete a registered endpoint; its pending deliveries are dropped."""
        _require_admin(principal)
        if any(e.id == endpoint_id for e in static_endpoints(self.opts, principal.org)):
            raise PermissionDenied(
                "This endpoint is configured by the cluster's operators (Helm values).",
                param="endpoint_id",
            )
        try:
            deleted = delete_endpoint(self.store, self.layout, principal.org, endpoint_id)
        except ValueError:  # not even an endpoint id: nothing of that name exists
            raise _not_found(endpoint_id) from None
        if not deleted:
            raise _not_found(endpoint_id)
        return DeleteWebhookEndpointResponse(id=endpoint_id, deleted=True)
