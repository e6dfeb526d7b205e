"""``/v1/webhooks/endpoints`` on a live API: admins only, per org, secrets shown once."""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from kubetune_api.auth import hash_key, new_api_key
from tests.harness.api import backend_env
from tests.harness.paths import REPO_ROOT, free_port
from tests.harness.procs import ServerProcess

PUBLIC_URL = "https://93.184.216.34/hooks"  # an address literal: no DNS needed
ENDPOINTS = "/v1/webhooks/endpoints"


class Api:
    """A live API with an admin and a member key for each of two orgs."""

    def __init__(self, base_url: str, keys: dict[str, str]) -> None:
        self.base_url = base_url
        self.keys = keys

    def as_(self, who: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {self.keys[who]}"}
        )


@pytest.fixture(scope="module")
def webhooks_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    data = tmp_path_factory.mktemp("api-webhooks")
    keys = {
        f"{org}-{role}": new_api_key() for org in ("acme", "globex") for role in ("admin", "member")
    }
    entries = [
        {"name": who, "org": who.split("-")[0], "role": who.split("-")[1], "sha256": hash_key(key)}
        for who, key in keys.items()
    ]
    (data / "keys.json").write_text(json.dumps(entries))
    port = free_port()
    env = {
        **backend_env("local"),
        "KUBETUNE_DATA_DIR": str(data),
        "KUBETUNE_API__HOST": "127.0.0.1",
        "KUBETUNE_API__PORT": str(port),
        "KUBETUNE_API__API_KEYS_FILE": str(data / "keys.json"),
        "KUBETUNE_WEBHOOKS__MAX_ENDPOINTS_PER_ORG": "2",
        "PYTHONPATH": ":".join(str(REPO_ROOT / p) for p in ("", "api", "operator")),
    }
    proc = ServerProcess(
        "kubetune-api-webhooks", [sys.executable, "-m", "kubetune_api"], data / "api.log", env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_until(
            lambda: urllib.request.urlopen(f"{url}/readyz", timeout=2).status == 200,  # noqa: S310
            timeout=60,
            what="ready",
        )
        yield Api(url, keys)
    finally:
        proc.stop()


def error(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()["error"]
    return body


def test_admins_manage_their_orgs_endpoints_and_see_the_secret_once(webhooks_api: Api) -> None:
    admin = webhooks_api.as_("acme-admin")
    created = admin.post(
        ENDPOINTS, json={"url": PUBLIC_URL, "event_types": ["fine_tuning.job.failed"]}
    )
    assert created.status_code == 200, created.text
    endpoint = created.json()
    assert endpoint["object"] == "webhook_endpoint"
    assert endpoint["event_types"] == ["fine_tuning.job.failed"]
    Webhook(endpoint["secret"])  # a usable whsec_ secret

    listed = admin.get(ENDPOINTS).json()
    assert [e["id"] for e in listed["data"]] == [endpoint["id"]]
    assert listed["data"][0]["secret"] is None
    assert endpoint["secret"] not in admin.get(ENDPOINTS).text

    # Another org's admin sees nothing and cannot delete it.
    other = webhooks_api.as_("globex-admin")
    assert other.get(ENDPOINTS).json()["data"] == []
    assert other.delete(f"{ENDPOINTS}/{endpoint['id']}").status_code == 404

    deleted = admin.delete(f"{ENDPOINTS}/{endpoint['id']}")
    assert deleted.json() == {
        "id": endpoint["id"],
        "object": "webhook_endpoint.deleted",
        "deleted": True,
    }
    assert admin.get(ENDPOINTS).json()["data"] == []
    assert admin.delete(f"{ENDPOINTS}/{endpoint['id']}").status_code == 404
    assert admin.delete(f"{ENDPOINTS}/not-an-id").status_code == 404


def test_members_may_not_manage_endpoints(webhooks_api: Api) -> None:
    member = webhooks_api.as_("acme-member")
    for response in (
        member.get(ENDPOINTS),
        member.post(ENDPOINTS, json={"url": PUBLIC_URL}),
        member.delete(f"{ENDPOINTS}/we_{'0' * 32}"),
    ):
        assert response.status_code == 403
        assert error(response)["code"] == "permission_denied"


@pytest.mark.parametrize(
    "url",
    [
        "http://93.184.216.34/hooks",
        "https://127.0.0.1/hooks",
        "https://169.254.169.254/latest",
        "https://10.0.0.1/hooks",
        "https://localhost/hooks",
    ],
)
def test_unsafe_urls_are_refused(webhooks_api: Api, url: str) -> None:
    response = webhooks_api.as_("globex-admin").post(ENDPOINTS, json={"url": url})
    assert response.status_code == 400
    assert error(response)["param"] == "url"


def test_bad_bodies_and_the_endpoint_limit(webhooks_api: Api) -> None:
    admin = webhooks_api.as_("globex-admin")
    bad = admin.post(ENDPOINTS, json={"url": PUBLIC_URL, "event_types": ["job.done"]})
    assert bad.status_code == 400
    assert admin.post(ENDPOINTS, json={"url": PUBLIC_URL, "secret": "whsec_x"}).status_code == 400
    ids = [admin.post(ENDPOINTS, json={"url": PUBLIC_URL}).json()["id"] for _ in range(2)]
    third = admin.post(ENDPOINTS, json={"url": PUBLIC_URL})
    assert third.status_code == 409
    assert error(third)["code"] == "too_many_endpoints"
    for endpoint_id in ids:
        assert admin.delete(f"{ENDPOINTS}/{endpoint_id}").status_code == 200
