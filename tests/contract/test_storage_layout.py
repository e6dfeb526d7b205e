import pytest

from kubetune.ids import new_file_id
from kubetune.storage_layout import StorageLayout, checkpoint_step_from_key

JOB = "ftjob-0mhx5k2ab00000000000001"
FILE = "file-0mhx5k2ab00000000000001"


def test_keys_follow_the_documented_layout():
    layout = StorageLayout(prefix="/kt/")
    assert layout.file_key("acme", FILE) == f"kt/orgs/acme/files/{FILE}"
    assert layout.job_config_key("acme", JOB) == f"kt/orgs/acme/jobs/{JOB}/config.json"
    assert (
        layout.event_chunk_key("acme", JOB, 3) == f"kt/orgs/acme/jobs/{JOB}/events/0000000003.jsonl"
    )
    assert layout.checkpoint_manifest_key("acme", JOB, 120) == (
        f"kt/orgs/acme/jobs/{JOB}/checkpoints/step-0000000120/manifest.json"
    )
    assert layout.adapter_prefix("acme", JOB) == f"kt/orgs/acme/jobs/{JOB}/adapter/"
    # Merged models sit beside, never under, the adapter and checkpoint folders.
    assert layout.merged_manifest_key("acme", JOB) == (
        f"kt/orgs/acme/jobs/{JOB}/merged/final/manifest.json"
    )
    assert layout.merged_prefix("acme", JOB, 120) == (
        f"kt/orgs/acme/jobs/{JOB}/merged/step-0000000120/"
    )
    assert layout.merge_failure_key("acme", JOB, 120) == (
        f"kt/orgs/acme/jobs/{JOB}/merged/step-0000000120.failure.json"
    )
    assert StorageLayout().file_key("acme", FILE) == f"orgs/acme/files/{FILE}"


def test_listing_order_is_numeric_order():
    layout = StorageLayout()
    steps = [5, 40, 100, 1200]
    keys = [layout.checkpoint_manifest_key("acme", JOB, s) for s in steps]
    assert sorted(keys) == keys
    assert [checkpoint_step_from_key(k) for k in keys] == steps
    chunks = [layout.event_chunk_key("acme", JOB, s) for s in (9, 10, 11)]
    assert sorted(chunks) == chunks


def test_one_org_prefix_never_contains_another_orgs_keys():
    layout = StorageLayout()
    assert not layout.file_key("acme-2", new_file_id()).startswith(layout.org_prefix("acme"))


@pytest.mark.parametrize(
    ("org", "object_id"),
    [
        ("../acme", FILE),
        ("acme/..", FILE),
        ("Acme", FILE),
        ("", FILE),
        ("acme", "file-../x"),
        ("acme", "file-0mhx5k2ab00000000000001/../../x"),
        ("acme", JOB),  # a job id is not a file id
    ],
)
def test_keys_that_could_escape_their_folder_are_refused(org, object_id):
    with pytest.raises(ValueError, match="invalid"):
        StorageLayout().file_key(org, object_id)


def test_negative_steps_are_refused():
    with pytest.raises(ValueError, match="≥ 0"):
        StorageLayout().checkpoint_prefix("acme", JOB, -1)
