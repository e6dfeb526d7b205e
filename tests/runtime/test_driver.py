"""The job driver's own decisions, pass by pass, with a scripted runtime plugin (no trainer): what
the end-to-end lifecycle suite (tests/lifecycle) cannot see from outside — when the event log is
read, what the runtime is asked, a lost config, a conflicting write, the order of a success.

The object store is the real local one; the runtime and the job store are the protocol's
smallest implementations, recording what they are asked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from kubetune.events import JobEvent, read_events, write_control_events
from kubetune.finetunejob import (
    ConditionStatus,
    ConditionType,
    ErrorKind,
    FineTuneJob,
    FineTuneJobStatus,
    JobPhase,
)
from kubetune.ids import new_job_id
from kubetune.settings import (
    BaseModelEntry,
    LimitSettings,
    ObjectStoreSettings,
    QueueingSettings,
    Settings,
    StaticWebhookEndpoint,
    WebhookSettings,
)
from kubetune.trainer_events import TrainerEventKind, message_data
from kubetune_runtime.driver import (
    JobDriver,
    JobState,
    StatusConflict,
    TrainerDefaults,
)
from kubetune_runtime.objectstore import LocalObjectStore, ObjectInfo
from kubetune_runtime.observed import Observed, Waiting
from kubetune_runtime.reconcile import Notice, Transition
from kubetune_runtime.serving import AdapterServing
from kubetune_runtime.webhooks import new_secret
from tests.harness.files import store_training_file

ORG = "acme"
ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@dataclass
class Workload:
    """A scripted workload: what the runtime reports of it is set by the test."""

    suspended: bool
    deleting: bool = False
    phase: JobPhase = JobPhase.QUEUED
    waiting: Waiting | None = None  # why it waits, as its scheduler says


@dataclass
class ScriptedRuntime:
    """The runtime protocol, recording every call; the test sets what ``observe`` sees."""

    name: str = "scripted"
    trainer_defaults: TrainerDefaults = field(
        default_factory=lambda: TrainerDefaults(image="img:1", event_flush_seconds=1.0)
    )
    workloads: dict[str, Workload] = field(default_factory=dict)
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def create(self, job: FineTuneJob, config_text: str, *, suspend: bool) -> Workload:
        self.calls.append(("create", suspend))
        self.config_text = config_text
        return self.workloads.setdefault(job.metadata.name, Workload(suspended=suspend))

    def set_suspended(self, job: FineTuneJob, workload: Workload, suspend: bool) -> None:
        self.calls.append(("set_suspended", suspend))
        workload.suspended = suspend

    def observe(self, job: FineTuneJob, workload: Workload, *, suspend: bool) -> Observed:
        return Observed(workload.phase, None, None, restarting=False, waiting=workload.waiting)

    def stop(self, job: FineTuneJob) -> None:
        self.calls.append(("stop", job.metadata.name))
        self.workloads.pop(job.metadata.name, None)

    def release(self, job: FineTuneJob) -> None:
        self.calls.append(("release", job.metadata.name))


@dataclass
class MemoryJobs:
    """The job-store protocol over a dict; ``conflicts`` makes that many writes conflict."""

    jobs: dict[str, FineTuneJob] = field(default_factory=dict)
    conflicts: int = 0
    writes: int = 0

    def write_status(self, job: FineTuneJob, patch: dict[str, Any]) -> FineTuneJob:
        if self.conflicts:
            self.conflicts -= 1
            raise StatusConflict("changed meanwhile")
        self.writes += 1
        wire = {**(job.status.to_wire() if job.status else {}), **patch}
        status = FineTuneJobStatus.model_validate({k: v for k, v in wire.items() if v is not None})
        stored = job.model_copy(update={"status": status})
        self.jobs[job.metadata.name] = stored
        return stored


class CountingStore(LocalObjectStore):
    """The local store, counting the listings of one prefix."""

    watched = "///"
    listings = 0

    def list(self, prefix: str, *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        if prefix.startswith(self.watched):
            self.listings += 1
        return super().list(prefix, start_after=start_after)


@dataclass
class Sink:
    """Records what the driver posts."""

    posted: list[str] = field(default_factory=list)

    def post(self, job: FineTuneJob, event: Transition | Notice) -> None:
        self.posted.append(event.reason)


@dataclass
class StaticServing:
    """Serving that reports a fixed placement; records what it was asked to publish."""

    where_: AdapterServing
    published: list[str] = field(default_factory=list)

    def publish(self, job: FineTuneJob) -> None:
        assert job.status is not None
        self.published.append(job.status.fine_tuned_model or "")

    def where(self, job: FineTuneJob) -> AdapterServing:
        return self.where_


@dataclass
class World:
    """One driver with its store, jobs, runtime and sink."""

    driver: JobDriver[Workload]
    store: CountingStore
    jobs: MemoryJobs
    runtime: ScriptedRuntime
    sink: Sink

    def submit(self, **spec: Any) -> FineTuneJob:
        layout = self.driver.layout
        training = store_training_file(self.store, layout, ORG, json.dumps(ROW).encode() + b"\n")
        job = FineTuneJob.from_manifest(
            {
                "metadata": {"name": new_job_id(), "generation": 1},
                "spec": {"org": ORG, "model": "tiny", "trainingFile": training, **spec},
            }
        )
        self.jobs.jobs[job.metadata.name] = job
        return job

    def set_spec(self, job: FineTuneJob, **fields: bool) -> None:
        """Change the stored job's spec, as the API does."""
        stored = self.jobs.jobs[job.metadata.name]
        stored.spec = stored.spec.model_copy(update=fields)

    def run(self, state: JobState, job: FineTuneJob) -> FineTuneJob:
        """One pass, with the workload as the runtime holds it; the job as stored after."""
        name = job.metadata.name
        self.driver.run_pass(state, self.jobs.jobs[name], self.runtime.workloads.get(name))
        return self.jobs.jobs[name]


