"""Registered base models in the catalogue (kubetune.base_models): an org's own, ready only,
never shadowing a catalogue model, trained on sequences no longer than every limit says.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from kubetune.base_models import (
    BaseModelPhase,
    BaseModelReport,
    RegisteredBaseModel,
    org_catalogue,
)
from kubetune.settings import BaseModelEntry

STATIC = [BaseModelEntry(id="llama", path="/models/llama", context_length=8192)]
REPORT = BaseModelReport(architecture="Qwen2ForCausalLM", model_type="qwen2", context_length=4096)


def registered(model_id: str, org: str, phase: BaseModelPhase, **kw: object) -> RegisteredBaseModel:
    return RegisteredBaseModel.model_validate(
        {
            "id": model_id,
            "org": org,
            "path": f"/data/{model_id}",
            "created": 7,
            "phase": phase,
            "report": REPORT if phase is BaseModelPhase.READY else None,
            **kw,
        }
    )


def test_an_org_sees_the_catalogue_then_its_own_ready_models() -> None:
    models = [
        registered("ours", "acme", BaseModelPhase.READY),
        registered("checking", "acme", BaseModelPhase.VALIDATING),
        registered("broken", "acme", BaseModelPhase.FAILED, message="no weights"),
        registered("theirs", "globex", BaseModelPhase.READY),
        registered("llama", "acme", BaseModelPhase.READY),  # never shadows the catalogue's
    ]
    catalogue = org_catalogue(STATIC, models, "acme")
    assert [m.id for m in catalogue] == ["llama", "ours"]
    assert catalogue[0] is STATIC[0]
    ours = catalogue[1]
    assert (ours.owned_by, ours.path, ours.tokenizer, ours.created) == (
        "acme",
        "/data/ours",
        Path("/data/ours"),
        7,
    )
    assert [m.id for m in org_catalogue(STATIC, models, "globex")] == ["llama", "theirs"]


@pytest.mark.parametrize(
    ("asked", "cap", "expected"), [(None, None, 4096), (1024, None, 1024), (None, 2048, 2048)]
)
def test_the_context_length_is_the_smallest_limit(
    asked: int | None, cap: int | None, expected: int
) -> None:
    model = registered("m", "acme", BaseModelPhase.READY, context_length=asked)
    assert model.entry(cap).context_length == expected


def test_only_a_ready_model_is_a_catalogue_entry() -> None:
    with pytest.raises(ValueError, match="validating, not ready"):
        registered("m", "acme", BaseModelPhase.VALIDATING).entry()


@pytest.mark.parametrize("bad", [{"id": "a:b"}, {"org": "Acme"}, {"path": ""}])
def test_names_follow_the_catalogue_rules(bad: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        RegisteredBaseModel.model_validate(
            {"id": "m", "org": "acme", "path": "/m", "created": 0, **bad}
        )
