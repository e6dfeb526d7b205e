"""Base models registered at run time through ``POST /v1/models`` (the official SDK's generic
``post``), on both backends (local mode's SQLite; BaseModel objects on the real apiserver):
admin keys only, checked before listed, the org's own, and on a cluster only from the places
the administrators allow.

No job driver runs here: the test plays it, recording the check's outcome through the backend
as local mode's checks and the operator do (tests/local/test_base_model_checks.py and
tests/operator/test_base_model_checks.py run the real checks).
"""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path
from typing import Any

import openai
import pytest

from kubetune.base_models import BaseModelPhase, BaseModelReport
from tests.api.conftest import SHARED_CLAIM, backend_of, chat_file, settings_of
from tests.harness.api import ADMIN, ApiServer, error_of


def register(client: Any, **body: Any) -> Any:
    return client.post("/models", body=body, cast_to=object)


def play_check(api: ApiServer, org: str, model_id: str, phase: BaseModelPhase) -> None:
    """Record a check's outcome, as local mode's checks do."""
    backend = backend_of(api)
    model = backend.get_base_model(org, model_id)
    assert model is not None
    report = BaseModelReport(
        architecture="LlamaForCausalLM", model_type="llama", context_length=512
    )
    message = "the tokenizer does not load" if phase is BaseModelPhase.FAILED else None
    backend.put_base_model(
        model.model_copy(update={"phase": phase, "report": report, "message": message})
    )


@pytest.fixture
def model_folder(tmp_path: Path, tiny_tokenizer: Path) -> Path:
    folder = tmp_path / "my-model"
    folder.mkdir()
    shutil.copy(tiny_tokenizer, folder / "tokenizer.json")
    return folder


@pytest.fixture
def checked(api: ApiServer) -> ApiServer:
    """The API on each backend (its responses checked against OpenAI's schema)."""
    return api


def test_an_admin_registers_a_model_that_is_listed_and_trainable_once_checked(
    checked: ApiServer, model_folder: Path
) -> None:
    admin = checked.client(f"acme{ADMIN}")
    member = checked.client("acme")
    created = register(admin, id="acme-base", path=str(model_folder), context_length=256)
    assert created["object"] == "model"
    assert (created["id"], created["owned_by"], created["status"]) == (
        "acme-base",
        "acme",
        "validating",
    )

    # Not listed, not trainable while it is checked; retrievable, with its state.
    assert "acme-base" not in [m.id for m in member.models.list()]
    assert member.models.retrieve("acme-base").model_extra["status"] == "validating"
    file_id = member.files.create(
        file=("t.jsonl", io.BytesIO(chat_file(10))), purpose="fine-tune"
    ).id
    with pytest.raises(openai.BadRequestError) as excinfo:
        member.fine_tuning.jobs.create(model="acme-base", training_file=file_id)
    assert error_of(excinfo)["code"] == "model_not_available"

    play_check(checked, "acme", "acme-base", BaseModelPhase.READY)
    listed = {m.id: m for m in member.models.list()}
    assert listed["acme-base"].owned_by == "acme"
    assert "tiny-llama" in listed  # the catalogue stays first
    got = member.models.retrieve("acme-base").model_extra
    assert (got["status"], got["architecture"], got["context_length"]) == (
        "ready",
        "LlamaForCausalLM",
        256,  # the registration's limit, under the model's 512
    )
    with pytest.raises(openai.BadRequestError) as excinfo:  # its weights are the org's folder
        member.get("/models/acme-base/content", cast_to=object)
    assert error_of(excinfo)["code"] == "model_not_downloadable"
    job = member.fine_tuning.jobs.create(model="acme-base", training_file=file_id)
    assert job.model == "acme-base"
    assert job.trained_tokens is None

    # Forgotten by an admin (members may not); its jobs stay.
    with pytest.raises(openai.PermissionDeniedError):
        member.models.delete("acme-base")
    assert admin.models.delete("acme-base").deleted is True
    assert "acme-base" not in [m.id for m in member.models.list()]
    assert member.fine_tuning.jobs.retrieve(job.id).model == "acme-base"


def test_another_org_neither_sees_nor_trains_nor_deletes_it(
    checked: ApiServer, model_folder: Path
) -> None:
    register(checked.client(f"acme{ADMIN}"), id="acme-private", path=str(model_folder))
    play_check(checked, "acme", "acme-private", BaseModelPhase.READY)
    other = checked.client(f"globex{ADMIN}")
    assert "acme-private" not in [m.id for m in other.models.list()]
    with pytest.raises(openai.NotFoundError):
        other.models.retrieve("acme-private")
    with pytest.raises(openai.NotFoundError):
        other.models.delete("acme-private")
    file_id = other.files.create(
        file=("t.jsonl", io.BytesIO(chat_file(10))), purpose="fine-tune"
    ).id
    with pytest.raises(openai.BadRequestError) as excinfo:
        other.fine_tuning.jobs.create(model="acme-private", training_file=file_id)
    assert "acme-private" not in error_of(excinfo)["message"].split("Available:")[1]
    # The same name is free for globex: models are the org's own.
    assert register(other, id="acme-private", path=str(model_folder))["owned_by"] == "globex"
    checked.client(f"acme{ADMIN}").models.delete("acme-private")
    other.models.delete("acme-private")


