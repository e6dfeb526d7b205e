"""Issue 7, serving: adapters of succeeded jobs are loaded on every ready vLLM replica of their
base model, replicas that start later catch up, deleting the model unloads it everywhere, and
an adapter vLLM cannot serve is a clear error on the job and in an Event.

Real parts only: the operator as a process against the real apiserver, the real trainer, S3
(moto's server), real vLLM servers on CPU and the adapter-sync sidecar as a process beside each.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kubetune.finetunejob import ANNOTATION_MODEL_DELETED, JobPhase, checkpoint_used_annotation
from kubetune.storage_layout import ADAPTER_FILES
from tests.harness.api import ADMIN, ApiServer
from tests.harness.kube import KubeCluster
from tests.harness.vllm import VllmServer
from tests.operator.conftest import (
    ORG,
    Testbed,
    jsonl,
    make_peered_testbed,
    peered_operators,
    sft_rows,
)
from tests.serving.conftest import (
    CHECKPOINT_SLOTS,
    MAX_LORA_RANK,
    SYNC_SECONDS,
    VLLM_API_KEY,
    Sidecar,
    complete,
    serving_testbed,
    sidecar_ready,
    start_replica,
)
from tests.trainer.tiny import question

pytestmark = [pytest.mark.xdist_group("vllm"), pytest.mark.timeout(900)]

SERVE_TIMEOUT = 120.0
TRAIN_TIMEOUT = 400.0
# One node (two cores are shared with two vLLM servers), a strong learning rate: a completion
# through the adapter must differ from the base model's.
JOB_SPEC: dict[str, Any] = {
    "resources": {"nodes": 1, "gpusPerNode": 0},
    "hyperparameters": {"nEpochs": 2, "batchSize": 4, "learningRateMultiplier": 10.0},
    "checkpointing": {"everySteps": 6, "keep": 2},  # 12 steps: checkpoints 6 and 12 kept
}


def submit(testbed: Testbed, rank: int) -> str:
    """A job that trains a LoRA adapter of ``rank`` on 24 examples."""
    manifest = testbed.manifest(
        testbed.upload(jsonl(sft_rows(24))),
        adapter={"type": "lora", "r": rank, "alpha": 2 * rank},
        **json.loads(json.dumps(JOB_SPEC)),
    )
    return testbed.apply(manifest)


def served_on(testbed: Testbed, name: str) -> list[str]:
    """The job's status.servedOn."""
    return list(testbed.status(name).served_on)


def condition(testbed: Testbed, name: str, type_: str) -> Any:
    """One condition of the job's status, or None."""
    return next((c for c in testbed.status(name).conditions if c.type == type_), None)


