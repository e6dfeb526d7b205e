"""docs/helm.md's values reference is generated from the chart and kept in sync."""

from __future__ import annotations

import json

from tests.chart.chart import CHART
from tests.chart.values_doc import DOC, render_doc, values_table


def test_the_values_reference_is_current() -> None:
    text = DOC.read_text()
    assert render_doc(text) == text, (
        "run `python -m tests.chart.values_doc` and commit docs/helm.md"
    )


def test_the_reference_lists_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    table = values_table()
    for key in schema["properties"]:
        if key != "global":
            assert f"| `{key}" in table
    assert "| `models[].serving.maxLoraRank` |" in table
    assert '| `vllm.image.tag` | string | `"v0.32.0"` |' in table


def test_docs_index_links_the_helm_page() -> None:
    assert "(helm.md)" in (DOC.parent / "README.md").read_text()
