"""/v1/fine_tuning/jobs through the official OpenAI SDK (sync and async), on both backends.

No operator runs here: where a test needs a job to be running, succeeded or checkpointed, it
plays the operator by writing the job's status through the backend, as the operator would.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import os
import tarfile
from typing import Any

import openai
import pytest

from kubetune.finetunejob import CheckpointRef, FineTuneJobStatus, Metrics
from kubetune.ids import new_checkpoint_id, results_file_id
from tests.api.conftest import backend_of, chat_file, dpo_file, settings_of, store_of
from tests.harness.api import error_of
from tests.harness.openapi import validate


@pytest.fixture
def training_file(api):
    return (
        api.client()
        .files.create(file=("t.jsonl", io.BytesIO(chat_file(10))), purpose="fine-tune")
        .id
    )


def play_operator(api, job_id, **status):
    backend = backend_of(api)
    return backend.update_status("acme", job_id, FineTuneJobStatus.model_validate(status))


def test_create_resolves_auto_like_openai(api, training_file):
    raw = api.client().fine_tuning.jobs.with_raw_response.create(
        model="tiny-llama",
        training_file=training_file,
        suffix="bot",
        seed=7,
        metadata={"team": "search"},
    )
    validate("FineTuningJob", raw.http_response.json())
    job = raw.parse()
    assert job.id.startswith("ftjob-")
    assert job.status == "validating_files"
    assert job.model == "tiny-llama"
    assert job.organization_id == "acme"
    # 10 examples: OpenAI's rule gives min(25, 100 // 10) = 10 epochs.
    assert job.hyperparameters.n_epochs == 10
    assert job.hyperparameters.batch_size == 1
    assert job.hyperparameters.learning_rate_multiplier == 1.0
    assert job.method.type == "supervised"
    assert job.seed == 7
    assert job.metadata == {"team": "search"}


def test_method_dpo_and_extra_body(api):
    client = api.client()
    dpo = client.files.create(file=("p.jsonl", io.BytesIO(dpo_file())), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=dpo.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3, "n_epochs": 2}}},
        extra_body={
            "adapter": {"type": "lora", "r": 8, "alpha": 16},
            "resources": {"nodes": 2, "gpus_per_node": 0},
            "strategy": "fsdp",
        },
    )
    assert job.method.dpo.hyperparameters.beta == 0.3
    assert job.method.dpo.hyperparameters.n_epochs == 2
    extra = job.model_extra
    assert extra["adapter"]["r"] == 8
    assert extra["resources"]["nodes"] == 2
    assert extra["strategy"] == "fsdp"


def _supervised(**hyperparameters):
    return {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}


def test_the_training_knobs_are_taken_and_shown(api, training_file):
    knobs = {
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.1,
        "weight_decay": 0.01,
        "max_grad_norm": 0.5,
        "max_seq_length": 128,
        "train_on_inputs": True,
        "packing": True,
        "save_steps": 5,
        "save_total_limit": 2,
    }
    client = api.client()
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=training_file,
        method=_supervised(n_epochs=2, **knobs),
    )
    shown = client.fine_tuning.jobs.retrieve(job.id).method.supervised.hyperparameters
    assert shown.n_epochs == 2
    assert shown.model_extra == {**knobs, "use_best_checkpoint": False}
    spec = backend_of(api).get("acme", job.id).spec
    assert (spec.checkpointing.every_steps, spec.checkpointing.keep) == (5, 2)
    hp = spec.method.hyperparameters
    assert (hp.lr_scheduler_type, hp.weight_decay, hp.train_on_inputs) == ("cosine", 0.01, True)
    assert hp.packing is True
    # Omitted knobs are resolved at create, like OpenAI's "auto", and shown as numbers.
    plain = client.fine_tuning.jobs.create(model="tiny-llama", training_file=training_file)
    assert plain.method.supervised.hyperparameters.model_extra == {
        "lr_scheduler_type": "linear",
        "warmup_ratio": 0.03,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "train_on_inputs": False,
        "packing": False,
        "save_steps": 50,
        "save_total_limit": 3,
        "use_best_checkpoint": False,
    }


def test_early_stopping_needs_a_validation_file_and_shows_its_resolved_knobs(api, training_file):
    client = api.client()
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=training_file,
        validation_file=training_file,
        method=_supervised(early_stopping_patience=3),
    )
    shown = client.fine_tuning.jobs.retrieve(job.id).method.supervised.hyperparameters.model_extra
    # The best checkpoint becomes the model unless asked otherwise; no threshold is 0.
    assert (
        shown["early_stopping_patience"],
        shown["early_stopping_threshold"],
        shown["use_best_checkpoint"],
    ) == (3, 0.0, True)
    for knobs, words in (
        ({"early_stopping_patience": 2}, "early_stopping_patience needs a validation_file"),
        ({"use_best_checkpoint": True}, "use_best_checkpoint needs a validation_file"),
    ):
        with pytest.raises(openai.BadRequestError) as excinfo:
            client.fine_tuning.jobs.create(
                model="tiny-llama", training_file=training_file, method=_supervised(**knobs)
            )
        # Refused for what the document cannot say, naming the missing parameter.
        assert words in error_of(excinfo)["message"]
        assert error_of(excinfo)["param"] == "validation_file"
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.fine_tuning.jobs.create(
            model="tiny-llama",
            training_file=training_file,
            validation_file=training_file,
            method=_supervised(use_best_checkpoint=True),
            extra_body={"adapter": {"type": "full"}},
        )
    assert "needs an adapter (lora, qlora)" in error_of(excinfo)["message"]
    assert error_of(excinfo)["param"] == "hyperparameters"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"model": "no-such-model"}, "model"),
        ({"training_file": "file-0000000000000000000000000"}, "training_file"),
        ({"suffix": "x" * 65}, "suffix"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"extra_body": {"adapter": {"r": 12}}}, "adapter.r"),
        (
            {"method": _supervised(weight_decay=2)},
            "method.supervised.hyperparameters.weight_decay",
        ),
        (
            {"method": _supervised(lr_scheduler_type="step")},
            "method.supervised.hyperparameters.lr_scheduler_type",
        ),
        (
            {"method": {"type": "dpo", "dpo": {"hyperparameters": {"train_on_inputs": True}}}},
            "method.dpo.hyperparameters.train_on_inputs",
        ),
        (
            {"method": {"type": "dpo", "dpo": {"hyperparameters": {"packing": True}}}},
            "method.dpo.hyperparameters.packing",
        ),
        # vLLM serves no LoRA weights on the embeddings or the head: refused before training.
        ({"extra_body": {"adapter": {"target_modules": ["lm_head"]}}}, "adapter.target_modules"),
    ],
)
def test_invalid_job_requests_are_400_naming_the_param(api, training_file, kwargs, param):
    args = {"model": "tiny-llama", "training_file": training_file, **kwargs}
    with pytest.raises(openai.BadRequestError) as excinfo:
        api.client().fine_tuning.jobs.create(**args)
    assert error_of(excinfo)["param"] == param
    assert error_of(excinfo)["type"] == "invalid_request_error"


def test_dpo_file_for_sft_job_is_refused(api):
    client = api.client()
    dpo = client.files.create(file=("p.jsonl", io.BytesIO(dpo_file())), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=dpo.id)
    assert error_of(excinfo)["param"] == "training_file"
    assert "supervised" in error_of(excinfo)["message"]


def test_idempotency_key_returns_the_same_job(api, training_file):
    client = api.client()
    headers = {"Idempotency-Key": f"key-{training_file}"}
    first = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=training_file, extra_headers=headers
    )
    second = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=training_file, extra_headers=headers
    )
    assert first.id == second.id
    third = client.fine_tuning.jobs.create(model="tiny-llama", training_file=training_file)
    assert third.id != first.id
    # The same key with another request is refused, not answered with the first job.
    with pytest.raises(openai.ConflictError) as excinfo:
        client.fine_tuning.jobs.create(
            model="tiny-llama", training_file=training_file, suffix="other", extra_headers=headers
        )
    error = error_of(excinfo)
    assert error["code"] == "idempotency_key_reuse"
    assert first.id in error["message"]


@pytest.mark.cluster
def test_an_idempotency_key_creates_one_job_across_api_replicas(kube_api_server, tmp_path):
    """Two API replicas on one namespace, the same key sent to both at once, many times."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.harness.api import start_api

    own = ("KUBETUNE_DATA_DIR", "KUBETUNE_API__PORT", "KUBETUNE_API__API_KEYS_FILE")
    shared = {k: v for k, v in kube_api_server.env.items() if k not in own}
    replica = start_api(tmp_path / "replica", shared, "kubernetes")
    training_file = (
        kube_api_server.client()
        .files.create(file=("t.jsonl", io.BytesIO(chat_file(10))), purpose="fine-tune")
        .id
    )
    try:
        servers = [kube_api_server, replica] * 4
        headers = {"Idempotency-Key": f"race-{training_file}"}

        def create(server):
            client = server.client()
            return client.fine_tuning.jobs.create(
                model="tiny-llama", training_file=training_file, extra_headers=headers
            ).id

        with ThreadPoolExecutor(len(servers)) as pool:
            ids = set(pool.map(create, servers))
        assert len(ids) == 1
        backend = backend_of(kube_api_server)
        listed = backend.list("acme", after=None, limit=500).jobs
        assert [j.metadata.name for j in listed if j.metadata.name in ids] == list(ids)
        same_key = [
            j
            for j in listed
            if j.metadata.annotations.get("kubetune.io/idempotency-key")
            == headers["Idempotency-Key"]
        ]
        assert len(same_key) == 1
    finally:
        replica.stop()


