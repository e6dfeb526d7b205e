"""What only a GPU cluster would hit, decided on the CPU: one test per bug of the CUDA paths.

Each decision the trainer makes for CUDA (device and dtype, process-group timeout, strategy
arguments by world size, the order config → load, the retention rule per node, adapter saves
under ZeRO-2, torchrun's stop timeout, the dtype of trained weights) is checked here with the
device described as a GPU's, as ``make gpu-smoke`` then checks it on one.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from peft import get_peft_model
from transformers import TrainerControl

from kubetune.events import EventType
from kubetune.settings import ObjectStoreSettings
from kubetune.trainer_config import TrainerConfig
from kubetune.trainer_events import TrainerEventKind, event_kind
from kubetune_runtime.objectstore import LocalObjectStore
from kubetune_trainer import exit_codes, training
from kubetune_trainer.callbacks import KubetuneCallback
from kubetune_trainer.device import CPU, Device, cuda_diagnosis, nvidia_driver_version
from kubetune_trainer.dist import Topology
from kubetune_trainer.launch import stop_grace_seconds, torchrun_args
from kubetune_trainer.methods import Hardware, KubetuneSFTTrainer, common_args, sft_config
from kubetune_trainer.model import load_model, load_tokenizer, lora_config, quantization
from kubetune_trainer.run import Run
from tests.trainer.harness import REPO, Job, make_job, trainer_env
from tests.trainer.tiny import jsonl, sft_examples

pytestmark = pytest.mark.trainer

H100 = Device(cuda=True, precision="bf16", attention="flex_attention", memory_bytes=80 << 30)
TRAIN = jsonl(sft_examples(16, seed=5))


@pytest.fixture
def job(
    tiny_model: Path, local_store: tuple[LocalObjectStore, ObjectStoreSettings], tmp_path: Path
) -> Job:
    """A CPU job on the tiny model (20 steps, checkpoints every 5)."""
    store, settings = local_store
    return make_job(store, settings, tiny_model, tmp_path / "job", TRAIN)


def _updated(config: TrainerConfig, **update: Any) -> TrainerConfig:
    """``config`` with fields changed, validated again."""
    return TrainerConfig.model_validate(config.model_dump() | update)


def _with(job: Job, **update: Any) -> Job:
    """``job`` with its config changed and written again."""
    config = _updated(job.config, **update)
    job.config_path.write_text(config.model_dump_json())
    return Job(config, job.config_path, job.store, job.workdir)


# -- 1. a GPU job on a node where CUDA is unusable -------------------------------------------
def test_1_a_gpu_job_without_usable_cuda_fails_at_once_naming_driver_and_build(job: Job) -> None:
    gpu_job = _with(job, resources={"gpus_per_node": 1})
    assert not torch.cuda.is_available()  # this machine: a CPU build, no driver
    assert gpu_job.run() == exit_codes.INTERNAL_ERROR
    [error] = [e for e in gpu_job.events() if event_kind(e) is TrainerEventKind.ERROR]
    assert error.data["code"] == "gpu_unavailable"
    assert error.data["user_error"] is False  # the infrastructure's fault, not the user's
    assert "CPU-only build" in error.message
    assert "no NVIDIA driver is visible" in error.message
    assert TrainerEventKind.STARTED not in gpu_job.kinds()  # nothing trained on the CPU


def test_1_local_mode_may_train_a_gpu_job_on_the_cpu_and_says_so(job: Job) -> None:
    local_job = _with(job, resources={"gpus_per_node": 1}, cpu_fallback=True)
    assert local_job.run() == exit_codes.SUCCESS
    warnings = [e.message for e in local_job.events() if event_kind(e) is TrainerEventKind.WARNING]
    assert any(w.startswith("No usable CUDA device: training on the CPU") for w in warnings)


def test_the_diagnosis_names_the_driver_and_the_cuda_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = tmp_path / "version"
    proc.write_text(
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release Build\n"
        "GCC version:  gcc version 12.2.0\n"
    )
    assert nvidia_driver_version(proc) == "550.54.15"
    assert nvidia_driver_version(tmp_path / "absent") is None
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    text = cuda_diagnosis(proc)
    assert "built for CUDA 13.0" in text
    assert "the NVIDIA driver is 550.54.15" in text
    assert "visible devices: '0'" in text


# -- 2. the collective timeout ---------------------------------------------------------------
PROBE = """
import sys
from pathlib import Path
import torch
import torch.distributed as dist
from kubetune_trainer import main, training

