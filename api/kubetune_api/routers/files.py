"""``/v1/files``."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from kubetune_api.deps import PrincipalDep, ServicesDep
from kubetune_api.protocol import (
    DeleteFileResponse,
    ListFilesResponse,
    OpenAIFile,
    UploadPurpose,
)
from kubetune_api.routers.common import ERRORS, content_disposition

router = APIRouter(prefix="/v1/files", tags=["Files"], responses=ERRORS)


@router.post("", response_model=OpenAIFile, operation_id="createFile")
async def create_file(
    principal: PrincipalDep,
    services: ServicesDep,
    file: Annotated[UploadFile, File(description="The JSONL file.")],
    purpose: Annotated[UploadPurpose, Form(description="Must be fine-tune.")],
) -> OpenAIFile:
    """Upload a JSONL training file; it is validated while it streams to the object store."""
    # Starlette has spooled the multipart body to a temporary file, not to memory.
    return await run_in_threadpool(
        services.files.upload,
        principal,
        filename=file.filename or "upload.jsonl",
        purpose=purpose,
        stream=file.file,
    )


@router.get("", response_model=ListFilesResponse, operation_id="listFiles")
def list_files(
    principal: PrincipalDep,
    services: ServicesDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> ListFilesResponse:
    """The org's files."""
    return services.files.list(principal, purpose=purpose, after=after, limit=limit, order=order)


@router.get("/{file_id}", response_model=OpenAIFile, operation_id="retrieveFile")
def retrieve_file(principal: PrincipalDep, services: ServicesDep, file_id: str) -> OpenAIFile:
    """One file's metadata."""
    return services.files.retrieve(principal, file_id)


@router.delete("/{file_id}", response_model=DeleteFileResponse, operation_id="deleteFile")
def delete_file(principal: PrincipalDep, services: ServicesDep, file_id: str) -> DeleteFileResponse:
    """Delete a file."""
    return services.files.delete(principal, file_id)


@router.get(
    "/{file_id}/content",
    operation_id="downloadFile",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {
                "application/octet-stream": {"schema": {"type": "string"}},
                "text/csv": {"schema": {"type": "string"}},
            }
        }
    },
)
def file_content(principal: PrincipalDep, services: ServicesDep, file_id: str) -> StreamingResponse:
    """The file's bytes, streamed."""
    meta, chunks = services.files.content(principal, file_id)
    media = "text/csv" if meta.filename.endswith(".csv") else "application/octet-stream"
    return StreamingResponse(
        chunks,
        media_type=media,
        headers={
            "content-disposition": content_disposition(meta.filename),
            "content-length": str(meta.bytes),
        },
    )