def test_list_paginates_and_filters_by_metadata(api, training_file):
    client = api.client("globex")
    file_id = client.files.create(
        file=("t.jsonl", io.BytesIO(chat_file(10))), purpose="fine-tune"
    ).id
    ids = [
        client.fine_tuning.jobs.create(
            model="tiny-llama", training_file=file_id, metadata={"batch": "pages", "n": str(i)}
        ).id
        for i in range(5)
    ]
    raw = client.fine_tuning.jobs.with_raw_response.list(limit=2)
    validate("ListPaginatedFineTuningJobsResponse", raw.http_response.json())
    seen = [j.id for j in client.fine_tuning.jobs.list(limit=2)]  # auto-pagination
    assert [i for i in seen if i in ids] == sorted(ids, reverse=True)
    filtered = client.fine_tuning.jobs.list(metadata={"n": "3"})
    assert [j.id for j in filtered.data] == [ids[3]]


def test_cancel_pause_resume_and_conflicts(api, training_file):
    client = api.client()
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=training_file)

    with pytest.raises(openai.ConflictError) as excinfo:
        client.fine_tuning.jobs.resume(job.id)
    assert excinfo.value.response.headers["x-should-retry"] == "false"

    play_operator(api, job.id, phase="running", step=3, totalSteps=10)
    assert client.fine_tuning.jobs.pause(job.id).status == "pausing"
    play_operator(api, job.id, phase="paused", step=5, totalSteps=10)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.pause(job.id)
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"

    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    play_operator(api, job.id, phase="cancelled")
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.pause(job.id)


