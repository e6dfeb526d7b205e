"""Downloading base weights into a shared cache: once, atomically, whoever finishes first."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_runtime.objectstore import LocalObjectStore
from kubetune_trainer.model import _download_folder, _download_once


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    store = LocalObjectStore(tmp_path / "store")
    store.put_bytes("models/tiny/config.json", b"{}")
    store.put_bytes("models/tiny/model.safetensors", b"weights")
    return store


def test_the_cache_folder_is_per_store_location(tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    a = _download_folder("models/tiny", cache, tmp_path / "work")
    b = _download_folder("other/tiny", cache, tmp_path / "work")
    assert a.parent == b.parent == tmp_path / "cache"
    assert a != b
    assert a.name.startswith("tiny-")
    assert _download_folder("models/tiny", None, tmp_path / "work") == tmp_path / "work/base-model"


def test_weights_are_downloaded_once_and_never_left_half_written(
    store: LocalObjectStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _download_folder("models/tiny", str(tmp_path / "cache"), tmp_path)
    caplog.set_level("INFO")
    _download_once(store, "models/tiny", folder, "tiny")
    assert (folder / "model.safetensors").read_bytes() == b"weights"
    _download_once(store, "models/tiny", folder, "tiny")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("downloading" in m for m in messages) == 1
    assert sum("not downloaded again" in m for m in messages) == 1
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


def test_a_download_that_fails_leaves_nothing_behind(
    store: LocalObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _download_folder("models/tiny", str(tmp_path / "cache"), tmp_path)

    def cut_short(prefix: str, dest: Path, **_: object) -> None:
        dest.mkdir(parents=True)
        (dest / "config.json").write_text("{}")
        raise ConnectionError("preempted mid-download")

    monkeypatch.setattr(store, "download_prefix", cut_short)
    with pytest.raises(ConnectionError):
        _download_once(store, "models/tiny", folder, "tiny")
    assert list(folder.parent.iterdir()) == []


def test_a_copy_another_node_finished_first_is_kept(
    store: LocalObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _download_folder("models/tiny", str(tmp_path / "cache"), tmp_path)
    download = store.download_prefix

    def raced(prefix: str, dest: Path, **kwargs: object) -> None:
        download(prefix, dest)
        download(prefix, folder)  # the other node renamed its copy into place meanwhile
        (folder / "winner").write_text("other node")

    monkeypatch.setattr(store, "download_prefix", raced)
    _download_once(store, "models/tiny", folder, "tiny")
    assert (folder / "winner").read_text() == "other node"
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]