@pytest.fixture
def world(tmp_path: Path) -> World:
    store = CountingStore(tmp_path / "store")
    settings = Settings(
        object_store=ObjectStoreSettings(local_root=tmp_path / "store"),
        models=[BaseModelEntry(id="tiny", path="/models/tiny", context_length=64)],
        limits=LimitSettings(min_examples=1),
        webhooks=WebhookSettings(
            allow_insecure_targets=True,
            allow_private_targets=True,
            endpoints=[
                StaticWebhookEndpoint(org=ORG, url="http://127.0.0.1:9/hook", secret=new_secret())
            ],
        ),
    )
    jobs, runtime, sink = MemoryJobs(), ScriptedRuntime(), Sink()
    driver: JobDriver[Workload] = JobDriver(
        settings=settings,
        store=store,
        jobs=jobs,
        runtime=runtime,
        progress_seconds=1000.0,
        sink=sink,
    )
    return World(driver, store, jobs, runtime, sink)


def test_a_new_job_is_validated_queued_and_given_a_workload_in_one_pass(world: World) -> None:
    job = world.submit()
    after = world.run(JobState(), job)
    assert after.status is not None
    assert after.status.phase is JobPhase.QUEUED
    assert after.status.observed_generation == 1
    assert world.runtime.calls == [("create", False)]
    config = json.loads(world.runtime.config_text)
    assert (config["image"], config["event_flush_seconds"]) == ("img:1", 1.0)  # the runtime's
    assert world.sink.posted == ["ValidatingFiles", "Queued"]
    events = read_events(world.store, world.driver.layout.events_prefix(ORG, job.metadata.name))
    assert [e.message for e in events] == ["Files validated, moving job to queued state"]


def test_no_event_log_is_read_before_a_trainer_ran(world: World) -> None:
    job = world.submit()
    state = JobState()
    world.store.watched = world.driver.layout.events_prefix(ORG, job.metadata.name)
    world.run(state, job)
    for _ in range(3):  # waiting in the queue: progress is never due
        world.run(state, job)
    assert world.store.listings == 0
    world.runtime.workloads[job.metadata.name].phase = JobPhase.RUNNING
    running = world.run(state, job)
    assert running.status is not None
    assert running.status.phase is JobPhase.RUNNING
    assert world.store.listings == 1  # the phase moved: read once, then every progress_seconds
    world.run(state, job)
    assert world.store.listings == 1


