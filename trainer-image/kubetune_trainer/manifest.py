"""The run manifest: what is needed to reproduce a checkpoint or an adapter.

Stored as ``manifest.json`` beside every checkpoint and the final adapter: the resolved config,
the seed, the sha256 of the data files, the versions of the training stack and the image.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterable
from importlib import metadata
from typing import Any, Final

from kubetune.trainer_config import TrainerConfig

PACKAGES: Final = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "kubetune")
MANIFEST_VERSION: Final = 1


def versions(packages: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """Python's and ``packages``' installed versions (None where a package is missing)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def run_manifest(
    config: TrainerConfig, data_sha256: dict[str, str], *, world_size: int
) -> dict[str, Any]:
    """The part of every manifest that describes the run."""
    return {
        "config": config.model_dump(mode="json"),
        "seed": config.seed,
        "data_sha256": data_sha256,
        "versions": versions(),
        "image": config.image,
        "world_size": world_size,
    }


def manifest(kind: str, run: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A complete manifest of ``kind`` (checkpoint or adapter)."""
    return {
        "manifest_version": MANIFEST_VERSION,
        "kind": kind,
        "created_at": int(time.time()),
        **fields,
        "run": run,
    }
