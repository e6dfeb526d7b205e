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
    return spec


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
