import re

import pytest

from kubetune.ids import (
    BODY_LENGTH,
    IdKind,
    is_valid_id,
    new_checkpoint_id,
    new_event_id,
    new_file_id,
    new_id,
    new_job_id,
    short_id,
)

DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@pytest.mark.parametrize(
    ("factory", "kind"),
    [
        (new_file_id, IdKind.FILE),
        (new_job_id, IdKind.JOB),
        (new_checkpoint_id, IdKind.CHECKPOINT),
        (new_event_id, IdKind.EVENT),
    ],
)
def test_ids_have_their_prefix_and_are_valid(factory, kind):
    value = factory()
    assert value.startswith(f"{kind.value}-")
    assert len(value) == len(kind.value) + 1 + BODY_LENGTH
    assert is_valid_id(value, kind)
    other = next(k for k in IdKind if k is not kind)
    assert not is_valid_id(value, other)


def test_job_ids_are_kubernetes_names_even_with_child_suffixes():
    job_id = new_job_id()
    for child in (job_id, f"{job_id}-master-0", f"{job_id}-worker-63", f"{job_id}-config"):
        assert DNS_1123_LABEL.match(child), child
        assert len(child) <= 63


def test_ids_sort_by_creation_time():
    earlier = new_id(IdKind.JOB, now_ms=1_700_000_000_000)
    later = new_id(IdKind.JOB, now_ms=1_700_000_000_001)
    much_later = new_id(IdKind.JOB, now_ms=4_000_000_000_000)
    assert earlier < later < much_later


def test_ids_are_unique():
    ids = {new_file_id() for _ in range(10_000)}
    assert len(ids) == 10_000


@pytest.mark.parametrize(
    "bad",
    [
        "ftjob-",
        "FTJOB-0mhx5k2ab00000000000001",
        "ftjob-0MHX5K2AB00000000000001",
        "ftjob-0mhx5k2ab00000000000001/..",
        "file-0mhx5k2ab00000000000001",
    ],
)
def test_malformed_ids_are_rejected(bad):
    assert not is_valid_id(bad, IdKind.JOB)


def test_short_id_comes_from_the_random_tail():
    a = new_id(IdKind.JOB, now_ms=1_700_000_000_000)
    b = new_id(IdKind.JOB, now_ms=1_700_000_000_000)
    assert len(short_id(a)) == 8
    assert short_id(a) != short_id(b)


def test_ids_made_in_one_process_strictly_increase():
    ids = [new_event_id() for _ in range(5000)]  # many share a millisecond
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
