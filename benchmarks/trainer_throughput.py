"""Trainer throughput: stock TRL SFTTrainer vs the kubetune trainer, same data, same device.

Issue 6. One run trains ``--steps`` optimizer steps per row on the same synthetic data (fixed
seed, random token ids of uniform random length, random weights built from a ``LlamaConfig``:
nothing is downloaded) and reports, per row:

- ``tokens_per_s``: real (non-pad) tokens per second over the steady-state steps (every step
  after the first ``--warmup`` ones, timed end of step to end of step, so data loading, the
  optimizer and logging are inside the window);
- ``mfu``: model FLOP/s over the GPU's dense bf16 peak (989 TFLOP/s, H100 SXM) on CUDA; null on
  CPU. The FLOP count is stated in the output (:data:`MFU_FORMULA`);
- ``peak_gib``: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the row process's peak
  RSS (``peak_kind`` says which);
- ``losses``: the per-token mean training loss of each of the first 20 steps.

Rows (each in its own process, so peak memory and any kernel patching stay per row):

- ``trl-<shape>-lora``: stock TRL SFTTrainer + PEFT in its best configuration for the device:
  on CUDA packing (BFD, padding-free) + Liger when installed + gradient checkpointing (the
  configuration that fits the 40 GiB budget in the issue's measurements); on CPU padded
  batches (Liger and flash attention are CUDA-only, and TRL's padding-free path is only
  documented for flash attention).
- ``kubetune-<shape>-lora``: the kubetune trainer's own code path: ``KubetuneSFTTrainer`` with
  the ``SFTConfig`` from ``methods.sft_config`` and the adapter from ``model.lora_config``, built
  from a ``TrainerConfig`` (padding-free micro-batches with restarting position ids, dtype and
  checkpointing as the trainer chooses them for the device).
- ``kubetune-<shape>-qlora`` (CUDA only): the same, with the base loaded by
  ``model.load_model`` in 4-bit NF4.
- ``trl-<shape>-lora-padded-ref`` (only when the TRL row does not use padded batches): stock
  TRL on padded batches for the loss guard's first 20 steps.

Loss guard: both trainers see the same examples in the same order (same seed, same sampler,
same batch size, no gradient accumulation, LoRA dropout 0 so no random masks differ) and the
same LoRA initialisation; kubetune's per-token mean loss of each of the first 20 steps must be
within 2% of TRL's on padded batches (packing changes batch composition, so a packed TRL row is
never the reference).

    .venv/bin/python benchmarks/trainer_throughput.py --shape tiny --device cpu
    .venv/bin/python benchmarks/trainer_throughput.py --shape 8b --steps 40   # on an H100
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import random
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT, REPO_ROOT / "trainer-image"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

PEAK_TFLOPS: Final = 989.0  # H100 SXM, dense bf16
GUARD_STEPS: Final = 20
BENCHMARKED_PACKAGES: Final = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "liger-kernel",
    "bitsandbytes",
)
GUARD_TOLERANCE: Final = 0.02
SEED: Final = 1234
LEARNING_RATE: Final = 2e-4
LORA_R: Final = 16
LORA_ALPHA: Final = 32
MFU_FORMULA: Final = (
    "MFU = (4*N*T + 6*n_layers*n_heads*head_dim*sum(l_i^2)) / step_time / 989e12, where N = "
    "non-embedding parameters of the base model (lm_head counted), T = real tokens, l_i = each "
    "example's length (causal attention: QK^T and PV, forward + 2x backward); 4*N*T = forward + "
    "activation gradients (frozen base weights get no weight gradients); LoRA and recomputation "
    "FLOPs not counted; 989 TFLOP/s = H100 SXM dense bf16"
)


@dataclass(frozen=True)
class Shape:
    """A Llama shape and its synthetic data."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    min_len: int
    max_len: int
    batch: int
    default_steps: int


SHAPES: Final = {
    # tests/trainer/tiny.py's model (its vocabulary is that of the locally trained tokenizer).
    "tiny": Shape(64, 128, 2, 4, 2, 16, 406, False, 16, 128, 4, 30),
    # Llama-3.2-1B.
    "1b": Shape(2048, 8192, 16, 32, 8, 64, 128256, True, 128, 2048, 4, 40),
    # Llama-3.1-8B.
    "8b": Shape(4096, 14336, 32, 32, 8, 128, 128256, False, 128, 2048, 4, 40),
}


@dataclass
class Row:
    """One benchmark row."""

    name: str
    trainer: str
    config: str
    steps: int = 0
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    peak_kind: str = ""
    real_tokens: int = 0
    timed_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    fast_paths: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None


# ---------------------------------------------------------------------------------------------
# Data, model, FLOPs
# ---------------------------------------------------------------------------------------------


