"""The trainer's CUDA paths on one GPU, in minutes: ``make gpu-smoke``.

Runs the real trainer (``python -m kubetune_trainer.launch`` or torchrun, as a pod does) on a
tiny Llama made on the spot (or ``--model DIR``, a Hugging Face folder) and prints what each case
saw; ``--out FILE`` also writes it as JSON with the machine and the versions. Cases:

- ``lora``, ``qlora``, ``dpo``: one process each;
- ``fsdp`` (full fine-tuning) and ``zero3`` (LoRA): one process under torchrun, so the process
  group exists and the strategy applies;
- ``sigterm-resume``: SIGTERM after step 3 (exit 143, the step's checkpoint committed), then a
  restart that resumes from step 3 and ends at the planned step;
- ``one-process-strategy``: ``strategy: fsdp`` in one process launched without torchrun (a
  one-GPU job): trains without sharding and says so in a warning event.

Without CUDA (or with ``--cpu``) the cases the CPU can run still run, and the others are listed
as needing CUDA; ``make test`` runs it that way. Exit code: 0 when every case that ran passed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import torch

from kubetune.events import EventType, JobEvent, read_events
from kubetune.ids import new_file_id, new_job_id
from kubetune.settings import ObjectStoreSettings
from kubetune.trainer_config import BaseModelSource, ResolvedHyperparameters, TrainerConfig
from kubetune.trainer_events import TrainerEventKind, event_kind
from kubetune_runtime.objectstore import LocalObjectStore
from kubetune_runtime.ports import free_loopback_port
from kubetune_trainer.manifest import versions
from kubetune_trainer.tiny_model import ensure_tiny_model

REPO: Final = Path(__file__).resolve().parents[1]
ORG: Final = "default"
N_EXAMPLES: Final = 16
BATCH: Final = 4
EPOCHS: Final = 2
TOTAL_STEPS: Final = N_EXAMPLES // BATCH * EPOCHS  # 8
FAULT_STEP: Final = 3
WORDS: Final = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "piano",
    "garden",
    "window",
    "rocket",
    "candle",
]
VERSIONED: Final = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "deepspeed",
    "bitsandbytes",
)


@dataclass
class Case:
    """One thing to try: the config it changes, how it is launched, what it needs."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    torchrun: bool = False  # one process under torchrun: a process group of one
    needs_cuda: bool = False
    needs: tuple[str, ...] = ()  # packages that must be importable
    dpo: bool = False


CASES: Final = (
    Case("lora"),
    Case("qlora", {"adapter": {"type": "qlora", "r": 8}}, needs_cuda=True, needs=("bitsandbytes",)),
    Case("dpo", {"method": "dpo"}, dpo=True),
    Case("fsdp", {"adapter": {"type": "full"}, "strategy": "fsdp"}, torchrun=True, needs_cuda=True),
    Case(
        "zero3",
        {"strategy": "deepspeed-zero3"},
        torchrun=True,
        needs_cuda=True,
        needs=("deepspeed",),
    ),
    Case("sigterm-resume"),
    Case("one-process-strategy", {"strategy": "fsdp"}),
)


@dataclass
class Outcome:
    """What a case saw."""

    case: str
    status: str  # passed, failed, skipped
    detail: str = ""
    seconds: float = 0.0
    exit_codes: list[int] = field(default_factory=list)
    steps: int | None = None
    first_loss: float | None = None
    last_loss: float | None = None
    peak_gib: float | None = None
    warnings: list[str] = field(default_factory=list)


def _question(word: str) -> str:
    return f"What color is the {word}?"


def sft_rows(rng: random.Random) -> list[dict[str, Any]]:
    """Chat examples that all teach one answer."""
    return [
        {
            "messages": [
                {"role": "user", "content": _question(rng.choice(WORDS))},
                {"role": "assistant", "content": "The color is blue."},
            ]
        }
        for _ in range(N_EXAMPLES)
    ]


def dpo_rows(rng: random.Random) -> list[dict[str, Any]]:
    """Preference examples in OpenAI's DPO format."""
    return [
        {
            "input": {"messages": [{"role": "user", "content": _question(rng.choice(WORDS))}]},
            "preferred_output": [{"role": "assistant", "content": "Good choice."}],
            "non_preferred_output": [{"role": "assistant", "content": "Bad choice."}],
        }
        for _ in range(N_EXAMPLES)
    ]


