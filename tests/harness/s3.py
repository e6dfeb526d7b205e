"""An S3-protocol server on loopback (moto in server mode), reached by boto3 over HTTP."""

from __future__ import annotations

import shutil
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness.paths import free_port
from tests.harness.procs import ServerProcess

# moto accepts any credentials; real ones must never be needed to run the tests.
ACCESS_KEY = "kubetune-test"
SECRET_KEY = "kubetune-test-secret"
REGION = "us-east-1"


@dataclass
class S3Server:
    """A running S3 endpoint with one bucket."""

    endpoint_url: str
    bucket: str
    _proc: ServerProcess
    _workdir: Path

    def env(self) -> dict[str, str]:
        """Environment for subprocesses (API, operator, trainer) to use this store."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "KUBETUNE_OBJECT_STORE__BACKEND": "s3",
            "KUBETUNE_OBJECT_STORE__BUCKET": self.bucket,
            "KUBETUNE_OBJECT_STORE__ENDPOINT_URL": self.endpoint_url,
            "KUBETUNE_OBJECT_STORE__REGION": REGION,
        }

    def client(self) -> Any:
        """A boto3 S3 client for this endpoint."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def stop(self) -> None:
        """Stop the server and drop its state."""
        self._proc.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)


def start_s3(bucket: str = "kubetune-test") -> S3Server:
    """Start moto's S3 server on a free loopback port and create ``bucket``."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="kubetune-s3-"))
    proc = ServerProcess(
        "moto_server",
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        workdir / "moto.log",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_until(
            lambda: urllib.request.urlopen(f"{url}/moto-api/", timeout=2).status == 200,  # noqa: S310
            timeout=60,
            what="serving",
        )
        server = S3Server(url, bucket, proc, workdir)
        server.client().create_bucket(Bucket=bucket)
    except BaseException:
        proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return server