def test_token_counts_use_the_base_models_tokenizer(api, training_file, tiny_tokenizer):
    from tokenizers import Tokenizer

    from kubetune_runtime.datasets import per_text, validate_jsonl

    tokenizer = Tokenizer.from_file(str(tiny_tokenizer))
    expected = validate_jsonl(
        [chat_file(10)],
        count_tokens=per_text(lambda s: len(tokenizer.encode(s, add_special_tokens=False).ids)),
    ).n_tokens
    assert expected
    client = api.client()
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=training_file)
    events = client.fine_tuning.jobs.list_events(job.id, limit=10).data
    estimate = next(e for e in events if "tokens" in e.message)
    assert estimate.data["n_tokens"] == expected
    assert estimate.data["estimated_trained_tokens"] == expected * job.hyperparameters.n_epochs
    # A base model without a tokenizer configured gets no estimate rather than a wrong one.
    other = client.fine_tuning.jobs.create(model="tiny-llama-2", training_file=training_file)
    events = client.fine_tuning.jobs.list_events(other.id, limit=10).data
    assert not [e for e in events if "tokens" in e.message]


def test_events_newest_first_with_pagination(api, training_file):
    client = api.client()
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=training_file)
    client.fine_tuning.jobs.cancel(job.id)
    raw = client.fine_tuning.jobs.with_raw_response.list_events(job.id, limit=1)
    validate("ListFineTuningJobEventsResponse", raw.http_response.json())
    page = raw.parse()
    assert page.has_more
    assert page.data[0].message == "Fine-tuning job cancelled"
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1)]
    assert len(messages) == 4
    assert messages[0] == "Fine-tuning job cancelled"
    assert messages[1].startswith("Training file has 10 examples and ")
    assert messages[2:] == [
        f"Validating training file: {training_file}",
        f"Created fine-tuning job: {job.id}",
    ]


