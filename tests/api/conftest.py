"""A live API per backend: local (SQLite + local folder) and Kubernetes (real apiserver + S3).

The ``api`` fixture is parametrized, so every test using it runs against both backends.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.settings import Settings
from tests.harness.api import ApiServer, backend_env, start_api

SHARED_CLAIM = "shared-models"  # the volume claim the Kubernetes API lets models name
TOKENIZER_WORDS = [
    "the",
    "a",
    "an",
    "is",
    "are",
    "was",
    "be",
    "to",
    "of",
    "and",
    "in",
    "that",
    "have",
    "it",
    "for",
    "not",
    "on",
    "with",
    "he",
    "as",
    "you",
    "do",
    "at",
    "this",
    "but",
    "his",
    "by",
    "from",
    "they",
    "we",
    "say",
    "her",
    "she",
    "or",
    "will",
    "my",
    "one",
    "all",
    "would",
    "there",
    "their",
    "what",
    "so",
    "up",
    "out",
    "if",
    "about",
    "who",
    "get",
    "which",
    "go",
    "me",
    "when",
    "make",
    "can",
    "like",
    "time",
    "no",
    "just",
    "him",
    "know",
    "take",
    "people",
    "into",
    "year",
    "your",
    "good",
    "some",
    "could",
    "them",
    "see",
    "other",
    "than",
    "then",
    "now",
    "look",
    "only",
    "come",
    "its",
    "over",
    "think",
    "also",
    "back",
    "after",
    "use",
    "two",
    "how",
    "our",
    "work",
    "first",
    "well",
    "way",
    "even",
    "new",
    "want",
    "because",
    "any",
    "these",
    "give",
    "day",
    "most",
    "us",
    "system",
    "user",
    "assistant",
    "hello",
    "world",
    "answer",
    "question",
    "capital",
    "france",
    "paris",
]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer trained here (no downloads), saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>"])
    tokenizer.train_from_iterator([" ".join(TOKENIZER_WORDS)] * 3, trainer)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="session")
def local_api(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Path
) -> Iterator[ApiServer]:
    """The API in local mode."""
    data = tmp_path_factory.mktemp("api-local")
    env = backend_env("local", tokenizer=tiny_tokenizer)
    server = start_api(data, env, "local")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kube_api_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Path, kube: Any, s3: Any
) -> Iterator[ApiServer]:
    """The API in Kubernetes mode against the real apiserver and S3 endpoint."""
    from kubernetes import client

    namespace = "kubetune-api"
    core: Any = client.CoreV1Api(kube.api_client())
    core.create_namespace({"metadata": {"name": namespace}})
    data = tmp_path_factory.mktemp("api-kube")
    env = backend_env(
        "kubernetes",
        tokenizer=tiny_tokenizer,
        s3_env=s3.env(),
        kubeconfig=kube.kubeconfig,
        namespace=namespace,
    )
    # Base models may be registered from this machine's temporary folders (the tests'), and
    # name one volume claim.
    env["KUBETUNE_MODEL_REGISTRY__ALLOWED_PATHS"] = json.dumps([tempfile.gettempdir()])
    env["KUBETUNE_MODEL_REGISTRY__ALLOWED_VOLUME_CLAIMS"] = json.dumps([SHARED_CLAIM])
    server = start_api(data, env, "kubernetes")
    yield server
    server.stop()


@pytest.fixture(params=["local", pytest.param("kubernetes", marks=pytest.mark.cluster)])
def api(request: pytest.FixtureRequest) -> Iterator[ApiServer]:
    """The live API, once per backend. Every response the test's SDK clients receive must
    match OpenAI's schema (or the error envelope)."""
    name = "local_api" if request.param == "local" else "kube_api_server"
    server: ApiServer = request.getfixturevalue(name)
    server.schema_violations.clear()
    checked = server.responses_checked
    yield server
    assert server.schema_violations == []
    assert server.responses_checked > checked, "the test's responses were not checked"


def settings_of(server: ApiServer) -> Settings:
    """The settings the server runs with, for tests that inspect its store or backend."""
    import os

    saved = dict(os.environ)
    try:
        os.environ.update(server.env)
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def store_of(server: ApiServer) -> Any:
    """The object store the server writes to."""
    import os

    from kubetune_runtime.objectstore import open_object_store

    # boto3 reads credentials from the environment when it first signs a request; the test
    # process uses the same throwaway credentials as the server.
    os.environ.update({k: v for k, v in server.env.items() if k.startswith("AWS_")})
    settings = settings_of(server)
    return open_object_store(settings.object_store, root=settings.store_root())


def backend_of(server: ApiServer) -> Any:
    """The job backend the server uses: tests play the operator through it."""
    settings = settings_of(server)
    if server.backend == "local":
        from kubetune_api.backends.local import LocalJobBackend

        return LocalJobBackend(settings.data_dir / "jobs.sqlite3")
    from kubernetes import config

    from kubetune_api.backends.kubernetes import KubernetesJobBackend

    api_client = config.new_client_from_config(config_file=str(settings.kubernetes.kubeconfig))
    # No watch thread: a test's backend reads the apiserver directly and leaves nothing running.
    return KubernetesJobBackend(api_client, settings.kubernetes.namespace, use_cache=False)


def chat_line(i: int, answer: str | None = None) -> dict[str, Any]:
    """One valid chat example."""
    return {
        "messages": [
            {"role": "system", "content": "you are a good assistant"},
            {"role": "user", "content": f"what is the capital of france {i}"},
            {"role": "assistant", "content": answer or f"the capital is paris {i}"},
        ]
    }


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    """Rows as JSONL bytes."""
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def chat_file(n: int = 12) -> bytes:
    """A valid chat training file of ``n`` examples."""
    return jsonl([chat_line(i) for i in range(n)])


def dpo_file(n: int = 12) -> bytes:
    """A valid preference (DPO) file."""
    return jsonl(
        [
            {
                "input": {"messages": [{"role": "user", "content": f"hello {i}"}]},
                "preferred_output": [{"role": "assistant", "content": "hello world"}],
                "non_preferred_output": [{"role": "assistant", "content": "go away"}],
            }
            for i in range(n)
        ]
    )
