"""``GET /v1/organization/usage/fine_tuning`` on a live API (both backends): an org's jobs,
trained tokens and worker time in time buckets, for its admins only.

The jobs' statuses are written as the operator writes them (no operator runs here), with
finish times days in the past, in an org no other test uses, so every figure is exact.
"""

from __future__ import annotations

import io
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from kubetune.finetunejob import FineTuneJobStatus
from tests.api.conftest import backend_of, chat_file
from tests.harness.api import ADMIN, ApiServer

ORG = "initech"
DAY = 86400
USAGE = "/v1/organization/usage/fine_tuning"


def usage(api: ApiServer, who: str, **params: Any) -> httpx.Response:
    http = api.client(who)._client  # the SDK's own HTTP client: its responses are checked too
    response: httpx.Response = http.get(
        f"{api.base_url}{USAGE}",
        params=params,
        headers={"Authorization": f"Bearer {api.keys[who]}"},
    )
    return response


def finish(api: ApiServer, job_id: str, phase: str, at: int, **fields: Any) -> None:
    """Write a finished job's status as the operator does."""
    when = datetime.fromtimestamp(at, UTC)
    status = FineTuneJobStatus.model_validate(
        {"phase": phase, "startedAt": when, "finishedAt": when, **fields}
    )
    backend_of(api).update_status(ORG, job_id, status)


def test_an_orgs_usage_in_day_buckets_for_its_admins(api: ApiServer) -> None:
    client = api.client(ORG)
    file = client.files.create(file=("t.jsonl", io.BytesIO(chat_file(10))), purpose="fine-tune")
    two_gpus = {"resources": {"nodes": 1, "gpus_per_node": 2}}
    jobs = [
        client.fine_tuning.jobs.create(
            model="tiny-llama", training_file=file.id, extra_body=two_gpus
        ).id
        for _ in range(4)
    ]
    start = (int(time.time()) // DAY - 3) * DAY  # three whole days ago, then today
    finish(api, jobs[0], "succeeded", start + DAY // 2, trainedTokens=1000, runSeconds=600)
    finish(api, jobs[1], "failed", start + DAY + 10, trainedTokens=10, runSeconds=60.5)
    finish(api, jobs[2], "cancelled", start + DAY + 20)
    # jobs[3] stays where it is (validating_files): created today, not finished.

    response = usage(api, f"{ORG}{ADMIN}", start_time=start, bucket_width="1d", limit=3)
    assert response.status_code == 200, response.text
    page = response.json()
    assert page["object"] == "page"
    assert [b["start_time"] for b in page["data"]] == [start, start + DAY, start + 2 * DAY]
    assert [b["end_time"] - b["start_time"] for b in page["data"]] == [DAY] * 3
    first, second, third = (b["results"] for b in page["data"])
    assert first == [
        {
            "object": "organization.usage.fine_tuning.result",
            "org": ORG,
            "jobs_created": 0,
            "jobs_succeeded": 1,
            "jobs_failed": 0,
            "jobs_cancelled": 0,
            "trained_tokens": 1000,
            "run_seconds": 600.0,
            "gpu_seconds": 1200.0,  # two GPUs
        }
    ]
    assert (second[0]["jobs_failed"], second[0]["jobs_cancelled"]) == (1, 1)
    assert (second[0]["trained_tokens"], second[0]["gpu_seconds"]) == (10, 121.0)
    assert third == []  # a day without activity
    assert page["has_more"] is True

    # The next page is today, up to now: the four jobs were created in it.
    rest = usage(
        api, f"{ORG}{ADMIN}", start_time=start, bucket_width="1d", page=page["next_page"]
    ).json()
    (today,) = rest["data"]
    assert today["start_time"] == start + 3 * DAY
    assert today["end_time"] <= int(time.time()) + 1
    assert today["results"][0]["jobs_created"] == 4
    assert today["results"][0]["jobs_succeeded"] == 0
    assert rest["has_more"] is False

    # Hour buckets cut the same day finer.
    hours = usage(
        api, f"{ORG}{ADMIN}", start_time=start + DAY, end_time=start + DAY + 3600,
        bucket_width="1h",
    ).json()  # fmt: skip
    assert [len(b["results"]) for b in hours["data"]] == [1]


@pytest.mark.parametrize(
    ("who", "params", "status", "param"),
    [
        (ORG, {"start_time": 0}, 403, None),  # a member key
        (f"{ORG}{ADMIN}", {"start_time": 100, "end_time": 100}, 400, "end_time"),
        (f"{ORG}{ADMIN}", {"start_time": 0, "bucket_width": "1w"}, 400, "bucket_width"),
        (f"{ORG}{ADMIN}", {"start_time": 0, "page": "next"}, 400, "page"),
        (f"{ORG}{ADMIN}", {}, 400, "start_time"),
    ],
)
def test_usage_is_for_admins_and_bad_queries_name_the_parameter(
    api: ApiServer, who: str, params: dict[str, Any], status: int, param: str | None
) -> None:
    response = usage(api, who, **params)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_an_admin_sees_only_their_own_orgs_usage(api: ApiServer) -> None:
    client = api.client("globex")
    file = client.files.create(file=("t.jsonl", io.BytesIO(chat_file(10))), purpose="fine-tune")
    client.fine_tuning.jobs.create(model="tiny-llama", training_file=file.id)
    today = int(time.time()) // DAY * DAY
    for who in (f"globex{ADMIN}", f"acme{ADMIN}", f"{ORG}{ADMIN}"):
        page = usage(api, who, start_time=today).json()
        orgs = {r["org"] for b in page["data"] for r in b["results"]}
        assert orgs <= {who.removesuffix(ADMIN)}, (who, orgs)
    assert usage(api, f"globex{ADMIN}", start_time=today).json()["data"][0]["results"]
