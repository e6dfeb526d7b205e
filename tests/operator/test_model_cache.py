"""A base model in the object store with a volume claim: the trainers download its weights into
the claim once, and a restarted trainer (or the next job) reads them from there instead of
downloading them again. On the TrainJob runtime, with a real preemption restart.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from kubetune.finetunejob import JobPhase
from kubetune.trainer_config import MODEL_CACHE_DIR
from kubetune.trainer_events import TrainerEventKind, event_kind
from tests.operator.conftest import CONTEXT_LENGTH, MODEL, PLANNED_STEPS, Testbed

CLAIM = "model-cache"
DOWNLOADING = "downloading from the object store"
CACHED = "not downloaded again"


def pod_logs(testbed: Testbed, name: str) -> list[list[str]]:
    """Each node pod's logs, one text per start."""
    return [
        [path.read_text(errors="replace") for path in pod.logs]
        for pod in testbed.trainers.pods(name)
    ]


def test_store_weights_are_downloaded_into_the_claim_once(make_testbed, tiny_model: Path) -> None:
    catalogue = [
        {
            "id": MODEL,
            "path": "store:models/tiny-llama",
            "volume_claim": CLAIM,
            "context_length": CONTEXT_LENGTH,
        }
    ]
    testbed: Testbed = make_testbed(
        runtime="trainjob", env={"KUBETUNE_MODELS": json.dumps(catalogue)}
    )
    testbed.store.upload_dir(tiny_model, "models/tiny-llama")
    pvc: dict[str, Any] = {
        "metadata": {"name": CLAIM},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": "10Gi"}},
        },
    }
    testbed.core.create_namespaced_persistent_volume_claim(testbed.namespace, pvc)

    name = testbed.submit(checkpointing={"everySteps": 1, "keep": 2})
    (template,) = testbed.pod_templates(name)
    volume = next(v for v in template["spec"]["volumes"] if "persistentVolumeClaim" in v)
    assert volume["persistentVolumeClaim"] == {"claimName": CLAIM, "readOnly": False}
    (trainer,) = template["spec"]["containers"]
    assert {"name": volume["name"], "mountPath": MODEL_CACHE_DIR, "readOnly": False} in (
        trainer["volumeMounts"]
    )

    testbed.wait(
        lambda: [
            e for e in testbed.job_events(name) if event_kind(e) is TrainerEventKind.CHECKPOINT
        ],
        "a checkpoint",
    )
    testbed.trainers.signal(name, 1, signal.SIGTERM)  # a spot node reclaimed: every pod restarts
    status = testbed.wait_phase(name, JobPhase.SUCCEEDED)
    assert status.step == PLANNED_STEPS
    assert status.restarts == 1

    logs = pod_logs(testbed, name)
    assert [len(starts) for starts in logs] == [2, 2]
    first_runs = "".join(starts[0] for starts in logs)
    assert DOWNLOADING in first_runs  # the cache was empty
    for starts in logs:
        restarted = starts[1]
        assert CACHED in restarted
        assert DOWNLOADING not in restarted
    cached = testbed.trainers.kubelet.claims_dir / CLAIM
    (folder,) = [p for p in cached.iterdir() if not p.name.startswith(".")]
    assert (folder / "config.json").is_file()
    assert not [p for p in cached.iterdir() if p.name.endswith(".partial")]