def test_checkpoints_results_file_and_models(api, training_file):
    client = api.client()
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=training_file, suffix="ckpt"
    )
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    checkpoints = [
        CheckpointRef(
            id=new_checkpoint_id(), step=s, created_at=now, metrics=Metrics(train_loss=1.0 / s)
        )
        for s in (5, 10)
    ]
    model_name = f"ft:tiny-llama:acme:ckpt:{job.id[-8:]}"
    play_operator(
        api,
        job.id,
        phase="succeeded",
        step=10,
        totalSteps=10,
        trainedTokens=1234,
        fineTunedModel=model_name,
        finishedAt=now.isoformat(),
        checkpoints=[c.model_dump(mode="json", by_alias=True) for c in checkpoints],
    )
    store = store_of(api)

    layout = settings_of(api).object_store.layout()
    csv = b"step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n1,2.0,0.1,,\n"
    store.put_bytes(layout.results_key("acme", job.id), csv)

    got = client.fine_tuning.jobs.retrieve(job.id)
    assert got.status == "succeeded"
    assert got.fine_tuned_model == model_name
    assert got.trained_tokens == 1234
    assert got.result_files == [results_file_id(job.id)]
    result = client.files.retrieve(got.result_files[0])
    assert result.purpose == "fine-tune-results"
    assert client.files.content(result.id).read() == csv

    raw = client.fine_tuning.jobs.checkpoints.with_raw_response.list(job.id)
    validate("ListFineTuningJobCheckpointsResponse", raw.http_response.json())
    listed = raw.parse().data
    assert [c.step_number for c in listed] == [10, 5]
    assert listed[0].fine_tuned_model_checkpoint == f"{model_name}:ckpt-step-10"

    models = client.models.with_raw_response.list()
    validate("ListModelsResponse", models.http_response.json())
    assert model_name in [m.id for m in models.parse().data]
    assert "tiny-llama" in [m.id for m in models.parse().data]
    assert client.models.retrieve(model_name).owned_by == "acme"

    # Another org can neither see nor delete it.
    with pytest.raises(openai.NotFoundError):
        api.client("globex").models.retrieve(model_name)
    with pytest.raises(openai.NotFoundError):
        api.client("globex").models.delete(model_name)
    with pytest.raises(openai.PermissionDeniedError):
        client.models.delete("tiny-llama")
    deleted = client.models.with_raw_response.delete(model_name)
    validate("DeleteModelResponse", deleted.http_response.json())
    # A deleted model cannot be continued either.
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.fine_tuning.jobs.create(model=model_name, training_file=training_file)
    assert (error_of(excinfo)["code"], error_of(excinfo)["param"]) == (
        "model_not_available",
        "model",
    )
    assert model_name not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(model_name)
    assert (
        backend_of(api).get("acme", job.id).metadata.annotations["kubetune.io/model-deleted"]
        == "true"
    )


