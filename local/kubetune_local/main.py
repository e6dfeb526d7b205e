"""Local mode: the whole service on one machine (``make run``, ``kubetune serve``).

``python -m kubetune_local [--data-dir D] [--host H] [--port P] [--no-vllm]
[--model FOLDER [--model-name NAME]]``

- state under the data folder (default ``~/.local/share/kubetune``): files and adapters in a
  local object store, jobs in SQLite, an API key made on first start (its hash in
  ``api_keys.json``, the key itself in the 0600 file ``api_key`` so it can be shown each time);
- a tiny Llama base model, ``tiny-llama``, created offline on first start; and, with
  ``--model``, any Hugging Face model folder of yours as a second base model (checked first:
  config, weights, tokenizer, chat template), which vLLM then serves instead;
- the job driver runs jobs with the subprocess runtime: the real trainer as child processes
  (:mod:`kubetune_local.runner`);
- a real vLLM on the CPU serves the base model with LoRA enabled, and every fine-tuned model
  through the API's ``/v1/chat/completions`` (skipped with ``--no-vllm`` or when vLLM is not
  installed: ``bash hack/install-vllm.sh``).

Ctrl-C (or SIGTERM) stops the server, then the trainers (each commits a checkpoint; its job
resumes on the next start), then vLLM. Children run in their own process groups and are
killed as groups, so nothing outlives this process.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Final

import uvicorn

from kubetune.base_models import BaseModelPhase
from kubetune.settings import BASE_MODEL_ID_PATTERN, BaseModelEntry, Mode, Settings
from kubetune_api.app import build_services, create_app
from kubetune_api.auth import ApiKeyEntry, Role, hash_key, new_api_key, write_private
from kubetune_api.backends.local import JOBS_DATABASE, LocalJobBackend
from kubetune_local.base_models import INSPECT_MODULE, VLLM_ARCHITECTURES
from kubetune_local.process import (
    ChildProcess,
    DataDirInUse,
    children_registry,
    lock_data_dir,
    stop_orphans,
)
from kubetune_local.runner import LocalRunner
from kubetune_runtime.ports import free_loopback_port
from kubetune_runtime.vllm_launch import (
    Accelerator,
    VllmLaunch,
    default_vllm_python,
    installed_accelerator,
)
from kubetune_trainer import tiny_model

log = logging.getLogger("kubetune.local")

BASE_MODEL: Final = "tiny-llama"
CONTEXT_LENGTH: Final = 512
KEY_FILE: Final = "api_key"
KEYS_FILE: Final = "api_keys.json"
VLLM_READY_TIMEOUT: Final = 300.0
VLLM_STOP_GRACE: Final = 20.0
LOCAL_ORG: Final = "local"
# A model of your own is trained and served on sequences up to this long (or its context, if
# shorter): enough for chat fine-tuning, and a KV cache a workstation's CPU or GPU can hold.
OWN_MODEL_MAX_LEN: Final = 2048
OWN_MODEL_CPU_KV_CACHE: Final = "1G"
MODEL_NAME: Final = re.compile(BASE_MODEL_ID_PATTERN)


class Stop(Exception):
    """SIGTERM arrived: unwind and stop every child, as for Ctrl-C."""


class UnusableModel(Exception):
    """``--model`` names a folder that cannot be a base model; the message says why."""


@dataclass(frozen=True)
class ServedBase:
    """The base model vLLM serves, under the name requests use."""

    name: str
    folder: Path
    max_model_len: int
    kv_cache_bytes: str | None = None  # on the CPU; None: VllmLaunch's (the tiny model's)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="kubetune-local", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, help="State folder (default: settings.data_dir).")
    parser.add_argument("--host", help="Address to listen on (default 127.0.0.1).")
    parser.add_argument("--port", type=int, help="Port to listen on (default 8000).")
    parser.add_argument("--no-vllm", action="store_true", help="Serve without inference.")
    parser.add_argument(
        "--model",
        type=Path,
        help="A Hugging Face model folder to fine-tune and serve beside tiny-llama, or the "
        "name of one added with `kubetune models add` (served instead of tiny-llama).",
    )
    parser.add_argument("--model-name", help="Its name in requests (default: the folder's).")
    return parser.parse_args(argv)


# -- first start: model and key -------------------------------------------------------------------
def ensure_base_model(data_dir: Path) -> Path:
    """The tiny base model's folder, created (offline, atomically) on first use."""
    folder = data_dir / "models" / BASE_MODEL
    if not (folder / "config.json").exists():
        print(f"Creating the tiny base model {BASE_MODEL} in {folder} (first start only)...")
        subprocess.run([sys.executable, "-m", tiny_model.__name__, str(folder)], check=True)
    return folder