def test_a_failed_check_is_told_and_the_model_is_never_listed(
    checked: ApiServer, model_folder: Path
) -> None:
    admin = checked.client(f"acme{ADMIN}")
    register(admin, id="acme-broken", path=str(model_folder))
    play_check(checked, "acme", "acme-broken", BaseModelPhase.FAILED)
    got = admin.models.retrieve("acme-broken").model_extra
    assert (got["status"], got["status_details"]) == ("failed", "the tokenizer does not load")
    assert "acme-broken" not in [m.id for m in admin.models.list()]
    admin.models.delete("acme-broken")


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"id": "a:b", "path": "/models/x"}, 400, "id", None),  # ids sit inside ft:<base>:…
        ({"id": "x", "path": "models/x"}, 400, "path", None),  # relative to what?
        ({"id": "x", "path": "/m", "context_length": 8}, 400, "context_length", None),
        ({"id": "x", "path": "/m", "weights": "url"}, 400, "weights", None),  # unknown field
        ({"id": "tiny-llama", "path": "/m"}, 409, "id", None),  # the catalogue's
    ],
)
def test_bad_registrations_are_refused_with_the_field_named(
    checked: ApiServer, body: dict[str, Any], status: int, param: str, code: str | None
) -> None:
    with pytest.raises(openai.APIStatusError) as excinfo:
        register(checked.client(f"acme{ADMIN}"), **body)
    assert excinfo.value.status_code == status
    assert error_of(excinfo)["param"] == param


def test_only_admins_register_and_twice_is_a_conflict(
    checked: ApiServer, model_folder: Path
) -> None:
    with pytest.raises(openai.PermissionDeniedError):
        register(checked.client("acme"), id="acme-twice", path=str(model_folder))
    admin = checked.client(f"acme{ADMIN}")
    register(admin, id="acme-twice", path=str(model_folder))
    with pytest.raises(openai.ConflictError) as excinfo:
        register(admin, id="acme-twice", path=str(model_folder))
    assert error_of(excinfo)["param"] == "id"
    admin.models.delete("acme-twice")


@pytest.mark.cluster
def test_a_cluster_reads_models_only_from_where_its_administrators_allow(
    kube_api_server: ApiServer, model_folder: Path
) -> None:
    admin = kube_api_server.client(f"acme{ADMIN}")
    for body, param in [
        ({"path": "/etc/secrets"}, "path"),
        ({"path": f"{model_folder}/../../../etc"}, "path"),
        ({"path": "store:orgs/globex/models/x"}, "path"),
        ({"path": str(model_folder), "volume_claim": "globex-weights"}, "volume_claim"),
    ]:
        with pytest.raises(openai.BadRequestError) as excinfo:
            register(admin, id="acme-elsewhere", **body)
        assert (error_of(excinfo)["param"], error_of(excinfo)["code"]) == (
            param,
            "path_not_allowed",
        )
    created = register(admin, id="acme-claimed", path=str(model_folder), volume_claim=SHARED_CLAIM)
    assert (created["volume_claim"], created["status"]) == (SHARED_CLAIM, "validating")
    # A BaseModel object the operator checks: the org's label, the registration as its spec.
    (obj,) = [
        o for o in kube_objects(kube_api_server, "basemodels") if o["spec"]["id"] == "acme-claimed"
    ]
    assert obj["metadata"]["labels"]["kubetune.io/org"] == "acme"
    assert obj["spec"]["volumeClaim"] == SHARED_CLAIM
    assert "status" not in obj
    admin.models.delete("acme-claimed")
    assert not [
        o for o in kube_objects(kube_api_server, "basemodels") if o["spec"]["org"] == "acme"
    ]


@pytest.mark.cluster
def test_the_cli_sends_a_clusters_folder_as_the_trainers_see_it(
    kube_api_server: ApiServer,
) -> None:
    from tests.cli.conftest import global_args, run_cli, run_json

    # Not a folder of this machine: `models add` sends it as it is, with the claim holding it.
    folder = f"{tempfile.gettempdir()}/team-models/team-llama"
    admin = global_args(kube_api_server, f"acme{ADMIN}")
    added = run_json([*admin, "models", "add", folder, "--volume-claim", SHARED_CLAIM, "--no-wait"])
    assert (added["id"], added["path"], added["volume_claim"], added["status"]) == (
        "team-llama",
        folder,
        SHARED_CLAIM,
        "validating",
    )
    result = run_cli([*admin, "models", "rm", "team-llama"])
    assert result.exit_code == 0, result.output


def test_local_mode_registers_folders_of_its_machine_only(local_api: ApiServer) -> None:
    admin = local_api.client(f"acme{ADMIN}")
    for body, param in [
        ({"path": "store:models/x"}, "path"),
        ({"path": "/models/x", "volume_claim": SHARED_CLAIM}, "volume_claim"),
    ]:
        with pytest.raises(openai.BadRequestError) as excinfo:
            register(admin, id="acme-cluster-only", **body)
        assert error_of(excinfo)["param"] == param


def kube_objects(server: ApiServer, plural: str) -> list[dict[str, Any]]:
    """Every ``kubetune.io`` object of that kind in the API's namespace."""
    from kubernetes import client, config

    settings = settings_of(server)
    api_client = config.new_client_from_config(config_file=str(settings.kubernetes.kubeconfig))
    found: Any = client.CustomObjectsApi(api_client).list_namespaced_custom_object(
        "kubetune.io", "v1alpha1", settings.kubernetes.namespace, plural
    )
    return list(found["items"])
