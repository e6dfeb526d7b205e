"""A model folder is checked before it becomes a base model: what it is, or why it cannot be."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kubetune_trainer.inspect_model import ModelReport, UnusableModel, inspect_folder

pytestmark = pytest.mark.trainer


def test_a_usable_folder_reports_what_the_catalogue_needs(tiny_model: Path) -> None:
    assert inspect_folder(tiny_model) == ModelReport(
        architecture="LlamaForCausalLM", model_type="llama", context_length=256, hidden_size=64
    )


def _edit_json(path: Path, change: Callable[[dict[str, object]], object]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _no_config(folder: Path) -> None:
    (folder / "config.json").unlink()


def _not_causal(folder: Path) -> None:
    _edit_json(
        folder / "config.json",
        lambda c: c.update(architectures=["LlamaForSequenceClassification"]),
    )


def _bad_config(folder: Path) -> None:
    _edit_json(folder / "config.json", lambda c: c.update(max_position_embeddings="long"))


def _no_weights(folder: Path) -> None:
    for weights in folder.glob("*.safetensors"):
        weights.unlink()


def _no_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)


def _no_chat_template(folder: Path) -> None:
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    _edit_json(folder / "tokenizer_config.json", lambda c: c.pop("chat_template", None))


def _broken_chat_template(folder: Path) -> None:
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    _edit_json(
        folder / "tokenizer_config.json",
        lambda c: c.update(chat_template="{{ raise_exception('no user turns, please') }}"),
    )


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_no_config, "has no config.json"),
        (_not_causal, "not a causal language model"),
        (_bad_config, "config.json does not load: .*max_position_embeddings"),
        (_no_weights, "holds no weights"),
        (_no_tokenizer, "tokenizer in"),
        (_no_chat_template, "has no chat template"),
        (_broken_chat_template, "does not render: no user turns, please"),
    ],
)
def test_an_unusable_folder_says_why(
    tiny_model: Path, tmp_path: Path, damage: Callable[[Path], None], reason: str
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    inspect_folder(folder)  # usable before the damage
    damage(folder)
    with pytest.raises(UnusableModel, match=reason):
        inspect_folder(folder)


def test_the_command_prints_json_either_way(tiny_model: Path, tmp_path: Path) -> None:
    def run(folder: Path) -> tuple[int, dict[str, object]]:
        done = subprocess.run(
            [sys.executable, "-m", "kubetune_trainer.inspect_model", str(folder)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return done.returncode, json.loads(done.stdout)

    assert run(tiny_model) == (0, {
        "architecture": "LlamaForCausalLM", "model_type": "llama", "context_length": 256,
        "hidden_size": 64,
    })  # fmt: skip
    code, said = run(tmp_path / "nowhere")
    assert code == 2
    assert "is not a folder" in str(said["error"])


def test_a_store_folder_is_downloaded_then_checked_and_the_answer_left_in_the_store(
    tiny_model: Path, tmp_path: Path
) -> None:
    from kubetune.settings import ObjectStoreBackend, ObjectStoreSettings
    from kubetune_runtime.objectstore import open_object_store
    from kubetune_trainer.inspect_model import main

    settings = ObjectStoreSettings(backend=ObjectStoreBackend.LOCAL, local_root=tmp_path / "s")
    store = open_object_store(settings)
    store.upload_dir(tiny_model, "models/tiny/")
    args = ["--object-store", settings.model_dump_json(), "--report-key"]

    assert main(["store:models/tiny", *args, "answers/ok.json"]) == 0
    assert store.get_json("answers/ok.json")["architecture"] == "LlamaForCausalLM"
    assert main(["store:models/absent", *args, "answers/no.json"]) == 2
    assert store.get_json("answers/no.json") == {
        "error": "nothing is stored under store:models/absent"
    }