def catalogue_entry(folder: Path) -> BaseModelEntry:
    """The catalogue entry of the tiny model: the trainer reads it from the folder."""
    return BaseModelEntry(
        id=BASE_MODEL,
        owned_by="kubetune",
        created=int(folder.stat().st_mtime),
        tokenizer=folder,
        context_length=CONTEXT_LENGTH,
        path=str(folder),
    )


def check_vllm_serves(architecture: str) -> None:
    """:class:`UnusableModel` unless the installed vLLM serves ``architecture`` (nothing to
    check when vLLM is not installed: local mode then serves no inference).
    """
    python = default_vllm_python()
    if not python.exists():
        return
    asked = subprocess.run(
        [str(python), "-c", VLLM_ARCHITECTURES], capture_output=True, text=True, check=False
    )
    try:
        version, served = json.loads(asked.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):  # vLLM would not start either; its start says why
        log.warning("could not ask vLLM which architectures it serves: %s", asked.stderr[-500:])
        return
    if architecture not in served:
        raise UnusableModel(
            f"vLLM {version} does not serve {architecture}, so its fine-tuned models could "
            "not answer (see vLLM's supported models)"
        )


def own_base_model(
    folder: Path, name: str | None, *, servable: bool = True
) -> tuple[BaseModelEntry, ServedBase]:
    """The catalogue entry and the serving of ``--model``'s folder, once
    :mod:`kubetune_trainer.inspect_model` found it usable (and, with ``servable``, vLLM serves
    its architecture); :class:`UnusableModel` otherwise.
    """
    folder = folder.expanduser().resolve()
    name = name or folder.name
    if not MODEL_NAME.match(name) or name == BASE_MODEL:
        raise UnusableModel(
            f"{name!r} cannot name a base model: letters, digits, '.', '_', '-' or '/', not "
            f"{BASE_MODEL} (give --model-name)"
        )
    checked = subprocess.run(
        [sys.executable, "-m", INSPECT_MODULE, str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        report = json.loads(checked.stdout)
    except ValueError:  # it crashed before it could say why
        raise UnusableModel(f"{folder} could not be checked: {checked.stderr[-2000:]}") from None
    if checked.returncode != 0:
        raise UnusableModel(str(report["error"]))
    if servable:
        check_vllm_serves(report["architecture"])
    length = min(int(report["context_length"]), OWN_MODEL_MAX_LEN)
    print(f"Base model {name}: {report['architecture']} from {folder} ({length} tokens)")
    entry = BaseModelEntry(
        id=name,
        owned_by=LOCAL_ORG,
        created=int(folder.stat().st_mtime),
        tokenizer=folder,
        context_length=length,
        path=str(folder),
    )
    return entry, ServedBase(name, folder, length, OWN_MODEL_CPU_KV_CACHE)


def ensure_api_key(data_dir: Path) -> str:
    """The local admin key: read from ``api_key``, or made (and its hash added to
    ``api_keys.json``, which the API reads) on first start.
    """
    key_path, keys_path = data_dir / KEY_FILE, data_dir / KEYS_FILE
    entries = json.loads(keys_path.read_text()) if keys_path.exists() else []
    if key_path.exists():
        key = key_path.read_text().strip()
        if any(e.get("sha256") == hash_key(key) for e in entries):
            return key
    key = new_api_key()
    entry = ApiKeyEntry(name="local-admin", org=LOCAL_ORG, role=Role.ADMIN, sha256=hash_key(key))
    data_dir.mkdir(parents=True, exist_ok=True)
    write_private(keys_path, json.dumps([*entries, entry.model_dump(exclude_none=True)]))
    write_private(key_path, key + "\n")
    return key


def local_settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with what local mode decides on top."""
    base = Settings()
    data_dir = (args.data_dir or base.data_dir).expanduser().resolve()
    api = base.api.model_copy(
        update={
            "host": args.host or base.api.host,
            "port": base.api.port if args.port is None else args.port,
            "api_keys_file": data_dir / KEYS_FILE,
        }
    )
    return base.model_copy(
        update={
            "mode": Mode.LOCAL,
            "data_dir": data_dir,
            "api": api,
        }
    )


# -- vLLM -----------------------------------------------------------------------------------------


def _serves(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as resp:  # noqa: S310 - loopback
            return bool(json.load(resp).get("data"))
    except (OSError, ValueError):
        return False


def start_vllm(settings: Settings, served: ServedBase) -> tuple[ChildProcess, str] | None:
    """Start vLLM on the base model and wait until it serves; None when it cannot run."""
    python = default_vllm_python()
    if not python.exists():
        print(f"vLLM is not installed ({python} is missing): serving without inference.")
        print("Install it with `bash hack/install-vllm.sh` (or `make run`) to chat with models.")
        return None
    accelerator = installed_accelerator(python)
    launch = VllmLaunch(
        model=served.folder,
        served_model_name=served.name,
        port=free_loopback_port(),
        python=python,
        max_lora_rank=settings.serving.max_lora_rank,
        max_model_len=served.max_model_len,
        accelerator=accelerator,
    )
    if served.kv_cache_bytes is not None:
        launch = replace(launch, kv_cache_bytes=served.kv_cache_bytes)
    logs = settings.data_dir / "logs"
    where = "on the GPU" if accelerator is Accelerator.CUDA else "about 30 s on a CPU"
    print(f"Starting vLLM on {served.name} ({where}; log: {logs / 'vllm.log'})...")
    process = ChildProcess(
        "vllm",
        launch.argv(),
        env=launch.env(),
        cwd=settings.data_dir,
        log_path=logs / "vllm.log",
        grace=VLLM_STOP_GRACE,
        registry=children_registry(settings.data_dir),
    )
    try:
        ready = _wait_ready(process, launch.base_url)
    except BaseException:  # Ctrl-C while waiting: no vLLM left behind
        process.stop(VLLM_STOP_GRACE)
        raise
    if not ready:
        print("vLLM did not start; serving without inference. Its log ends with:")
        print(process.log_tail(2000))
        process.stop(VLLM_STOP_GRACE)
        return None
    return process, launch.base_url


def _wait_ready(process: ChildProcess, url: str) -> bool:
    deadline = time.monotonic() + VLLM_READY_TIMEOUT
    while not _serves(url):
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def with_vllm(settings: Settings, served: ServedBase, url: str) -> Settings:
    """Settings whose inference proxy and job runner use the local vLLM."""
    serving = settings.serving.model_copy(
        update={
            "vllm_urls": {**settings.serving.vllm_urls, served.name: url},
            "vllm_model": str(served.folder),
            "adapter_dir": settings.data_dir / "adapters",
        }
    )
    return settings.model_copy(update={"serving": serving})


# -- the server -----------------------------------------------------------------------------------
def banner(base_url: str, key: str, *, inference: bool) -> str:
    """What to tell the user once the server listens."""
    chat = (
        f'reply = client.chat.completions.create(model="{BASE_MODEL}", '
        'messages=[{"role": "user", "content": "Hello!"}])\n'
        "print(reply.choices[0].message.content)\n"
        if inference
        else "# (inference is off: vLLM is not running)\n"
    )
    return (
        "\nkubetune is running in local mode.\n"
        f"  Base URL: {base_url}\n"
        f"  API key:  {key}\n\n"
        "Use it with the OpenAI SDK:\n\n"
        "from openai import OpenAI\n"
        f'client = OpenAI(base_url="{base_url}", api_key="{key}")\n'
        "print([m.id for m in client.models.list()])\n"
        f"{chat}\n"
        "Press Ctrl-C to stop (running jobs resume on the next start).\n"
    )


class _Server(uvicorn.Server):
    """uvicorn, telling the user how to connect once it listens."""

    def __init__(self, config: uvicorn.Config, message: str) -> None:
        super().__init__(config)
        self.message = message

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self.message, flush=True)


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop


def added_base_model(settings: Settings, name: Path) -> ServedBase | None:
    """The serving of ``--model NAME`` when NAME is no folder but a base model added at run
    time (``kubetune models add``) and found ready; None otherwise.
    """
    if name.exists() or not MODEL_NAME.match(str(name)):
        return None
    registry = LocalJobBackend(settings.data_dir / JOBS_DATABASE)
    model = registry.get_base_model(LOCAL_ORG, str(name))
    if model is None:
        return None
    if model.phase is not BaseModelPhase.READY:
        raise UnusableModel(f"base model {name} is {model.phase.value}: {model.message or ''}")
    length = min(model.entry().context_length, OWN_MODEL_MAX_LEN)
    print(f"Base model {name}: added at run time, from {model.path} ({length} tokens)")
    return ServedBase(model.id, Path(model.path), length, OWN_MODEL_CPU_KV_CACHE)


def prepare(args: argparse.Namespace) -> tuple[Settings, ServedBase, str]:
    """The settings, the base model vLLM serves and the API key, made on first start."""
    settings = local_settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    lock_data_dir(settings.data_dir)  # before the orphan sweep: they are no live server's
    left = stop_orphans(children_registry(settings.data_dir))
    if left:  # a previous run was killed before it could stop them
        print(f"Stopped what a previous run left running: {', '.join(left)}", flush=True)
    model = ensure_base_model(settings.data_dir)
    ours = [catalogue_entry(model)]
    served = ServedBase(BASE_MODEL, model, CONTEXT_LENGTH)
    added = None if args.model is None else added_base_model(settings, args.model)
    if added is not None:  # added at run time (kubetune models add): listed from the registry
        served = added
    elif args.model is not None:
        entry, served = own_base_model(args.model, args.model_name, servable=not args.no_vllm)
        ours.append(entry)
    names = {m.id for m in ours}
    catalogue = [*(m for m in settings.models if m.id not in names), *ours]
    settings = settings.model_copy(update={"models": catalogue})
    return settings, served, ensure_api_key(settings.data_dir)


def run_service(settings: Settings, key: str, *, inference: bool) -> None:
    """Serve the API with the job runner beside it until the server stops (Ctrl-C)."""
    services = build_services(settings)
    if not isinstance(services.backend, LocalJobBackend):
        raise TypeError("local mode keeps its jobs in SQLite")
    runner = LocalRunner(settings, services.backend, services.store)
    host = "localhost" if settings.api.host in ("127.0.0.1", "0.0.0.0") else settings.api.host  # noqa: S104
    config = uvicorn.Config(
        create_app(settings, services),
        host=settings.api.host,
        port=settings.api.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    runner.start()
    try:
        _Server(
            config, banner(f"http://{host}:{settings.api.port}/v1", key, inference=inference)
        ).run()
    finally:
        runner.stop()  # trainers commit a checkpoint; their jobs resume on the next start


def serve(args: argparse.Namespace) -> int:
    """Prepare the data folder, start vLLM, serve until Ctrl-C, then stop everything."""
    settings, served, key = prepare(args)
    vllm = None if args.no_vllm else start_vllm(settings, served)
    try:
        if vllm is not None:
            settings = with_vllm(settings, served, vllm[1])
        run_service(settings, key, inference=vllm is not None)
    except (KeyboardInterrupt, Stop):
        pass
    finally:
        if vllm is not None:
            print("Stopping vLLM...", flush=True)
            vllm[0].stop(VLLM_STOP_GRACE)
    print("kubetune stopped.", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run local mode; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # One line per request to vLLM (every sync, every proxied completion) would bury the rest.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # SIGTERM unwinds like Ctrl-C (uvicorn handles both while it serves, then re-raises them).
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        return serve(parse_args(argv))
    except (KeyboardInterrupt, Stop):  # before the server started (e.g. waiting for vLLM)
        return 0
    except DataDirInUse as exc:
        print(f"kubetune: {exc}", file=sys.stderr, flush=True)
        return 1
    except UnusableModel as exc:
        print(f"kubetune: --model: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
