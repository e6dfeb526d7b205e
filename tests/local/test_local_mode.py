"""``make run``'s server end to end: the demo with the official SDK, inference through the API,
and Ctrl-C in the middle of a job followed by a restart that resumes it.

One local-mode server (real trainer subprocesses, real vLLM on the CPU) on a fresh data folder;
the last test stops it with SIGINT mid-job and starts it again on the same folder. The tests
share that server, so they run in this order.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from rich.console import Console

from examples import demo
from kubetune_cli.download import download_model
from tests.local.server import LocalServer, processes_using

pytestmark = pytest.mark.xdist_group("vllm")

FT_PREFIX = "ft:tiny-llama:local:pirate:"


@pytest.fixture(scope="module")
def other_key(server_holder: dict[str, Any]) -> str:
    """A key of a second org on the same server."""
    return str(server_holder["other_key"])


@pytest.fixture(scope="module")
def server_holder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Local mode on a fresh data folder (with a second org's key seeded)."""
    server = LocalServer(tmp_path_factory.mktemp("local") / "data")
    other = server.seed_other_org()
    server.start()
    try:
        yield {"server": server, "other_key": other}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(server_holder: dict[str, Any]) -> LocalServer:
    """The running server."""
    result: LocalServer = server_holder["server"]
    return result


@pytest.fixture(scope="module")
def client(server: LocalServer) -> OpenAI:
    """The official SDK pointed at local mode, as the demo connects."""
    return demo.connect(server.base_url, server.key)


