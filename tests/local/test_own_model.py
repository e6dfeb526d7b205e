"""Local mode with a model folder of your own (``make run RUN_ARGS="--model FOLDER"``): checked
first, then listed, fine-tuned and served under its name by the real vLLM, through the SDK.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from examples import demo
from tests.cli.conftest import run_cli
from tests.harness.paths import REPO_ROOT
from tests.local.server import LocalServer, tiny_model_folder

pytestmark = pytest.mark.xdist_group("vllm")

NAME = "my-llama"
JOB_TIMEOUT = 240.0


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face model folder of the user's (the tiny Llama, made as local mode makes it)."""
    return tiny_model_folder(tmp_path_factory.mktemp("models") / "Llama-mine")


def wait_for_job(client: Any, job: Any) -> Any:
    """The job once it ended (or ``JOB_TIMEOUT`` passed)."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while job.status not in demo.FINAL and time.monotonic() < deadline:
        time.sleep(1)
        job = client.fine_tuning.jobs.retrieve(job.id)
    return job


@pytest.fixture(scope="module")
def server(model_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """Local mode serving ``model_folder`` as ``my-llama``."""
    server = LocalServer(
        tmp_path_factory.mktemp("own") / "data",
        extra_args=["--model", str(model_folder), "--model-name", NAME],
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_folder_that_cannot_be_a_base_model_stops_local_mode_with_the_reason(
    tmp_path: Path, model_folder: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")}
    argv = [sys.executable, "-m", "kubetune_local", "--data-dir", str(tmp_path / "data")]
    # A causal LM by its config that this vLLM has never heard of.
    unknown = tmp_path / "Unknown"
    shutil.copytree(model_folder, unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(
        json.dumps({**config, "architectures": ["NoSuchForCausalLM"]})
    )
    no_vllm = ["--no-vllm"]
    for args, reason in (
        ([*no_vllm, "--model", str(tmp_path)], "has no config.json"),
        ([*no_vllm, "--model", str(tmp_path), "--model-name", "tiny-llama"], "cannot name"),
        (["--model", str(unknown)], "does not serve NoSuchForCausalLM"),  # asked before it starts
    ):
        done = subprocess.run(
            [*argv, *args],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert reason in done.stderr


def test_your_model_is_listed_fine_tuned_and_served_under_its_name(server: LocalServer) -> None:
    client = demo.connect(server.base_url, server.key)
    assert {NAME, demo.BASE_MODEL} <= {m.id for m in client.models.list()}
    assert f"Base model {NAME}: LlamaForCausalLM" in server.log()
    # vLLM serves your model under its name: the base answers...
    base = client.chat.completions.create(
        model=NAME, messages=demo.chat(demo.QUESTION), max_tokens=4
    )
    assert base.model == NAME
    # ...and a model fine-tuned from it is loaded on that vLLM and answers too.
    job = demo.create_job(client, demo.upload(client, demo.dataset()), n_epochs=1, model=NAME)
    job = wait_for_job(client, job)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model is not None
    assert job.fine_tuned_model.startswith(f"ft:{NAME}:local:pirate:")
    tuned = client.chat.completions.create(
        model=job.fine_tuned_model, messages=demo.chat(demo.QUESTION), max_tokens=4
    )
    assert tuned.model == job.fine_tuned_model


def test_a_model_added_at_run_time_is_checked_listed_and_trained(
    server: LocalServer, model_folder: Path, tmp_path: Path
) -> None:
    """``kubetune models add`` on the running server: checked (inspect_model, then the
    installed vLLM's architectures), listed, trained on; its models answer where a vLLM serves
    the base: not the one local mode started with (a clear 400, not a hang), but local mode
    started on it (``--model NAME``).
    """
    added = tmp_path / "Llama-added"
    shutil.copytree(model_folder, added)
    url = ["--base-url", server.base_url, "--api-key", server.key, "--max-retries", "0"]
    result = run_cli([*url, "models", "add", str(added), "--context-length", "256"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "Base model Llama-added (LlamaForCausalLM, 256 tokens): ready" in result.stdout

    client = demo.connect(server.base_url, server.key)
    assert "Llama-added" in {m.id for m in client.models.list()}
    job = demo.create_job(
        client, demo.upload(client, demo.dataset()), n_epochs=1, model="Llama-added"
    )
    job = wait_for_job(client, job)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model is not None
    with pytest.raises(openai.BadRequestError, match="no inference server is configured"):
        client.chat.completions.create(
            model=job.fine_tuned_model, messages=demo.chat(demo.QUESTION), max_tokens=4
        )
    # An unusable folder is refused with the reason; nothing is listed.
    result = run_cli([*url, "models", "add", str(tmp_path), "--name", "nothing"])
    assert result.exit_code == 1
    assert "has no config.json" in result.stderr
    assert "nothing" not in {m.id for m in client.models.list()}

    # Started on it (`--model NAME`), local mode's vLLM serves it and its fine-tuned model.
    server.stop()
    server.extra_args = ["--model", "Llama-added"]
    server.start()
    assert "Base model Llama-added: added at run time" in server.log()
    client = demo.connect(server.base_url, server.key)  # a new port
    assert chat_when_served(client, job.fine_tuned_model).model == job.fine_tuned_model
    assert client.models.delete("Llama-added").deleted


def chat_when_served(client: Any, model: str, timeout: float = 60) -> Any:
    """A completion from ``model`` once the restarted server's first sync has loaded it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.chat.completions.create(
                model=model, messages=demo.chat(demo.QUESTION), max_tokens=4
            )
        except openai.APIStatusError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
