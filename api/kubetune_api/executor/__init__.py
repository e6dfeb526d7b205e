"""Local mode's executor: runs FineTuneJobs from the SQLite backend as trainer subprocesses.

It plays the operator's part on one machine with the operator's own pure lifecycle functions
(:mod:`kubetune.reconcile`), so a job reads the same wherever it ran. The API process never
imports torch: the trainer is a separate process (``python -m kubetune_trainer.launch``).
"""

from __future__ import annotations

from kubetune.objectstore import ObjectStore
from kubetune.serving import ReplicaAdapters
from kubetune.settings import Mode, Settings
from kubetune_api.backends.base import JobBackend
from kubetune_api.backends.local import LocalJobBackend
from kubetune_api.executor.executor import LocalExecutor
from kubetune_api.executor.serving import LocalServing

__all__ = ["LocalExecutor", "build_executor"]


def build_executor(
    settings: Settings, backend: JobBackend, store: ObjectStore
) -> LocalExecutor | None:
    """The executor of a local-mode API that runs its jobs (``settings.local.run_jobs``), with
    the local vLLMs (``settings.serving.vllm_urls``) it registers adapters with; else None.
    """
    if settings.mode is not Mode.LOCAL or not settings.local.run_jobs:
        return None
    if not isinstance(backend, LocalJobBackend):
        raise TypeError("the local executor runs jobs of the SQLite backend only")
    serving = None
    if settings.serving.vllm_urls:
        layout = settings.object_store.layout()
        serving = LocalServing(
            {
                base: ReplicaAdapters(
                    store,
                    layout,
                    url,
                    settings.serving.adapter_dir,
                    settings.serving.vllm_model,
                    settings.serving.max_lora_rank,
                    timeout=settings.serving.request_timeout_seconds,
                )
                for base, url in settings.serving.vllm_urls.items()
            }
        )
    return LocalExecutor(settings, backend, store, serving=serving)
