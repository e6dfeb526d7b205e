"""Base models registered at run time, beside the catalogue of the settings (Helm's ``models``).

An org's admin registers a Hugging Face model folder under a name (``POST /v1/models``,
``kubetune models add``). The model is ``validating`` until the job driver has checked it (its
config names a causal LM, its weights are there, its tokenizer and chat template load, vLLM
serves its architecture: ``kubetune_trainer.inspect_model``), then ``ready`` — listed in the
org's ``/v1/models`` and trainable like a catalogue model — or ``failed`` with the reason.

A registered model belongs to the org that registered it: no other org sees, trains on or
deletes it, as for fine-tuned models. Its name may not shadow a catalogue model's.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Final

from pydantic import BaseModel, Field

from kubetune.finetunejob import GROUP, LABEL_ORG, ORG_PATTERN, VERSION, CRModel
from kubetune.settings import BASE_MODEL_ID_PATTERN, BaseModelEntry

# The BaseModel custom resource (cluster mode): one per registered model, in the release's
# namespace; the API creates and deletes it, the operator checks it and writes its status.
KIND: Final = "BaseModel"
PLURAL: Final = "basemodels"
SINGULAR: Final = "basemodel"
CRD_NAME: Final = f"{PLURAL}.{GROUP}"
# A Kubernetes object name: what a claim's name must look like.
K8S_NAME_PATTERN: Final = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
# The PersistentVolumeClaim holding a registered model's folder (cluster mode).
VolumeClaim = Annotated[
    str,
    Field(
        max_length=253,
        pattern=K8S_NAME_PATTERN,
        description="A PersistentVolumeClaim holding the folder, mounted read-only at path in "
        "the check's and the trainers' pods (cluster mode).",
    ),
]

# Registered models an org may hold: each is a catalogue entry every listing and job looks at.
MAX_BASE_MODELS_PER_ORG: Final = 64


class BaseModelPhase(StrEnum):
    """Where a registered base model stands."""

    VALIDATING = "validating"
    READY = "ready"
    FAILED = "failed"


class BaseModelReport(BaseModel):
    """What the check found (``kubetune_trainer.inspect_model``'s report)."""

    architecture: str = Field(max_length=256)
    model_type: str = Field(default="", max_length=256)
    context_length: int = Field(ge=16)
    hidden_size: int | None = None


class RegisteredBaseModel(BaseModel):
    """A base model an org registered, and what its check found."""

    id: str = Field(pattern=BASE_MODEL_ID_PATTERN)
    org: str = Field(pattern=ORG_PATTERN, description="The org it belongs to.")
    path: str = Field(
        min_length=1,
        max_length=1024,
        description="The model's Hugging Face folder, where the trainer (and vLLM) read it.",
    )
    volume_claim: VolumeClaim | None = None
    context_length: int | None = Field(
        default=None, ge=16, description="Longest sequence to train on (default: the model's)."
    )
    created: int = Field(ge=0, description="Unix time of the registration.")
    phase: BaseModelPhase = BaseModelPhase.VALIDATING
    message: str | None = Field(default=None, max_length=4000, description="Why it failed.")
    report: BaseModelReport | None = None

    @property
    def effective_context_length(self) -> int | None:
        """The longest sequence it trains on: the smaller of the model's (once checked) and
        the one asked for; None while neither is known.
        """
        measured = self.report.context_length if self.report is not None else None
        known = [n for n in (measured, self.context_length) if n is not None]
        return min(known) if known else None

    def entry(self, max_context_length: int | None = None) -> BaseModelEntry:
        """The catalogue entry of a ready model: its folder holds the tokenizer too."""
        length = self.effective_context_length
        if self.phase is not BaseModelPhase.READY or self.report is None or length is None:
            raise ValueError(f"base model {self.id!r} is {self.phase.value}, not ready")
        return BaseModelEntry(
            id=self.id,
            owned_by=self.org,
            created=self.created,
            tokenizer=self._tokenizer_here(),
            context_length=min(length, max_context_length or length),
            path=self.path,
            volume_claim=self.volume_claim,
        )

    def _tokenizer_here(self) -> Path | None:
        """The folder, for token counts, when its tokenizer is on this machine: in local mode;
        on a cluster the folder is in the trainers' volume, and counts are estimated.
        """
        if self.path.startswith("store:") or self.volume_claim is not None:
            return None
        folder = Path(self.path)
        return folder if (folder / "tokenizer.json").is_file() else None


def inspected(model: RegisteredBaseModel, answer: Any, code: int | None) -> RegisteredBaseModel:
    """``model`` with what ``kubetune_trainer.inspect_model`` answered (its JSON, its exit
    status; None where it is not known): the report, or failed with the reason.
    """
    if code in (0, None) and isinstance(answer, dict) and "architecture" in answer:
        try:
            report = BaseModelReport.model_validate(answer)
        except ValueError as exc:
            return failed(model, f"the check answered a report that does not hold: {exc}")
        return model.model_copy(update={"report": report})
    reason = answer.get("error") if isinstance(answer, dict) else None
    crashed = f"the check of {model.path} crashed" + (f" (exit {code})" if code else "")
    return failed(model, str(reason or crashed))


def failed(model: RegisteredBaseModel, reason: str) -> RegisteredBaseModel:
    """``model`` failed for ``reason``."""
    return model.model_copy(update={"phase": BaseModelPhase.FAILED, "message": reason[-4000:]})


def org_catalogue(
    static: Iterable[BaseModelEntry],
    registered: Iterable[RegisteredBaseModel],
    org: str,
    *,
    max_context_length: int | None = None,
) -> list[BaseModelEntry]:
    """The base models ``org`` may list and train on: the settings' catalogue, then the org's
    ready registered models (a name already in the catalogue is never shadowed).
    """
    out = list(static)
    taken = {m.id for m in out}
    for model in registered:
        if model.org == org and model.phase is BaseModelPhase.READY and model.id not in taken:
            out.append(model.entry(max_context_length))
            taken.add(model.id)
    return out


# ---------------------------------------------------------------------------------------------
# The BaseModel custom resource
# ---------------------------------------------------------------------------------------------


class BaseModelSpec(CRModel):
    """What an org's admin registered (the API writes it; it never changes)."""

    org: str = Field(pattern=ORG_PATTERN, description="The org it belongs to.")
    id: str = Field(pattern=BASE_MODEL_ID_PATTERN, description="Its name in requests.")
    path: str = Field(
        min_length=1,
        max_length=1024,
        description="The model's Hugging Face folder in the trainers' pods, or 'store:<key "
        "prefix>' for a folder in the object store.",
    )
    volume_claim: VolumeClaim | None = None
    context_length: int | None = Field(
        default=None, ge=16, description="Longest sequence to train on (default: the model's)."
    )
    created: int = Field(ge=0, description="Unix time of the registration.")


class BaseModelReportStatus(CRModel):
    """What the check found (``kubetune_trainer.inspect_model``'s report)."""

    architecture: str = Field(max_length=256)
    model_type: str = Field(default="", max_length=256)
    context_length: int = Field(ge=16)
    hidden_size: int | None = None


class BaseModelStatus(CRModel):
    """Where the check stands (only the operator writes it)."""

    phase: BaseModelPhase = Field(description="validating, ready or failed.")
    message: str | None = Field(default=None, max_length=4000, description="Why it failed.")
    report: BaseModelReportStatus | None = None
    checked_at: datetime | None = Field(default=None, description="When the check ended.")


def resource_name(org: str, model_id: str) -> str:
    """The BaseModel object of an org's model: readable, unique per (org, id), and short
    enough that its check Job's name (and the pods' ``job-name`` label) stays under 63.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", f"{org}-{model_id}".lower()).strip("-")[:36].strip("-")
    digest = hashlib.sha256(f"{org}\0{model_id}".encode()).hexdigest()[:10]
    return f"{slug}-{digest}"


def to_manifest(model: RegisteredBaseModel, namespace: str) -> dict[str, Any]:
    """The BaseModel object of ``model`` (its status is the operator's to write)."""
    spec = BaseModelSpec(
        org=model.org,
        id=model.id,
        path=model.path,
        volume_claim=model.volume_claim,
        context_length=model.context_length,
        created=model.created,
    )
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": resource_name(model.org, model.id),
            "namespace": namespace,
            "labels": {LABEL_ORG: model.org},
        },
        "spec": spec.to_wire(),
    }


def from_manifest(obj: Mapping[str, Any]) -> RegisteredBaseModel:
    """The registered model a BaseModel object stands for (``validating`` until checked)."""
    spec = BaseModelSpec.model_validate(obj.get("spec") or {})
    raw_status = obj.get("status") or {}
    status = BaseModelStatus.model_validate(raw_status) if raw_status.get("phase") else None
    report = status.report if status is not None else None
    return RegisteredBaseModel(
        id=spec.id,
        org=spec.org,
        path=spec.path,
        volume_claim=spec.volume_claim,
        context_length=spec.context_length,
        created=spec.created,
        phase=status.phase if status is not None else BaseModelPhase.VALIDATING,
        message=status.message if status is not None else None,
        report=BaseModelReport.model_validate(report.model_dump()) if report else None,
    )


def status_of(model: RegisteredBaseModel, checked_at: datetime | None = None) -> BaseModelStatus:
    """The status a BaseModel object gets for ``model``'s check outcome."""
    report = model.report
    return BaseModelStatus(
        phase=model.phase,
        message=model.message,
        report=BaseModelReportStatus.model_validate(report.model_dump()) if report else None,
        checked_at=checked_at,
    )