def examples(shape: Shape, n: int, vocab: int, seed: int = SEED) -> list[list[int]]:
    """``n`` random token-id sequences of uniform random length in the shape's range."""
    rng = random.Random(seed)  # noqa: S311 - synthetic data, not cryptography
    return [
        [rng.randrange(vocab) for _ in range(rng.randint(shape.min_len, shape.max_len))]
        for _ in range(n)
    ]


def non_embedding_params(shape: Shape) -> int:
    """N: the base model's parameters without the input embedding (lm_head counted)."""
    attn = shape.hidden * shape.head_dim * (2 * shape.heads + 2 * shape.kv_heads)
    mlp = 3 * shape.hidden * shape.intermediate
    per_layer = attn + mlp + 2 * shape.hidden
    return shape.layers * per_layer + shape.hidden + shape.hidden * shape.vocab


def step_flops(shape: Shape, lengths: list[int]) -> float:
    """Model FLOPs of one step over examples of these lengths (see :data:`MFU_FORMULA`)."""
    tokens = sum(lengths)
    attention = 6 * shape.layers * shape.heads * shape.head_dim * sum(n * n for n in lengths)
    return 4.0 * non_embedding_params(shape) * tokens + attention


def llama_config(shape: Shape, tokenizer: Any) -> Any:
    """A LlamaConfig of the shape, with the tokenizer's special ids."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=max(256, shape.max_len),
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=shape.tied,
    )


def random_model(shape: Shape, tokenizer: Any, cuda: bool, attention: str = "sdpa") -> Any:
    """Random weights (seeded), in the dtype a LoRA base is loaded in on this device, with the
    ``attention`` kernel (the kubetune row: what its device plan picks).
    """
    import torch
    from transformers import LlamaForCausalLM

    dtype = torch.bfloat16 if cuda else torch.float32  # as model.load_model chooses
    torch.manual_seed(SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda" if cuda else "cpu"):
            config = llama_config(shape, tokenizer)
            config._attn_implementation = attention
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def tiny_tokenizer(folder: Path) -> Any:
    """The tests' locally trained tokenizer (only its special ids matter: data are ids)."""
    from tests.trainer.tiny import build_tokenizer

    return build_tokenizer(folder)


# ---------------------------------------------------------------------------------------------
# One row, in its own process
# ---------------------------------------------------------------------------------------------


