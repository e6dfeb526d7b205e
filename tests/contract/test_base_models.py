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
    from_manifest,
    inspected,
    org_catalogue,
    resource_name,
    status_of,
    to_manifest,
)
from kubetune.settings import BaseModelEntry, ModelRegistrySettings

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


def test_an_org_sees_the_catalogue_then_its_own_ready_models(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    models = [
        registered("ours", "acme", BaseModelPhase.READY, path=str(tmp_path)),
        registered("checking", "acme", BaseModelPhase.VALIDATING),
        registered("broken", "acme", BaseModelPhase.FAILED, message="no weights"),
        registered("theirs", "globex", BaseModelPhase.READY),
        registered("llama", "acme", BaseModelPhase.READY),  # never shadows the catalogue's
    ]
    catalogue = org_catalogue(STATIC, models, "acme")
    assert [m.id for m in catalogue] == ["llama", "ours"]
    assert catalogue[0] is STATIC[0]
    ours = catalogue[1]
    # Its tokenizer counts tokens where the folder is on this machine (local mode).
    assert (ours.owned_by, ours.path, ours.tokenizer, ours.created) == (
        "acme",
        str(tmp_path),
        tmp_path,
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


@pytest.mark.parametrize(
    "where",
    [
        {"path": "/models/not-on-this-machine"},  # a cluster's: in the trainers' volume
        {"path": "store:models/ours"},
        {"volume_claim": "weights"},
    ],
)
def test_a_folder_elsewhere_counts_no_tokens_here(tmp_path: Path, where: dict[str, str]) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    model = registered("m", "acme", BaseModelPhase.READY, **{"path": str(tmp_path), **where})
    entry = model.entry()
    assert entry.tokenizer is None
    assert (entry.path, entry.volume_claim) == (model.path, model.volume_claim)


def test_a_base_model_object_stands_for_the_registration_and_its_check() -> None:
    model = registered(
        "Qwen/Qwen2.5-7B_Instruct",
        "acme",
        BaseModelPhase.VALIDATING,
        report=None,
        volume_claim="weights",
        context_length=2048,
    )
    manifest = to_manifest(model, "ml")
    name = manifest["metadata"]["name"]
    assert name == resource_name("acme", model.id)
    assert name.startswith("acme-qwen-qwen2-5-7b-instruct-")
    assert len(name) <= 47
    assert manifest["metadata"]["labels"] == {"kubetune.io/org": "acme"}
    assert manifest["spec"] == {
        "org": "acme",
        "id": "Qwen/Qwen2.5-7B_Instruct",
        "path": "/data/Qwen/Qwen2.5-7B_Instruct",
        "volumeClaim": "weights",
        "contextLength": 2048,
        "created": 7,
    }
    assert from_manifest(manifest) == model  # no status yet: validating
    checked = model.model_copy(update={"phase": BaseModelPhase.READY, "report": REPORT})
    manifest["status"] = status_of(checked).to_wire()
    assert manifest["status"]["report"]["contextLength"] == 4096
    assert from_manifest(manifest) == checked


def test_names_are_unique_per_org_and_model_whatever_the_slug() -> None:
    names = {
        resource_name(org, model)
        for org in ("acme", "acme-x")
        for model in ("x-m", "m", "M", "x/m", "m" * 200)
    }
    assert len(names) == 10
    assert all(len(n) <= 47 and n[0].isalnum() and n[-1].isalnum() for n in names)


@pytest.mark.parametrize(
    ("answer", "code", "phase", "message"),
    [
        ({"architecture": "LlamaForCausalLM", "context_length": 2048}, 0, "validating", None),
        ({"error": "no weights in /m"}, 2, "failed", "no weights in /m"),
        (None, 137, "failed", "the check of /m crashed (exit 137)"),
        ({"architecture": "X", "context_length": 1}, 0, "failed", "report that does not hold"),
    ],
)
def test_what_the_check_answered_becomes_the_models_state(
    answer: object, code: int, phase: str, message: str | None
) -> None:
    model = registered("m", "acme", BaseModelPhase.VALIDATING, path="/m", report=None)
    after = inspected(model, answer, code)
    assert after.phase.value == phase
    assert (after.message is None) if message is None else (message in (after.message or ""))


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/models/shared/llama", True),
        ("/models/shared", True),
        ("/models/sharedx/llama", False),  # a segment boundary, not a string prefix
        ("/models/shared/../other/llama", False),
        ("/etc", False),
        ("store:models/llama", True),
        ("store:models/../orgs/globex", False),
        ("store:orgs/globex/files", False),
    ],
)
def test_a_cluster_reads_models_only_under_the_allowed_places(path: str, allowed: bool) -> None:
    settings = ModelRegistrySettings(allowed_paths=["/models/shared/", "store:models"])
    assert settings.path_allowed(path) is allowed
    assert ModelRegistrySettings().path_allowed(path) is False  # none allowed: none