@pytest.fixture(scope="module")
def finished_demo(client: OpenAI, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What ``make demo`` does: upload, fine-tune, follow the events to the end, chat, continue
    training from the result, download its adapter.
    """
    printed = io.StringIO()
    target = tmp_path_factory.mktemp("demo") / "adapter"
    result = demo.run(client, Console(file=printed, width=200), target)
    assert result is not None, printed.getvalue()
    first = result.first
    return {
        "job": first.job,
        "events": first.events,
        "steps": first.steps,
        "run": result,
        "printed": printed.getvalue(),
    }


def test_first_start_prints_how_to_connect(server: LocalServer) -> None:
    log = server.log()
    assert f"Base URL: http://localhost:{server.port}/v1" in log
    assert f"API key:  {server.key}" in log
    assert "from openai import OpenAI" in log
    assert (server.data_dir / "api_key").stat().st_mode & 0o777 == 0o600
    assert (server.data_dir / "models" / "tiny-llama" / "config.json").exists()


def test_demo_fine_tunes_and_serves_the_model(
    client: OpenAI, finished_demo: dict[str, Any]
) -> None:
    job = finished_demo["job"]
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith(FT_PREFIX)
    total = job.hyperparameters.n_epochs * 20  # 40 examples, batch size 2
    assert finished_demo["steps"][-1] == (total, total)
    messages = [e.message for e in finished_demo["events"]]
    for expected in (
        "Files validated, moving job to queued state",
        "Fine-tuning job started",
        f"New fine-tuned model created: {job.fine_tuned_model}",
        "The job has successfully completed",
    ):
        assert expected in messages
    assert job.fine_tuned_model in [m.id for m in client.models.list()]
    listed = list(demo.checkpoints(client, job.id))
    assert listed[0][0] == total
    assert listed[0][1] == f"{job.fine_tuned_model}:ckpt-step-{total}"
    base = demo.answer(client, demo.BASE_MODEL)
    tuned = demo.answer(client, job.fine_tuned_model)
    assert tuned != base
    assert tuned.startswith("Arr"), tuned  # what the dataset taught


def test_demo_continues_training_and_downloads_the_adapter(
    client: OpenAI, finished_demo: dict[str, Any]
) -> None:
    run: demo.DemoRun = finished_demo["run"]
    model = run.first.job.fine_tuned_model
    assert run.checkpoint.startswith(f"{model}:ckpt-step-")
    assert f"{run.checkpoint}: " in finished_demo["printed"]  # it answered
    assert run.continued is not None
    continued = run.continued.job
    assert continued.status == "succeeded", continued.error
    assert continued.model == model
    assert continued.fine_tuned_model is not None
    assert continued.fine_tuned_model.startswith(FT_PREFIX)
    assert continued.fine_tuned_model != model
    fresh, more = demo.losses(run.first.events), demo.losses(run.continued.events)
    # The adapter's weights went on training: the first loss is near where the first job
    # ended (within a fifth of what it learned), far from where a fresh adapter starts.
    learned = fresh[0] - fresh[-1]
    assert learned > 1.0, fresh
    assert more[0] - fresh[-1] < learned / 5, (fresh, more)
    assert "Continuing training" in finished_demo["printed"]

    assert run.download is not None
    # Exactly what the trainer published (the adapter, its tokenizer and chat template), intact.
    files = {p.name for p in run.download.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= files
    manifest = json.loads((run.download / "manifest.json").read_text())
    assert files == {*manifest["files"], "manifest.json"}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((run.download / name).read_bytes()).hexdigest() == digest
    config = json.loads((run.download / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == (run.first.job.model_extra or {})["adapter"]["r"]


def test_the_fine_tuned_model_downloads_merged_into_its_base(
    client: OpenAI, finished_demo: dict[str, Any], tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = finished_demo["job"].fine_tuned_model
    # The first ask starts local mode's merge; `kubetune models download`'s code waits for it.
    folder = download_model(client, model, "merged", tmp_path / "merged", extract=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (manifest["kind"], manifest["model"]) == ("merged", model)
    assert {p.name for p in folder.iterdir()} == {*manifest["files"], "manifest.json"}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest

    # A plain Hugging Face model that answers as the fine-tuned model does, not as the base.
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    tokenizer: Any = AutoTokenizer.from_pretrained(folder)
    prompt: Any = tokenizer.apply_chat_template(
        [{"role": "system", "content": demo.SYSTEM}, {"role": "user", "content": demo.QUESTION}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = merged.generate(**prompt, max_new_tokens=8, do_sample=False)
    reply = str(tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True))
    assert reply.startswith("Arr"), reply  # what the dataset taught


def test_inference_proxy(
    server: LocalServer, client: OpenAI, other_key: str, finished_demo: dict[str, Any]
) -> None:
    model = finished_demo["job"].fine_tuned_model
    prompt = demo.chat(demo.QUESTION)
    whole = client.chat.completions.create(
        model=model, messages=prompt, temperature=0, max_tokens=16
    )
    stream = client.chat.completions.create(
        model=model, messages=prompt, temperature=0, max_tokens=16, stream=True
    )
    chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(chunks) > 1  # streamed, not buffered into one
    assert "".join(chunks) == whole.choices[0].message.content
    # ignore_eos: a tiny model may well end at once; these checks need tokens to compare.
    forced = {"ignore_eos": True}
    base = client.completions.create(
        model=demo.BASE_MODEL, prompt="The sky", max_tokens=4, extra_body=forced
    )
    assert base.model == demo.BASE_MODEL
    assert base.choices[0].text
    tuned = client.completions.create(
        model=model, prompt="The sky", max_tokens=4, temperature=0, extra_body=forced
    )
    streamed = list(
        client.completions.create(
            model=model,
            prompt="The sky",
            max_tokens=4,
            temperature=0,
            stream=True,
            extra_body=forced,
        )
    )
    assert len(streamed) > 1
    assert "".join(c.choices[0].text for c in streamed if c.choices) == tuned.choices[0].text

    # A checkpoint's model answers too: loaded on demand, beside the final model.
    steps = [step for step, _, _ in demo.checkpoints(client, finished_demo["job"].id)]
    earliest = f"{model}:ckpt-step-{min(steps)}"
    reply = client.chat.completions.create(model=earliest, messages=prompt, max_tokens=4)
    assert reply.model == earliest  # vLLM answered with that LoRA adapter
    assert reply.choices[0].message.content
    with pytest.raises(openai.NotFoundError) as caught:
        demo.answer(client, f"{model}:ckpt-step-{min(steps) - 1}")
    assert earliest in caught.value.message  # it names the checkpoints that are kept

    stranger = OpenAI(base_url=server.base_url, api_key=other_key, max_retries=0)
    assert demo.answer(stranger, demo.BASE_MODEL)  # base models are everyone's
    for name in (model, earliest, FT_PREFIX + "unknown", "no-such-model"):
        with pytest.raises(openai.NotFoundError) as caught:
            stranger.chat.completions.create(model=name, messages=prompt)
        assert caught.value.code == "model_not_found"
    # A bad request is vLLM's to refuse; its error comes back as an OpenAI error.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=prompt, max_tokens=100_000)

    client.models.delete(model)
    for name in (model, earliest):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=name, messages=prompt)


def _metrics_steps(events: list[Any]) -> list[int]:
    return [int(e.data["step"]) for e in events if e.type == "metrics"]


def _committed_steps(data_dir: Path, job_id: str) -> list[int]:
    folder = data_dir / "store" / "orgs" / "local" / "jobs" / job_id / "checkpoints"
    return sorted(int(m.parent.name.split("-")[1]) for m in folder.glob("step-*/manifest.json"))


def test_ctrl_c_mid_job_then_restart_resumes_it(server: LocalServer, client: OpenAI) -> None:
    # Long enough to stop mid-way, whatever the machine's speed: an idle machine trains the tiny
    # model at several steps a second, and stopping the server takes a few seconds.
    job = demo.create_job(client, demo.upload(client, demo.dataset(seed=1)), n_epochs=10)
    total = 200  # 40 examples, batch 2, 10 epochs
    deadline = time.monotonic() + 300
    seen: set[str] = set()
    steps: list[int] = []
    while not steps or max(steps) < 3:
        assert time.monotonic() < deadline, server.log()[-3000:]
        steps += _metrics_steps(demo.new_events(client, job.id, seen))
        time.sleep(0.3)

    assert server.interrupt() == 0
    log = server.log()
    assert "kubetune stopped." in log
    assert processes_using(server.data_dir) == []  # no trainer, no vLLM left behind
    committed = _committed_steps(server.data_dir, job.id)
    assert committed, "the trainer committed no checkpoint on SIGTERM"
    stopped_at = committed[-1]
    assert 3 <= stopped_at < total

    server.start()
    after = demo.connect(server.base_url, server.key)
    assert after.fine_tuning.jobs.retrieve(job.id).status in ("running", "queued")
    resumed: list[Any] = []
    done = demo.follow(after, job.id, on_event=resumed.append, poll=0.5, timeout=400)
    assert done.status == "succeeded", done.error
    messages = [e.message for e in resumed]
    assert f"Restarted from step {stopped_at}" in messages
    assert any(re.search(rf"resumed from step {stopped_at}\b", m) for m in messages)
    resumed.sort(key=lambda e: e.id)
    restart = next(i for i, e in enumerate(resumed) if e.message.startswith("Restarted from"))
    before, after_restart = _metrics_steps(resumed[:restart]), _metrics_steps(resumed[restart:])
    assert max(before) == stopped_at
    # Exactly the planned run: no step trained twice, none skipped.
    assert after_restart == list(range(stopped_at + 1, total + 1))
    assert _committed_steps(server.data_dir, job.id)[-1] == total
    # Files and jobs survived the restart.
    assert {j.id for j in after.fine_tuning.jobs.list()} >= {job.id}
    assert any(f.filename == "pirate.jsonl" for f in after.files.list())
