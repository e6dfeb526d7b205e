"""Generate the FineTuneJob CustomResourceDefinition from the pydantic models.

``python -m kubetune.crd`` prints the YAML committed as ``crds/finetunejobs.kubetune.io.yaml``
(``make crds``); a unit test fails when the two drift apart.

Pydantic emits JSON Schema 2020-12; a CRD needs a *structural* OpenAPI v3.0 schema: no ``$ref``,
``nullable`` instead of ``anyOf [..., null]``, boolean ``exclusiveMinimum``, no
``additionalProperties: false`` beside ``properties``, no titles. :func:`to_structural` converts.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema, to_jsonable_python

from kubetune import base_models
from kubetune.finetunejob import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    FineTuneJobSpec,
    FineTuneJobStatus,
)

# JSON Schema keywords a structural CRD schema keeps; anything else pydantic emits is dropped.
_KEPT_KEYWORDS: Final = frozenset(
    {
        "type",
        "format",
        "description",
        "default",
        "enum",
        "maximum",
        "minimum",
        "exclusiveMaximum",
        "exclusiveMinimum",
        "maxLength",
        "minLength",
        "pattern",
        "maxItems",
        "minItems",
        "maxProperties",
        "minProperties",
        "required",
        "nullable",
        "items",
        "properties",
        "additionalProperties",
        "x-kubernetes-int-or-string",
        "x-kubernetes-preserve-unknown-fields",
        "x-kubernetes-list-type",
        "x-kubernetes-list-map-keys",
        "x-kubernetes-map-type",
    }
)

PRINTER_COLUMNS: Final = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
    {"name": "Fine-tuned model", "type": "string", "jsonPath": ".status.fineTunedModel"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


class _DefaultsFromFactories(GenerateJsonSchema):
    """Emit defaults for ``default_factory`` fields too, so the apiserver fills them in.

    A nested model's default is ``{}``: the apiserver then applies that object's own field
    defaults, which is how ``kubectl get -o yaml`` comes to show the effective configuration.
    """

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        factory = schema.get("default_factory")
        if factory is None or schema.get("default_factory_takes_data"):
            return super().default_schema(schema)
        value = factory()  # type: ignore[call-arg]
        default = {} if isinstance(value, BaseModel) else to_jsonable_python(value)
        return {**self.generate_inner(schema["schema"]), "default": default}


def _resolve(node: Any, defs: Mapping[str, Any]) -> Any:
    """Inline every ``$ref``; keywords beside a ``$ref`` (a field's description) win."""
    if isinstance(node, list):
        return [_resolve(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _resolve(merged, defs)
    return {key: _resolve(value, defs) for key, value in node.items()}


def _collapse_nullable(node: dict[str, Any]) -> dict[str, Any]:
    """``anyOf: [X, {type: null}]`` → ``X`` with ``nullable: true``."""
    variants = node.get("anyOf")
    if not variants:
        return node
    non_null = [v for v in variants if v.get("type") != "null"]
    if len(non_null) != 1:
        raise ValueError(f"unions other than X | None cannot be expressed in a CRD: {variants}")
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    merged = {**non_null[0], **rest}
    if len(non_null) < len(variants):
        merged["nullable"] = True
    return merged


def to_structural(node: Any, *, keep_defaults: bool) -> Any:
    """Convert a resolved pydantic JSON schema into a structural OpenAPI v3.0 schema."""
    if not isinstance(node, dict):
        return node
    node = _collapse_nullable(node)
    if "const" in node:
        node = {**node, "enum": [node["const"]]}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in _KEPT_KEYWORDS:
            continue
        if key == "properties":
            out[key] = {
                name: to_structural(prop, keep_defaults=keep_defaults)
                for name, prop in value.items()
            }
        elif key in ("items", "additionalProperties"):
            if value is False:
                continue  # the apiserver prunes unknown fields; false is not structural
            out[key] = to_structural(value, keep_defaults=keep_defaults)
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "default":
            if keep_defaults and value is not None:
                out[key] = value
        else:
            out[key] = value
    if out.get("nullable") and "default" not in out:
        out.pop("nullable")  # optional fields are simply omitted on the wire
    return _ordered(out)


def _ordered(schema: dict[str, Any]) -> dict[str, Any]:
    """Order keywords the way people read them: type and description first, children last."""
    first = ("type", "description", "default", "enum", "format")
    last = ("required", "properties", "items", "additionalProperties")
    head = [k for k in first if k in schema]
    tail = [k for k in last if k in schema]
    middle = sorted(k for k in schema if k not in first and k not in last)
    return {k: schema[k] for k in (*head, *middle, *tail)}


def _model_schema(model: type[Any], *, keep_defaults: bool) -> dict[str, Any]:
    raw = model.model_json_schema(
        by_alias=True, mode="validation", schema_generator=_DefaultsFromFactories
    )
    resolved = _resolve({k: v for k, v in raw.items() if k != "$defs"}, raw.get("$defs", {}))
    schema: dict[str, Any] = to_structural(resolved, keep_defaults=keep_defaults)
    return schema


@dataclass(frozen=True)
class Kind:
    """What one of our CRDs is: its names, its two halves, how kubectl shows it."""

    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    spec: type[BaseModel]
    status: type[BaseModel]
    description: str
    printer_columns: list[dict[str, str]]
    source: str  # the module it is generated from, for the header

    @property
    def crd_name(self) -> str:
        """``<plural>.<group>``: the CRD's object name and file name."""
        return f"{self.plural}.{GROUP}"


FINETUNEJOB: Final = Kind(
    kind=KIND,
    plural=PLURAL,
    singular=SINGULAR,
    short_names=SHORT_NAMES,
    spec=FineTuneJobSpec,
    status=FineTuneJobStatus,
    description=(
        f"A fine-tuning job ({API_VERSION}): a base model, training data and a method in; a "
        "trained adapter, served by vLLM, out. Created by the kubetune API or by kubectl apply; "
        "only the operator writes its status."
    ),
    printer_columns=PRINTER_COLUMNS,
    source="kubetune/finetunejob.py",
)
BASEMODEL: Final = Kind(
    kind=base_models.KIND,
    plural=base_models.PLURAL,
    singular=base_models.SINGULAR,
    short_names=("bm",),
    spec=base_models.BaseModelSpec,
    status=base_models.BaseModelStatus,
    description=(
        f"A base model an org registered at run time ({API_VERSION}): a Hugging Face folder on "
        "a volume or in the object store. Created by the kubetune API (POST /v1/models); the "
        "operator checks it with a Job and writes its status; once ready it is listed in the "
        "org's /v1/models and trainable."
    ),
    printer_columns=[
        {"name": "Org", "type": "string", "jsonPath": ".spec.org"},
        {"name": "Model", "type": "string", "jsonPath": ".spec.id"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Architecture", "type": "string", "jsonPath": ".status.report.architecture"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
    source="kubetune/base_models.py",
)
KINDS: Final = {k.singular: k for k in (FINETUNEJOB, BASEMODEL)}


def build_crd(kind: Kind = FINETUNEJOB) -> dict[str, Any]:
    """Build a CRD (the FineTuneJob's by default) as a dict ready to dump or to send to the
    apiserver.
    """
    spec_schema = _model_schema(kind.spec, keep_defaults=True)
    status_schema = _model_schema(kind.status, keep_defaults=False)
    status_schema.pop("required", None)  # status is written piecemeal by the operator
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": kind.crd_name,
            "labels": {"app.kubernetes.io/part-of": "kubetune"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": list(kind.short_names),
                "categories": ["kubetune"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": kind.printer_columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": kind.description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def render_crd_yaml(kind: Kind = FINETUNEJOB) -> str:
    """Render a CRD as the YAML committed under ``crds/``."""
    header = f"# Generated by `make crds` from {kind.source}. Do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(kind), sort_keys=False, width=100, allow_unicode=True)


def main(argv: list[str] | None = None) -> None:
    """Print a CRD's YAML to standard output: ``finetunejob`` (the default) or ``basemodel``."""
    args = sys.argv[1:] if argv is None else argv
    sys.stdout.write(render_crd_yaml(KINDS[args[0] if args else FINETUNEJOB.singular]))


if __name__ == "__main__":
    main()
