"""Local mode's checks of the base models registered at run time (``POST /v1/models``,
``kubetune models add``; :mod:`kubetune.base_models`).

Each sweep of the job loop moves one check along, in guarded children (registered, stopped
with the server, never orphaned), as the operator would run a check Job:

1. ``python -m kubetune_trainer.inspect_model FOLDER`` in the trainer's interpreter: its
   config names a causal LM, its weights are there, its tokenizer and chat template load; it
   prints the report (architecture, context length) or why the folder is unusable;
2. when vLLM is installed, vLLM's interpreter lists the architectures it serves (asked once
   per run, then remembered), so a model whose fine-tunes could never answer is refused.

Then the model is ``ready`` or ``failed`` with the reason. A check cut short (Ctrl-C, a crash)
left the model ``validating``: the next start checks it again.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from kubetune.base_models import BaseModelPhase, RegisteredBaseModel, failed, inspected
from kubetune_api.backends.local import LocalJobBackend
from kubetune_local.policy import HOST_ENV
from kubetune_local.process import ChildProcess, children_registry

log = logging.getLogger(__name__)

INSPECT_MODULE: Final = "kubetune_trainer.inspect_model"
# Asked of the vLLM venv's interpreter: the architectures this vLLM serves (about 12 s on a CPU).
VLLM_ARCHITECTURES: Final = (
    "import json, vllm; from vllm import ModelRegistry; "
    "print(json.dumps([vllm.__version__, sorted(ModelRegistry.get_supported_archs())]))"
)
CHECK_GRACE_SECONDS: Final = 5.0
# Offline, like the trainer: a folder is checked as it is, nothing is fetched from the Hub.
OFFLINE_ENV: Final = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

Stage = Literal["inspect", "vllm"]


def last_json(text: str) -> Any:
    """The last line of ``text`` that is JSON (a child's answer after its log lines), or None."""
    for line in reversed(text.splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def vllm_verdict(
    model: RegisteredBaseModel, version: str, served: list[str]
) -> RegisteredBaseModel:
    """Ready when this vLLM serves the model's architecture, else failed with why."""
    assert model.report is not None
    if model.report.architecture in served:
        return model.model_copy(update={"phase": BaseModelPhase.READY, "message": None})
    return failed(
        model,
        f"vLLM {version} does not serve {model.report.architecture}, so its fine-tuned models "
        "could not answer (see vLLM's supported models)",
    )


@dataclass
class RunningCheck:
    """The check in progress: which model, which stage, its process."""

    model: RegisteredBaseModel
    stage: Stage
    process: ChildProcess


class LocalBaseModelChecks:
    """Checks local mode's registered base models, one at a time (see the module docstring)."""

    def __init__(
        self,
        backend: LocalJobBackend,
        data_dir: Path,
        *,
        python: str,
        host_env: Mapping[str, str],
        vllm_python: Callable[[], Path | None],
    ) -> None:
        self.backend = backend
        self.data_dir = data_dir
        self.python = python
        self.env = {**{k: host_env[k] for k in HOST_ENV if k in host_env}, **OFFLINE_ENV}
        self.vllm_python = vllm_python
        self.running: RunningCheck | None = None
        self._served: tuple[str, list[str]] | None = None  # vLLM's version and architectures

    def sync(self) -> None:
        """Move the check in progress along, or start the next model's."""
        if self.running is not None:
            code = self.running.process.poll()
            if code is None:
                return
            check, self.running = self.running, None
            self._ended(check, code)
            return
        waiting = self.backend.base_models()
        model = next((m for m in waiting if m.phase is BaseModelPhase.VALIDATING), None)
        if model is not None:
            self._start(model, "inspect", [self.python, "-m", INSPECT_MODULE, model.path])

    def close(self) -> None:
        """Stop the check in progress (the next start checks the model again)."""
        if self.running is not None:
            self.running.process.stop(CHECK_GRACE_SECONDS)
            self.running = None

    def _start(self, model: RegisteredBaseModel, stage: Stage, argv: list[str]) -> None:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model.org}-{model.id}")
        process = ChildProcess(
            f"check of base model {model.id} ({stage})",
            argv,
            env=self.env,
            cwd=self.data_dir / "checks",
            log_path=self.data_dir / "logs" / f"base-model-{name}.log",
            grace=CHECK_GRACE_SECONDS,
            registry=children_registry(self.data_dir),
        )
        self.running = RunningCheck(model, stage, process)

    def _ended(self, check: RunningCheck, code: int) -> None:
        answer = last_json(check.process.log_tail())
        model = check.model
        if check.stage == "vllm":
            if isinstance(answer, list) and len(answer) == 2 and code == 0:
                self._served = (str(answer[0]), list(answer[1]))
            else:  # vLLM would not start either; its own start says why
                log.warning("could not ask vLLM which architectures it serves (exit %d)", code)
                self._served = ("(unknown)", [])
        else:
            model = inspected(model, answer, code)
        if model.phase is BaseModelPhase.VALIDATING:
            model = self._after_inspection(model)
        if model.phase is not BaseModelPhase.VALIDATING:
            self._record(model)

    def _after_inspection(self, model: RegisteredBaseModel) -> RegisteredBaseModel:
        """Ready, failed, or still validating while vLLM is asked (once per run)."""
        if self._served is not None and self._served[1]:
            return vllm_verdict(model, *self._served)
        python = self.vllm_python()
        if python is None or self._served is not None:  # no vLLM here: nothing serves anyway
            return model.model_copy(update={"phase": BaseModelPhase.READY})
        self._start(model, "vllm", [str(python), "-c", VLLM_ARCHITECTURES])
        return model

    def _record(self, model: RegisteredBaseModel) -> None:
        # Deleted (or deleted and registered anew) while it was checked: not this check's.
        current = self.backend.get_base_model(model.org, model.id)
        if current is None or (current.path, current.created) != (model.path, model.created):
            return
        self.backend.put_base_model(model)
        log.info(
            "base model %s of %s: %s %s", model.id, model.org, model.phase, model.message or ""
        )
