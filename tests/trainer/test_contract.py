"""The trainer's contract pieces without training: config, events, exit codes, checkpoints."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from kubetune.events import EventType, JobEvent, read_events
from kubetune.finetunejob import FineTuneJob, MethodType, ObjectMeta
from kubetune.ids import new_job_id
from kubetune.settings import BaseModelEntry, ObjectStoreSettings, Settings
from kubetune.storage_layout import StorageLayout
from kubetune.trainer_config import (
    BASE_LEARNING_RATE,
    TrainerConfig,
    build_trainer_config,
    parse_model_location,
)
from kubetune.trainer_events import (
    CheckpointEventData,
    TrainerEventKind,
    checkpoint_from_event,
    message_data,
    step_metrics,
)
from kubetune_runtime.objectstore import LocalObjectStore
from kubetune_trainer import exit_codes
from kubetune_trainer.callbacks import examples_seen
from kubetune_trainer.checkpoints import CheckpointStore
from kubetune_trainer.event_log import EventLog
from kubetune_trainer.launch import exit_code_for, is_single_process, torchrun_args
from kubetune_trainer.methods import micro_batch_seed, split_batch
from kubetune_trainer.results import Results
from kubetune_trainer.telemetry import Exporter


def _job(**spec: object) -> FineTuneJob:
    return FineTuneJob(
        metadata=ObjectMeta(name=new_job_id()),
        spec={"model": "llama", "trainingFile": "file-" + "0" * 23, **spec},
    )


def _settings(path: str | None = "store:models/llama") -> Settings:
    return Settings(models=[BaseModelEntry(id="llama", context_length=2048, path=path)])


def test_config_resolves_auto_and_round_trips() -> None:
    job = _job(method={"type": "dpo"}, validationFile="file-" + "1" * 23, suffix="mine")
    config = build_trainer_config(job, _settings(), n_train_examples=500, image="img:1")
    hp = config.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.beta) == (3, 1, 0.1)
    assert hp.learning_rate == pytest.approx(BASE_LEARNING_RATE)
    assert config.base_model.store_prefix == "models/llama/"
    assert config.base_model.path is None
    assert config.max_seq_length == 2048
    assert config.n_evals == 3  # once per epoch when a validation file is given
    assert config.total_steps == 1500
    assert config.fine_tuned_model.startswith("ft:llama:default:mine:")
    assert TrainerConfig.model_validate_json(config.model_dump_json()) == config


def test_the_training_knobs_reach_the_trainer_config_and_default_when_omitted() -> None:
    knobs = {
        "lrSchedulerType": "cosine",
        "weightDecay": 0.01,
        "maxGradNorm": 0,  # 0 is a value (clipping off), not "omitted"
        "warmupRatio": 0,
        "trainOnInputs": True,
        "packing": True,
        "maxSeqLength": 512,
    }
    job = _job(method={"hyperparameters": knobs}, checkpointing={"everySteps": 7, "keep": 2})
    hp = build_trainer_config(job, _settings(), n_train_examples=100).hyperparameters
    assert (hp.lr_scheduler, hp.weight_decay, hp.max_grad_norm) == ("cosine", 0.01, 0.0)
    assert (hp.warmup_ratio, hp.train_on_inputs, hp.packing) == (0.0, True, True)
    config = build_trainer_config(job, _settings(), n_train_examples=100)
    assert config.max_seq_length == 512
    assert (config.checkpointing.every_steps, config.checkpointing.keep) == (7, 2)
    defaults = build_trainer_config(_job(), _settings(), n_train_examples=100).hyperparameters
    assert (defaults.lr_scheduler, defaults.weight_decay, defaults.max_grad_norm) == (
        "linear",
        0.0,
        1.0,
    )
    assert (defaults.train_on_inputs, defaults.packing) == (False, False)


def test_the_knobs_become_the_trainers_arguments(tmp_path: Path) -> None:
    from kubetune_trainer.methods import Hardware, common_args

    job = _job(
        method={"hyperparameters": {"lrSchedulerType": "cosine", "weightDecay": 0.1}},
        checkpointing={"everySteps": 7},
    )
    config = build_trainer_config(job, _settings(), n_train_examples=100)
    args = common_args(config, tmp_path, Hardware())  # one process on the CPU
    assert (args["lr_scheduler_type"], args["weight_decay"]) == ("cosine", 0.1)
    assert (args["max_grad_norm"], args["save_steps"]) == (1.0, 7)


def test_config_refuses_what_the_trainer_cannot_run() -> None:
    with pytest.raises(ValueError, match="not in the catalogue"):
        build_trainer_config(_job(model="other"), _settings(), n_train_examples=10)
    with pytest.raises(ValueError, match="where the weights"):
        build_trainer_config(_job(), _settings(path=None), n_train_examples=10)
    with pytest.raises(ValueError, match="continueFrom"):
        build_trainer_config(_job(model="ft:llama:default::abc"), _settings(), n_train_examples=10)


def test_a_continued_job_starts_from_its_sources_adapter_or_checkpoint() -> None:
    source = new_job_id()
    layout = _settings().object_store.layout()
    for step, prefix in [
        (None, layout.adapter_prefix("default", source)),
        (20, layout.checkpoint_prefix("default", source, 20)),
    ]:
        job = _job(model="ft:llama:default::abc", continueFrom={"job": source, "step": step})
        config = build_trainer_config(job, _settings(), n_train_examples=10)
        assert config.initial_adapter_prefix == prefix
        assert config.base_model.name == "llama"
        assert config.fine_tuned_model.startswith("ft:llama:default::")
    plain = build_trainer_config(_job(), _settings(), n_train_examples=10)
    assert plain.initial_adapter_prefix is None


def test_model_location() -> None:
    assert parse_model_location("/models/llama") == ("/models/llama", None)
    assert parse_model_location("store:/models/llama/") == (None, "models/llama/")
    with pytest.raises(ValueError, match="no object-store folder"):
        parse_model_location("store:")


def test_checkpoint_event_becomes_a_status_checkpoint() -> None:
    data = CheckpointEventData(
        checkpoint_id="ftckpt-" + "a" * 23, step=7, created_at=1_700_000_000, prefix="p/"
    )
    event = JobEvent(message="Checkpoint saved at step 7", data=data.model_dump(mode="json"))
    ref = checkpoint_from_event(event)
    assert ref is not None
    assert (ref.id, ref.step) == ("ftckpt-" + "a" * 23, 7)
    error = JobEvent(message="x", data=message_data(TrainerEventKind.ERROR))
    assert checkpoint_from_event(error) is None
    assert step_metrics(event) is None
    metrics = JobEvent(message="s", type=EventType.METRICS, data={"step": 3, "train_loss": 1.5})
    parsed = step_metrics(metrics)
    assert parsed is not None
    assert parsed.to_metrics().train_loss == 1.5


def test_batch_split_keeps_the_global_batch() -> None:
    assert split_batch(8, 1, 8) == (8, 1)
    assert split_batch(8, 2, 2) == (2, 2)
    assert split_batch(12, 2, 4) == (3, 2)  # 6 per rank: 2 micro-batches of 3
    assert split_batch(4, 1, 2) == (2, 2)
    with pytest.raises(Exception, match="multiple of 2"):
        split_batch(5, 2, 2)
    assert micro_batch_seed(1, 5) == micro_batch_seed(1, 5) != micro_batch_seed(1, 6)


def test_launcher_maps_the_pytorchjob_environment() -> None:
    env = {
        "MASTER_ADDR": "job-master-0",
        "MASTER_PORT": "23456",
        "PET_NNODES": "3",
        "PET_NODE_RANK": "2",
        "PET_NPROC_PER_NODE": "8",
    }
    args = torchrun_args(env, ["--config", "c.json"])
    pairs = dict(zip(args[:-4:2], args[1:-4:2], strict=True))
    assert pairs["--nnodes"] == "3"
    assert pairs["--node_rank"] == "2"
    assert pairs["--nproc_per_node"] == "8"
    assert pairs["--master_addr"] == "job-master-0"
    assert args[-4:] == ["-m", "kubetune_trainer", "--config", "c.json"]
    assert not is_single_process(env)
    assert is_single_process({})


def test_launcher_maps_the_trainjob_environment() -> None:
    # What Kubeflow Trainer v2's torch plugin sets on each node's pod.
    env = {
        "PET_NNODES": "2",
        "PET_NODE_RANK": "1",
        "PET_NPROC_PER_NODE": "4",
        "PET_MASTER_ADDR": "job-node-0-0.job",
        "PET_MASTER_PORT": "29500",
    }
    pairs = dict(zip(*[iter(torchrun_args(env, [])[:-2])] * 2, strict=True))
    assert pairs["--master_addr"] == "job-node-0-0.job"
    assert pairs["--master_port"] == "29500"
    assert (pairs["--nnodes"], pairs["--node_rank"], pairs["--nproc_per_node"]) == ("2", "1", "4")


_EXIT_BARRIER_PROBE = """
from torch.distributed.elastic.agent.server.api import WorkerSpec
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from kubetune_trainer.launch import shorten_exit_barrier

