"""``/v1/fine_tuning/jobs``."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request

from kubetune_api.deps import PrincipalDep, ServicesDep
from kubetune_api.errors import InvalidRequest
from kubetune_api.protocol import (
    CreateFineTuningJobRequest,
    FineTuningJob,
    ListFineTuningJobCheckpointsResponse,
    ListFineTuningJobEventsResponse,
    ListPaginatedFineTuningJobsResponse,
)
from kubetune_api.routers.common import ERRORS

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["Fine-tuning"], responses=ERRORS)
_METADATA_PARAM = re.compile(r"^metadata\[(.{1,64})\]$")


@router.post("", response_model=FineTuningJob, operation_id="createFineTuningJob")
def create_job(
    principal: PrincipalDep,
    services: ServicesDep,
    body: CreateFineTuningJobRequest,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
) -> FineTuningJob:
    """Create a fine-tuning job; the same ``Idempotency-Key`` returns the same job."""
    return services.jobs.create(principal, body, idempotency_key)


@router.get(
    "",
    response_model=ListPaginatedFineTuningJobsResponse,
    operation_id="listPaginatedFineTuningJobs",
)
def list_jobs(
    request: Request,
    principal: PrincipalDep,
    services: ServicesDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ListPaginatedFineTuningJobsResponse:
    """The org's jobs, newest first; filter with ``metadata[key]=value``."""
    metadata: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        match = _METADATA_PARAM.match(name)
        if match:
            metadata[match.group(1)] = value
        elif name.startswith("metadata"):
            raise InvalidRequest("Filter by metadata as metadata[key]=value.", param=name)
    return services.jobs.list(principal, after=after, limit=limit, metadata=metadata or None)


@router.get(
    "/{fine_tuning_job_id}", response_model=FineTuningJob, operation_id="retrieveFineTuningJob"
)
def retrieve_job(
    principal: PrincipalDep, services: ServicesDep, fine_tuning_job_id: str
) -> FineTuningJob:
    """One job."""
    return services.jobs.retrieve(principal, fine_tuning_job_id)


@router.post(
    "/{fine_tuning_job_id}/cancel", response_model=FineTuningJob, operation_id="cancelFineTuningJob"
)
def cancel_job(
    principal: PrincipalDep, services: ServicesDep, fine_tuning_job_id: str
) -> FineTuningJob:
    """Cancel a job that has not finished."""
    return services.jobs.cancel(principal, fine_tuning_job_id)


@router.post(
    "/{fine_tuning_job_id}/pause", response_model=FineTuningJob, operation_id="pauseFineTuningJob"
)
def pause_job(
    principal: PrincipalDep, services: ServicesDep, fine_tuning_job_id: str
) -> FineTuningJob:
    """Pause a job after a checkpoint."""
    return services.jobs.pause(principal, fine_tuning_job_id)


@router.post(
    "/{fine_tuning_job_id}/resume", response_model=FineTuningJob, operation_id="resumeFineTuningJob"
)
def resume_job(
    principal: PrincipalDep, services: ServicesDep, fine_tuning_job_id: str
) -> FineTuningJob:
    """Resume a paused job from its checkpoint."""
    return services.jobs.resume(principal, fine_tuning_job_id)


@router.get(
    "/{fine_tuning_job_id}/events",
    response_model=ListFineTuningJobEventsResponse,
    operation_id="listFineTuningEvents",
)
def list_events(
    principal: PrincipalDep,
    services: ServicesDep,
    fine_tuning_job_id: str,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> ListFineTuningJobEventsResponse:
    """The job's events, newest first."""
    return services.jobs.events(principal, fine_tuning_job_id, after=after, limit=limit)


@router.get(
    "/{fine_tuning_job_id}/checkpoints",
    response_model=ListFineTuningJobCheckpointsResponse,
    operation_id="listFineTuningJobCheckpoints",
)
def list_checkpoints(
    principal: PrincipalDep,
    services: ServicesDep,
    fine_tuning_job_id: str,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> ListFineTuningJobCheckpointsResponse:
    """The job's checkpoints, newest first."""
    return services.jobs.checkpoints(principal, fine_tuning_job_id, after=after, limit=limit)
