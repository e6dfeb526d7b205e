"""Validate JSON responses against OpenAI's own OpenAPI document (../shared/reference).

kubetune's documented departures from that document are applied here, each with its reason,
so a test fails on any other difference.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import yaml
from jsonschema import Draft202012Validator

from tests.harness.paths import REFERENCE_DIR

SPEC_FILE = REFERENCE_DIR / "openai-fine-tuning.openapi.yaml"


@functools.lru_cache(maxsize=1)
def _spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(SPEC_FILE.read_text())
    spec = copy.deepcopy(spec)
    _oas30_bounds_to_2020_12(spec)
    schemas = spec["components"]["schemas"]
    # kubetune adds pause/resume states (OpenAI's spec subset predates its pause endpoint).
    schemas["FineTuningJob"]["properties"]["status"]["enum"] += ["pausing", "paused"]
    # An empty file list has no first/last id; OpenAI answers null there too.
    for name in ("first_id", "last_id"):
        schemas["ListFilesResponse"]["properties"][name] = {
            "anyOf": [{"type": "string"}, {"type": "null"}]
        }
    schemas["UsageResponse"] = USAGE_RESPONSE
    return spec


# The envelope of OpenAI's organization usage API (its ``UsageResponse`` and ``UsageTimeBucket``,
# not in this subset of its document), with the result object of kubetune's fine-tuning usage.
_COUNT: dict[str, Any] = {"type": "integer", "minimum": 0}
_SECONDS: dict[str, Any] = {"type": "number", "minimum": 0}
USAGE_RESPONSE: dict[str, Any] = {
    "type": "object",
    "required": ["object", "data", "has_more", "next_page"],
    "additionalProperties": False,
    "properties": {
        "object": {"const": "page"},
        "has_more": {"type": "boolean"},
        "next_page": {"type": ["string", "null"]},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["object", "start_time", "end_time", "results"],
                "additionalProperties": False,
                "properties": {
                    "object": {"const": "bucket"},
                    "start_time": {"type": "integer"},
                    "end_time": {"type": "integer"},
                    "results": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["object", "org"],
                            "properties": {
                                "object": {"const": "organization.usage.fine_tuning.result"},
                                "org": {"type": "string"},
                                "jobs_created": _COUNT,
                                "jobs_succeeded": _COUNT,
                                "jobs_failed": _COUNT,
                                "jobs_cancelled": _COUNT,
                                "trained_tokens": _COUNT,
                                "run_seconds": _SECONDS,
                                "gpu_seconds": _SECONDS,
                            },
                        },
                    },
                },
            },
        },
    },
}


def _oas30_bounds_to_2020_12(node: Any) -> None:
    """The document says OpenAPI 3.1 (JSON Schema 2020-12) but some bounds are written the 3.0
    way (``exclusiveMinimum: true`` beside ``minimum``); 2020-12 reads ``true`` as the number 1.
    Rewrite them as 2020-12 means them."""
    if isinstance(node, list):
        for item in node:
            _oas30_bounds_to_2020_12(item)
        return
    if not isinstance(node, dict):
        return
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(bound) is True and limit in node:
            node[bound] = node.pop(limit)
        elif node.get(bound) is False:
            node.pop(bound)
    for value in node.values():
        _oas30_bounds_to_2020_12(value)


def validate(schema_name: str, payload: Any) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``payload`` matches the named schema."""
    spec = _spec()
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": spec["components"]}
    Draft202012Validator(schema).validate(payload)


# The error envelope: OpenAI's document does not define it in this subset, so it is spelled
# out here as the SDK reads it.
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string", "minLength": 1},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_JOB = r"/v1/fine_tuning/jobs/[^/]+"
_ROUTES: list[tuple[str, str, str]] = [
    ("POST", r"/v1/files", "OpenAIFile"),
    ("GET", r"/v1/files", "ListFilesResponse"),
    ("GET", r"/v1/files/[^/]+", "OpenAIFile"),
    ("DELETE", r"/v1/files/[^/]+", "DeleteFileResponse"),
    ("POST", r"/v1/uploads", "Upload"),
    ("POST", r"/v1/uploads/[^/]+/parts", "UploadPart"),
    ("POST", r"/v1/uploads/[^/]+/(complete|cancel)", "Upload"),
    ("POST", r"/v1/fine_tuning/jobs", "FineTuningJob"),
    ("GET", r"/v1/fine_tuning/jobs", "ListPaginatedFineTuningJobsResponse"),
    ("GET", _JOB, "FineTuningJob"),
    ("POST", _JOB + r"/(cancel|pause|resume)", "FineTuningJob"),
    ("GET", _JOB + r"/events", "ListFineTuningJobEventsResponse"),
    ("GET", _JOB + r"/checkpoints", "ListFineTuningJobCheckpointsResponse"),
    ("GET", r"/v1/models", "ListModelsResponse"),
    ("POST", r"/v1/models", "Model"),  # kubetune: a registered base model, a Model and more
    ("GET", r"/v1/models/.+", "Model"),
    ("DELETE", r"/v1/models/.+", "DeleteModelResponse"),
    ("GET", r"/v1/organization/usage/fine_tuning", "UsageResponse"),
]


def schema_for(method: str, path: str) -> str | None:
    """The OpenAPI schema name of a successful JSON response to ``method path``."""
    import re

    for route_method, pattern, schema in _ROUTES:
        if route_method == method and re.fullmatch(pattern, path):
            return schema
    return None


def check_response(method: str, path: str, status: int, content_type: str, body: bytes) -> None:
    """Validate one HTTP response of the API: success bodies against OpenAI's schemas, error
    bodies against the error envelope. Raises AssertionError naming the route on a mismatch."""
    import json

    from jsonschema import ValidationError

    if "application/json" not in content_type:
        assert status < 300, (method, path, status, content_type)
        assert path.endswith("/content"), (method, path, status, content_type)
        return
    payload = json.loads(body)
    try:
        if status >= 400:
            Draft202012Validator(ERROR_SCHEMA).validate(payload)
            return
        schema = schema_for(method, path)
        assert schema is not None, f"no schema known for {method} {path}"
        validate(schema, payload)
    except ValidationError as exc:
        raise AssertionError(
            f"{method} {path} ({status}) breaks its schema: {exc.message}"
        ) from exc