def test_a_config_lost_from_the_store_is_rebuilt_and_the_first_one_wins(world: World) -> None:
    job = world.submit()
    world.run(JobState(), job)
    key = world.driver.layout.job_config_key(ORG, job.metadata.name)
    first = world.store.get_bytes(key)
    world.store.delete(key)
    world.run(JobState(), job)  # a new process: nothing in memory
    assert world.store.get_bytes(key) == first


def test_a_conflicting_write_ends_the_pass_and_the_next_recomputes(world: World) -> None:
    job = world.submit()
    world.jobs.conflicts = 1
    state = JobState()
    assert world.run(state, job).status is None  # nothing written, nothing raised
    after = world.run(state, job)
    assert after.status is not None
    assert after.status.phase is JobPhase.QUEUED


def test_pause_and_resume_go_to_the_workload_and_cancel_stops_it(world: World) -> None:
    job = world.submit()
    state = JobState()
    world.run(state, job)
    world.set_spec(job, suspend=True)
    world.run(state, job)
    assert ("set_suspended", True) in world.runtime.calls
    world.runtime.workloads[job.metadata.name].phase = JobPhase.PAUSED
    paused = world.run(state, job)
    assert paused.status is not None
    assert paused.status.phase is JobPhase.PAUSED
    world.set_spec(job, cancel=True)
    cancelled = world.run(state, job)
    assert cancelled.status is not None
    assert cancelled.status.phase is JobPhase.CANCELLED
    assert world.runtime.calls[-2:] == [("stop", job.metadata.name), ("release", job.metadata.name)]
    outbox = list(world.store.list(world.driver.layout.webhook_outbox_prefix()))
    assert len(outbox) == 1  # the cancelled event, queued once
    world.run(state, job)  # a terminal job does not move, and queues nothing new
    assert len(list(world.store.list(world.driver.layout.webhook_outbox_prefix()))) == 1


def test_a_success_is_published_and_says_where_it_is_served_in_the_same_write(
    world: World,
) -> None:
    serving = StaticServing(AdapterServing(("vllm-0",), 1))
    world.driver.serving = serving
    job = world.submit()
    state = JobState()
    world.run(state, job)
    name = job.metadata.name
    adapter = world.driver.layout.adapter_manifest_key(ORG, name)
    world.store.put_json(adapter, {"step": 1})
    world.runtime.workloads[name].phase = JobPhase.SUCCEEDED
    writes = world.jobs.writes
    done = world.run(state, job)
    assert done.status is not None
    assert done.status.phase is JobPhase.SUCCEEDED
    assert serving.published == [done.status.fine_tuned_model]
    assert done.status.served_on == ["vllm-0"]
    served = {c.type: c for c in done.status.conditions}["Served"]
    assert served.status is ConditionStatus.TRUE
    assert world.jobs.writes == writes + 1  # succeeded and served: one status write
    assert world.sink.posted[-3:] == ["Running", "Succeeded", "Served"]
    assert world.runtime.calls[-1] == ("release", name)


def running_then_paused(world: World) -> tuple[FineTuneJob, JobState, str]:
    """A job whose trainer has said it started, then paused by its spec; with the driver's
    state and the job's events folder.
    """
    job = world.submit()
    state = JobState()
    world.run(state, job)
    name = job.metadata.name
    world.runtime.workloads[name].phase = JobPhase.RUNNING
    world.run(state, job)
    prefix = world.driver.layout.events_prefix(ORG, name)
    write_control_events(
        world.store, prefix, [JobEvent(message="go", data=message_data(TrainerEventKind.STARTED))]
    )
    world.set_spec(job, suspend=True)
    return job, state, prefix


def test_a_pause_waits_for_the_trainer_to_say_it_stopped(world: World) -> None:
    job, state, prefix = running_then_paused(world)
    name = job.metadata.name
    # The workload says suspended at once (a TrainJob does); its trainer is still committing.
    world.runtime.workloads[name].phase = JobPhase.PAUSED
    pausing = world.run(state, job)
    assert pausing.status is not None
    assert pausing.status.phase is JobPhase.PAUSING
    stopped = JobEvent(message="stop", data=message_data(TrainerEventKind.PREEMPTED, step=3))
    write_control_events(world.store, prefix, [stopped])
    paused = world.run(state, job)
    assert paused.status is not None
    assert paused.status.phase is JobPhase.PAUSED


