"""Local mode's checks of registered base models, with the real ``inspect_model`` child on
real folders: a usable model becomes ``ready`` with its report, an unusable one ``failed`` with
the reason, one at a time, and a model deleted (or registered anew) meanwhile keeps its record.
vLLM's architecture list, asked of the vLLM venv, is tests/local/test_own_model.py's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from kubetune.base_models import BaseModelPhase, BaseModelReport, RegisteredBaseModel
from kubetune_api.backends.local import LocalJobBackend
from kubetune_local.base_models import LocalBaseModelChecks, last_json, vllm_verdict
from kubetune_local.process import children_registry
from tests.local.server import tiny_model_folder


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_folder(tmp_path_factory.mktemp("models") / "Llama-mine")


def model(model_id: str, path: Path, created: int = 1) -> RegisteredBaseModel:
    return RegisteredBaseModel(id=model_id, org="local", path=str(path), created=created)


def checks(backend: LocalJobBackend, data_dir: Path) -> LocalBaseModelChecks:
    return LocalBaseModelChecks(
        backend,
        data_dir,
        python=sys.executable,
        host_env={"PATH": "/usr/bin:/bin"},
        vllm_python=lambda: None,
    )


def run_until_idle(check: LocalBaseModelChecks, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    check.sync()
    while check.running is not None:
        assert time.monotonic() < deadline, "the check did not end"
        time.sleep(0.2)
        check.sync()


def test_usable_and_unusable_folders_are_told_apart(tmp_path: Path, model_folder: Path) -> None:
    backend = LocalJobBackend(tmp_path / "jobs.sqlite3")
    empty = tmp_path / "empty"
    empty.mkdir()
    backend.add_base_model(model("good", model_folder))
    backend.add_base_model(model("empty", empty))
    check = checks(backend, tmp_path / "data")
    run_until_idle(check)  # one model per check: "empty" first (by name)
    run_until_idle(check)
    got = {m.id: m for m in backend.base_models("local")}
    assert got["empty"].phase is BaseModelPhase.FAILED
    assert got["empty"].message == f"{empty} has no config.json: not a Hugging Face model folder"
    assert got["good"].phase is BaseModelPhase.READY
    assert got["good"].report is not None
    assert got["good"].report.architecture == "LlamaForCausalLM"
    assert got["good"].entry().tokenizer == model_folder
    assert not list(children_registry(tmp_path / "data").iterdir())  # nothing left behind


def test_a_model_deleted_while_checked_stays_deleted(tmp_path: Path, model_folder: Path) -> None:
    backend = LocalJobBackend(tmp_path / "jobs.sqlite3")
    backend.add_base_model(model("m", model_folder))
    check = checks(backend, tmp_path / "data")
    check.sync()
    assert check.running is not None
    backend.delete_base_model("local", "m")
    backend.add_base_model(model("m", tmp_path, created=2))  # the same name, another folder
    run_until_idle(check)
    (again,) = backend.base_models("local")
    assert (again.path, again.phase) == (str(tmp_path), BaseModelPhase.VALIDATING)
    check.close()


def test_vllm_must_serve_the_architecture() -> None:
    report = BaseModelReport(architecture="MambaForCausalLM", context_length=2048)
    inspected = model("m", Path("/m")).model_copy(update={"report": report})
    refused = vllm_verdict(inspected, "0.32.0", ["LlamaForCausalLM"])
    assert refused.phase is BaseModelPhase.FAILED
    assert refused.message is not None
    assert "vLLM 0.32.0 does not serve MambaForCausalLM" in refused.message
    assert vllm_verdict(inspected, "0.32.0", ["MambaForCausalLM"]).phase is BaseModelPhase.READY


def test_a_childs_answer_is_its_last_json_line() -> None:
    assert last_json('INFO loading\n{"error": "no"}\n') == {"error": "no"}
    assert last_json("Traceback ...\nKeyError: x\n") is None
