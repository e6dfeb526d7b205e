"""The response checker the API tests rely on does catch what it must."""

import json

import pytest

from tests.harness.openapi import check_response, schema_for


def test_routes_map_to_openai_schemas():
    assert schema_for("GET", "/v1/fine_tuning/jobs") == "ListPaginatedFineTuningJobsResponse"
    assert schema_for("POST", "/v1/fine_tuning/jobs/ftjob-x/pause") == "FineTuningJob"
    assert schema_for("GET", "/v1/models/ft:a:b:c:d") == "Model"
    assert schema_for("PATCH", "/v1/files") is None


def test_a_job_missing_required_fields_is_caught():
    body = json.dumps({"id": "ftjob-x", "object": "fine_tuning.job"}).encode()
    with pytest.raises(AssertionError, match="breaks its schema"):
        check_response("GET", "/v1/fine_tuning/jobs/ftjob-x", 200, "application/json", body)


def test_an_error_without_the_envelope_is_caught():
    with pytest.raises(AssertionError, match="breaks its schema"):
        check_response("GET", "/v1/files", 404, "application/json", b'{"detail": "nope"}')
    good = {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}}
    check_response("GET", "/v1/files", 404, "application/json", json.dumps(good).encode())
