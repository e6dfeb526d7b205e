"""The writer lease on both object stores: one writer at a time, a successor in the same slot
takes over at once, another slot waits for a release or the expiry, and a writer that lost the
lease finds out before it writes.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune_runtime.lease import LeaseLost, LeaseRecord, WriterLease
from kubetune_runtime.objectstore import LocalObjectStore, ObjectStore, S3ObjectStore
from tests.harness.s3 import S3Server


class FakeClock:
    """Wall-clock seconds a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "local":
        yield LocalObjectStore(tmp_path / "store")
        return
    s3: S3Server = request.getfixturevalue("s3")
    with S3ObjectStore(s3.bucket, client=s3.client()) as s3_store:
        yield s3_store


@pytest.fixture
def key() -> str:
    return f"t-{secrets.token_hex(4)}/jobs/ftjob-x/writer-lease.json"


def lease(
    store: ObjectStore, key: str, slot: str, clock: FakeClock, ttl: float = 30
) -> WriterLease:
    return WriterLease(store, key, ttl_seconds=ttl, slot=slot, clock=clock, poll_seconds=0.05)


def test_another_slot_waits_while_the_holder_is_live(store: ObjectStore, key: str) -> None:
    clock = FakeClock()
    first, second = lease(store, key, "node-a", clock), lease(store, key, "node-b", clock)
    assert first.try_acquire() is None
    holder = second.try_acquire()
    assert holder is not None
    assert holder.holder == first.holder
    clock.now += 29  # still live
    assert second.try_acquire() is not None
    first.ensure_held()  # the holder renews: live for another 30 s from now
    clock.now += 29
    assert second.try_acquire() is not None
    first.release()
    assert second.try_acquire() is None  # released: free at once
    with pytest.raises(LeaseLost):
        first.ensure_held()


def test_an_expired_lease_is_taken_and_its_old_holder_refuses_to_write(
    store: ObjectStore, key: str
) -> None:
    clock = FakeClock()
    crashed, successor = lease(store, key, "node-a", clock), lease(store, key, "node-b", clock)
    assert crashed.try_acquire() is None
    clock.now += 31
    assert successor.try_acquire() is None
    with pytest.raises(LeaseLost) as lost:
        crashed.ensure_held()
    assert lost.value.holder == successor.holder
    crashed.release()  # must not free the successor's lease
    successor.ensure_held()
    current = store.get_versioned(key)
    assert current is not None
    assert LeaseRecord.decode(current.data).holder == successor.holder


def test_a_successor_in_the_same_slot_takes_over_at_once(store: ObjectStore, key: str) -> None:
    """The same hostname is a restarted container or a replacement pod: the older one is dead
    or cut off, and must not write again."""
    clock = FakeClock()
    old, new = lease(store, key, "job-master-0", clock), lease(store, key, "job-master-0", clock)
    assert old.try_acquire() is None
    assert new.try_acquire() is None
    with pytest.raises(LeaseLost):
        old.ensure_held()
    new.ensure_held()


def test_acquire_waits_for_the_release_and_says_so_once(store: ObjectStore, key: str) -> None:
    first = WriterLease(store, key, ttl_seconds=30, slot="node-a")
    second = WriterLease(store, key, ttl_seconds=30, slot="node-b", poll_seconds=0.05)
    first.acquire()
    waits: list[LeaseRecord] = []
    taken = threading.Event()

    def take() -> None:
        second.acquire(waits.append)
        taken.set()

    waiter = threading.Thread(target=take)
    waiter.start()
    try:
        assert not taken.wait(0.5)
        first.release()
        assert taken.wait(10)
    finally:
        waiter.join(10)
    assert [w.holder for w in waits] == [first.holder]
    assert second.held
    second.release()


def test_the_renewer_keeps_a_live_holder_ahead_of_its_expiry(store: ObjectStore, key: str) -> None:
    holder = WriterLease(store, key, ttl_seconds=0.6, slot="node-a")
    other = WriterLease(store, key, ttl_seconds=0.6, slot="node-b")
    holder.acquire()
    try:
        time.sleep(1.5)  # more than two times to live
        assert other.try_acquire() is not None
        holder.ensure_held()
    finally:
        holder.release()
    assert other.try_acquire() is None
    other.release()


def test_the_renewer_notices_a_takeover(store: ObjectStore, key: str) -> None:
    holder = WriterLease(store, key, ttl_seconds=0.3, slot="node-a")
    holder.acquire()
    usurper = WriterLease(store, key, ttl_seconds=30, slot="node-a")  # same slot: at once
    assert usurper.try_acquire() is None
    deadline = time.monotonic() + 5
    while holder.held and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not holder.held
    holder.release()
    usurper.ensure_held()


def test_an_unreadable_lease_counts_as_free(store: ObjectStore, key: str) -> None:
    store.put_bytes(key, b"not json")
    clock = FakeClock()
    assert lease(store, key, "node-a", clock).try_acquire() is None