class _Counting:
    """Wraps a data collator and records each batch's real token count and lengths."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.batches: list[list[int]] = []

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        self.batches.append([len(f["input_ids"]) for f in features])
        return self.inner(features)


def _timer_callback(cuda: bool) -> Any:
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.losses: list[float] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def _trainer_config(
    shape: Shape, cuda: bool, steps: int, n_examples: int, qlora: bool, workdir: Path
) -> Any:
    from kubetune.ids import new_file_id, new_job_id
    from kubetune.settings import ObjectStoreSettings
    from kubetune.trainer_config import BaseModelSource, ResolvedHyperparameters, TrainerConfig

    hp = ResolvedHyperparameters(
        n_epochs=max(1, math.ceil(steps * shape.batch / n_examples)),
        batch_size=shape.batch,
        learning_rate_multiplier=1.0,
        learning_rate=LEARNING_RATE,
        warmup_ratio=0.0,
        micro_batch_size=shape.batch,
    )
    return TrainerConfig(
        job_id=new_job_id(),
        org="default",
        fine_tuned_model="ft:bench:default::bench",
        base_model=BaseModelSource(
            name="bench-llama", path=str(workdir / "model"), context_length=shape.max_len
        ),
        training_file=new_file_id(),
        object_store=ObjectStoreSettings(local_root=workdir / "store"),
        hyperparameters=hp,
        adapter={
            "type": "qlora" if qlora else "lora",
            "r": LORA_R,
            "alpha": LORA_ALPHA,
            "dropout": 0.0,
        },
        resources={"gpus_per_node": 1 if cuda else 0},
        checkpointing={"every_steps": 10**6, "keep": 1},
        seed=SEED,
        max_seq_length=shape.max_len,
        n_evals=0,
        n_train_examples=n_examples,
        total_steps=steps,
        metrics_port=None,
    )


def _stock_trl_args(
    shape: Shape, cuda: bool, steps: int, padded: bool, workdir: Path
) -> tuple[Any, dict[str, Any]]:
    from trl.trainer.sft_config import SFTConfig

    liger = cuda and not padded and importlib.util.find_spec("liger_kernel") is not None
    fast = {
        "packing": not padded,
        "padding_free": not padded,
        "liger": liger,
        "gradient_checkpointing": cuda,
        "bf16": cuda,
        "torch_compile": False,
    }
    args = SFTConfig(
        output_dir=str(workdir / "out"),
        per_device_train_batch_size=shape.batch,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=SEED,
        data_seed=SEED,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        bf16=cuda,
        use_cpu=not cuda,
        activation_checkpointing=cuda,
        dataloader_num_workers=0,
        report_to="none",
        disable_tqdm=True,
        max_length=shape.max_len,
        packing=not padded,
        packing_strategy="bfd",
        padding_free=not padded,
        use_liger_kernel=liger,
        shuffle_dataset=False,
    )
    return args, fast


def run_row(kind: str, shape_name: str, steps: int, warmup: int, cuda: bool) -> Row:
    """Train one row's steps and measure it (in this process)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig

    shape = SHAPES[shape_name]
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-"))
    tokenizer = tiny_tokenizer(workdir / "tokenizer")
    n_examples = steps * shape.batch
    ids = examples(shape, n_examples, shape.vocab)
    name = f"{kind.split('-')[0]}-{shape_name}-{kind.split('-', 1)[1]}"
    timer = _timer_callback(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if kind.startswith("trl"):
        padded = kind == "trl-lora-padded-ref" or not cuda
        args, fast = _stock_trl_args(shape, cuda, steps, padded, workdir)
        config_text = "padded" if padded else "packing(bfd)+padding-free"
        if fast["liger"]:
            config_text += "+liger"
        if cuda:
            config_text += "+gradient-checkpointing"
        model = random_model(shape, tokenizer, cuda)
        torch.manual_seed(SEED)
        from trl.trainer.sft_trainer import SFTTrainer

        trainer: Any = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict({"input_ids": ids}),
            processing_class=tokenizer,
            callbacks=[timer],
            peft_config=LoraConfig(
                r=LORA_R,
                lora_alpha=LORA_ALPHA,
                lora_dropout=0.0,
                target_modules="all-linear",
                bias="none",
                task_type="CAUSAL_LM",
            ),
        )
    else:
        from kubetune_trainer.device import plan_device
        from kubetune_trainer.methods import Hardware, KubetuneSFTTrainer, sft_config
        from kubetune_trainer.model import load_model, lora_config

        qlora = kind == "kubetune-qlora"
        config = _trainer_config(shape, cuda, steps, n_examples, qlora, workdir)
        device = plan_device(config)
        model = random_model(shape, tokenizer, cuda, device.attention)
        if qlora:  # the trainer's loader: from a folder, 4-bit NF4 through bitsandbytes
            model.save_pretrained(workdir / "model")
            del model
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            model = load_model(workdir / "model", config, device)
        hardware = Hardware(device=device, vocab_size=shape.vocab)
        args = sft_config(config, workdir / "checkpoints", hardware)
        args.max_steps = steps
        args.save_strategy = "no"
        fast = {
            "packing": False,
            "padding_free": bool(args.padding_free),
            "liger": bool(args.use_liger_kernel),
            "gradient_checkpointing": bool(args.activation_checkpointing),
            "bf16": bool(args.bf16),
            "torch_compile": bool(args.torch_compile),
        }
        config_text = "padding-free (trainer defaults)" + (" + 4-bit NF4" if qlora else "")
        torch.manual_seed(SEED)
        trainer = KubetuneSFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
            processing_class=tokenizer,
            callbacks=[timer],
            peft_config=lora_config(config),
        )
    fast["optim"] = str(getattr(trainer.args.optim, "value", trainer.args.optim))
    counter = _Counting(trainer.data_collator)
    trainer.data_collator = counter
    trainer.train()
    ends: list[float] = timer.ends
    done = len(ends)
    lengths = counter.batches[:done]
    start = max(1, min(warmup, done - 1))
    timed = range(start, done)
    seconds = ends[done - 1] - ends[start - 1] if done > start else 0.0
    tokens = sum(sum(lengths[i]) for i in timed)
    flops = sum(step_flops(shape, lengths[i]) for i in timed)
    row = Row(name=name, trainer=kind.split("-")[0], config=config_text, steps=done)
    row.real_tokens = tokens
    row.timed_seconds = seconds
    row.tokens_per_s = tokens / seconds if seconds else None
    row.mfu = flops / seconds / (PEAK_TFLOPS * 1e12) if cuda and seconds else None
    if cuda:
        row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        row.peak_kind = "cuda_max_memory_allocated"
    else:
        row.peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
        row.peak_kind = "cpu_process_peak_rss"
    row.losses = timer.losses[:GUARD_STEPS]
    row.fast_paths = fast
    return row


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _spawn(kind: str, opts: argparse.Namespace, cuda: bool) -> Row:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    steps = min(GUARD_STEPS, opts.steps) if kind == "trl-lora-padded-ref" else opts.steps
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--shape",
        opts.shape,
        "--steps",
        str(steps),
        "--warmup",
        str(opts.warmup),
        "--device",
        "cuda" if cuda else "cpu",
        "--row",
        kind,
        "--output",
        str(out),
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"row {kind} failed (exit {proc.returncode})")
    row = Row(**json.loads(out.read_text()))
    out.unlink()
    return row


