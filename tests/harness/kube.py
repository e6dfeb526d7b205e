"""A real kube-apiserver + etcd on loopback, in the way controller-runtime's envtest runs them.

No kubelet, scheduler or controller-manager: objects are stored, validated, defaulted, watched
and authorized exactly as on a cluster, but nothing runs pods. Tests that need the
training-operator's behaviour play it themselves.

The kube-apiserver binary is built once from Debian's source package by
``hack/build-kube-apiserver.sh`` and cached under ``~/.cache/kubetune/bin``; etcd comes from
Debian's ``etcd-server`` package.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import secrets
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from filelock import FileLock

from tests.harness.crds import for_old_apiserver, is_upstream
from tests.harness.paths import CACHE_BIN, CACHE_DIR, REFERENCE_DIR, REPO_ROOT, free_port
from tests.harness.procs import ServerProcess

APISERVER = CACHE_BIN / "kube-apiserver"
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-kube-apiserver.sh"
CRD_FILES = (
    REPO_ROOT / "crds" / "finetunejobs.kubetune.io.yaml",
    REPO_ROOT / "crds" / "basemodels.kubetune.io.yaml",
    REFERENCE_DIR / "kubeflow.org_pytorchjobs.yaml",
)
ADMIN_USER = "kubetune-admin"


def ensure_apiserver() -> Path:
    """Return the cached kube-apiserver, building it from Debian's sources when missing."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with FileLock(str(CACHE_DIR / "apiserver.lock")):
        if not APISERVER.exists():
            subprocess.run(["bash", str(BUILD_SCRIPT)], check=True)
    return APISERVER