def _succeed_with_checkpoints(api, job_id, model_name, steps):
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    checkpoints = [CheckpointRef(id=new_checkpoint_id(), step=s, created_at=now) for s in steps]
    play_operator(
        api,
        job_id,
        phase="succeeded",
        step=steps[-1],
        totalSteps=steps[-1],
        fineTunedModel=model_name,
        finishedAt=now.isoformat(),
        checkpoints=[c.model_dump(mode="json", by_alias=True) for c in checkpoints],
    )


def test_an_ft_model_or_its_checkpoint_is_continued(api, training_file):
    client = api.client()
    source = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=training_file,
        suffix="first",
        extra_body={"adapter": {"r": 8, "alpha": 16}},
    )
    model_name = f"ft:tiny-llama:acme:first:{source.id[-8:]}"
    _succeed_with_checkpoints(api, source.id, model_name, [5, 10])

    continued = client.fine_tuning.jobs.create(
        model=model_name, training_file=training_file, suffix="second"
    )
    assert continued.model == model_name  # what was asked, as OpenAI shows it
    assert continued.model_extra["adapter"]["r"] == 8  # the source's adapter, continued
    spec = backend_of(api).get("acme", continued.id).spec
    assert (spec.continue_from.job, spec.continue_from.step) == (source.id, None)
    assert spec.base_model == "tiny-llama"
    from_checkpoint = client.fine_tuning.jobs.create(
        model=f"{model_name}:ckpt-step-5", training_file=training_file
    )
    spec = backend_of(api).get("acme", from_checkpoint.id).spec
    assert (spec.continue_from.job, spec.continue_from.step) == (source.id, 5)

    refused: list[tuple[Any, dict[str, Any], str | None]] = [
        # A checkpoint the job did not keep.
        (client, {"model": f"{model_name}:ckpt-step-7"}, "model_not_available"),
        # Another org's model does not exist for this one.
        (api.client("globex"), {"model": model_name}, "model_not_available"),
        # The adapter is the source's: another shape would not be the same adapter.
        (client, {"model": model_name, "extra_body": {"adapter": {"r": 16}}}, None),
    ]
    for caller, kwargs, code in refused:
        with pytest.raises(openai.BadRequestError) as excinfo:
            caller.fine_tuning.jobs.create(training_file=training_file, **kwargs)
        error = error_of(excinfo)
        assert error["param"] == ("adapter" if code is None else "model")
        if code is not None:
            assert error["code"] == code
    # The refusal of a checkpoint not kept names those that are.
    assert f"{model_name}:ckpt-step-5, {model_name}:ckpt-step-10" in error_message(
        lambda: client.fine_tuning.jobs.create(
            model=f"{model_name}:ckpt-step-7", training_file=training_file
        )
    )


def _store_weights(api, org, job_id, step, files):
    """Store a model's files and then its manifest, as the trainer commits them."""
    store, layout = store_of(api), settings_of(api).object_store.layout()
    prefix = layout.model_prefix(org, job_id, step)
    for name, data in files.items():
        store.put_bytes(prefix + name, data)
    store.put_bytes(layout.model_manifest_key(org, job_id, step), b'{"files": {}}')


def _download(api, model, org="acme", **params):
    http = api.client(org)._client
    return http.get(
        f"{api.base_url}/v1/models/{model}/content",
        params=params,
        headers={"Authorization": f"Bearer {api.keys[org]}"},
    )


