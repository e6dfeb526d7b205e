from pathlib import Path

from kubetune.settings import Mode, ObjectStoreBackend, Settings


def test_defaults_are_local_mode(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("KUBETUNE_"):
            monkeypatch.delenv(name)
    settings = Settings()
    assert settings.mode is Mode.LOCAL
    assert settings.object_store.backend is ObjectStoreBackend.LOCAL
    assert settings.store_root() == settings.data_dir / "store"


def test_environment_with_prefix_and_nested_groups(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBETUNE_MODE", "kubernetes")
    monkeypatch.setenv("KUBETUNE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("KUBETUNE_OBJECT_STORE__BACKEND", "s3")
    monkeypatch.setenv("KUBETUNE_OBJECT_STORE__BUCKET", "models")
    monkeypatch.setenv("KUBETUNE_OBJECT_STORE__PREFIX", "prod")
    monkeypatch.setenv("KUBETUNE_KUBERNETES__NAMESPACE", "ml")
    monkeypatch.setenv("KUBETUNE_LIMITS__MAX_FILE_BYTES", "1024")
    settings = Settings()
    assert settings.mode is Mode.KUBERNETES
    assert settings.data_dir == Path(tmp_path)
    assert settings.object_store.backend is ObjectStoreBackend.S3
    assert settings.object_store.bucket == "models"
    assert settings.object_store.layout().org_prefix("acme") == "prod/orgs/acme/"
    assert settings.kubernetes.namespace == "ml"
    assert settings.limits.max_file_bytes == 1024