def agent():
    spec = WorkerSpec(role="trainer", local_world_size=1, rdzv_handler=None, entrypoint="true")
    return LocalElasticAgent(spec=spec, logs_specs=DefaultLogsSpecs())

before = agent()._exit_barrier_timeout
shorten_exit_barrier(12.0)
shorten_exit_barrier(7.0)
print(before, agent()._exit_barrier_timeout)
"""


def test_the_launcher_shortens_torchruns_exit_barrier(tmp_path: Path) -> None:
    """A node restarted just before the result was published never reaches the barrier; the
    master's pod must not wait torchrun's default five minutes for it. Set again, the value is
    replaced, not stacked. (In a subprocess: the launcher's own process is the one it changes.)
    """
    from tests.trainer.harness import REPO, trainer_env

    probe = subprocess.run(
        [sys.executable, "-c", _EXIT_BARRIER_PROBE],
        env=trainer_env(tmp_path),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert probe.stdout.split() == ["300", "7.0"]


def test_exit_code_of_a_pod_from_its_workers() -> None:
    assert exit_code_for([0, 0]) == exit_codes.SUCCESS
    assert exit_code_for([143, 143]) == exit_codes.PREEMPTED
    assert exit_code_for([143, -15]) == exit_codes.PREEMPTED  # killed by SIGTERM = 128 + 15
    assert exit_code_for([143, 65]) == exit_codes.USER_ERROR
    assert exit_code_for([0, 129]) == exit_codes.RETRYABLE_ERROR
    assert exit_codes.USER_ERROR < 128 <= min(exit_codes.RETRYABLE)


def test_results_csv_joins_validation_to_its_step() -> None:
    results = Results()
    results.update(1, train_loss=2.0, train_accuracy=0.5)
    results.update(2, train_loss=1.0)
    results.update(2, valid_loss=1.5, valid_mean_token_accuracy=0.75)
    lines = results.to_csv().decode().splitlines()
    assert lines[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert lines[1:] == ["1,2,0.5,,", "2,1,,1.5,0.75"]
    assert Results.from_state(results.upto(1).to_state()).rows == {1: results.rows[1]}
    assert examples_seen(7, 4, 40) == 28
    assert examples_seen(11, 4, 38) == 38 + 4  # epochs of 10 steps, the last batch short


def test_checkpoints_commit_with_manifest_last_and_prune(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "store")
    job = new_job_id()
    checkpoints = CheckpointStore(store, StorageLayout(), "default", job)
    for step in (5, 10, 15):
        folder = tmp_path / f"c{step}"
        folder.mkdir()
        (folder / "optimizer.pt").write_bytes(b"x" * step)
        checkpoints.upload_files(folder, step)
        checkpoints.commit(step, {"step": step})
    checkpoints.upload_files(tmp_path / "c5", 20)  # an upload that never committed
    newest = checkpoints.newest()
    assert newest is not None
    assert (newest.step, newest.manifest) == (15, {"step": 15})
    assert checkpoints.prune(keep=2) == [5]
    assert [c.key.split("/")[-2] for c in store.list(checkpoints.prefix(10)[:-16])] == [
        "step-0000000010",
        "step-0000000010",
        "step-0000000015",
        "step-0000000015",
        "step-0000000020",  # newer than the newest commit: maybe still uploading, kept
    ]
    downloaded = checkpoints.download(newest, tmp_path / "dl")
    assert downloaded.name == "checkpoint-15"
    assert (downloaded / "optimizer.pt").read_bytes() == b"x" * 15


def test_event_log_appends_chunks_after_existing_ones(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "store")
    layout, job = ObjectStoreSettings().layout(), new_job_id()
    first = EventLog(store, layout, "default", job)
    first.message(TrainerEventKind.STARTED, "one", flush=True)
    first.message(TrainerEventKind.WARNING, "two")
    first.close()
    second = EventLog(store, layout, "default", job)  # a restarted trainer
    second.message(TrainerEventKind.RESTARTED, "three", flush=True)
    keys = [i.key.rsplit("/", 1)[1] for i in store.list(layout.events_prefix("default", job))]
    assert keys == ["0000000000.jsonl", "0000000001.jsonl", "0000000002.jsonl"]
    messages = [e.message for e in read_events(store, layout.events_prefix("default", job))]
    assert messages == ["one", "two", "three"]


def test_prometheus_endpoint_serves_the_last_step() -> None:
    exporter = Exporter("ftjob-x")
    port = exporter.serve(0)
    try:
        exporter.observe({"step": 7, "total_steps": 20, "train_loss": 1.25})
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    finally:
        exporter.close()
    text = body.decode()
    assert 'kubetune_trainer_step{job_id="ftjob-x"} 7.0' in text
    assert 'kubetune_trainer_train_loss{job_id="ftjob-x"} 1.25' in text


def test_dpo_method_is_the_default_only_when_asked() -> None:
    config = build_trainer_config(_job(), _settings("/m"), n_train_examples=50)
    assert config.method is MethodType.SUPERVISED
    assert config.hyperparameters.beta is None
    assert config.n_evals == 0


def test_infrastructure_failures_are_retried_and_bugs_are_not() -> None:
    from botocore.exceptions import EndpointConnectionError
    from torch.distributed import DistNetworkError

    from kubetune_trainer.main import is_transient

    assert is_transient(EndpointConnectionError(endpoint_url="http://s3"))
    assert is_transient(DistNetworkError("peer gone"))
    assert is_transient(ConnectionResetError())
    assert not is_transient(KeyError("bug"))


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("ddp", {}),
        ("fsdp", {"fsdp": "full_shard auto_wrap"}),
        ("deepspeed-zero2", {"stage": 2}),
        ("deepspeed-zero3", {"stage": 3}),
    ],
)
def test_strategies_on_cuda_map_to_accelerate(strategy: str, expected: dict[str, object]) -> None:
    from kubetune_trainer.device import Device
    from kubetune_trainer.methods import Hardware, common_args

    job = _job(strategy=strategy, resources={"nodes": 2, "gpusPerNode": 8})
    config = build_trainer_config(job, _settings("/m"), n_train_examples=64)
    cpu = common_args(config, Path("/tmp/out"), Hardware(world_size=1))
    assert (cpu["use_cpu"], cpu["bf16"], "fsdp" in cpu, "deepspeed" in cpu) == (
        True,
        False,
        False,
        False,
    )
    h100 = Device(cuda=True, precision="bf16", attention="flex_attention", memory_bytes=80 << 30)
    gpu = common_args(
        config, Path("/tmp/out"), Hardware(world_size=16, distributed=True, device=h100)
    )
    assert (gpu["use_cpu"], gpu["bf16"]) == (False, True)
    # Activation checkpointing on GPU: by FSDP inside its wrapping, else by the Trainer.
    assert gpu["activation_checkpointing"] is (strategy != "fsdp")
    if strategy == "fsdp":
        assert gpu["fsdp_config"]["activation_checkpointing"] is True
    if "stage" in expected:
        assert gpu["deepspeed"]["zero_optimization"]["stage"] == expected["stage"]
    else:
        assert {k: gpu[k] for k in expected} == expected
        assert "deepspeed" not in gpu


def test_batch_is_shared_evenly_by_the_processes() -> None:
    two_nodes = {"nodes": 2, "gpusPerNode": 4}
    auto = build_trainer_config(_job(resources=two_nodes), _settings("/m"), n_train_examples=64)
    assert auto.hyperparameters.batch_size == 8  # "auto" gives 1, rounded up to 8 processes
    assert auto.total_steps == 3 * 8
    with pytest.raises(ValueError, match="multiple of 8"):
        build_trainer_config(
            _job(resources=two_nodes, method={"hyperparameters": {"batchSize": 12}}),
            _settings("/m"),
            n_train_examples=64,
        )


def test_config_errors_name_the_field_at_fault() -> None:
    from kubetune.trainer_config import ConfigError

    with pytest.raises(ConfigError) as caught:
        build_trainer_config(
            _job(resources={"nodes": 3}, method={"hyperparameters": {"batchSize": 4}}),
            _settings("/m"),
            n_train_examples=64,
        )
    assert caught.value.param == "method.hyperparameters.batch_size"
    with pytest.raises(ConfigError) as caught:
        build_trainer_config(_job(model="other"), _settings(), n_train_examples=10)
    assert caught.value.param == "model"


def test_a_job_made_without_the_api_cannot_name_a_tracking_server_either() -> None:
    from kubetune.settings import TrackingSettings, url_under
    from kubetune.trainer_config import ConfigError

    mlflow = {"type": "mlflow", "mlflow": {"experiment": "e", "trackingUri": "http://10.0.0.1/"}}
    with pytest.raises(ConfigError) as caught:
        build_trainer_config(_job(integrations=[mlflow]), _settings("/m"), n_train_examples=64)
    assert (caught.value.code, caught.value.param) == (
        "tracking_uri_not_allowed",
        "integrations[0].mlflow.tracking_uri",
    )
    allowed = _settings("/m").model_copy(
        update={"tracking": TrackingSettings(mlflow_tracking_uris=["http://10.0.0.1"])}
    )
    config = build_trainer_config(_job(integrations=[mlflow]), allowed, n_train_examples=64)
    assert config.integrations[0].mlflow is not None
    # The prefix rule: scheme, host and port equal (default ports spelt or not), path inside.
    assert url_under("https://m.example/a/b", "https://m.example:443/a")
    assert not url_under("https://m.example/ab", "https://m.example/a")
    assert not url_under("http://m.example/a", "https://m.example/a")
    assert not url_under("https://m.example:x/a", "https://m.example/a")
    assert not url_under("https://user:pw@m.example/a", "https://m.example/a")