def _members(response):
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:") as archive:
        files = {m.name: archive.extractfile(m) for m in archive.getmembers()}
        return {name: file.read() for name, file in files.items() if file is not None}


def test_a_model_and_its_checkpoints_download_as_tar_archives(api, training_file):
    client = api.client()
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=training_file, suffix="dl"
    )
    model = f"ft:tiny-llama:acme:dl:{job.id[-8:]}"
    _succeed_with_checkpoints(api, job.id, model, [5, 10])
    # Sizes that are not whole 512-byte blocks: the archive pads them.
    weights = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": os.urandom(70_001)}
    _store_weights(api, "acme", job.id, None, weights)
    resume_only = {"optimizer.pt": b"o" * 999, "rng_state.pth": b"r", "trainer_state.json": b"{}"}
    _store_weights(api, "acme", job.id, 5, {**weights, **resume_only})

    folder = f"ft-tiny-llama-acme-dl-{job.id[-8:]}"
    for name, wanted_folder in ((model, folder), (f"{model}:ckpt-step-5", f"{folder}-ckpt-step-5")):
        response = _download(api, name)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/x-tar"
        assert int(response.headers["content-length"]) == len(response.content)
        assert f'filename="{wanted_folder}.tar"' in response.headers["content-disposition"]
        members = _members(response)
        # The adapter's files, then the manifest; never a checkpoint's optimizer state.
        assert list(members) == [
            f"{wanted_folder}/adapter_config.json",
            f"{wanted_folder}/adapter_model.safetensors",
            f"{wanted_folder}/manifest.json",
        ]
        assert (
            members[f"{wanted_folder}/adapter_model.safetensors"]
            == weights["adapter_model.safetensors"]
        )

    refused = [
        # Another org's model does not exist for this one.
        ({"model": model, "org": "globex"}, 404, "model", "model_not_found"),
        # A checkpoint the job does not keep; one it keeps whose weights are gone.
        ({"model": f"{model}:ckpt-step-7"}, 404, "model", "model_not_found"),
        ({"model": f"{model}:ckpt-step-10"}, 404, "model", "model_not_found"),
        # A base model's weights are not the API's to hand out.
        ({"model": "tiny-llama"}, 400, "model", "model_not_downloadable"),
        # An unknown format is a validation error (merged LoRA models: the next test).
        ({"model": model, "format": "gguf"}, 400, "format", None),
    ]
    for kwargs, status, param, code in refused:
        response = _download(api, **kwargs)
        assert response.status_code == status, (kwargs, response.text)
        error = response.json()["error"]
        assert error["param"] == param, error
        if code is not None:
            assert error["code"] == code, error
    assert "ckpt-step-5, " in _download(api, f"{model}:ckpt-step-7").json()["error"]["message"]


