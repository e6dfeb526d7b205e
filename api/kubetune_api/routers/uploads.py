"""``/v1/uploads``: files larger than one request."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, UploadFile
from fastapi.concurrency import run_in_threadpool

from kubetune_api.deps import PrincipalDep, ServicesDep
from kubetune_api.protocol import CompleteUploadRequest, CreateUploadRequest, Upload, UploadPart
from kubetune_api.routers.common import ERRORS

router = APIRouter(prefix="/v1/uploads", tags=["Uploads"], responses=ERRORS)


@router.post("", response_model=Upload, operation_id="createUpload")
def create_upload(
    principal: PrincipalDep, services: ServicesDep, body: CreateUploadRequest
) -> Upload:
    """Start an upload; add parts, then complete it."""
    return services.uploads.create(principal, body)


@router.post("/{upload_id}/parts", response_model=UploadPart, operation_id="addUploadPart")
async def add_part(
    principal: PrincipalDep,
    services: ServicesDep,
    upload_id: str,
    data: Annotated[UploadFile, File(description="The bytes of this part (≤ 64 MB).")],
) -> UploadPart:
    """Add one part; parts may be sent in parallel."""
    return await run_in_threadpool(services.uploads.add_part, principal, upload_id, data.file)


@router.post("/{upload_id}/complete", response_model=Upload, operation_id="completeUpload")
def complete_upload(
    principal: PrincipalDep, services: ServicesDep, upload_id: str, body: CompleteUploadRequest
) -> Upload:
    """Assemble the parts, in the given order, into a validated file."""
    return services.uploads.complete(principal, upload_id, body)


@router.post("/{upload_id}/cancel", response_model=Upload, operation_id="cancelUpload")
def cancel_upload(principal: PrincipalDep, services: ServicesDep, upload_id: str) -> Upload:
    """Cancel the upload; its parts are deleted."""
    return services.uploads.cancel(principal, upload_id)
