"""What the benchmarks share: percentiles, a process's memory, the machine they ran on."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterable
from contextlib import ExitStack
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.harness.kube import KubeCluster
    from tests.harness.s3 import S3Server


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of sorted values, interpolated linearly."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def proc_status_mib(pid: int) -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` (peak) of a process, in MiB."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) / 1024  # kB
    return values


def machine_info(packages: Iterable[str]) -> dict[str, Any]:
    """What the numbers were measured on, with the versions of ``packages``."""
    cpu_model = None
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.partition(":")[2].strip()
                break
    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "packages": versions,
    }


def start_cluster_and_s3(stack: ExitStack, namespace: str) -> tuple[KubeCluster, S3Server]:
    """The real kube-apiserver + etcd (with ``namespace`` created) and the S3 server, both
    stopped when ``stack`` closes.
    """
    from kubernetes import client

    from tests.harness.kube import start_cluster
    from tests.harness.s3 import start_s3

    cluster = start_cluster()
    stack.callback(cluster.stop)
    s3 = start_s3()
    stack.callback(s3.stop)
    core: Any = client.CoreV1Api(cluster.api_client())
    core.create_namespace({"metadata": {"name": namespace}})
    return cluster, s3
