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

from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Final

from pydantic import BaseModel, Field

from kubetune.finetunejob import ORG_PATTERN
from kubetune.settings import BASE_MODEL_ID_PATTERN, BaseModelEntry

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
    context_length: int | None = Field(
        default=None, ge=16, description="Longest sequence to train on (default: the model's)."
    )
    created: int = Field(ge=0, description="Unix time of the registration.")
    phase: BaseModelPhase = BaseModelPhase.VALIDATING
    message: str | None = Field(default=None, max_length=4000, description="Why it failed.")
    report: BaseModelReport | None = None

    def entry(self, max_context_length: int | None = None) -> BaseModelEntry:
        """The catalogue entry of a ready model: its folder holds the tokenizer too."""
        if self.phase is not BaseModelPhase.READY or self.report is None:
            raise ValueError(f"base model {self.id!r} is {self.phase.value}, not ready")
        lengths = [self.report.context_length, self.context_length, max_context_length]
        return BaseModelEntry(
            id=self.id,
            owned_by=self.org,
            created=self.created,
            tokenizer=None if self.path.startswith("store:") else Path(self.path),
            context_length=min(n for n in lengths if n is not None),
            path=self.path,
        )


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
