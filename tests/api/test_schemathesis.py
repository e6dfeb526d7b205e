"""Property-based conformance: schemathesis against the live API's own OpenAPI document.

Every operation in ``GET /openapi.json`` of the local-mode server gets generated requests
(valid and invalid ones, from schemathesis' examples, coverage and fuzzing phases) sent with
one org's API key, under every check schemathesis has: no 5xx; a documented status code,
content type, body schema and headers; schema-valid requests accepted and invalid ones refused;
the key enforced (each operation is replayed without it and with a wrong one); no required
header ignored; unsupported methods answered 405 with a true ``Allow``; a deleted object gone.
Where a valid request may still be refused for what no schema can say (a file's content, the
models served right now), our own check makes sure the refusal is that, never the API's
request validation disagreeing with its own document.

Random ids only ever find nothing (404), so path parameters and a job's ``training_file`` /
``model`` are drawn, half the time, from objects created up front: uploaded files, jobs,
pending uploads, the base models. That way the 200 and 409 answers are checked too.

Bugs this run found are pinned by regression tests at the end of this module.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS as CHECK_REGISTRY
from schemathesis.specs.openapi.checks import negative_data_rejection

from tests.api.conftest import chat_file
from tests.harness.api import ApiServer

ORG = "acme"
# Fuzzing examples per operation; the examples and coverage phases add a bounded, fixed set.
MAX_EXAMPLES = 20
# The API's own request validation refuses with this prefix (kubetune_api.errors).
REQUEST_VALIDATION_PREFIX = "Invalid request: "
# Operations whose schema-valid requests may still be refused, for what no schema can say: the
# content of a file, which models exist or are served right now, which parts were sent.
REFUSED_FOR_MORE_THAN_SHAPE = [
    "createFile",
    "createUpload",
    "completeUpload",
    "createFineTuningJob",
    "createChatCompletion",
    "createCompletion",
]
# 413: the size limits are deployment settings, not part of the document.
POSITIVE_STATUSES = ["2XX", "3XX", "400", "401", "403", "404", "409", "413", "429"]
# A multipart body carries no types: a binary field that schemathesis fills with an object
# arrives as that object's JSON text, which is valid bytes; its negative cases cannot be told
# from positive ones here (tests/api/test_files_api.py and test_uploads_api.py cover bad input).
MULTIPART_OPERATIONS = ["createFile", "addUploadPart"]


@schemathesis.check
def valid_data_never_fails_request_validation(ctx: Any, response: Any, case: Any) -> None:
    """Schemathesis' positive-data check, sharpened where 400 must be allowed: a schema-valid
    request may be refused for its content or the service's state, never by the API's own
    request validation (that would mean the document and the code disagree).
    """
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return
    message = response.json()["error"]["message"]
    if message.startswith(REQUEST_VALIDATION_PREFIX):
        raise AssertionError(f"A schema-valid request failed request validation: {message}")


# Every check schemathesis has (status codes, content types, schemas, headers, positive and
# negative data, auth, missing headers, unsupported methods, use after free, ...) and ours.
CHECKS = [check for check in CHECK_REGISTRY.get_all() if not isinstance(check, type)]


def _client(server: ApiServer) -> Any:
    return server.client(ORG)


def _auth(server: ApiServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.keys[ORG]}"}


def _upload_file(server: ApiServer, name: str) -> str:
    file_id: str = (
        _client(server).files.create(file=(name, io.BytesIO(chat_file(12))), purpose="fine-tune").id
    )
    return file_id


def _pending_upload(server: ApiServer, filename: str = "schemathesis.jsonl") -> str:
    upload_id: str = (
        _client(server)
        .uploads.create(
            bytes=len(chat_file(12)),
            filename=filename,
            mime_type="application/jsonl",
            purpose="fine-tune",
        )
        .id
    )
    return upload_id


@pytest.fixture(scope="module")
def seeded(local_api: ApiServer) -> dict[str, list[str]]:
    """Objects of ``ORG`` for generated requests to find, by schemathesis dictionary name.

    Operations that end an object's life (delete, cancel) get objects of their own, so that
    the others keep finding live ones whatever order the operations run in.
    """
    client = _client(local_api)
    training_file = _upload_file(local_api, "schemathesis-training.jsonl")

    def job() -> str:
        job_id: str = client.fine_tuning.jobs.create(
            model="tiny-llama", training_file=training_file
        ).id
        return job_id

    return {
        "files": [_upload_file(local_api, "schemathesis-file.jsonl")],
        "deletable_files": [_upload_file(local_api, "schemathesis-deletable.jsonl")],
        "training_files": [training_file],
        "jobs": [job()],
        "cancellable_jobs": [job()],
        "uploads": [_pending_upload(local_api)],
        "cancellable_uploads": [_pending_upload(local_api)],
        "base_models": ["tiny-llama", "tiny-llama-2"],
        "jsonl_names": ["schemathesis.jsonl"],
        "purposes": ["fine-tune"],
    }


def _bind(bindings: dict[str, str], probability: float = 0.5) -> dict[str, dict[str, Any]]:
    """``parameters`` config: each parameter drawn from a dictionary ``probability`` of the time."""
    return {key: {"dictionary": name, "probability": probability} for key, name in bindings.items()}


@pytest.fixture(scope="module")
def openapi_schema(local_api: ApiServer, seeded: dict[str, list[str]]) -> schemathesis.BaseSchema:
    """The live server's own OpenAPI document, with an org's API key on every request.

    The document declares bearer auth; the key goes in as a configured header (and again, per
    call, in the test, so schemathesis knows it for a real credential).
    """
    config = schemathesis.Config.from_dict(
        {
            "seed": 20240601,
            "headers": _auth(local_api),
            "dictionaries": {name: {"values": values} for name, values in seeded.items()},
            "parameters": _bind(
                {
                    "path.file_id": "files",
                    "path.fine_tuning_job_id": "jobs",
                    "path.upload_id": "uploads",
                    "body.model": "base_models",
                    "body.training_file": "training_files",
                    "body.validation_file": "training_files",
                    "body.filename": "jsonl_names",
                    "body.purpose": "purposes",
                }
            ),
            "operations": [
                {
                    "include-operation-id": "deleteFile",
                    "parameters": _bind({"path.file_id": "deletable_files"}),
                },
                {
                    "include-operation-id": "cancelFineTuningJob",
                    "parameters": _bind({"path.fine_tuning_job_id": "cancellable_jobs"}),
                },
                {
                    "include-operation-id": "cancelUpload",
                    "parameters": _bind({"path.upload_id": "cancellable_uploads"}),
                },
                {
                    "include-operation-id": "deleteModel",
                    "parameters": _bind({"path.model": "base_models"}),
                },
                {
                    "include-operation-id": "retrieveModel",
                    "parameters": _bind({"path.model": "base_models"}),
                },
                *(
                    {
                        "include-operation-id": operation,
                        "checks": {
                            "positive_data_acceptance": {"expected-statuses": POSITIVE_STATUSES}
                        },
                    }
                    for operation in REFUSED_FOR_MORE_THAN_SHAPE
                ),
            ],
        }
    )
    return schemathesis.openapi.from_url(f"{local_api.base_url}/openapi.json", config=config)


@pytest.fixture(autouse=True)
def _schemathesis_pytest_9_2_shim(request: pytest.FixtureRequest) -> None:
    """Give the test item the ``_nodeid`` attribute schemathesis' lazy loader still uses.

    pytest 9.2 replaced ``Node._nodeid`` (a str) by ``Node._id`` (a ``NodeId``), and
    ``schemathesis.pytest.from_fixture`` (4.32.5) reads and rewrites ``request.node._nodeid``
    to label each operation, so without this every run fails with ``AttributeError``. The
    attribute only feeds schemathesis' labels; pytest reports the item under its real id.
    """
    node: object = request.node
    if not hasattr(node, "_nodeid"):
        node._nodeid = request.node.nodeid  # type: ignore[attr-defined]


schema = schemathesis.pytest.from_fixture("openapi_schema")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_openapi_document(case, local_api):
    # The key passed here, not only configured: schemathesis then knows the credentials are
    # real, and its ignored-auth check replays the request without them and with a wrong key.
    multipart = case.operation.definition.raw.get("operationId") in MULTIPART_OPERATIONS
    case.call_and_validate(
        headers=_auth(local_api),
        checks=CHECKS,
        excluded_checks=[negative_data_rejection] if multipart else [],
    )


# ---------------------------------------------------------------------------------------------
# Regressions: the same checks on the one request that once triggered each bug.
# ---------------------------------------------------------------------------------------------


def _call_and_validate(
    server: ApiServer,
    openapi_schema: schemathesis.BaseSchema,
    path: str,
    method: str,
    **path_parameters: str,
) -> None:
    # A hand-made case does not get the configured headers: the key goes in explicitly.
    case = openapi_schema[path][method].Case(path_parameters=path_parameters)
    case.call_and_validate(headers=_auth(server), checks=CHECKS)


def test_deleting_a_base_model_answers_a_documented_status(local_api, openapi_schema):
    _call_and_validate(
        local_api, openapi_schema, "/v1/models/{model}", "DELETE", model="tiny-llama"
    )


def test_a_file_with_a_non_latin1_name_can_be_downloaded(local_api, openapi_schema):
    file_id = _upload_file(local_api, "データ.jsonl")
    _call_and_validate(
        local_api, openapi_schema, "/v1/files/{file_id}/content", "GET", file_id=file_id
    )


def test_a_file_name_with_a_line_break_is_refused(local_api):
    # Such a name once reached the content-disposition header of downloads.
    with pytest.raises(Exception, match="control characters") as excinfo:
        _pending_upload(local_api, filename="line\nbreak.jsonl")
    assert getattr(excinfo.value, "status_code", None) == 400