def test_a_lora_model_downloads_merged_once_its_job_driver_merged_it(api, training_file):
    client = api.client()
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=training_file, suffix="mg"
    )
    model = f"ft:tiny-llama:acme:mg:{job.id[-8:]}"
    _succeed_with_checkpoints(api, job.id, model, [5, 10])
    adapter = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": b"a" * 999}
    for step in (None, 5):
        _store_weights(api, "acme", job.id, step, adapter)
    backend = backend_of(api)
    # Asked for: the job driver is asked to merge, and the client to come back.
    for _ in range(2):
        response = _download(api, model, format="merged")
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "5"
        assert response.json()["error"]["code"] == "model_merging"
    assert backend.get("acme", job.id).metadata.annotations["kubetune.io/merge-final"] == (
        "requested"
    )
    # Merged (as kubetune_trainer.merge publishes it: the manifest last): the whole model.
    store, layout = store_of(api), settings_of(api).object_store.layout()
    merged = {"config.json": b"{}", "model.safetensors": os.urandom(5000)}
    for name, data in merged.items():
        store.put_bytes(layout.merged_prefix("acme", job.id) + name, data)
    store.put_bytes(layout.merged_manifest_key("acme", job.id), b'{"kind": "merged"}')
    response = _download(api, model, format="merged")
    assert response.status_code == 200, response.text
    folder = f"ft-tiny-llama-acme-mg-{job.id[-8:]}"
    members = _members(response)
    assert list(members) == [f"{folder}/{n}" for n in (*merged, "manifest.json")]
    assert members[f"{folder}/model.safetensors"] == merged["model.safetensors"]
    # Another org still has no such model, merged or not.
    assert _download(api, model, org="globex", format="merged").status_code == 404

    # A merge that failed is told once, with the reason; asking again merges again.
    checkpoint = f"{model}:ckpt-step-5"
    backend.annotate("acme", job.id, {"kubetune.io/merge-step-5": "failed: out of memory"})
    error = _download(api, checkpoint, format="merged").json()["error"]
    assert (error["code"], error["param"]) == ("merge_failed", "model")
    assert "out of memory" in error["message"]
    assert _download(api, checkpoint, format="merged").status_code == 503
    annotations = backend.get("acme", job.id).metadata.annotations
    assert annotations["kubetune.io/merge-step-5"] == "requested"


def error_message(call):
    with pytest.raises(openai.BadRequestError) as excinfo:
        call()
    return error_of(excinfo)["message"]


def test_async_client(api, training_file):
    async def scenario() -> list[str]:
        client = api.async_client()
        jobs = await asyncio.gather(
            *[
                client.fine_tuning.jobs.create(model="tiny-llama", training_file=training_file)
                for _ in range(3)
            ]
        )
        fetched = await asyncio.gather(*[client.fine_tuning.jobs.retrieve(j.id) for j in jobs])
        await client.close()
        return [j.id for j in fetched]

    ids = asyncio.run(scenario())
    assert len(set(ids)) == 3


def test_tenants_never_see_each_other(api, training_file):
    acme, globex = api.client("acme"), api.client("globex")
    job = acme.fine_tuning.jobs.create(model="tiny-llama", training_file=training_file)
    calls = [
        lambda: globex.files.retrieve(training_file),
        lambda: globex.files.content(training_file).read(),
        lambda: globex.files.delete(training_file),
        lambda: globex.fine_tuning.jobs.retrieve(job.id),
        lambda: globex.fine_tuning.jobs.cancel(job.id),
        lambda: globex.fine_tuning.jobs.pause(job.id),
        lambda: globex.fine_tuning.jobs.resume(job.id),
        lambda: globex.fine_tuning.jobs.list_events(job.id),
        lambda: globex.fine_tuning.jobs.checkpoints.list(job.id),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError):
            call()
    assert job.id not in [j.id for j in globex.fine_tuning.jobs.list(limit=100).data]
    assert training_file not in [f.id for f in globex.files.list().data]
    with pytest.raises(openai.BadRequestError) as excinfo:
        globex.fine_tuning.jobs.create(model="tiny-llama", training_file=training_file)
    assert error_of(excinfo)["param"] == "training_file"
    # And acme still has everything.
    assert acme.fine_tuning.jobs.retrieve(job.id).status == "validating_files"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/files", "GET, POST"),
        ("DELETE", "/v1/fine_tuning/jobs", "GET, POST"),
        ("POST", "/v1/models/tiny-llama", "DELETE, GET"),
    ],
)
def test_a_405_allows_every_method_the_path_has(api, method, path, allowed):
    http = api.client()._client  # the SDK's own HTTP client: its responses are checked too
    auth = {"Authorization": f"Bearer {api.keys['acme']}"}
    response = http.request(method, f"{api.base_url}{path}", headers=auth)
    assert response.status_code == 405
    assert response.headers["allow"] == allowed
    assert response.json()["error"]["type"] == "invalid_request_error"
