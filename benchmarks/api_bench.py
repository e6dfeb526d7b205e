"""Benchmark the kubetune API on loopback, on both backends, in one run.

Part 1 (latency): the API is started on the local backend (SQLite + a local folder) and on the
Kubernetes backend (a real kube-apiserver + etcd, moto's S3 server), with the test harness.
For each backend, job create (``POST /v1/fine_tuning/jobs``), list
(``GET /v1/fine_tuning/jobs?limit=20``) and retrieve (``GET /v1/fine_tuning/jobs/{id}``) are
driven by 1, 16 and 64 concurrent clients (``httpx2.AsyncClient``, the HTTP client of the
installed ``openai`` SDK), each cell bounded by a number of requests and a time limit.

Part 2 (uploads): valid chat JSONL files of 20 MB and 200 MB are generated on disk, line by
line, and uploaded (multipart, streamed from disk) to a fresh local-backend API process each,
whose peak RSS (``VmHWM``) is read from ``/proc`` afterwards. ``validate_jsonl`` is timed
in-process on the same files as a baseline.

Results are printed as tables and written to ``benchmarks/results/api.json``.

    .venv/bin/python benchmarks/api_bench.py [--requests 200] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parents[1]
for _root in (REPO_ROOT, REPO_ROOT / "api"):
    if str(_root) not in sys.path:
        sys.path.insert(0, str(_root))

import httpx2  # noqa: E402

from benchmarks.common import (  # noqa: E402
    machine_info,
    percentile,
    proc_status_mib,
    start_cluster_and_s3,
)
from kubetune_runtime.datasets import validate_jsonl  # noqa: E402
from tests.harness.api import ApiServer, backend_env, start_api  # noqa: E402

DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "results" / "api.json"
OPERATIONS = ("create", "list", "retrieve")
MB = 1_000_000  # throughput and file sizes are in decimal megabytes
MIB = 1024 * 1024
READ_CHUNK = 1 * MIB  # what the object store reads per chunk, for the in-process baseline
ORG = "acme"
WARMUP_SECONDS = 2.0  # the unmeasured warm-up of a cell stops after this long
BENCH_ENV = {
    # Thousands of requests from one org: lift the per-org limits far out of the way.
    "KUBETUNE_LIMITS__MAX_ACTIVE_JOBS_PER_ORG": "1000000",
    "KUBETUNE_API__REQUESTS_PER_MINUTE": "10000000",
}
WORDS = (
    *("the", "model", "answers", "questions", "about", "capitals", "rivers", "mountains"),
    *("history", "science", "and", "language", "with", "short", "clear", "sentences", "that"),
    *("a", "careful", "assistant", "would", "write", "for", "curious", "user", "who", "asks"),
    *("france", "paris", "germany", "berlin", "italy", "rome", "spain", "madrid", "tokyo"),
)


# ---------------------------------------------------------------------------------------------
# Part 1: request latency
# ---------------------------------------------------------------------------------------------


@dataclass
class Cell:
    """The outcome of one (backend, operation, concurrency) cell."""

    backend: str
    operation: str
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    requests_per_s: float
    jobs_in_org: int
    first_error: str | None = None


Request = Callable[[httpx2.AsyncClient, int], Awaitable[httpx2.Response]]


async def run_cell(
    client: httpx2.AsyncClient,
    request: Request,
    *,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    expect: int = 200,
) -> tuple[list[float], int, float, str | None]:
    """Drive ``request`` from ``concurrency`` workers until ``max_requests`` were issued or
    ``max_seconds`` passed; return latencies (s), errors, wall time (s) and the first error.
    """
    latencies: list[float] = []
    errors = 0
    issued = 0
    first_error: str | None = None
    start = time.perf_counter()
    deadline = start + max_seconds

    async def worker() -> None:
        nonlocal issued, errors, first_error
        while issued < max_requests and time.perf_counter() < deadline:
            index = issued
            issued += 1
            began = time.perf_counter()
            try:
                response = await request(client, index)
                ok = response.status_code == expect
                problem = None if ok else f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx2.HTTPError as exc:
                ok, problem = False, f"{type(exc).__name__}: {exc}"
            elapsed = time.perf_counter() - began
            if ok:
                latencies.append(elapsed)
            else:
                errors += 1
                first_error = first_error or problem

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - start, first_error


def chat_example(i: int) -> dict[str, Any]:
    """One valid, unique chat example of a few hundred bytes (length varies with ``i``)."""

    def sentence(seed: int, n: int) -> str:
        return " ".join(WORDS[(seed * 7 + k * 13 + k * k) % len(WORDS)] for k in range(n))

    return {
        "messages": [
            {"role": "system", "content": "You are a concise, helpful assistant."},
            {"role": "user", "content": f"Question {i}: {sentence(i, 8 + i % 40)}?"},
            {"role": "assistant", "content": f"Answer {i}: {sentence(i + 1, 12 + i % 70)}."},
        ]
    }


def jsonl_bytes(n: int) -> bytes:
    """``n`` chat examples as JSONL."""
    return b"".join(json.dumps(chat_example(i)).encode() + b"\n" for i in range(n))


def count_jobs(client: httpx2.Client) -> int:
    """How many jobs the org has (paging through the list)."""
    total, after = 0, None
    while True:
        params: dict[str, str | int] = {"limit": 100}
        if after:
            params["after"] = after
        page = client.get("/v1/fine_tuning/jobs", params=params).raise_for_status().json()
        total += len(page["data"])
        if not page["has_more"] or not page["data"]:
            return total
        after = page["data"][-1]["id"]


async def bench_backend(
    server: ApiServer,
    *,
    concurrencies: list[int],
    max_requests: int,
    max_seconds: float,
    warmup: int,
    on_cell: Callable[[Cell], None],
) -> list[Cell]:
    """Measure create, list and retrieve on one running API."""
    headers = {"Authorization": f"Bearer {server.keys[ORG]}"}
    with httpx2.Client(base_url=server.base_url, headers=headers, timeout=60) as sync:
        uploaded = sync.post(
            "/v1/files",
            files={"file": ("bench.jsonl", jsonl_bytes(32), "application/jsonl")},
            data={"purpose": "fine-tune"},
        )
        training_file = uploaded.raise_for_status().json()["id"]
    body = {"model": "tiny-llama", "training_file": training_file}
    job_ids: list[str] = []

    async def create(client: httpx2.AsyncClient, _: int) -> httpx2.Response:
        response = await client.post("/v1/fine_tuning/jobs", json=body)
        if response.status_code == 200:
            job_ids.append(response.json()["id"])
        return response

    async def list_jobs(client: httpx2.AsyncClient, _: int) -> httpx2.Response:
        return await client.get("/v1/fine_tuning/jobs", params={"limit": 20})

    async def retrieve(client: httpx2.AsyncClient, i: int) -> httpx2.Response:
        if not job_ids:
            raise RuntimeError("no job was created, so none can be retrieved")
        return await client.get(f"/v1/fine_tuning/jobs/{job_ids[i % len(job_ids)]}")

    requests: dict[str, Request] = {"create": create, "list": list_jobs, "retrieve": retrieve}
    cells: list[Cell] = []
    for operation in OPERATIONS:
        for concurrency in concurrencies:
            limits = httpx2.Limits(
                max_connections=concurrency, max_keepalive_connections=concurrency
            )
            async with httpx2.AsyncClient(
                base_url=server.base_url, headers=headers, timeout=120, limits=limits
            ) as client:
                # Warm-up (not measured): open the connections, fill caches, create a few jobs.
                await run_cell(
                    client,
                    requests[operation],
                    concurrency=concurrency,
                    max_requests=max(warmup, concurrency),
                    max_seconds=min(max_seconds, WARMUP_SECONDS),
                )
                latencies, errors, wall, first_error = await run_cell(
                    client,
                    requests[operation],
                    concurrency=concurrency,
                    max_requests=max_requests,
                    max_seconds=max_seconds,
                )
            latencies.sort()
            ms = [x * 1000 for x in latencies]
            cell = Cell(
                backend=server.backend,
                operation=operation,
                concurrency=concurrency,
                requests=len(latencies),
                errors=errors,
                wall_s=round(wall, 3),
                p50_ms=round(percentile(ms, 50), 2) if ms else None,
                p99_ms=round(percentile(ms, 99), 2) if ms else None,
                mean_ms=round(sum(ms) / len(ms), 2) if ms else None,
                max_ms=round(ms[-1], 2) if ms else None,
                requests_per_s=round(len(latencies) / wall, 1) if wall > 0 else 0.0,
                jobs_in_org=len(job_ids),
                first_error=first_error,
            )
            on_cell(cell)
            cells.append(cell)
    return cells


def start_backend(backend: str, workdir: Path, stack: ExitStack) -> ApiServer:
    """Start the API on ``backend`` (and the cluster and S3 server it needs) under ``stack``."""
    if backend == "local":
        env = backend_env("local")
    else:
        namespace = "kubetune-bench"
        cluster, s3 = start_cluster_and_s3(stack, namespace)
        env = backend_env(
            "kubernetes",
            s3_env=s3.env(),
            kubeconfig=cluster.kubeconfig,
            namespace=namespace,
            prefix="api-bench",
        )
    server = start_api(workdir / f"api-{backend}", {**env, **BENCH_ENV}, backend)
    stack.callback(server.stop)
    if urlsplit(server.base_url).hostname != "127.0.0.1":
        raise RuntimeError(f"refusing a non-loopback server: {server.base_url}")
    return server


# ---------------------------------------------------------------------------------------------
# Part 2: upload (validation) throughput and memory
# ---------------------------------------------------------------------------------------------


@dataclass
class Upload:
    """One upload to a fresh local-backend API process."""

    size_mb: int
    bytes: int
    lines: int
    upload_wall_s: float
    upload_mb_per_s: float
    server_rss_idle_mib: float
    server_hwm_idle_mib: float
    server_hwm_after_mib: float
    server_rss_after_mib: float
    status: str


@dataclass
class Baseline:
    """``validate_jsonl`` timed in this process on the same file."""

    size_mb: int
    bytes: int
    wall_s: float
    mb_per_s: float
    n_examples: int
    valid: bool
    runs_wall_s: list[float] = field(default_factory=list)


@dataclass
class Generated:
    """A generated JSONL file."""

    path: Path
    size_mb: int
    bytes: int
    lines: int


def generate_jsonl(path: Path, size_mb: int) -> Generated:
    """Write valid chat examples to ``path`` until it holds at least ``size_mb`` MB."""
    target = size_mb * MB
    written = lines = 0
    with path.open("wb", buffering=MIB) as out:
        while written < target:
            line = json.dumps(chat_example(lines)).encode() + b"\n"
            out.write(line)
            written += len(line)
            lines += 1
    return Generated(path, size_mb, written, lines)


def bench_upload(generated: Generated, workdir: Path) -> Upload:
    """Upload ``generated`` to a fresh local-backend API and read its peak RSS."""
    server = start_api(
        workdir / f"api-upload-{generated.size_mb}", {**backend_env("local"), **BENCH_ENV}, "local"
    )
    try:
        if urlsplit(server.base_url).hostname != "127.0.0.1":
            raise RuntimeError(f"refusing a non-loopback server: {server.base_url}")
        idle = proc_status_mib(server.pid)
        headers = {"Authorization": f"Bearer {server.keys[ORG]}"}
        with (
            httpx2.Client(base_url=server.base_url, headers=headers, timeout=900) as client,
            generated.path.open("rb") as handle,
        ):
            began = time.perf_counter()
            # A file object: the multipart body is streamed from disk in 64 KiB chunks.
            response = client.post(
                "/v1/files",
                files={"file": (generated.path.name, handle, "application/jsonl")},
                data={"purpose": "fine-tune"},
            )
            wall = time.perf_counter() - began
        if response.status_code != 200:
            raise RuntimeError(f"upload failed: HTTP {response.status_code}: {response.text}")
        uploaded = response.json()
        if uploaded["bytes"] != generated.bytes:
            raise RuntimeError(f"stored {uploaded['bytes']} bytes of {generated.bytes}")
        after = proc_status_mib(server.pid)
    finally:
        server.stop()
    return Upload(
        size_mb=generated.size_mb,
        bytes=generated.bytes,
        lines=generated.lines,
        upload_wall_s=round(wall, 3),
        upload_mb_per_s=round(generated.bytes / MB / wall, 2),
        server_rss_idle_mib=round(idle["VmRSS"], 1),
        server_hwm_idle_mib=round(idle["VmHWM"], 1),
        server_hwm_after_mib=round(after["VmHWM"], 1),
        server_rss_after_mib=round(after["VmRSS"], 1),
        status=str(uploaded["status"]),
    )


def file_chunks(path: Path) -> Iterator[bytes]:
    """The file in chunks of the object store's read size."""
    with path.open("rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            yield chunk


def bench_validator(generated: Generated, repeats: int = 2) -> Baseline:
    """Time ``validate_jsonl`` in this process (no token counting, as the bench API runs);
    the best of ``repeats`` runs, so one slow run (page cache, a stray process) does not count.
    """
    walls = []
    for _ in range(repeats):
        began = time.perf_counter()
        report = validate_jsonl(file_chunks(generated.path))
        walls.append(time.perf_counter() - began)
    wall = min(walls)
    return Baseline(
        size_mb=generated.size_mb,
        bytes=generated.bytes,
        wall_s=round(wall, 3),
        mb_per_s=round(generated.bytes / MB / wall, 2),
        n_examples=report.n_examples,
        valid=report.valid,
        runs_wall_s=[round(w, 3) for w in walls],
    )


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


CELL_HEADER = (
    f"{'backend':<11} {'operation':<9} {'conc':>4} {'ok':>5} {'err':>4} {'p50 ms':>9} "
    f"{'p99 ms':>9} {'req/s':>8} {'jobs':>5}"
)


def cell_row(cell: Cell) -> str:
    """One line of the latency table."""
    return (
        f"{cell.backend:<11} {cell.operation:<9} {cell.concurrency:>4} {cell.requests:>5} "
        f"{cell.errors:>4} {_fmt(cell.p50_ms, '.2f'):>9} {_fmt(cell.p99_ms, '.2f'):>9} "
        f"{cell.requests_per_s:>8.1f} {cell.jobs_in_org:>5}"
    )


# Whose versions the results record.
PACKAGES = ("fastapi", "starlette", "uvicorn", "httpx2", "pydantic", "kubernetes")


def summarize(cells: list[Cell], uploads: list[Upload], baselines: list[Baseline]) -> list[str]:
    """A few lines that say what the tables mean."""
    lines: list[str] = []
    by_key = {(c.backend, c.operation, c.concurrency): c for c in cells}
    backends = list(dict.fromkeys(c.backend for c in cells))
    for operation in OPERATIONS:
        parts = []
        for backend in backends:
            best = max(
                (c for c in cells if c.backend == backend and c.operation == operation),
                key=lambda c: c.requests_per_s,
                default=None,
            )
            single = by_key.get((backend, operation, 1))
            if best is None:
                continue
            parts.append(
                f"{backend}: p50 {_fmt(single.p50_ms if single else None, '.1f')} ms at c=1, "
                f"peak {best.requests_per_s:.0f} req/s at c={best.concurrency}"
            )
        if parts:
            lines.append(f"{operation:<8} " + "; ".join(parts))
    errors = sum(c.errors for c in cells)
    if errors:
        lines.append(f"{errors} requests failed; see first_error in the JSON")
    for upload in uploads:
        base = next((b for b in baselines if b.size_mb == upload.size_mb), None)
        share = f" ({upload.upload_mb_per_s / base.mb_per_s:.0%} of it)" if base else ""
        lines.append(
            f"upload {upload.size_mb} MB: {upload.upload_mb_per_s:.1f} MB/s through the API vs "
            f"{_fmt(base.mb_per_s if base else None)} MB/s validator alone{share}; server peak "
            f"RSS {upload.server_hwm_after_mib:.0f} MiB (idle {upload.server_hwm_idle_mib:.0f})"
        )
    if len(uploads) >= 2:
        small, large = uploads[0], uploads[-1]
        ratio = large.server_hwm_after_mib / small.server_hwm_after_mib
        growth = large.server_hwm_after_mib - small.server_hwm_after_mib
        lines.append(
            f"peak RSS {large.size_mb} MB / {small.size_mb} MB upload: {ratio:.2f}x "
            f"({growth:+.0f} MiB for {large.bytes / small.bytes:.0f}x the bytes)"
        )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=200, help="requests per cell at most")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per cell at most")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured requests per cell")
    parser.add_argument(
        "--concurrency", default="1,16,64", help="comma-separated concurrent clients"
    )
    parser.add_argument(
        "--backends", default="local,kubernetes", help="comma-separated: local, kubernetes"
    )
    parser.add_argument(
        "--sizes-mb", default="20,200", help="comma-separated upload sizes in MB (0: skip)"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results")
    return parser.parse_args(argv)


@dataclass
class Results:
    """Everything the run measured, as written to the JSON file."""

    machine: dict[str, Any]
    command: str
    date: str
    config: dict[str, Any]
    latency: list[Cell] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)
    validator_baseline: list[Baseline] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the tables and write the JSON."""
    args = parse_args(argv)
    concurrencies = [int(x) for x in args.concurrency.split(",") if x]
    backends = [x for x in args.backends.split(",") if x]
    sizes = [int(x) for x in args.sizes_mb.split(",") if x and int(x) > 0]
    for backend in backends:
        if backend not in ("local", "kubernetes"):
            raise SystemExit(f"unknown backend {backend!r}")
    started = time.perf_counter()
    results = Results(
        machine=machine_info(PACKAGES),
        command=shlex.join([sys.executable, *sys.argv]),
        date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        config={
            "max_requests_per_cell": args.requests,
            "max_seconds_per_cell": args.seconds,
            "warmup_requests_per_cell": args.warmup,
            "concurrency": concurrencies,
            "backends": backends,
            "upload_sizes_mb": sizes,
            "client": "httpx2.AsyncClient on loopback, one connection per concurrent client; "
            "the client shares the machine's CPUs with the servers",
            "token_counting": "off (no tokenizer configured)",
            "jobs_in_org": "jobs the bench had created on that backend when the cell ended",
        },
    )
    print(
        f"kubetune API benchmark: {results.machine['cpu_count']} CPUs, Python "
        f"{results.machine['python']}"
    )

    def on_cell(cell: Cell) -> None:
        print(cell_row(cell), flush=True)

    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        workdir = Path(tmp)
        print("\nLatency (ms) and throughput per backend, operation and concurrency")
        print(CELL_HEADER)
        for backend in backends:
            with ExitStack() as stack:
                server = start_backend(backend, workdir, stack)
                results.latency += asyncio.run(
                    bench_backend(
                        server,
                        concurrencies=concurrencies,
                        max_requests=args.requests,
                        max_seconds=args.seconds,
                        warmup=args.warmup,
                        on_cell=on_cell,
                    )
                )

        if sizes:
            print("\nUploads (POST /v1/files, local backend, a fresh server per file)")
            print(
                f"{'size':>6} {'bytes':>11} {'lines':>8} {'API MB/s':>9} {'valid. MB/s':>11} "
                f"{'RSS idle':>9} {'peak RSS':>9} {'RSS after':>9}  (MiB)"
            )
            for size in sizes:
                generated = generate_jsonl(workdir / f"chat-{size}mb.jsonl", size)
                upload = bench_upload(generated, workdir)
                baseline = bench_validator(generated)
                generated.path.unlink()
                results.uploads.append(upload)
                results.validator_baseline.append(baseline)
                print(
                    f"{size:>4}MB {upload.bytes:>11} {upload.lines:>8} "
                    f"{upload.upload_mb_per_s:>9.1f} {baseline.mb_per_s:>11.1f} "
                    f"{upload.server_hwm_idle_mib:>9.1f} {upload.server_hwm_after_mib:>9.1f} "
                    f"{upload.server_rss_after_mib:>9.1f}",
                    flush=True,
                )
                if not baseline.valid:
                    raise RuntimeError(f"the generated {size} MB file is not valid")

    results.summary = summarize(results.latency, results.uploads, results.validator_baseline)
    results.wall_s = round(time.perf_counter() - started, 1)
    print("\nSummary")
    for line in results.summary:
        print(f"  {line}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(asdict(results), indent=2) + "\n")
    print(f"\nwrote {args.output} ({results.wall_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
