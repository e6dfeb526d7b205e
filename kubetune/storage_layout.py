"""Every object-store key kubetune reads or writes, built in one place.

Layout (``<prefix>`` comes from settings and may be empty)::

    <prefix>/orgs/<org>/files/<file-id>                      uploaded JSONL
    <prefix>/orgs/<org>/files/<file-id>.meta.json            its metadata (written after the data)
    <prefix>/orgs/<org>/uploads/<upload-id>/upload.json      a multi-request upload's state
    <prefix>/orgs/<org>/uploads/<upload-id>/<part-id>        one of its parts
    <prefix>/orgs/<org>/jobs/<job-id>/config.json            resolved trainer config
    <prefix>/orgs/<org>/jobs/<job-id>/events/<seq>.jsonl     append-only event chunks
    <prefix>/orgs/<org>/jobs/<job-id>/checkpoints/step-<n>/  checkpoint; manifest.json written last
    <prefix>/orgs/<org>/jobs/<job-id>/adapter/               final adapter
    <prefix>/orgs/<org>/jobs/<job-id>/results.csv            OpenAI-style results file
    <prefix>/orgs/<org>/webhooks/endpoints/<we_…>.json       a registered webhook endpoint
    <prefix>/webhooks/outbox/<wh_…>.json                     a delivery not yet made
    <prefix>/webhooks/delivered/<wh_…>.json                  written after the receiver's 2xx
    <prefix>/webhooks/failed/<wh_…>.json                     a delivery given up on

Keys are checked as they are built: an org or id that could escape its folder (``..``, ``/``)
raises ValueError, so no caller can be talked into reading another tenant's objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from kubetune.finetunejob import ORG_PATTERN
from kubetune.ids import (
    ID_PATTERNS,
    WEBHOOK_ENDPOINT_ID_PATTERN,
    WEBHOOK_MESSAGE_ID_PATTERN,
    IdKind,
)

_ORG_RE: Final = re.compile(ORG_PATTERN)
_FILE_RE: Final = re.compile(ID_PATTERNS[IdKind.FILE])
_JOB_RE: Final = re.compile(ID_PATTERNS[IdKind.JOB])
_UPLOAD_RE: Final = re.compile(ID_PATTERNS[IdKind.UPLOAD])
_PART_RE: Final = re.compile(ID_PATTERNS[IdKind.PART])
_WEBHOOK_ENDPOINT_RE: Final = re.compile(WEBHOOK_ENDPOINT_ID_PATTERN)
_WEBHOOK_MESSAGE_RE: Final = re.compile(WEBHOOK_MESSAGE_ID_PATTERN)
_OBJECT_NAME_RE: Final = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")  # a Kubernetes name
EVENT_CHUNK_DIGITS: Final = 10  # zero-padded so chunks list in order
CHECKPOINT_DIGITS: Final = 10
MANIFEST_NAME: Final = "manifest.json"
# A LoRA adapter's own files, in the adapter folder and in every checkpoint beside the
# optimizer state: all that vLLM, PEFT or a continued job need of it.
ADAPTER_FILES: Final = ("adapter_config.json", "adapter_model.safetensors")
FILE_META_SUFFIX: Final = ".meta.json"  # a file's metadata sits beside its bytes


def _check(value: str, pattern: re.Pattern[str], what: str) -> str:
    if not pattern.match(value):
        raise ValueError(f"invalid {what}: {value!r}")
    return value


@dataclass(frozen=True)
class StorageLayout:
    """Builds object-store keys under an optional prefix."""

    prefix: str = ""

    def _root(self) -> str:
        prefix = self.prefix.strip("/")
        return f"{prefix}/" if prefix else ""

    def org_prefix(self, org: str) -> str:
        """Folder of everything an org owns."""
        return f"{self._root()}orgs/{_check(org, _ORG_RE, 'org')}/"

    def base_model_check_key(self, org: str, name: str) -> str:
        """Key of what the check of a registered base model found (``name``: its BaseModel
        object's): written by the check Job's pod, read by the operator.
        """
        return (
            f"{self.org_prefix(org)}base-models/{_check(name, _OBJECT_NAME_RE, 'name')}/check.json"
        )

    # Files -------------------------------------------------------------------------------
    def files_prefix(self, org: str) -> str:
        """Folder of an org's uploaded files."""
        return f"{self.org_prefix(org)}files/"

    def file_key(self, org: str, file_id: str) -> str:
        """Key of an uploaded file's bytes."""
        return f"{self.files_prefix(org)}{_check(file_id, _FILE_RE, 'file id')}"

    def file_meta_key(self, org: str, file_id: str) -> str:
        """Key of an uploaded file's metadata; its presence makes the file visible."""
        return f"{self.file_key(org, file_id)}{FILE_META_SUFFIX}"

    def uploads_prefix(self, org: str) -> str:
        """Folder of an org's multi-request uploads."""
        return f"{self.org_prefix(org)}uploads/"

    def upload_prefix(self, org: str, upload_id: str) -> str:
        """Folder of a multi-request upload: its state and its parts."""
        return f"{self.uploads_prefix(org)}{_check(upload_id, _UPLOAD_RE, 'upload id')}/"

    def upload_state_key(self, org: str, upload_id: str) -> str:
        """Key of an upload's state (filename, declared size, status)."""
        return f"{self.upload_prefix(org, upload_id)}upload.json"

    def upload_part_key(self, org: str, upload_id: str, part_id: str) -> str:
        """Key of one part of a multi-request upload (the Uploads API)."""
        part = _check(part_id, _PART_RE, "part id")
        return f"{self.upload_prefix(org, upload_id)}{part}"

    # Jobs --------------------------------------------------------------------------------
    def job_prefix(self, org: str, job_id: str) -> str:
        """Folder of everything a job produces."""
        return f"{self.org_prefix(org)}jobs/{_check(job_id, _JOB_RE, 'job id')}/"

    def job_config_key(self, org: str, job_id: str) -> str:
        """Key of the resolved trainer config."""
        return f"{self.job_prefix(org, job_id)}config.json"

    def writer_lease_key(self, org: str, job_id: str) -> str:
        """Key of the lease the trainer that writes a job's checkpoints and result holds."""
        return f"{self.job_prefix(org, job_id)}writer-lease.json"

    def events_prefix(self, org: str, job_id: str) -> str:
        """Folder of a job's event chunks."""
        return f"{self.job_prefix(org, job_id)}events/"

    def event_chunk_key(self, org: str, job_id: str, seq: int) -> str:
        """Key of event chunk ``seq`` (chunks are never rewritten)."""
        if seq < 0:
            raise ValueError("event chunk sequence must be ≥ 0")
        return f"{self.events_prefix(org, job_id)}{seq:0{EVENT_CHUNK_DIGITS}d}.jsonl"

    def checkpoints_prefix(self, org: str, job_id: str) -> str:
        """Folder of a job's checkpoints."""
        return f"{self.job_prefix(org, job_id)}checkpoints/"

    def checkpoint_prefix(self, org: str, job_id: str, step: int) -> str:
        """Folder of the checkpoint taken at ``step``."""
        if step < 0:
            raise ValueError("checkpoint step must be ≥ 0")
        return f"{self.checkpoints_prefix(org, job_id)}step-{step:0{CHECKPOINT_DIGITS}d}/"

    def checkpoint_manifest_key(self, org: str, job_id: str, step: int) -> str:
        """Key of a checkpoint's manifest: written last; without it the checkpoint doesn't exist."""
        return f"{self.checkpoint_prefix(org, job_id, step)}{MANIFEST_NAME}"

    def adapter_prefix(self, org: str, job_id: str) -> str:
        """Folder of the final adapter (what vLLM loads)."""
        return f"{self.job_prefix(org, job_id)}adapter/"

    def adapter_manifest_key(self, org: str, job_id: str) -> str:
        """Key of the final adapter's run manifest, written after the adapter files."""
        return f"{self.adapter_prefix(org, job_id)}{MANIFEST_NAME}"

    def model_prefix(self, org: str, job_id: str, step: int | None = None) -> str:
        """Folder of a fine-tuned model's weights: the final adapter, or (``step``) that
        checkpoint's.
        """
        if step is None:
            return self.adapter_prefix(org, job_id)
        return self.checkpoint_prefix(org, job_id, step)

    def model_manifest_key(self, org: str, job_id: str, step: int | None = None) -> str:
        """Key of the manifest without which that model's weights do not exist (yet)."""
        return f"{self.model_prefix(org, job_id, step)}{MANIFEST_NAME}"

    def merged_prefix(self, org: str, job_id: str, step: int | None = None) -> str:
        """Folder of a LoRA model merged into its base (the final adapter's, or ``step``'s):
        made on request, kept apart from the adapter, so the adapter's download and vLLM's
        loads never pick it up.
        """
        which = "final" if step is None else f"step-{step:0{CHECKPOINT_DIGITS}d}"
        return f"{self.job_prefix(org, job_id)}merged/{which}/"

    def merged_manifest_key(self, org: str, job_id: str, step: int | None = None) -> str:
        """Key of a merged model's manifest: written last; without it the merge is not done."""
        return f"{self.merged_prefix(org, job_id, step)}{MANIFEST_NAME}"

    def merge_failure_key(self, org: str, job_id: str, step: int | None = None) -> str:
        """Key of why the last merge of that model failed (beside its folder, never in it)."""
        return f"{self.merged_prefix(org, job_id, step).rstrip('/')}.failure.json"

    def results_key(self, org: str, job_id: str) -> str:
        """Key of the OpenAI-style results CSV."""
        return f"{self.job_prefix(org, job_id)}results.csv"

    # Webhooks ----------------------------------------------------------------------------
    def webhook_endpoints_prefix(self, org: str) -> str:
        """Folder of an org's registered webhook endpoints."""
        return f"{self.org_prefix(org)}webhooks/endpoints/"

    def webhook_endpoint_key(self, org: str, endpoint_id: str) -> str:
        """Key of one registered webhook endpoint (url, secret, event types)."""
        endpoint = _check(endpoint_id, _WEBHOOK_ENDPOINT_RE, "webhook endpoint id")
        return f"{self.webhook_endpoints_prefix(org)}{endpoint}.json"

    def webhook_outbox_prefix(self) -> str:
        """Folder of pending webhook deliveries (of every org: one sender lists one folder)."""
        return f"{self._root()}webhooks/outbox/"

    def webhook_outbox_key(self, message_id: str) -> str:
        """Key of one pending delivery."""
        message = _check(message_id, _WEBHOOK_MESSAGE_RE, "webhook message id")
        return f"{self.webhook_outbox_prefix()}{message}.json"

    def webhook_delivered_prefix(self) -> str:
        """Folder of delivery markers."""
        return f"{self._root()}webhooks/delivered/"

    def webhook_delivered_key(self, message_id: str) -> str:
        """Key of a delivery's marker, written once the receiver answered 2xx."""
        message = _check(message_id, _WEBHOOK_MESSAGE_RE, "webhook message id")
        return f"{self.webhook_delivered_prefix()}{message}.json"

    def webhook_failed_key(self, message_id: str) -> str:
        """Key of a delivery given up on (attempts exhausted, endpoint gone)."""
        message = _check(message_id, _WEBHOOK_MESSAGE_RE, "webhook message id")
        return f"{self._root()}webhooks/failed/{message}.json"


def checkpoint_step_from_key(key: str) -> int | None:
    """Parse the step out of a key inside a checkpoint folder, or None if it isn't one."""
    match = re.search(r"/checkpoints/step-(\d+)/", key)
    return int(match.group(1)) if match else None