class Bench:
    """The store, the model and the configs of one smoke run."""

    def __init__(self, root: Path, model: Path, cuda: bool) -> None:
        self.root = root
        self.model = model
        self.cuda = cuda
        self.settings = ObjectStoreSettings(local_root=root / "store")
        self.store = LocalObjectStore(root / "store")
        self.layout = self.settings.layout()

    def config(self, case: Case) -> Path:
        """Upload the case's data and write its trainer config; returns the config's path."""
        rng = random.Random(1)  # noqa: S311 - example data, not a secret
        rows = dpo_rows(rng) if case.dpo else sft_rows(rng)
        file_id = new_file_id()
        body = b"".join(json.dumps(row).encode() + b"\n" for row in rows)
        self.store.put_bytes(self.layout.file_key(ORG, file_id), body)
        fields: dict[str, Any] = {
            "job_id": new_job_id(),
            "org": ORG,
            "fine_tuned_model": f"ft:smoke:{ORG}::{case.name}",
            "base_model": BaseModelSource(name="smoke", path=str(self.model), context_length=256),
            "training_file": file_id,
            "object_store": self.settings,
            "hyperparameters": ResolvedHyperparameters(
                n_epochs=EPOCHS,
                batch_size=BATCH,
                learning_rate_multiplier=1.0,
                learning_rate=5e-3,
                warmup_ratio=0.0,
                micro_batch_size=2,
                beta=0.1 if case.dpo else None,
            ),
            "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
            "checkpointing": {"every_steps": 4, "keep": 2},
            "resources": {"gpus_per_node": 1 if self.cuda else 0},
            "seed": 1234,
            "max_seq_length": 128,
            "n_evals": 0,
            "n_train_examples": N_EXAMPLES,
            "total_steps": TOTAL_STEPS,
            "metrics_port": None,
            **case.overrides,
        }
        config = TrainerConfig.model_validate(fields)
        path = self.root / case.name / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(config.model_dump_json(indent=2))
        return path

    def events(self, config_path: Path) -> list[JobEvent]:
        """The events the case's trainer wrote."""
        job_id = json.loads(config_path.read_text())["job_id"]
        return read_events(self.store, self.layout.events_prefix(ORG, job_id))

    def launch(self, case: Case, config_path: Path, env: dict[str, str] | None = None) -> int:
        """Run the trainer as a pod would; returns its exit code (output in the case folder)."""
        if case.torchrun:
            command = [
                *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"),
                *("--master_port", str(free_loopback_port())),
                *("-m", "kubetune_trainer", "--config", str(config_path)),
            ]
        else:
            command = [
                sys.executable,
                "-m",
                "kubetune_trainer.launch",
                "--config",
                str(config_path),
            ]
        environment = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "trainer-image")]),
            "KUBETUNE_TRAINER_WORKDIR": str(self.root / case.name / "scratch"),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **(env or {}),
        }
        log = config_path.parent / f"log-{len(list(config_path.parent.glob('log-*')))}.txt"
        with log.open("wb") as out:
            return subprocess.run(
                command, env=environment, stdout=out, stderr=subprocess.STDOUT, check=False
            ).returncode


def _losses(events: Sequence[JobEvent]) -> dict[int, float]:
    return {
        int(e.data["step"]): float(e.data["train_loss"])
        for e in events
        if e.type is EventType.METRICS and "train_loss" in e.data
    }


def _peak(events: Sequence[JobEvent]) -> float | None:
    peaks = [e.data["memory_bytes"] for e in events if e.data.get("memory_bytes")]
    return round(max(peaks) / 2**30, 2) if peaks else None


def run_case(bench: Bench, case: Case) -> Outcome:
    """Run one case and judge it: every run ends at the planned step, and each case's own sign."""
    started = time.monotonic()
    config_path = bench.config(case)
    outcome = Outcome(case.name, "passed")
    if case.name == "sigterm-resume":
        fault = {"KUBETUNE_TRAINER_FAULT_SIGTERM_AT_STEP": str(FAULT_STEP)}
        outcome.exit_codes.append(bench.launch(case, config_path, fault))
    outcome.exit_codes.append(bench.launch(case, config_path))
    events = bench.events(config_path)
    kinds = [event_kind(e) for e in events]
    losses = _losses(events)
    outcome.steps = max(losses, default=None)
    outcome.first_loss = losses[min(losses)] if losses else None
    outcome.last_loss = losses[max(losses)] if losses else None
    outcome.peak_gib = _peak(events)
    outcome.warnings = [e.message for e in events if event_kind(e) is TrainerEventKind.WARNING]
    problems = _judge(case, outcome, kinds, events)
    if problems:
        outcome.status, outcome.detail = "failed", "; ".join(problems)
    outcome.seconds = round(time.monotonic() - started, 1)
    return outcome


