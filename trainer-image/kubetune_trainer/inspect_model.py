"""Whether a Hugging Face model folder can be a base model, and what the catalogue needs of it.

A base model is checked before anyone trains on it, so that a folder that cannot work fails
once, with the reason, instead of failing every job: its ``config.json`` loads and names a
causal language model, its weights are there (safetensors or PyTorch files), its tokenizer
loads, and its chat template renders a conversation (chat examples are rendered with it). The
report carries what the catalogue and vLLM need: the architecture (vLLM serves by it), the
context length, the hidden size.

``python -m kubetune_trainer.inspect_model FOLDER`` prints the report as JSON, or
``{"error": reason}`` with exit status 2: local mode runs it as a child, since it never imports
transformers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from transformers import AutoConfig, AutoTokenizer

from kubetune.trainer_config import parse_model_location
from kubetune_runtime.objectstore import ObjectStore, open_object_store

WEIGHT_PATTERNS: Final = ("*.safetensors", "pytorch_model*.bin")
# The first conversation a chat template must render (system turns are optional in some).
PROBE: Final = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]
EXIT_UNUSABLE: Final = 2


class UnusableModel(Exception):
    """The folder cannot be a base model; the message says why."""


@dataclass(frozen=True)
class ModelReport:
    """What the catalogue needs to know of a usable base model."""

    architecture: str
    model_type: str
    context_length: int
    hidden_size: int | None


def _config(folder: Path) -> Any:
    if not (folder / "config.json").is_file():
        raise UnusableModel(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise UnusableModel(f"{folder}/config.json does not load: {exc}") from exc


def _architecture(config: Any) -> str:
    architectures = list(getattr(config, "architectures", None) or [])
    causal = [a for a in architectures if a.endswith(("ForCausalLM", "ForConditionalGeneration"))]
    if not causal:
        raise UnusableModel(
            f"config.json names {architectures or 'no architecture'}: not a causal language "
            "model (an architecture ending in ForCausalLM)"
        )
    return str(causal[0])


def _context_length(config: Any) -> int:
    text = getattr(config, "text_config", None) or config
    for name in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise UnusableModel("config.json gives no context length (max_position_embeddings)")


def _check_weights(folder: Path) -> None:
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise UnusableModel(f"{folder} holds no weights (*.safetensors or pytorch_model*.bin)")


def _check_tokenizer(folder: Path) -> None:
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise UnusableModel(f"the tokenizer in {folder} does not load: {exc}") from exc
    if not tokenizer.chat_template:
        raise UnusableModel(
            f"the tokenizer in {folder} has no chat template: chat examples could not be "
            "rendered as the model expects (a base, not an instruct, model?)"
        )
    try:
        tokenizer.apply_chat_template(PROBE, tokenize=False)
    except Exception as exc:
        raise UnusableModel(f"the chat template in {folder} does not render: {exc}") from exc


def inspect_folder(folder: Path) -> ModelReport:
    """The report of a usable base model folder; :class:`UnusableModel` says why not."""
    if not folder.is_dir():
        raise UnusableModel(f"{folder} is not a folder")
    config = _config(folder)
    report = ModelReport(
        architecture=_architecture(config),
        model_type=str(getattr(config, "model_type", "")),
        context_length=_context_length(config),
        hidden_size=getattr(getattr(config, "text_config", None) or config, "hidden_size", None),
    )
    _check_weights(folder)
    _check_tokenizer(folder)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Print the folder's report as JSON (exit 0), or why it is unusable (exit 2), on stdout;
    with ``--report-key``, also leave that answer in the object store (a cluster's check Job:
    the operator reads it there, as it reads a merge's).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="a folder, or store:<prefix> for one in the object store")
    parser.add_argument("--report-key", help="object-store key the answer is written to")
    parser.add_argument(
        "--object-store", help="the store's settings as JSON (credentials from the environment)"
    )
    args = parser.parse_args(argv)
    store = _store(args.object_store) if args.object_store else None
    try:
        report: dict[str, Any] = asdict(inspect_folder(_folder(args.folder, store)))
        code = 0
    except UnusableModel as exc:
        report, code = {"error": str(exc)}, EXIT_UNUSABLE
    print(json.dumps(report))
    if args.report_key:
        if store is None:
            parser.error("--report-key needs --object-store")
        store.put_json(args.report_key, report)
    return code


def _store(settings_json: str) -> ObjectStore:
    from kubetune.settings import ObjectStoreSettings

    return open_object_store(ObjectStoreSettings.model_validate_json(settings_json))


def _folder(location: str, store: ObjectStore | None) -> Path:
    """The folder to inspect: ``location`` itself, or a store folder downloaded to scratch."""
    local, prefix = parse_model_location(location)
    if prefix is None:
        assert local is not None
        return Path(local).expanduser().resolve()
    if store is None:
        raise UnusableModel(f"{location} is in the object store, and no store was given")
    dest = Path(tempfile.mkdtemp(prefix="base-model-"))
    if not store.download_prefix(prefix, dest):
        raise UnusableModel(f"nothing is stored under {location}")
    return dest


if __name__ == "__main__":
    sys.exit(main())