def timeout():
    backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    return int(backend.options._timeout.total_seconds())

def probe(run):
    before = timeout()
    training.training_args(run, Path(run.config.base_model.path))  # accelerate's state again
    print("TIMEOUTS", before, timeout(), flush=True)
    return 0

training.train = probe
sys.exit(main.main(["--config", sys.argv[1]]))
"""


def test_2_every_collective_waits_the_configured_timeout(job: Job) -> None:
    probed = _with(job, collective_timeout_seconds=4321)
    env = trainer_env(job.workdir)
    # One process as torchrun's agent starts it: a process group of one.
    env.update(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29561",
        TORCHELASTIC_RUN_ID="probe",
    )
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(probed.config_path)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("TIMEOUTS"))
    assert line.split()[1:] == ["4321", "4321"]  # not torch's 600 s, and kept by the Trainer


# -- 3. a sharding strategy in one process ----------------------------------------------------
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed-zero2", "deepspeed-zero3"])
def test_3_one_process_launched_alone_trains_without_sharding(job: Job, strategy: str) -> None:
    config = _updated(job.config, strategy=strategy)
    alone = common_args(config, job.workdir, Hardware(distributed=False, device=H100))
    assert "fsdp" not in alone
    assert "deepspeed" not in alone
    # Under torchrun one process has a process group, and the strategy applies.
    grouped = common_args(
        config, job.workdir, Hardware(world_size=1, distributed=True, device=H100)
    )
    assert "fsdp" in grouped or "deepspeed" in grouped


def test_3_the_strategy_left_out_is_said_in_an_event(job: Job) -> None:
    fsdp_job = _with(job, strategy="fsdp")
    assert fsdp_job.run() == exit_codes.SUCCESS
    warnings = [e.message for e in fsdp_job.events() if event_kind(e) is TrainerEventKind.WARNING]
    assert any("Strategy fsdp shards a model" in w for w in warnings)


# -- 4. the model is loaded after its trainer config exists ----------------------------------
class _Loaded(Exception):
    """Raised where the model would load: the test has seen what it wanted."""


def test_4_the_trainer_config_exists_before_the_model_is_loaded(
    job: Job, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_args = training.training_args

    def args(run: Run, folder: Path) -> Any:
        calls.append("config")
        return real_args(run, folder)

    def load(folder: Path, config: Any, device: Device) -> Any:
        calls.append("load")
        raise _Loaded

    monkeypatch.setattr(training, "training_args", args)
    monkeypatch.setattr(training, "load_model", load)
    run = Run(job.config, Topology(), job.workdir / "scratch")
    with pytest.raises(_Loaded):
        training.train(run)
    assert calls == ["config", "load"]


def test_qlora_stores_its_4bit_weights_in_the_compute_dtype(job: Job) -> None:
    config = _updated(job.config, adapter={"type": "qlora", "r": 8})
    quant = quantization(config, H100)
    assert quant.bnb_4bit_quant_storage == torch.bfloat16  # FSDP / ZeRO-3 shard one dtype
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16
    fp16 = quantization(config, Device(cuda=True, precision="fp16"))
    assert fp16.bnb_4bit_quant_storage == fp16.bnb_4bit_compute_dtype == torch.float16


# -- 5. every node prunes its local checkpoints ----------------------------------------------
def test_5_a_node_other_than_the_first_deletes_its_older_local_checkpoints(job: Job) -> None:
    output = job.workdir / "scratch" / "checkpoints"
    for step in (5, 10):
        folder = output / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "zero_pp_rank_8_mp_rank_00_optim_states.pt").write_bytes(b"shard")
    node_1 = Topology(rank=8, world_size=16, local_rank=0, node_rank=1)
    callback = KubetuneCallback(Run(job.config, node_1, job.workdir / "scratch"))
    args: Any = SimpleNamespace(output_dir=str(output))
    callback.on_save(args, SimpleNamespace(global_step=10), TrainerControl())  # type: ignore[arg-type]
    assert sorted(p.name for p in output.iterdir()) == ["checkpoint-10"]
    uploaded = job.layout.checkpoint_prefix("default", job.config.job_id, 10)
    assert job.store.exists(uploaded + "zero_pp_rank_8_mp_rank_00_optim_states.pt")


# -- 6. adapter saves under ZeRO-2 -------------------------------------------------------------
def test_6_an_adapter_under_zero2_is_saved_without_copying_the_whole_model(
    job: Job, tiny_model: Path, tmp_path: Path
) -> None:
    from datasets import Dataset

    config = job.config
    trainer = KubetuneSFTTrainer(
        model=load_model(tiny_model, config, CPU),
        args=sft_config(config, tmp_path / "out", Hardware()),
        train_dataset=Dataset.from_dict({"input_ids": [[1, 2, 3]], "labels": [[1, 2, 3]]}),
        processing_class=load_tokenizer(tiny_model, config),
        peft_config=lora_config(config),
    )
    # DeepSpeed ZeRO-2 as the Trainer sees it after accelerate prepared the model.
    trainer.is_deepspeed_enabled = True
    trainer.args.deepspeed = {"zero_optimization": {"stage": 2}}

    def whole_model_copy(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the whole model's state dict was copied to the CPU")

    trainer.accelerator.get_state_dict = whole_model_copy
    trainer.save_model(str(tmp_path / "checkpoint"))
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "checkpoint" / "adapter_model.safetensors"))
    assert tensors
    assert all("lora_" in name for name in tensors)


# -- 7. torchrun's stop timeout ----------------------------------------------------------------
def test_7_torchrun_gives_workers_the_pods_grace_period(job: Job) -> None:
    config_args = ["--config", str(job.config_path)]
    assert stop_grace_seconds(config_args) == 600  # the config's default: the pod's default
    args = torchrun_args({}, config_args, stop_grace_seconds(config_args))
    timeout = int(args[args.index("--shutdown-timeout") + 1])
    assert 560 <= timeout < 600  # most of the grace period, and the agent exits within it
    short = _with(job, stop_grace_seconds=40)
    args = torchrun_args({}, config_args, stop_grace_seconds(["--config", str(short.config_path)]))
    assert int(args[args.index("--shutdown-timeout") + 1]) == 25


# -- 8. trained weights stay fp32 --------------------------------------------------------------
def test_8_full_fine_tuning_on_a_bf16_gpu_trains_fp32_weights(job: Job, tiny_model: Path) -> None:
    full = _updated(job.config, adapter={"type": "full"})
    model = load_model(tiny_model, full, H100)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert common_args(full, job.workdir, Hardware(device=H100))["bf16"]  # computed in bf16
    # LoRA: the frozen base in bf16, the adapter PEFT adds in fp32.
    adapter = lora_config(job.config)
    assert adapter is not None
    lora = get_peft_model(load_model(tiny_model, job.config, H100), adapter)
    trained = {p.dtype for p in lora.parameters() if p.requires_grad}
    frozen = {p.dtype for p in lora.parameters() if not p.requires_grad}
    assert (trained, frozen) == ({torch.float32}, {torch.bfloat16})


# -- the risks: precision, attention, memory, out of memory -----------------------------------
def test_precision_follows_the_gpus_capability(job: Job, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune_trainer import device as device_module

    gpu_config = _updated(job.config, resources={"gpus_per_node": 1})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda _i: SimpleNamespace(total_memory=16 << 30)
    )
    for bf16, expected in ((True, "bf16"), (False, "fp16")):  # Ampere and later; a T4 or V100
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda _b=bf16, **_kw: _b)
        planned = device_module.plan_device(gpu_config)
        assert (planned.cuda, planned.precision, planned.memory_bytes) == (True, expected, 16 << 30)
        args = common_args(gpu_config, job.workdir, Hardware(device=planned))
        assert (args["bf16"], args["fp16"]) == (expected == "bf16", expected == "fp16")


def test_packed_batches_on_cuda_use_a_kernel_without_a_dense_mask(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kubetune_trainer import device as device_module

    assert device_module.attention_implementation(cuda=False) == "sdpa"
    monkeypatch.setattr(importlib.util, "find_spec", lambda _name: None)
    assert device_module.attention_implementation(cuda=True) == "flex_attention"
    monkeypatch.setattr(importlib.util, "find_spec", lambda _name: object())
    assert device_module.attention_implementation(cuda=True) == "flash_attention_2"


def test_a_micro_batch_holds_no_more_tokens_than_the_gpu_has_logits_room_for(job: Job) -> None:
    from kubetune_trainer.methods import micro_batch_cap

    llama3 = Hardware(device=H100, vocab_size=128_256, world_size=8, distributed=True)
    # 80 GiB / 4 for logits of 10 bytes per entry: about 16.7k tokens.
    assert micro_batch_cap(llama3, 2048) == 8
    assert micro_batch_cap(llama3, 8192) == 2
    assert micro_batch_cap(llama3, 32768) == 1
    assert micro_batch_cap(Hardware(vocab_size=128_256), 8192) is None  # the CPU: no cap
    hp = job.config.hyperparameters.model_dump() | {"batch_size": 64, "micro_batch_size": 8}
    config = _updated(job.config, max_seq_length=8192, hyperparameters=hp)
    args = common_args(config, job.workdir, llama3)
    assert args["per_device_train_batch_size"] == 2
    assert 8 * args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] == 64


def test_out_of_gpu_memory_is_the_users_error_naming_what_to_lower(job: Job) -> None:
    from kubetune_trainer.errors import UserError

    run: Any = SimpleNamespace(config=job.config)
    trainer: Any = SimpleNamespace(
        args=SimpleNamespace(per_device_train_batch_size=4), state=SimpleNamespace(global_step=6)
    )
    with (
        pytest.raises(UserError) as caught,
        training.out_of_memory_as_user_error(run, trainer),
    ):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.83 GiB")
    error = caught.value
    assert (error.code, error.param) == ("out_of_memory", "hyperparameters.max_seq_length")
    assert "at step 7" in error.message
    assert "micro-batches of 4 example(s) of up to 128 tokens" in error.message
    assert "Tried to allocate 7.83 GiB" in error.message


def test_lora_on_the_embeddings_or_the_head_is_refused_as_vllm_would() -> None:
    from pydantic import ValidationError

    from kubetune.finetunejob import Adapter

    assert Adapter(target_modules=["q_proj", "v_proj"]).target_modules == ["q_proj", "v_proj"]
    for refused in (["q_proj", "lm_head"], ["embed_tokens"], ["model.embed_tokens"]):
        with pytest.raises(ValidationError, match="vLLM serves LoRA adapters on the linear"):
            Adapter(target_modules=refused)


def test_metrics_events_of_a_cpu_run_are_unchanged(job: Job) -> None:
    # The device plan changes nothing for a CPU job: fp32, sdpa, the configured micro-batch.
    assert job.run() == exit_codes.SUCCESS
    [started] = [e for e in job.events() if event_kind(e) is TrainerEventKind.STARTED]
    assert started.data["micro_batch_size"] == 2
    assert any(e.type is EventType.METRICS for e in job.events())
    assert json.loads(job.config_path.read_text())["cpu_fallback"] is False
