"""What every request handler gets: the services, and the authenticated caller."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from kubetune.settings import Settings
from kubetune_api.auth import KeyStore, Principal
from kubetune_api.backends.base import JobBackend
from kubetune_api.errors import RateLimited
from kubetune_api.ratelimit import RateLimiter
from kubetune_api.services.files import FileService
from kubetune_api.services.inference import InferenceService
from kubetune_api.services.jobs import JobService
from kubetune_api.services.models import ModelService
from kubetune_api.services.uploads import UploadService
from kubetune_runtime.objectstore import ObjectStore


@dataclass
class Services:
    """The API's collaborators, built once per process (see ``app.build_services``)."""

    settings: Settings
    keys: KeyStore
    store: ObjectStore
    backend: JobBackend
    files: FileService
    jobs: JobService
    models: ModelService
    uploads: UploadService
    limiter: RateLimiter
    inference: InferenceService


def get_services(request: Request) -> Services:
    """The services attached to the app."""
    services: Services = request.app.state.services
    return services


def authenticate(
    request: Request,
    services: Annotated[Services, Depends(get_services)],
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Principal:
    """Resolve the API key and spend one request of the org's rate budget."""
    principal = services.keys.authenticate(authorization)
    decision = services.limiter.check(principal.org)
    request.state.rate_limit_headers = decision.headers()
    if not decision.allowed:
        headers = decision.headers()
        raise RateLimited(
            f"Rate limit reached for organization {principal.org}: {decision.limit} requests "
            f"per minute. Retry after {headers['retry-after']}s.",
            headers=headers,
        )
    return principal


ServicesDep = Annotated[Services, Depends(get_services)]
PrincipalDep = Annotated[Principal, Depends(authenticate)]