def loss_guard(reference: Row, candidate: Row) -> dict[str, Any]:
    """Per-step relative difference of the first 20 per-token mean losses."""
    n = min(len(reference.losses), len(candidate.losses), GUARD_STEPS)
    diffs = [
        abs(c - r) / abs(r) for r, c in zip(reference.losses[:n], candidate.losses[:n], strict=True)
    ]
    worst = max(diffs) if diffs else math.inf
    return {
        "reference": reference.name,
        "candidate": candidate.name,
        "steps_compared": n,
        "max_rel_diff": worst,
        "tolerance": GUARD_TOLERANCE,
        "passed": n > 0 and worst <= GUARD_TOLERANCE,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[Row], cuda: bool) -> None:
    """The results as a text table."""
    mem = "peak GiB (CUDA)" if cuda else "peak RSS GiB (process)"
    head = f"{'row':<30} {'tokens/s':>10} {'MFU':>7} {mem:>22} {'steps':>5}  config"
    print(head)
    print("-" * len(head))
    for row in rows:
        if row.skipped:
            print(f"{row.name:<30} skipped: {row.skipped}")
            continue
        mfu = "-" if row.mfu is None else f"{row.mfu:.1%}"
        print(
            f"{row.name:<30} {_fmt(row.tokens_per_s, ',.0f'):>10} {mfu:>7} "
            f"{_fmt(row.peak_gib, '.2f'):>22} {row.steps:>5}  {row.config}"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with the internal ``--row``, one of its rows)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps per row")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    import torch

    cuda = opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible")
    opts.steps = opts.steps or SHAPES[opts.shape].default_steps
    if opts.steps <= opts.warmup + 1:
        parser.error("--steps must exceed --warmup + 1")
    if opts.row:
        row = run_row(opts.row, opts.shape, opts.steps, opts.warmup, cuda)
        opts.output.write_text(json.dumps(asdict(row)))
        return 0

    device = "cuda" if cuda else "cpu"
    output = opts.output or REPO_ROOT / f"benchmarks/results/trainer-{device}-{opts.shape}.json"
    started = time.perf_counter()
    rows = [_spawn("trl-lora", opts, cuda), _spawn("kubetune-lora", opts, cuda)]
    if cuda:
        rows.append(_spawn("kubetune-qlora", opts, cuda))
        reference = _spawn("trl-lora-padded-ref", opts, cuda)
        rows.append(reference)
    else:
        rows.append(
            Row(
                name=f"kubetune-{opts.shape}-qlora",
                trainer="kubetune",
                config="4-bit NF4",
                skipped="QLoRA needs CUDA (bitsandbytes' 4-bit kernels); not run on CPU",
            )
        )
        reference = rows[0]  # on CPU the stock TRL row already runs padded batches
    trl_row, kube_row = rows[0], rows[1]
    ratio = (
        kube_row.tokens_per_s / trl_row.tokens_per_s
        if kube_row.tokens_per_s and trl_row.tokens_per_s
        else None
    )
    guard = loss_guard(reference, kube_row)
    gpu = torch.cuda.get_device_name(0) if cuda else None
    print(f"\nTrainer throughput, shape {opts.shape}, device {gpu or 'cpu'}\n")
    print_table(rows, cuda)
    print(f"\nratio kubetune/trl tokens/s: {_fmt(ratio, '.2f')}x")
    print(f"MFU formula: {MFU_FORMULA}" + ("" if cuda else " (not computed on CPU)"))
    print(
        f"loss guard: {guard['candidate']} vs {guard['reference']} over "
        f"{guard['steps_compared']} steps, max relative difference "
        f"{guard['max_rel_diff']:.2e} (tolerance {GUARD_TOLERANCE:.0%}): "
        f"{'PASS' if guard['passed'] else 'FAIL'}"
    )
    from kubetune_trainer.manifest import versions

    body = {
        "benchmark": "trainer_throughput",
        "shape": opts.shape,
        "shape_dims": asdict(SHAPES[opts.shape]),
        "device": device,
        "gpu": gpu,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "versions": versions(BENCHMARKED_PACKAGES),
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "seed": SEED,
        "steps": opts.steps,
        "warmup_steps": opts.warmup,
        "batch_size": SHAPES[opts.shape].batch,
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0, "targets": "all-linear"},
        "mfu_formula": MFU_FORMULA,
        "peak_memory": "torch.cuda.max_memory_allocated per row process"
        if cuda
        else "peak RSS of each row's process (ru_maxrss), not GPU memory",
        "ratio_kubetune_over_trl": ratio,
        "loss_guard": guard,
        "wall_seconds": time.perf_counter() - started,
        "rows": [asdict(r) for r in rows],
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(body, indent=2) + "\n")
    print(f"\nwrote {output}")
    return 0 if guard["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
