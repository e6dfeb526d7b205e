"""Serving fine-tuned adapters on vLLM: which adapters should be served, and one replica's.

Shared by the operator's adapter-sync sidecar (one per vLLM pod) and local mode, which drives
its local vLLM with the same :class:`ReplicaAdapters`.

- :func:`desired_adapters` is pure: the adapters of succeeded, registered, undeleted jobs, per
  base model, and the checkpoints users asked for (``ft:…:ckpt-step-N``; the API records each
  use in an annotation), the most recently used ``checkpoint_slots`` of them per base model.
  Everything else is level-based on it, so a replica that starts later catches up, a deleted
  model is unloaded by the next sync, and so is the least recently used checkpoint when a
  newer one needs its slot.
- :class:`ReplicaAdapters` makes one vLLM replica serve a set of adapters. An adapter is fetched
  from the object store into ``<adapter_dir>/<name>`` (a temporary folder renamed into place,
  so vLLM never reads half an adapter), its ``adapter_config.json`` checked against the
  replica's limits and rewritten for vLLM's filesystem resolver, then registered with
  ``POST /v1/load_lora_adapter``. vLLM never sees an object-store path.

vLLM's limits (0.32): ``--max-lora-rank`` refuses an adapter whose rank (``r``, or any
``rank_pattern`` value) is larger, with a 500 and no detail for the client, so the rank is
checked here first and reported as :class:`AdapterRejected`. ``--max-loras`` is the number of
adapters one batch may use, not a registration limit: vLLM keeps ``--max-cpu-loras`` adapters
in memory (an LRU cache) and reloads an evicted one from its folder on its next request. So
registrations are not capped, and the folders of registered adapters are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Self

import httpx

from kubetune.finetunejob import (
    ANNOTATION_MODEL_DELETED,
    CHECKPOINT_MODEL_MARK,
    VLLM_LORA_RANKS,
    AdapterType,
    ErrorKind,
    FineTuneJob,
    JobError,
    JobPhase,
    checkpoints_in_use,
)
from kubetune.storage_layout import ADAPTER_FILES, StorageLayout
from kubetune_runtime.objectstore import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)

ADAPTER_NAME_PREFIX: Final = "ft:"
ADAPTER_CONFIG: Final = "adapter_config.json"
TEMP_PREFIX: Final = ".tmp-"
_SAFE_NAME: Final = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")


# ---------------------------------------------------------------------------------------------
# What should be served
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class AdapterRef:
    """One adapter to serve: the fine-tuned model id and where its files are."""

    name: str  # the model id, "ft:…" or a checkpoint's "ft:…:ckpt-step-N": vLLM's lora_name
    org: str
    job_id: str
    base_model: str
    step: int | None = None  # a checkpoint's step; None: the job's final adapter

    def to_json(self) -> dict[str, Any]:
        """As the sidecar's API carries it."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AdapterRef:
        """Read one from the sidecar's API (KeyError/TypeError/ValueError on a malformed body)."""
        step = data.get("step")
        return cls(
            name=str(data["name"]),
            org=str(data["org"]),
            job_id=str(data["job_id"]),
            base_model=str(data["base_model"]),
            step=None if step is None else int(step),
        )


def _servable_model(job: FineTuneJob) -> str | None:
    """The job's fine-tuned model if its adapters may be served, else None.

    Served: the job succeeded with a fine-tuned model, ``spec.serving.register`` is on, the
    model was not deleted (``kubetune.io/model-deleted``), and it is an adapter: a full
    fine-tune is a whole model, which vLLM's runtime LoRA loading cannot serve (it needs a
    deployment of its own).
    """
    status = job.status
    if status is None or status.phase is not JobPhase.SUCCEEDED or not status.fine_tuned_model:
        return None
    if not job.spec.serving.register_adapter or job.spec.adapter.type is AdapterType.FULL:
        return None
    if job.metadata.annotations.get(ANNOTATION_MODEL_DELETED) == "true":
        return None
    return status.fine_tuned_model


def adapter_ref(job: FineTuneJob) -> AdapterRef | None:
    """The adapter a job's model is served from, or None when it should not be served."""
    model = _servable_model(job)
    if model is None:
        return None
    return AdapterRef(
        name=model, org=job.spec.org, job_id=job.metadata.name, base_model=job.spec.base_model
    )


def checkpoint_model_name(model: str, step: int) -> str:
    """The model name of checkpoint ``step`` of the fine-tuned ``model``."""
    return f"{model}{CHECKPOINT_MODEL_MARK}{step}"


@dataclass(frozen=True)
class JobAdapters:
    """What one job offers for serving: its final adapter, and its checkpoints whose model was
    asked for (``kubetune.io/checkpoint-used-step-N``, kept ones only) with when each was last
    used.
    """

    final: AdapterRef | None = None
    checkpoints: tuple[tuple[float, AdapterRef], ...] = ()

    @property
    def base_model(self) -> str | None:
        """The base model they are served on (None: nothing to serve)."""
        ref = self.final or (self.checkpoints[0][1] if self.checkpoints else None)
        return ref.base_model if ref else None