def test_a_trainer_that_never_says_it_stopped_is_paused_after_its_grace(world: World) -> None:
    now = [0.0]
    world.driver.clock = lambda: now[0]
    world.driver.stop_grace_seconds = 30
    world.driver.progress_seconds = 0.1
    job, state, _ = running_then_paused(world)
    name = job.metadata.name
    world.runtime.workloads[name].phase = JobPhase.PAUSED
    now[0] = 1.0
    assert world.run(state, job).status.phase is JobPhase.PAUSING  # type: ignore[union-attr]
    now[0] = 40.0  # SIGKILLed after its grace period: no event will come
    assert world.run(state, job).status.phase is JobPhase.PAUSED  # type: ignore[union-attr]


def queued_condition(job: FineTuneJob) -> tuple[str | None, str | None]:
    assert job.status is not None
    cond = next(c for c in job.status.conditions if c.type == ConditionType.QUEUED)
    return cond.reason, cond.message


def test_why_a_job_waits_is_its_condition_and_one_event_per_reason(world: World) -> None:
    job = world.submit()
    name = job.metadata.name
    state = JobState()
    world.run(state, job)
    workload = world.runtime.workloads[name]
    workload.waiting = Waiting("Pending", "waiting for quota in queue q: 4 more needed")
    stored = world.run(state, job)
    assert queued_condition(stored) == ("Pending", "waiting for quota in queue q: 4 more needed")
    # The same reason with a new message updates the condition, without a second event.
    workload.waiting = Waiting("Pending", "waiting for quota in queue q: 2 more needed")
    stored = world.run(state, job)
    assert queued_condition(stored)[1] == "waiting for quota in queue q: 2 more needed"
    workload.waiting = Waiting("Preempted", "preempted by Kueue", warning=True)
    world.run(state, job)
    assert world.sink.posted.count("Pending") == 1
    assert world.sink.posted.count("Preempted") == 1
    messages = [
        e.message for e in read_events(world.store, world.driver.layout.events_prefix(ORG, name))
    ]
    assert messages.count("waiting for quota in queue q: 4 more needed") == 1
    assert "preempted by Kueue" in messages


def test_a_job_queued_past_the_limit_fails_with_why_it_waited(world: World) -> None:
    world.driver.settings.queueing = QueueingSettings(max_queued_seconds=60)
    job = world.submit()
    name = job.metadata.name
    state = JobState()
    world.run(state, job)
    world.runtime.workloads[name].waiting = Waiting("Pending", "waiting for quota in queue q")
    world.run(state, job)
    assert world.jobs.jobs[name].status.phase is JobPhase.QUEUED  # type: ignore[union-attr]
    # Two minutes later (the condition says since when it waits).
    stored = world.jobs.jobs[name]
    assert stored.status is not None
    for cond in stored.status.conditions:
        if cond.type == ConditionType.QUEUED:
            cond.last_transition_time = datetime.now(UTC) - timedelta(minutes=2)
    failed = world.run(state, job)
    assert failed.status is not None
    assert failed.status.phase is JobPhase.FAILED
    assert failed.status.error is not None
    assert failed.status.error.code == "queue_timeout"
    assert failed.status.error.kind is ErrorKind.INFRASTRUCTURE
    assert "waiting for quota in queue q" in failed.status.error.message
    assert ("stop", name) in world.runtime.calls


def test_a_job_whose_passes_keep_failing_fails_once_given_up_on(world: World) -> None:
    job = world.submit()
    name = job.metadata.name
    state = JobState()
    world.run(state, job)
    result = world.driver.give_up(world.jobs.jobs[name], 20, RuntimeError("webhook said no"))
    assert result.terminal
    error = world.jobs.jobs[name].status.error  # type: ignore[union-attr]
    assert error is not None
    assert error.code == "reconcile_failed"
    assert "20 times in a row" in error.message
    assert "webhook said no" in error.message
    assert ("stop", name) in world.runtime.calls
    assert world.runtime.calls[-1] == ("release", name)
