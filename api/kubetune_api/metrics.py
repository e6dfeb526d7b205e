"""Prometheus metrics of the API (``/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

HTTP_REQUESTS = Counter(
    "kubetune_api_requests_total",
    "HTTP requests answered, by route template, method and status code.",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "kubetune_api_request_duration_seconds",
    "Time to answer an HTTP request, by route template and method.",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
FILES_CREATED = Counter(
    "kubetune_api_files_created_total", "Files stored, by purpose.", ["purpose"]
)
JOBS_CREATED = Counter(
    "kubetune_api_jobs_created_total", "Fine-tuning jobs created, by method.", ["method"]
)
SWEPT_OBJECTS = Counter(
    "kubetune_api_swept_objects_total",
    "Objects the store sweeper deleted: parts of abandoned uploads, file bytes without metadata.",
    ["kind"],
)