def job_adapters(job: FineTuneJob) -> JobAdapters:
    """The adapters ``job`` offers for serving."""
    model = _servable_model(job)
    if model is None or job.status is None:
        return JobAdapters()
    kept = {c.step for c in job.status.checkpoints}
    used = checkpoints_in_use(job.metadata.annotations)
    checkpoints = tuple(
        (
            when,
            AdapterRef(
                name=checkpoint_model_name(model, step),
                org=job.spec.org,
                job_id=job.metadata.name,
                base_model=job.spec.base_model,
                step=step,
            ),
        )
        for step, when in sorted(used.items())
        if step in kept
    )
    return JobAdapters(adapter_ref(job), checkpoints)


def choose_adapters(
    offered: Iterable[JobAdapters], *, checkpoint_slots: int
) -> dict[str, list[AdapterRef]]:
    """The adapters each base model should serve (sorted by name): every final adapter, and
    the ``checkpoint_slots`` most recently used checkpoints — the least recently used beyond
    those are unloaded to make room.
    """
    result: dict[str, list[AdapterRef]] = {}
    used: dict[str, list[tuple[float, AdapterRef]]] = {}
    for job in offered:
        if job.final is not None:
            result.setdefault(job.final.base_model, []).append(job.final)
        for when, checkpoint in job.checkpoints:
            used.setdefault(checkpoint.base_model, []).append((when, checkpoint))
    for base, candidates in used.items():
        newest = sorted(candidates, key=lambda c: (-c[0], c[1].name))[:checkpoint_slots]
        result.setdefault(base, []).extend(ref for _, ref in newest)
    return {base: sorted(set(refs)) for base, refs in result.items() if refs}


def desired_adapters(
    jobs: Iterable[FineTuneJob], *, checkpoint_slots: int
) -> dict[str, list[AdapterRef]]:
    """The adapters each base model should serve, from every job known (see
    :func:`choose_adapters`).
    """
    return choose_adapters(map(job_adapters, jobs), checkpoint_slots=checkpoint_slots)


def folder_name(name: str) -> str:
    """The folder an adapter is stored in: its name, which vLLM's filesystem resolver looks
    up, unless the name could not be one path segment (then a sanitized name and a hash).
    """
    if _SAFE_NAME.match(name) and name not in (".", ".."):
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9._:-]', '_', name)[:180]}-{digest}"


# ---------------------------------------------------------------------------------------------
# Errors and results
# ---------------------------------------------------------------------------------------------


class ServingError(Exception):
    """An adapter could not be loaded or unloaded; ``code`` says why, the message to whom."""

    code = "serving_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


def rejection_error(code: str | None, message: str | None) -> JobError:
    """The job's user-facing error for an adapter that cannot be served (operator and local)."""
    code = code or "adapter_rejected"
    text = f"The fine-tuned model cannot be served: {message or code}"
    return JobError(
        code=code,
        message=text[:4096],
        param="adapter.r" if code == "adapter_rank_too_large" else None,
        kind=ErrorKind.USER,
    )


class AdapterRejected(ServingError):
    """The adapter can never be served as it is (its rank, its type): the user's to fix."""

    code = "adapter_rejected"


class ServingUnavailable(ServingError):
    """vLLM or the object store did not answer: retried by the next sync."""

    code = "serving_unavailable"


class SyncState(StrEnum):
    """Where one adapter stands on one replica after a sync."""

    LOADED = "loaded"
    UNLOADED = "unloaded"
    REJECTED = "rejected"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class SyncResult:
    """One adapter on one replica: its state, whether this call changed it, how long it took."""

    state: SyncState
    changed: bool = False
    seconds: float = 0.0
    code: str | None = None
    message: str | None = None

    def to_json(self) -> dict[str, Any]:
        """As the sidecar's API carries it."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SyncResult:
        """Read one from the sidecar's API."""
        return cls(
            state=SyncState(data["state"]),
            changed=bool(data.get("changed", False)),
            seconds=float(data.get("seconds", 0.0)),
            code=data.get("code"),
            message=data.get("message"),
        )


# ---------------------------------------------------------------------------------------------
# The adapter's config
# ---------------------------------------------------------------------------------------------


def adapter_rank(config: Mapping[str, Any]) -> int:
    """The largest LoRA rank of a PEFT adapter config, as vLLM computes it."""
    ranks = [int(config.get("r") or 0)]
    ranks += [int(v) for v in (config.get("rank_pattern") or {}).values()]
    return max(ranks)


