"""The committed CRD is generated from the models, and is a valid structural schema."""

from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from kubetune.crd import BASEMODEL, FINETUNEJOB, Kind, build_crd, render_crd_yaml
from tests.harness.paths import REPO_ROOT

CRD_PATH = REPO_ROOT / "crds" / "finetunejobs.kubetune.io.yaml"


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def root_schema() -> Any:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("kind", [FINETUNEJOB, BASEMODEL], ids=lambda k: k.kind)
def test_committed_crds_match_the_models_and_the_chart_ships_them(kind: Kind) -> None:
    committed = REPO_ROOT / "crds" / f"{kind.crd_name}.yaml"
    assert committed.read_text() == render_crd_yaml(kind), (
        f"{committed.name} is stale: run `make crds` and commit the result"
    )
    chart_copy = REPO_ROOT / "charts" / "kubetune" / "crds" / committed.name
    assert chart_copy.read_text() == committed.read_text(), "run `make crds`"


def test_a_base_model_is_registered_by_the_api_and_checked_by_the_operator() -> None:
    crd = build_crd(BASEMODEL)
    assert crd["metadata"]["name"] == "basemodels.kubetune.io"
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}  # only the operator writes the status
    schema = version["schema"]["openAPIV3Schema"]["properties"]
    assert schema["spec"]["required"] == ["org", "id", "path", "created"]
    assert set(schema["spec"]["properties"]) == {
        "org",
        "id",
        "path",
        "volumeClaim",
        "contextLength",
        "created",
    }
    assert schema["status"]["properties"]["phase"]["enum"] == ["validating", "ready", "failed"]
    assert "required" not in schema["status"]
    assert [c["jsonPath"] for c in version["additionalPrinterColumns"]][:3] == [
        ".spec.org",
        ".spec.id",
        ".status.phase",
    ]


def test_committed_crd_matches_the_models():
    assert CRD_PATH.read_text() == render_crd_yaml(), (
        "crds/finetunejobs.kubetune.io.yaml is stale: run `make crds` and commit the result"
    )


def test_schema_is_structural():
    forbidden = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "const", "propertyNames"}
    for path, node in walk(root_schema()):
        assert not forbidden & node.keys(), f"{path}: {forbidden & node.keys()}"
        assert "type" in node, f"{path} has no type"
        if node["type"] == "object" and "properties" in node:
            assert "additionalProperties" not in node, path
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(key, True), bool), f"{path}.{key} must be boolean in OAS 3.0"


def test_every_spec_and_status_field_is_documented():
    undocumented = [
        path
        for path, node in walk(root_schema())
        if path.startswith((".spec", ".status"))
        and not node.get("description")
        and not path.endswith(("[]", "{}"))
    ]
    assert undocumented == []


def test_crd_names_printer_columns_and_status_subresource():
    crd = yaml.safe_load(CRD_PATH.read_text())
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["ftj"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Model", "Progress", "Fine-tuned model", "Age"]


def test_enums_and_bounds_reach_the_schema():
    spec = root_schema()["properties"]["spec"]
    assert spec["required"] == ["model", "trainingFile"]
    method = spec["properties"]["method"]["properties"]
    assert method["type"]["enum"] == ["supervised", "dpo"]
    epochs = method["hyperparameters"]["properties"]["nEpochs"]
    assert (epochs["type"], epochs["minimum"], epochs["maximum"]) == ("integer", 1, 50)
    lr = method["hyperparameters"]["properties"]["learningRateMultiplier"]
    assert lr["minimum"] == 0
    assert lr["exclusiveMinimum"] is True
    assert spec["properties"]["adapter"]["properties"]["r"]["enum"] == [
        1,
        8,
        16,
        32,
        64,
        128,
        256,
        320,
        512,
    ]
    assert spec["properties"]["metadata"]["maxProperties"] == 16


def test_the_chart_ships_the_same_crd():
    chart_copy = REPO_ROOT / "charts" / "kubetune" / "crds" / CRD_PATH.name
    assert chart_copy.read_text() == CRD_PATH.read_text(), "run `make crds`"
