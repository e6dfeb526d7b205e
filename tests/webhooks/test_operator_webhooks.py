"""The operator sends one signed webhook per terminal job: real apiserver, S3, operator process,
the real tiny trainer, and loopback receivers that verify with ``standardwebhooks``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from kubetune.finetunejob import JobPhase
from kubetune.ids import new_file_id
from kubetune.settings import WebhookSettings
from kubetune_runtime.faults import FAULT_ENV
from kubetune_runtime.webhooks import OutboxEntry, create_endpoint, new_secret
from tests.harness.kube import KubeCluster
from tests.operator.conftest import (
    ORG,
    Testbed,
    make_peered_testbed,
    make_testbed,
    peered_operators,
    tiny_model,
    wait_resumed,
)
from tests.webhooks.receiver import Receiver

__all__ = ["make_testbed", "tiny_model"]  # the operator tests' fixtures, used here


# Loopback receivers over http: the operator must accept them (production refuses both).
LOOPBACK = WebhookSettings(allow_insecure_targets=True, allow_private_targets=True)


def operator_webhook_env(poll_seconds: str, **more: str) -> dict[str, str]:
    """The operator's webhook settings for loopback receivers, polling its outbox often."""
    env = {
        "KUBETUNE_WEBHOOKS__ALLOW_INSECURE_TARGETS": "true",
        "KUBETUNE_WEBHOOKS__ALLOW_PRIVATE_TARGETS": "true",
        "KUBETUNE_WEBHOOKS__POLL_SECONDS": poll_seconds,
    }
    env.update({f"KUBETUNE_WEBHOOKS__{k.upper()}": v for k, v in more.items()})
    return env


def test_each_terminal_job_gets_exactly_one_signed_event_per_endpoint(
    make_testbed: Callable[..., Testbed],
) -> None:
    registered = Receiver(new_secret()).start()
    configured = Receiver(new_secret()).start()
    for r in (registered, configured):
        r.stop()  # down at first: the operator's sender has to retry
    testbed = make_testbed(start_operator=False)
    static = [{"org": ORG, "url": configured.url, "secret": configured.secret}]
    testbed.operator.env.update(
        operator_webhook_env(
            "0.2",
            backoff_base_seconds="0.2",
            backoff_cap_seconds="1",
            endpoints=json.dumps(static),
        )
    )
    create_endpoint(
        testbed.store, testbed.layout, ORG, registered.url, LOOPBACK, secret=registered.secret
    )
    testbed.operator.start()
    try:
        failed = testbed.apply(testbed.manifest(new_file_id()))  # no such file: fails at once
        succeeded = testbed.submit()
        cancelled = testbed.submit()
        testbed.patch_spec(cancelled, cancel=True)
        testbed.wait_phase(failed, JobPhase.FAILED, timeout=60)
        testbed.wait_phase(cancelled, JobPhase.CANCELLED, timeout=60)

        def retried() -> bool:
            prefix = testbed.layout.webhook_outbox_prefix()
            entries = [
                OutboxEntry.model_validate(testbed.store.get_json(i.key))
                for i in testbed.store.list(prefix)
            ]
            return len(entries) >= 4 and all(e.attempts >= 2 for e in entries)

        testbed.wait(retried, "deliveries retried during the outage", timeout=60)
        for r in (registered, configured):
            r.start()
        testbed.wait_phase(succeeded, JobPhase.SUCCEEDED)
        expected = {
            failed: "fine_tuning.job.failed",
            succeeded: "fine_tuning.job.succeeded",
            cancelled: "fine_tuning.job.cancelled",
        }
        for r in (registered, configured):
            r.wait_for(lambda r: len(r.deliveries) >= len(expected), timeout=60)
        # A restarted operator replays nothing.
        testbed.operator.stop()
        testbed.operator.start()
        time.sleep(3)
    finally:
        testbed.operator.stop()
        for r in (registered, configured):
            r.stop()
    for r in (registered, configured):
        assert r.rejected == []
        events = r.events()
        assert Counter(e["data"]["id"] for e in events) == Counter(expected.keys())
        assert {e["data"]["id"]: e["type"] for e in events} == expected
        assert len({d.webhook_id for d in r.deliveries}) == len(expected)


def test_an_operator_killed_before_queueing_the_event_sends_it_after_restart(
    make_testbed: Callable[..., Testbed],
) -> None:
    receiver = Receiver(new_secret()).start()
    testbed = make_testbed(start_operator=False)
    testbed.operator.env.update(operator_webhook_env("0.2"))
    create_endpoint(
        testbed.store, testbed.layout, ORG, receiver.url, LOOPBACK, secret=receiver.secret
    )
    # The terminal phase is written, then the process dies before the event is queued.
    testbed.operator.start(env={FAULT_ENV: "before-webhook-announce"})
    try:
        failed = testbed.apply(testbed.manifest(new_file_id()))  # no such file: fails at once
        testbed.wait_phase(failed, JobPhase.FAILED, timeout=60)
        testbed.wait(lambda: testbed.operator.returncode == 137, "the operator to die at the fault")
        testbed.operator.stop()
        assert receiver.deliveries == []
        testbed.operator.start()
        receiver.wait_for(lambda r: len(r.deliveries) >= 1, timeout=60)
        time.sleep(2)  # nothing more arrives
    finally:
        testbed.operator.stop()
        receiver.stop()
    assert receiver.rejected == []
    assert [(e["data"]["id"], e["type"]) for e in receiver.events()] == [
        (failed, "fine_tuning.job.failed")
    ]


def test_of_two_peered_operators_only_the_active_one_sends(
    kube: KubeCluster, make_testbed: Callable[..., Testbed], tmp_path: Path
) -> None:
    # A slow receiver: a second sender polling meanwhile would POST the same message too.
    receiver = Receiver(new_secret(), delay=1.0).start()
    testbed = make_peered_testbed(make_testbed)
    testbed.operator.env.update(operator_webhook_env("0.1"))
    create_endpoint(
        testbed.store, testbed.layout, ORG, receiver.url, LOOPBACK, secret=receiver.secret
    )
    try:
        with peered_operators(testbed, kube, tmp_path) as (leader, follower):
            first = testbed.apply(testbed.manifest(new_file_id()))  # no such file: fails at once
            testbed.wait_phase(first, JobPhase.FAILED, timeout=60)
            receiver.wait_for(lambda r: len(r.deliveries) >= 1, timeout=60)
            time.sleep(2)  # a second sender, polling every 0.1 s, would have posted it by now
            # The leader leaves; the follower resumes and sends the next job's event.
            leader.stop()
            wait_resumed(testbed, follower)
            second = testbed.apply(testbed.manifest(new_file_id()))
            testbed.wait_phase(second, JobPhase.FAILED, timeout=60)
            receiver.wait_for(lambda r: len(r.deliveries) >= 2, timeout=60)
            time.sleep(2)
    finally:
        receiver.stop()
    assert receiver.rejected == []
    assert len(receiver.deliveries) == 2
    assert [(e["data"]["id"], e["type"]) for e in receiver.events()] == [
        (first, "fine_tuning.job.failed"),
        (second, "fine_tuning.job.failed"),
    ]