def _judge(
    case: Case, outcome: Outcome, kinds: list[TrainerEventKind | None], events: list[JobEvent]
) -> list[str]:
    problems = []
    expected_codes = [143, 0] if case.name == "sigterm-resume" else [0]
    if outcome.exit_codes != expected_codes:
        errors = [e.message for e in events if event_kind(e) is TrainerEventKind.ERROR]
        problems.append(f"exit codes {outcome.exit_codes}, wanted {expected_codes} {errors}")
    if outcome.steps != TOTAL_STEPS:
        problems.append(f"ended at step {outcome.steps}, planned {TOTAL_STEPS}")
    if TrainerEventKind.COMPLETED not in kinds:
        problems.append("no completed event")
    if case.name == "sigterm-resume":
        restarted = [e for e in events if event_kind(e) is TrainerEventKind.RESTARTED]
        if [e.data.get("step") for e in restarted] != [FAULT_STEP]:
            problems.append(f"restarts {[e.data.get('step') for e in restarted]}, wanted [3]")
    if case.name == "one-process-strategy" and not any(
        "trains without it" in w for w in outcome.warnings
    ):
        problems.append("no warning that the strategy was left out")
    return problems


def _missing(case: Case, cuda: bool) -> str | None:
    import importlib.util

    if case.needs_cuda and not cuda:
        return "needs CUDA"
    absent = [name for name in case.needs if importlib.util.find_spec(name) is None]
    return f"needs {', '.join(absent)}" if absent else None


def report(outcomes: Sequence[Outcome], cuda: bool, say: Callable[[str], None] = print) -> None:
    """Print one line per case."""
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    say(f"gpu-smoke on {device} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    for o in outcomes:
        losses = (
            f"loss {o.first_loss:.3f} -> {o.last_loss:.3f}"
            if o.first_loss is not None and o.last_loss is not None
            else ""
        )
        peak = f"peak {o.peak_gib} GiB" if o.peak_gib is not None else ""
        facts = ", ".join(x for x in (f"steps {o.steps}", losses, peak, f"{o.seconds}s") if x)
        line = f"{o.case:<22} {o.status:<8}"
        line += f" {facts}" if o.status != "skipped" else ""
        say(line + (f"  [{o.detail}]" if o.detail else ""))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the cases; returns 0 when every case that ran passed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="A Hugging Face model folder (default: tiny)")
    parser.add_argument("--cases", help="Comma-separated case names (default: all)")
    parser.add_argument("--cpu", action="store_true", help="Run on the CPU even with CUDA")
    parser.add_argument("--out", type=Path, help="Also write the outcomes as JSON here")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    wanted = set(args.cases.split(",")) if args.cases else {c.name for c in CASES}
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="kubetune-gpu-smoke-") as tmp:
        root = Path(tmp)
        model = args.model or ensure_tiny_model(root / "tiny-model")
        bench = Bench(root, model, cuda)
        for case in CASES:
            if case.name not in wanted:
                continue
            missing = _missing(case, cuda)
            if missing:
                outcomes.append(Outcome(case.name, "skipped", missing))
                continue
            outcomes.append(run_case(bench, case))
            if outcomes[-1].status == "failed":
                print((root / case.name / "log-0.txt").read_text()[-3000:], file=sys.stderr)
    report(outcomes, cuda)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        machine = {"platform": platform.platform(), "python": platform.python_version()}
        if cuda:
            machine["gpu"] = torch.cuda.get_device_name(0)
        body = {
            "command": "make gpu-smoke",
            "machine": machine,
            "versions": versions(VERSIONED),
            "outcomes": [asdict(o) for o in outcomes],
        }
        args.out.write_text(json.dumps(body, indent=2) + "\n")
    return 0 if all(o.status != "failed" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
