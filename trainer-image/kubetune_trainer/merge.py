"""Merge a fine-tuned LoRA adapter into its base model and publish the whole model: what
``GET /v1/models/{model}/content?format=merged`` hands out for a LoRA model.

``python -m kubetune_trainer.merge --config CONFIG [--step N]`` reads the job's resolved trainer
config (the base model's location, the store, the job), takes the final adapter (or checkpoint
``N``'s), loads it onto the base model in the base's own dtype, folds the LoRA weights in
(PEFT's ``merge_and_unload``) and uploads the result to the store's merged folder of that model:
safetensors weights, ``config.json``, the generation config, the tokenizer with the chat
template the job trained with, and ``manifest.json`` last, listing every file's sha256. The
manifest is the commit marker: a merge cut short leaves none, and the next request merges
again. A merge already published is not redone.

Exit status: 0 published (or already there), 65 (:data:`~kubetune_trainer.exit_codes.USER_ERROR`)
when the model's weights are gone, 70 on anything else; a failure also leaves its reason in the
store (``StorageLayout.merge_failure_key``) for the job driver to pass on.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from kubetune.storage_layout import ADAPTER_FILES, MANIFEST_NAME
from kubetune.trainer_config import TrainerConfig
from kubetune_runtime.objectstore import ObjectNotFound, ObjectStore, open_object_store
from kubetune_trainer import exit_codes
from kubetune_trainer.checkpoints import file_digests
from kubetune_trainer.dist import Topology
from kubetune_trainer.errors import UserError
from kubetune_trainer.manifest import MANIFEST_VERSION, versions

log = logging.getLogger(__name__)

# What a published adapter keeps beside its weights for the tokenizer (a checkpoint may not).
TOKENIZER_FILES: Final = ("tokenizer_config.json", "tokenizer.json", "chat_template.jinja")


def merge_into_base(base: Path, adapter: Path, out: Path) -> None:
    """Write the base model at ``base`` with the LoRA adapter at ``adapter`` folded in, and
    its tokenizer (the adapter's copy when it has one: the template the job trained with), as
    a Hugging Face model folder ``out``.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    has_tokenizer = (adapter / "tokenizer_config.json").is_file()
    AutoTokenizer.from_pretrained(adapter if has_tokenizer else base).save_pretrained(out)


def _fetch_adapter(store: ObjectStore, prefix: str, dest: Path) -> Path:
    """The adapter's weights and config, and its tokenizer files where it has them."""
    present = {info.key[len(prefix) :] for info in store.list(prefix)}
    missing = [name for name in ADAPTER_FILES if name not in present]
    if MANIFEST_NAME not in present or missing:
        raise UserError(
            f"The adapter at {prefix} is no longer stored (its job or checkpoint was deleted)",
            code="model_not_available",
            param="model",
        )
    wanted = [*ADAPTER_FILES, *(n for n in TOKENIZER_FILES if n in present)]
    store.download_prefix(prefix, dest, only=wanted)
    return dest


def merged_manifest(source: dict[str, Any], files: dict[str, str], model: str) -> dict[str, Any]:
    """The merged model's manifest: what it was made from, and every file's sha256."""
    return {
        "manifest_version": MANIFEST_VERSION,
        "kind": "merged",
        "created_at": int(time.time()),
        "model": model,
        "files": files,
        "versions": versions(),
        "source": {"kind": source.get("kind"), "run": source.get("run")},
    }


def merge(config: TrainerConfig, step: int | None, workdir: Path) -> str:
    """Merge and publish the model of ``config``'s job (``step``: that checkpoint's); returns
    the merged folder's prefix in the store.
    """
    from kubetune_trainer.model import fetch_base_model

    store = open_object_store(config.object_store)
    layout = config.object_store.layout()
    org, job_id = config.org, config.job_id
    out_prefix = layout.merged_prefix(org, job_id, step)
    if store.exists(layout.merged_manifest_key(org, job_id, step)):
        log.info("%s is merged already", out_prefix)
        return out_prefix
    store.delete(layout.merge_failure_key(org, job_id, step))  # an earlier try's
    source_prefix = layout.model_prefix(org, job_id, step)
    adapter = _fetch_adapter(store, source_prefix, workdir / "adapter")
    source = json.loads(store.get_bytes(layout.model_manifest_key(org, job_id, step)))
    base = fetch_base_model(config, store, Topology(), workdir)
    out = workdir / "merged"
    log.info("merging %s into %s", source_prefix, config.base_model.name)
    merge_into_base(base, adapter, out)
    model = config.fine_tuned_model + ("" if step is None else f":ckpt-step-{step}")
    manifest = merged_manifest(source, file_digests(out), model)
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    store.upload_dir(out, out_prefix, last=MANIFEST_NAME)
    log.info("published %s", out_prefix)
    return out_prefix


def main(argv: Sequence[str] | None = None) -> int:
    """Merge one model; returns the exit status (see the module docstring)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = argparse.ArgumentParser(prog="kubetune_trainer.merge", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="The job's trainer config.")
    parser.add_argument("--step", type=int, help="A checkpoint's step (default: the final model).")
    args = parser.parse_args(argv)
    config = TrainerConfig.model_validate_json(args.config.read_text())
    workdir = Path(tempfile.mkdtemp(prefix="kubetune-merge-"))
    try:
        merge(config, args.step, workdir)
    except (UserError, ObjectNotFound) as exc:
        log.error("cannot merge: %s", exc)
        record_failure(config, args.step, str(exc))
        return exit_codes.USER_ERROR
    except Exception as exc:
        log.exception("the merge failed")
        record_failure(config, args.step, f"{type(exc).__name__}: {exc}")
        return exit_codes.INTERNAL_ERROR
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return exit_codes.SUCCESS


def record_failure(config: TrainerConfig, step: int | None, reason: str) -> None:
    """Leave why the merge failed in the store, for the job driver to tell the API (a pod's
    log is not something the operator reads); best effort: the store may be what failed.
    """
    layout = config.object_store.layout()
    key = layout.merge_failure_key(config.org, config.job_id, step)
    try:
        open_object_store(config.object_store).put_json(key, {"message": reason[-2000:]})
    except Exception:
        log.exception("could not record the merge's failure at %s", key)


if __name__ == "__main__":
    sys.exit(main())
