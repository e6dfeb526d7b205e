"""``/v1/organization/usage/fine_tuning``: the org's fine-tuning usage (admin keys only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from kubetune_api.deps import PrincipalDep, ServicesDep
from kubetune_api.protocol import BucketWidth, UsagePage
from kubetune_api.routers.common import ERRORS
from kubetune_api.services.usage import UsageService

router = APIRouter(prefix="/v1/organization/usage", tags=["Usage"], responses=ERRORS)


@router.get("/fine_tuning", response_model=UsagePage, operation_id="fineTuningUsage")
def fine_tuning_usage(
    principal: PrincipalDep,
    services: ServicesDep,
    start_time: Annotated[int, Query(ge=0, description="Start (Unix seconds), inclusive.")],
    end_time: Annotated[
        int | None, Query(ge=0, description="End (Unix seconds), exclusive; default now.")
    ] = None,
    bucket_width: Annotated[BucketWidth, Query(description="1h or 1d.")] = BucketWidth.DAY,
    limit: Annotated[
        int | None, Query(ge=1, le=168, description="Buckets per page (1d: ≤ 31; 1h: ≤ 168).")
    ] = None,
    page: Annotated[str | None, Query(max_length=32, description="next_page of the last.")] = None,
) -> UsagePage:
    """Jobs created and finished, trained tokens, run and GPU seconds, per time bucket."""
    return UsageService(services.backend).fine_tuning(
        principal,
        start_time=start_time,
        end_time=end_time,
        width=bucket_width,
        limit=limit,
        page=page,
    )