def ensure_etcd() -> Path:
    """Return Debian's etcd, installing the package when it is missing (CI runs as root)."""
    found = shutil.which("etcd")
    if found:
        return Path(found)
    with FileLock(str(CACHE_DIR / "apt.lock")):
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "etcd-server"],
            check=True,
            env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
    found = shutil.which("etcd")
    if not found:
        raise RuntimeError("etcd is not on PATH after installing etcd-server")
    return Path(found)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _write_pki(directory: Path) -> dict[str, Path]:
    """A CA, a serving certificate for 127.0.0.1/localhost, and the service-account key pair."""
    now = dt.datetime.now(dt.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubetune-test-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.DNSName("kubernetes.default.svc"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    files = {
        "ca.crt": ca_cert.public_bytes(serialization.Encoding.PEM),
        "server.crt": server_cert.public_bytes(serialization.Encoding.PEM),
        "server.key": _pem_key(server_key),
        "sa.key": _pem_key(sa_key),
        "sa.pub": sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }
    paths = {}
    for name, data in files.items():
        path = directory / name
        path.write_bytes(data)
        path.chmod(0o600)
        paths[name] = path
    return paths


@dataclass
class KubeCluster:
    """A running apiserver: its URL, an admin token, and a kubeconfig file for clients."""

    server: str
    token: str
    ca_file: Path
    kubeconfig: Path
    workdir: Path
    _procs: list[ServerProcess]
    _installed: set[Path] = field(default_factory=set)
    _crd_lock: threading.Lock = field(default_factory=threading.Lock)
    apiserver_restarts: int = 0

    def env(self) -> dict[str, str]:
        """Environment for subprocesses (kubectl, helm, the operator) to reach this cluster."""
        return {"KUBECONFIG": str(self.kubeconfig)}

    def api_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` authenticated as the admin user."""
        from kubernetes import config

        # The client's config helpers are untyped.
        return config.new_client_from_config(config_file=str(self.kubeconfig))  # type: ignore[no-untyped-call]

    def get(self, path: str) -> int:
        """GET a raw path with the admin token and return the HTTP status."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        req = urllib.request.Request(  # noqa: S310 - https to our own loopback server
            self.server + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:  # noqa: S310
            return int(resp.status)

    def apply_crds(self, files: tuple[Path, ...] = CRD_FILES, timeout: float = 60) -> None:
        """Create (or replace) CRDs and wait until the apiserver serves them."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        api: Any = client.ApiextensionsV1Api(self.api_client())
        names = []
        for path in files:
            for doc in yaml.safe_load_all(path.read_text()):
                if not doc:
                    continue
                if is_upstream(path):
                    doc = for_old_apiserver(doc)
                names.append(doc["metadata"]["name"])
                try:
                    api.create_custom_resource_definition(doc)
                except ApiException as exc:
                    if exc.status != 409:
                        raise
                    current = api.read_custom_resource_definition(doc["metadata"]["name"])
                    doc["metadata"]["resourceVersion"] = current.metadata.resource_version
                    api.replace_custom_resource_definition(doc["metadata"]["name"], doc)
        deadline = time.monotonic() + timeout
        for name in names:
            while True:
                crd = api.read_custom_resource_definition(name)
                conditions = {c.type: c.status for c in (crd.status.conditions or [])}
                if conditions.get("Established") == "True":
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"CRD {name} not established: {conditions}")
                time.sleep(0.1)

    def ensure_crds(self, files: tuple[Path, ...]) -> None:
        """Install CRDs once per cluster (tests that need them ask; the first one installs)."""
        with self._crd_lock:
            missing = tuple(f for f in files if f not in self._installed)
            if missing:
                self.apply_crds(missing)
                self._installed.update(missing)

    def create_cluster_object(self, body: dict[str, Any]) -> None:
        """Create (or replace) a cluster-scoped custom object."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        custom: Any = client.CustomObjectsApi(self.api_client())
        group, version = body["apiVersion"].split("/")
        plural = body["kind"].lower() + "s"
        name = body["metadata"]["name"]
        try:
            custom.create_cluster_custom_object(group, version, plural, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            current = custom.get_cluster_custom_object(group, version, plural, name)
            body = {
                **body,
                "metadata": {
                    **body["metadata"],
                    "resourceVersion": current["metadata"]["resourceVersion"],
                },
            }
            custom.replace_cluster_custom_object(group, version, plural, name, body)

    def restart_apiserver(self, down_seconds: float = 0, timeout: float = 90) -> None:
        """Kill the apiserver (SIGKILL), keep it down ``down_seconds``, start it again on the
        same port and etcd, and wait until it is ready: what clients see of a control-plane
        upgrade or crash.
        """
        old = self._procs[-1]
        old.proc.kill()
        old.proc.wait()
        time.sleep(down_seconds)
        self.apiserver_restarts += 1
        log = self.workdir / f"kube-apiserver.{self.apiserver_restarts}.log"
        new = ServerProcess(old.name, old.argv, log)
        self._procs[-1] = new
        new.wait_until(lambda: self.get("/readyz") == 200, timeout=timeout, what="ready")

    def stop(self) -> None:
        """Stop the apiserver, then etcd, and remove their state."""
        for proc in reversed(self._procs):
            proc.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _write_kubeconfig(path: Path, server: str, ca_file: Path, token: str) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kubetune-test",
                "cluster": {"server": server, "certificate-authority": str(ca_file)},
            }
        ],
        "users": [{"name": ADMIN_USER, "user": {"token": token}}],
        "contexts": [
            {"name": "kubetune-test", "context": {"cluster": "kubetune-test", "user": ADMIN_USER}}
        ],
        "current-context": "kubetune-test",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)


def start_cluster(timeout: float = 90) -> KubeCluster:
    """Start etcd and kube-apiserver on free loopback ports; install our CRDs."""
    apiserver = ensure_apiserver()
    etcd = ensure_etcd()
    # etcd's data is disposable: keep it in memory when /dev/shm exists (fsync dominates on disk).
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    workdir = Path(tempfile.mkdtemp(prefix="kubetune-kube-", dir=base))
    procs: list[ServerProcess] = []
    try:
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        etcd_proc = ServerProcess(
            "etcd",
            [
                str(etcd),
                "--name",
                "default",
                "--data-dir",
                str(workdir / "etcd"),
                "--listen-client-urls",
                etcd_url,
                "--advertise-client-urls",
                etcd_url,
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-cluster",
                f"default=http://127.0.0.1:{peer_port}",
                "--log-level",
                "warn",
            ],
            workdir / "etcd.log",
        )
        procs.append(etcd_proc)
        etcd_proc.wait_until(
            lambda: urllib.request.urlopen(f"{etcd_url}/health", timeout=2).status == 200,  # noqa: S310
            timeout=30,
            what="healthy",
        )

        pki = _write_pki(workdir)
        token = secrets.token_urlsafe(32)
        tokens = workdir / "tokens.csv"
        tokens.write_text(f'{token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
        tokens.chmod(0o600)
        api_proc = ServerProcess(
            "kube-apiserver",
            [
                str(apiserver),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                "--insecure-port=0",
                f"--tls-cert-file={pki['server.crt']}",
                f"--tls-private-key-file={pki['server.key']}",
                f"--client-ca-file={pki['ca.crt']}",
                f"--token-auth-file={tokens}",
                "--authorization-mode=RBAC",
                f"--service-account-key-file={pki['sa.pub']}",
                f"--service-account-signing-key-file={pki['sa.key']}",
                "--service-account-issuer=https://kubernetes.default.svc",
                "--service-cluster-ip-range=10.0.0.0/24",
                # No controller-manager runs: nothing would create the default ServiceAccount
                # that this admission plugin waits for, nor reconcile the kubernetes endpoints.
                "--disable-admission-plugins=ServiceAccount",
                "--endpoint-reconciler-type=none",
                "--enable-priority-and-fairness=false",
                f"--cert-dir={workdir / 'certs'}",
                "--v=0",
            ],
            workdir / "kube-apiserver.log",
        )
        procs.append(api_proc)
        server = f"https://127.0.0.1:{api_port}"
        kubeconfig = workdir / "kubeconfig"
        _write_kubeconfig(kubeconfig, server, pki["ca.crt"], token)
        cluster = KubeCluster(server, token, pki["ca.crt"], kubeconfig, workdir, procs)
        api_proc.wait_until(lambda: cluster.get("/readyz") == 200, timeout=timeout, what="ready")
        cluster.apply_crds()
    except BaseException:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return cluster


@contextlib.contextmanager
def running_cluster() -> Any:
    """Context manager form of :func:`start_cluster`."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