def prepare_adapter_config(
    config: Mapping[str, Any], *, vllm_model: str | None, max_lora_rank: int
) -> dict[str, Any]:
    """Check a PEFT ``adapter_config.json`` against what vLLM serves; return it for vLLM.

    Raises :class:`AdapterRejected` for what vLLM would refuse (not LoRA, a rank above
    ``max_lora_rank``, a bias). ``base_model_name_or_path`` becomes ``vllm_model`` (vLLM's
    ``--model``), which vLLM's filesystem resolver compares.
    """
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterRejected(
            f"the adapter is not a LoRA adapter (peft_type {peft_type or 'missing'}); vLLM "
            "serves LoRA adapters only",
            code="adapter_not_lora",
        )
    rank = adapter_rank(config)
    if rank > max_lora_rank:
        raise AdapterRejected(
            f"the adapter's LoRA rank {rank} is larger than the largest rank the vLLM "
            f"deployment serves (--max-lora-rank {max_lora_rank}); train with adapter.r ≤ "
            f"{max_lora_rank}, or raise the deployment's maxLoraRank to a rank of "
            f"{[r for r in VLLM_LORA_RANKS if r >= rank]}",
            code="adapter_rank_too_large",
        )
    if str(config.get("bias") or "none") != "none":
        raise AdapterRejected(
            f"the adapter trains biases (bias {config.get('bias')!r}), which vLLM cannot serve",
            code="adapter_bias_unsupported",
        )
    result = dict(config)
    if vllm_model:
        result["base_model_name_or_path"] = vllm_model
    return result


# ---------------------------------------------------------------------------------------------
# One replica
# ---------------------------------------------------------------------------------------------