def metric(text: str, name: str, **labels: str) -> float | None:
    """One sample's value from a /metrics page."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_adapter_is_served_on_every_replica_and_unloaded_when_the_model_is_deleted(
    make_testbed: Callable[..., Testbed],
    start_sidecar: Callable[[VllmServer, str], Sidecar],
    vllm_a: VllmServer,
    tiny_model: Path,
    tmp_path: Path,
    serving_api: ApiServer,
) -> None:
    testbed = serving_testbed(make_testbed)
    sidecar_a = start_sidecar(vllm_a, "a")
    start_replica(testbed, "vllm-a", sidecar_a)

    name = submit(testbed, rank=8)
    status = testbed.wait_phase(name, JobPhase.SUCCEEDED, timeout=TRAIN_TIMEOUT)
    model = status.fine_tuned_model
    assert model is not None
    assert model.startswith("ft:")
    testbed.wait(lambda: served_on(testbed, name) == ["vllm-a"], "served on vllm-a", SERVE_TIMEOUT)
    assert model in vllm_a.adapters()
    assert (sidecar_a.adapter_dir / model / "adapter_config.json").exists()
    # vLLM's metrics, on the sidecar's metrics port (what Prometheus scrapes), and nothing else.
    relay = f"http://127.0.0.1:{sidecar_a.metrics_port}"
    scraped = httpx.get(f"{relay}/metrics", timeout=30)
    assert scraped.status_code == 200
    assert "vllm:num_requests_running" in scraped.text
    assert httpx.get(f"{relay}/adapters", timeout=30).status_code == 404

    # A replica started after the job succeeded catches up.
    vllm_b = VllmServer.start(
        tiny_model, vllm_a.launch.served_model_name, tmp_path, api_key=VLLM_API_KEY
    )
    try:
        assert vllm_b.adapters() == set()
        # Without the key, nothing else on the network may load an adapter into vLLM.
        refused = httpx.post(
            f"{vllm_b.base_url}/v1/load_lora_adapter",
            json={"lora_name": model, "lora_path": str(sidecar_a.adapter_dir / model)},
            timeout=30,
        )
        assert refused.status_code == 401
        sidecar_b = start_sidecar(vllm_b, "b")
        assert not sidecar_ready(sidecar_b)  # no push yet: the pod would not take traffic
        start_replica(testbed, "vllm-b", sidecar_b)
        # The pod turned Ready (its Service sends it requests) holding the adapter already.
        assert model in vllm_b.adapters()
        testbed.wait(
            lambda: served_on(testbed, name) == ["vllm-a", "vllm-b"],
            "served on both replicas",
            SERVE_TIMEOUT,
        )
        assert model in vllm_a.adapters()
        assert model in vllm_b.adapters()
        served = condition(testbed, name, "Served")
        assert served.status == "True"
        assert "2 of 2" in served.message
        stored = json.loads((sidecar_b.adapter_dir / model / "adapter_config.json").read_text())
        assert stored["base_model_name_or_path"] == str(tiny_model)  # vLLM's --model

        # The adapter the job trained answers differently from the base model, on both.
        prompt = question("apple")
        for vllm in (vllm_a, vllm_b):
            base = complete(vllm, vllm.launch.served_model_name, prompt)
            tuned = complete(vllm, model, prompt)
            assert tuned != base, (base, tuned)
        assert complete(vllm_a, model, prompt) == complete(vllm_b, model, prompt)

        page = testbed.operator.metrics()
        for replica in ("vllm-a", "vllm-b"):
            assert metric(page, "kubetune_operator_adapters_loaded", replica=replica) == 1
        assert metric(page, "kubetune_operator_adapter_registrations_total", result="success") == 2
        assert metric(page, "kubetune_operator_adapter_registration_seconds_count") == 2
        kinds = {e.reason: e.type for e in testbed.kube_events(name)}
        assert kinds.get("Served") == "Normal"

        use_checkpoints_on_demand(
            serving_api, testbed, name, model, (vllm_a, vllm_b), (sidecar_a, sidecar_b)
        )
        download_and_account(serving_api, testbed, name, model)

        # vLLM crashes and its container restarts empty: the next push loads the adapter again.
        vllm_b.crash_and_restart()
        testbed.wait(lambda: model in vllm_b.adapters(), "reloaded after a crash", SERVE_TIMEOUT)
        assert complete(vllm_b, model, prompt) == complete(vllm_a, model, prompt)

        # Deleting the model (what DELETE /v1/models/{id} does) unloads it from both.
        testbed.kubectl(
            "annotate", "finetunejob", name, "-n", testbed.namespace,
            f"{ANNOTATION_MODEL_DELETED}=true",
        )  # fmt: skip
        testbed.wait(
            lambda: not vllm_a.adapters() and not vllm_b.adapters(),
            "unloaded from both replicas",
            SERVE_TIMEOUT,
        )
        testbed.wait(lambda: served_on(testbed, name) == [], "servedOn emptied", SERVE_TIMEOUT)
        assert condition(testbed, name, "Served").reason == "ModelDeleted"
        assert not (sidecar_a.adapter_dir / model).exists()
        assert not (sidecar_b.adapter_dir / model).exists()
        time.sleep(3 * float(SYNC_SECONDS))  # a few periodic syncs later it stays unloaded
        assert not vllm_a.adapters()
        assert not vllm_b.adapters()
    finally:
        vllm_b.stop()


def use_checkpoints_on_demand(
    api: ApiServer,
    testbed: Testbed,
    name: str,
    model: str,
    replicas: tuple[VllmServer, ...],
    sidecars: tuple[Sidecar, ...],
) -> None:
    """Chat with a checkpoint's model through the API (the official SDK): the API records the
    use on the job, the operator has every replica load it — the adapter's files only, not the
    optimizer state — and the request answers once it is served; with one slot, the next
    checkpoint asked for evicts the least recently used one everywhere. Another org's key
    finds no such model.
    """
    assert CHECKPOINT_SLOTS == 1
    client = api.client(ORG)
    first, second = f"{model}:ckpt-step-6", f"{model}:ckpt-step-12"
    prompt = question("apple")
    for checkpoint in (first, second):
        messages = [{"role": "user", "content": prompt}]
        reply = client.chat.completions.create(model=checkpoint, messages=messages, max_tokens=4)
        assert reply.model == checkpoint  # vLLM answered with that LoRA adapter
        wanted = {model, checkpoint}
        testbed.wait(
            lambda: all(v.adapters() == wanted for v in replicas),  # noqa: B023 - waited here
            f"{checkpoint} served alone beside the final model",
            SERVE_TIMEOUT,
        )
        for sidecar in sidecars:
            folder = sidecar.adapter_dir / checkpoint
            assert sorted(p.name for p in folder.iterdir()) == sorted(ADAPTER_FILES)
            assert not (sidecar.adapter_dir / first).exists() or checkpoint == first
        answers = {complete(v, checkpoint, prompt) for v in replicas}
        assert len(answers) == 1, answers  # the same weights on every replica
    used = testbed.job(name)["metadata"]["annotations"]
    assert {checkpoint_used_annotation(6), checkpoint_used_annotation(12)} <= set(used)
    assert served_on(testbed, name) == ["vllm-a", "vllm-b"]  # the final model is untouched
    with pytest.raises(openai.NotFoundError):
        api.client("globex").chat.completions.create(
            model=second, messages=[{"role": "user", "content": prompt}]
        )


def download_and_account(api: ApiServer, testbed: Testbed, name: str, model: str) -> None:
    """The trained weights download through the API as the trainer published them, and the
    org's usage shows the job with what its status says.
    """
    http = api.client(ORG)._client
    auth = {"Authorization": f"Bearer {api.keys[ORG]}"}
    for wanted in (model, f"{model}:ckpt-step-6"):
        response = http.get(f"{api.base_url}/v1/models/{wanted}/content", headers=auth)
        assert response.status_code == 200, response.text
        with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
            files = {Path(n).name: archive.extractfile(n) for n in archive.getnames()}
        manifest = json.loads(files.pop("manifest.json").read())  # type: ignore[union-attr]
        assert set(ADAPTER_FILES) <= set(files)
        for file_name, reader in files.items():
            digest = hashlib.sha256(reader.read()).hexdigest()  # type: ignore[union-attr]
            assert manifest["files"][file_name] == digest

    status = testbed.status(name)
    assert status.finished_at is not None
    day = int(status.finished_at.timestamp()) // 86400 * 86400
    admin = {"Authorization": f"Bearer {api.keys[f'{ORG}{ADMIN}']}"}
    page = http.get(
        f"{api.base_url}/v1/organization/usage/fine_tuning",
        params={"start_time": day, "end_time": day + 86400},
        headers=admin,
    ).json()
    (result,) = page["data"][0]["results"]
    assert result["jobs_succeeded"] >= 1
    assert result["trained_tokens"] >= status.trained_tokens > 0
    # The usage page shows milliseconds.
    assert result["run_seconds"] >= round(status.run_seconds, 3) > 0


def test_an_adapter_above_max_lora_rank_is_a_clear_error_on_the_job_and_in_an_event(
    make_testbed: Callable[..., Testbed],
    start_sidecar: Callable[[VllmServer, str], Sidecar],
    vllm_a: VllmServer,
) -> None:
    testbed = serving_testbed(make_testbed)
    sidecar = start_sidecar(vllm_a, "a")
    start_replica(testbed, "vllm-a", sidecar)

    name = submit(testbed, rank=2 * MAX_LORA_RANK)
    testbed.wait_phase(name, JobPhase.SUCCEEDED, timeout=TRAIN_TIMEOUT)

    error = testbed.wait(
        lambda: testbed.status(name).serving_error, "a serving error", SERVE_TIMEOUT
    )
    assert error.code == "adapter_rank_too_large"
    assert error.param == "adapter.r"
    assert error.kind == "user"
    assert "rank 32" in error.message
    assert "--max-lora-rank 16" in error.message
    served = condition(testbed, name, "Served")
    assert served.status == "False"
    assert served.reason == "AdapterRejected"
    assert "rank 32" in served.message
    assert testbed.status(name).phase is JobPhase.SUCCEEDED  # the training itself succeeded
    assert served_on(testbed, name) == []

    def warnings() -> list[Any]:
        return [e for e in testbed.kube_events(name) if e.reason == "AdapterRejected"]

    testbed.wait(warnings, "the AdapterRejected event", 30)
    time.sleep(3 * float(SYNC_SECONDS))  # several periodic syncs later: still reported once
    (event,) = warnings()
    assert event.type == "Warning"
    assert "rank 32" in event.message
    model = testbed.status(name).fine_tuned_model
    assert model not in vllm_a.adapters()
    assert not any(sidecar.adapter_dir.iterdir())  # nothing left for vLLM's resolver
    page = testbed.operator.metrics()
    assert metric(page, "kubetune_operator_adapter_registrations_total", result="failure") == 1


def test_with_peering_the_active_operator_serves_and_the_next_one_takes_over(
    kube: KubeCluster,
    make_testbed: Callable[..., Testbed],
    start_sidecar: Callable[[VllmServer, str], Sidecar],
    vllm_a: VllmServer,
    tmp_path: Path,
) -> None:
    testbed = make_peered_testbed(make_testbed)
    testbed.operator.env["KUBETUNE_SERVING__SYNC_SECONDS"] = SYNC_SECONDS
    with peered_operators(testbed, kube, tmp_path) as (leader, follower):
        start_replica(testbed, "vllm-a", start_sidecar(vllm_a, "a"))
        name = submit(testbed, rank=8)
        testbed.wait_phase(name, JobPhase.SUCCEEDED, timeout=TRAIN_TIMEOUT)
        testbed.wait(lambda: served_on(testbed, name) == ["vllm-a"], "served", SERVE_TIMEOUT)
        time.sleep(2 * float(SYNC_SECONDS))  # several sync periods
        # Only the active replica pushes: the paused one never saw the replica's adapters.
        loaded = "kubetune_operator_adapters_loaded"
        assert metric(leader.metrics(), loaded, replica="vllm-a") == 1
        assert not metric(follower.metrics(), loaded, replica="vllm-a")

        # The leader leaves: the follower takes over the sync and keeps the model served.
        leader.stop()
        testbed.wait(
            lambda: metric(follower.metrics(), loaded, replica="vllm-a") == 1,
            "the follower to sync the replica",
            timeout=SERVE_TIMEOUT,
        )
        model = testbed.status(name).fine_tuned_model
        assert model in vllm_a.adapters()
        testbed.kubectl(
            "annotate", "finetunejob", name, "-n", testbed.namespace,
            f"{ANNOTATION_MODEL_DELETED}=true",
        )  # fmt: skip
        testbed.wait(
            lambda: model not in vllm_a.adapters(),
            "the follower to unload the deleted model",
            SERVE_TIMEOUT,
        )