def _error_text(response: httpx.Response) -> str:
    """VLLM's error message ({"error": {"message"}}, or the body)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return response.text[:500]


# vLLM 0.32 answers 500 when its own checks (PEFTHelper.validate_legal) refuse an adapter.
_VLLM_REFUSALS: Final = ("greater than max_lora_rank", "is not supported", "not supported")


class ReplicaAdapters:
    """The adapters of one vLLM replica and the folder it reads them from.

    Methods are blocking and serialized (one lock per instance): call them from a worker
    thread in async code.
    """

    def __init__(
        self,
        store: ObjectStore,
        layout: StorageLayout,
        vllm_url: str,
        adapter_dir: Path,
        vllm_model: str | None,
        max_lora_rank: int,
        *,
        timeout: float = 120.0,
        api_key: str | None = None,
    ) -> None:
        self.store = store
        self.layout = layout
        self.vllm_url = vllm_url.rstrip("/")
        self.adapter_dir = Path(adapter_dir)
        self.vllm_model = vllm_model
        self.max_lora_rank = max_lora_rank
        # vLLM's --api-key guards /v1 (models, load and unload of adapters).
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.vllm_url, timeout=timeout, headers=headers)
        self._lock = threading.RLock()

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- vLLM -----------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        try:
            return self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise ServingUnavailable(f"vLLM at {self.vllm_url} did not answer: {exc}") from exc

    def loaded(self) -> set[str]:
        """Names of the LoRA adapters vLLM serves now (from ``/v1/models``)."""
        response = self._request("GET", "/v1/models")
        if response.status_code != 200:
            raise ServingUnavailable(f"vLLM /v1/models answered {response.status_code}")
        return {
            str(m["id"]) for m in response.json().get("data", []) if m.get("parent") is not None
        }

    def _load(self, name: str, path: Path) -> bool:
        """POST /v1/load_lora_adapter; False if it was loaded already."""
        response = self._request(
            "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}
        )
        if response.status_code == 200:
            return True
        text = _error_text(response)
        if response.status_code == 400 and "already been loaded" in text:
            return False
        if 400 <= response.status_code < 500 or any(r in text for r in _VLLM_REFUSALS):
            raise AdapterRejected(f"vLLM refused the adapter {name}: {text}", code="vllm_refused")
        raise ServingUnavailable(f"vLLM failed to load {name} ({response.status_code}): {text}")

    def _unload(self, name: str) -> bool:
        """POST /v1/unload_lora_adapter; False if it was not loaded."""
        response = self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        if response.status_code == 200:
            return True
        text = _error_text(response)
        if response.status_code in (400, 404) and "cannot be found" in text:
            return False
        raise ServingUnavailable(f"vLLM failed to unload {name} ({response.status_code}): {text}")

    # -- files ----------------------------------------------------------------------------------
    def path_of(self, name: str) -> Path:
        """The folder vLLM reads adapter ``name`` from."""
        return self.adapter_dir / folder_name(name)

    def _fetch(self, ref: AdapterRef) -> Path:
        """The adapter's folder, downloaded and checked first if it is not there yet."""
        target = self.path_of(ref.name)
        if (target / ADAPTER_CONFIG).exists():
            return target
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.adapter_dir / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
        try:
            self._download(ref, tmp)
            config_path = tmp / ADAPTER_CONFIG
            config = prepare_adapter_config(
                json.loads(config_path.read_text()),
                vllm_model=self.vllm_model,
                max_lora_rank=self.max_lora_rank,
            )
            config_path.write_text(json.dumps(config, indent=2))
            if target.exists():  # an incomplete leftover (no config): replace it
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def _download(self, ref: AdapterRef, dest: Path) -> None:
        what = f"the adapter of {ref.job_id}"
        if ref.step is not None:
            what = f"checkpoint {ref.step} of {ref.job_id}"
        manifest = self.layout.model_manifest_key(ref.org, ref.job_id, ref.step)
        prefix = self.layout.model_prefix(ref.org, ref.job_id, ref.step)
        try:
            if not self.store.exists(manifest):
                raise AdapterRejected(f"{what} is not in the object store", code="adapter_missing")
            # A checkpoint's folder also holds the optimizer state: only the adapter is served.
            only = ADAPTER_FILES if ref.step is not None else None
            self.store.download_prefix(prefix, dest, only=only)
        except ServingError:
            raise
        except ObjectNotFound as exc:
            raise AdapterRejected(
                f"{what} is incomplete in the object store: {exc}", code="adapter_missing"
            ) from exc
        except Exception as exc:  # the store's client raises its own errors (botocore, OSError)
            raise ServingUnavailable(f"could not fetch {what}: {exc}") from exc
        if not (dest / ADAPTER_CONFIG).exists():
            raise AdapterRejected(f"{what} has no {ADAPTER_CONFIG}", code="adapter_missing")

    def _remove_folder(self, name: str) -> None:
        shutil.rmtree(self.path_of(name), ignore_errors=True)

    # -- the operations -------------------------------------------------------------------------
    def ensure_loaded(self, ref: AdapterRef) -> SyncResult:
        """Serve ``ref`` on this replica (fetch, check, load); idempotent.

        Raises :class:`AdapterRejected` or :class:`ServingUnavailable`.
        """
        with self._lock:
            return self._ensure_loaded(ref, self.loaded())

    def _ensure_loaded(self, ref: AdapterRef, loaded: set[str]) -> SyncResult:
        started = time.monotonic()
        try:
            path = self._fetch(ref)  # also when loaded: vLLM reloads evicted adapters from it
            changed = ref.name not in loaded and self._load(ref.name, path)
        except AdapterRejected:
            # Nothing of a refused adapter stays served, nor where vLLM's resolver finds it.
            if ref.name in loaded:
                self._unload(ref.name)
            self._remove_folder(ref.name)
            raise
        return SyncResult(SyncState.LOADED, changed, time.monotonic() - started)

    def ensure_unloaded(self, name: str) -> SyncResult:
        """Stop serving ``name`` and delete its folder; idempotent."""
        with self._lock:
            changed = self._unload(name)
            self._remove_folder(name)
            return SyncResult(SyncState.UNLOADED, changed)

    def sync(self, desired: Iterable[AdapterRef]) -> dict[str, SyncResult]:
        """Make this replica serve exactly ``desired`` among kubetune's (``ft:``) adapters.

        Loads what is missing, unloads the rest and deletes stale folders. A rejected or
        failed adapter does not stop the others; its result says why. Raises
        :class:`ServingUnavailable` only when vLLM cannot be asked what it serves.
        """
        wanted = {ref.name: ref for ref in desired}
        with self._lock:
            loaded = self.loaded()
            results: dict[str, SyncResult] = {}
            for name, ref in sorted(wanted.items()):
                results[name] = self._try(lambda r=ref: self._ensure_loaded(r, loaded))
            for name in sorted(loaded - wanted.keys()):
                if name.startswith(ADAPTER_NAME_PREFIX):
                    results[name] = self._try(lambda n=name: self.ensure_unloaded(n))
            self._remove_stale_folders({folder_name(n) for n in wanted})
            return results

    @staticmethod
    def _try(action: Any) -> SyncResult:
        try:
            result: SyncResult = action()
        except AdapterRejected as exc:
            return SyncResult(SyncState.REJECTED, code=exc.code, message=exc.message)
        except ServingUnavailable as exc:
            return SyncResult(SyncState.UNAVAILABLE, code=exc.code, message=exc.message)
        return result

    def _remove_stale_folders(self, keep: set[str]) -> None:
        """Delete folders of adapters no longer wanted, so vLLM's resolver cannot load them."""
        if not self.adapter_dir.is_dir():
            return
        for entry in self.adapter_dir.iterdir():
            ours = entry.name.startswith((ADAPTER_NAME_PREFIX, TEMP_PREFIX))
            if entry.is_dir() and ours and entry.name not in keep:
                with contextlib.suppress(OSError):
                    shutil.rmtree(entry)
