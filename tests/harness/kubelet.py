"""Pods as local processes: what the training-controller stand-ins use in place of a kubelet.

The test apiserver runs no kubelet. The stand-ins of Kubeflow's controllers
(``tests.harness.training_operator`` for PyTorchJobs, ``tests.harness.trainer_v2`` for
TrainJobs) decide which pods should run; :class:`Kubelet` runs each pod's trainer container as a
local process, as the kubelet would run the container:

- volumes: ``configMap`` volumes are the ConfigMap's data written to a folder when the pod
  starts, ``emptyDir`` volumes a fresh folder per pod, a ``persistentVolumeClaim`` (which must
  exist) one folder per claim that every pod shares across restarts (ReadWriteMany; read-only
  is not enforced); paths in the container's ``command``, ``args`` and ``env`` under a mount
  point are rewritten to that folder (and a claim's mount path in ConfigMap data, as every pod
  shares this host's filesystem), and a mount at ``/tmp`` becomes the process' ``TMPDIR``;
- environment: this host's ``PATH``/``LANG``, the node's (``node_env``), ``envFrom``
  Secrets/ConfigMaps (read from the apiserver), the container's ``env`` values, then what the
  controller injects (which wins);
- the image's entrypoint is ``entrypoint`` (a host command) unless the container has a
  ``command``; a command's ``python`` is this venv's interpreter;
- stopping a pod is the kubelet's: SIGTERM to the main process, as to a container's PID 1, then
  SIGKILL to its process group once the grace period (capped at ``grace_cap``) is over.

Each pod is its own process group (``start_new_session``), as a container is its own cgroup.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from base64 import b64decode
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final, Generic, Self, TypeVar

# The trainer image's entrypoint, as a host command: this venv's Python.
TRAINER_ENTRYPOINT: Final = (sys.executable, "-m", "kubetune_trainer.launch")
# The part of this host's environment a container would also have.
HOST_ENV: Final = ("PATH", "LANG", "LC_ALL")


def exit_code(returncode: int) -> int:
    """The container exit code of a process: a signal N is reported as 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class Pod:
    """One pod (a replica, a node of a job) across its restarts: the current process, if any."""

    name: str
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    exit_codes: list[int] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    stop_deadline: float | None = None

    def alive(self) -> bool:
        """Whether its process runs."""
        return self.proc is not None and self.proc.poll() is None

    def reap(self) -> int | None:
        """The exit code of a process that ended since the last call (recorded), else None."""
        if self.proc is None or self.proc.poll() is None:
            return None
        code = exit_code(self.proc.returncode)
        self.exit_codes.append(code)
        self.proc = None
        return code

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the main process, as the kubelet does to a container's PID 1; a
        SIGKILL kills the whole container (every process in it dies with PID 1).
        """
        if sig == signal.SIGKILL:
            self.kill()
            return
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole process group and wait for it."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)

    def stop(self, grace: float, now: float) -> None:
        """The kubelet deleting the pod: SIGTERM now, SIGKILL once the grace period is over
        (call it again until the pod is gone).
        """
        if not self.alive():
            self.stop_deadline = None
            return
        if self.stop_deadline is None:
            self.stop_deadline = now + grace
            self.signal(signal.SIGTERM)
        elif now >= self.stop_deadline:
            self.kill()


class Kubelet:
    """Starts pods of one namespace as local processes (see the module docstring)."""

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        *,
        entrypoint: Sequence[str],
        node_env: Mapping[str, str] | None = None,
        grace_cap: float = 60.0,
        claims_dir: Path | None = None,
    ) -> None:
        from kubernetes import client

        self.namespace = namespace
        # A PersistentVolumeClaim is one folder every pod mounting it shares (a ReadWriteMany
        # volume), kept across pods and restarts.
        self.claims_dir = claims_dir
        self.entrypoint = list(entrypoint)
        self.node_env = dict(node_env or {})
        self.grace_cap = grace_cap
        self._core: Any = client.CoreV1Api(api_client)

    def grace(self, pod_spec: Mapping[str, Any]) -> float:
        """The pod's termination grace period, capped."""
        return min(float(pod_spec.get("terminationGracePeriodSeconds", 30)), self.grace_cap)

    def start(
        self,
        pod: Pod,
        pod_spec: Mapping[str, Any],
        container_name: str,
        *,
        injected: Mapping[str, str],
        root: Path,
        log_path: Path,
    ) -> None:
        """Start ``pod``'s container ``container_name`` with the controller's ``injected``
        environment. Raises when a volume or an ``envFrom`` source is not there yet (a real pod
        would wait for it too).
        """
        container = next(c for c in pod_spec["containers"] if c["name"] == container_name)
        root.mkdir(parents=True, exist_ok=True)
        mounts = self._mounts(pod_spec, container, root)
        env = {k: os.environ[k] for k in HOST_ENV if k in os.environ}
        env.update(self.node_env)
        env.update(self._env_from(container))
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = self._translate(str(var["value"]), mounts)
        env.update(injected)
        if "/tmp" in mounts:  # the container's /tmp, not ours
            env["TMPDIR"] = str(mounts["/tmp"])
        # The image's entrypoint is a host command (this venv's python), not a container path:
        # only what the container spec says is translated to the volumes mounted here.
        command = [self._translate(c, mounts) for c in container.get("command") or []]
        if command[:1] == ["python"]:  # the image's interpreter: this venv's, untranslated
            command[0] = sys.executable  # (a venv under /tmp is not the pod's /tmp volume)
        argv = [
            *(command or self.entrypoint),
            *(self._translate(a, mounts) for a in container.get("args") or []),
        ]
        cwd = Path(self._translate(container.get("workingDir") or "", mounts) or root)
        with log_path.open("wb") as log:
            pod.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, as a container's cgroup
            )
        pod.starts += 1
        pod.logs.append(log_path)
        pod.stop_deadline = None

    def _mounts(
        self, pod_spec: Mapping[str, Any], container: Mapping[str, Any], root: Path
    ) -> dict[str, Path]:
        """Prepare the volumes of one pod; mount path → local folder."""
        volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
        mounts: dict[str, Path] = {}
        claims: dict[str, Path] = {}
        config_maps: list[tuple[Path, dict[str, str]]] = []
        for mount in container.get("volumeMounts") or []:
            volume = volumes[mount["name"]]
            folder = root / "volumes" / mount["name"]
            path = mount["mountPath"].rstrip("/") or "/"
            if "persistentVolumeClaim" in volume:
                folder = claims[path] = self._claim(volume["persistentVolumeClaim"]["claimName"])
            folder.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                cm = self._core.read_namespaced_config_map(
                    volume["configMap"]["name"], self.namespace
                )
                config_maps.append((folder, dict(cm.data or {})))
            elif "emptyDir" not in volume and "persistentVolumeClaim" not in volume:
                raise NotImplementedError(
                    f"volume {mount['name']}: only configMap, emptyDir and persistentVolumeClaim"
                )
            mounts[path] = folder
        for folder, data in config_maps:
            for key, value in data.items():
                # One host holds every pod: a claim's mount path named in a config file (the
                # trainer config's model cache) is the claim's folder here.
                for path, claim in claims.items():
                    value = value.replace(f'"{path}', f'"{claim}')
                (folder / key).write_text(value)
        return mounts

    def _claim(self, name: str) -> Path:
        """The folder of a claim, which must exist (a kubelet would not start the pod)."""
        if self.claims_dir is None:
            raise NotImplementedError("this kubelet has no folder for volume claims")
        self._core.read_namespaced_persistent_volume_claim(name, self.namespace)
        return self.claims_dir / name

    @staticmethod
    def _translate(value: str, mounts: Mapping[str, Path]) -> str:
        for path in sorted(mounts, key=len, reverse=True):
            if value == path or value.startswith(path + "/"):
                return str(mounts[path]) + value[len(path) :]
        return value

    def _env_from(self, container: Mapping[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            if "secretRef" in source:
                secret = self._core.read_namespaced_secret(
                    source["secretRef"]["name"], self.namespace
                )
                env.update({k: b64decode(v).decode() for k, v in (secret.data or {}).items()})
            elif "configMapRef" in source:
                cm = self._core.read_namespaced_config_map(
                    source["configMapRef"]["name"], self.namespace
                )
                env.update(cm.data or {})
        return env


R = TypeVar("R")


class ControllerStandIn(ABC, Generic[R]):
    """What the stand-ins of Kubeflow's controllers share: a loop that polls one kind of object
    in a namespace and reconciles each (a run per object, by uid), a :class:`Kubelet` for their
    pods, the uids seen per name, the errors met (a test reads them), and a stop that leaves no
    process behind.
    """

    group: ClassVar[str]
    version: ClassVar[str]
    plural: ClassVar[str]

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        workdir: Path,
        *,
        entrypoint: Sequence[str] = TRAINER_ENTRYPOINT,
        node_env: Mapping[str, str] | None = None,
        grace_cap: float = 60.0,
        poll: float = 0.2,
    ) -> None:
        from kubernetes import client

        self.namespace = namespace
        self.workdir = workdir
        self.poll = poll
        self.kubelet = Kubelet(
            api_client,
            namespace,
            entrypoint=entrypoint,
            node_env=node_env,
            grace_cap=grace_cap,
            claims_dir=workdir / "claims",
        )
        self._custom: Any = client.CustomObjectsApi(api_client)
        self._runs: dict[str, R] = {}
        self._created: dict[str, list[str]] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=self.plural, daemon=True)
        self.errors: list[str] = []

    # -- what each controller does ---------------------------------------------------------------
    @abstractmethod
    def _new_run(self, obj: Mapping[str, Any]) -> R:
        """What is tracked of a newly seen object."""

    @abstractmethod
    def _sync(self, obj: dict[str, Any]) -> None:
        """Reconcile one object."""

    @abstractmethod
    def _delete(self, run: R) -> None:
        """The object is gone: its pods go too (the garbage collector's part)."""

    @abstractmethod
    def _pods_of(self, run: R) -> Iterable[Pod]:
        """The pods of one run."""

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Self:
        """Start watching."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching, then every pod still running (SIGTERM, SIGKILL after 10 s)."""
        self._stop.set()
        self._thread.join(timeout=30)
        with self._lock:
            pods = [pod for run in self._runs.values() for pod in self._pods_of(run)]
        for pod in pods:
            if pod.alive():
                pod.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for pod in pods:
            if pod.proc is None:
                continue
            try:
                pod.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pod.kill()

    def created(self, name: str) -> list[str]:
        """The uids of every object named ``name`` seen so far (one per creation)."""
        with self._lock:
            return list(self._created.get(name, []))

    # -- the loop --------------------------------------------------------------------------------
    def _run_for(self, obj: Mapping[str, Any]) -> R:
        meta = obj["metadata"]
        with self._lock:
            run = self._runs.get(meta["uid"])
            if run is None:
                run = self._runs[meta["uid"]] = self._new_run(obj)
                self._created.setdefault(meta["name"], []).append(meta["uid"])
            return run

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                items = self._custom.list_namespaced_custom_object(
                    self.group, self.version, self.namespace, self.plural
                )["items"]
                seen = set()
                for obj in items:
                    seen.add(obj["metadata"]["uid"])
                    self._sync(obj)
                with self._lock:
                    gone = [run for uid, run in self._runs.items() if uid not in seen]
                for run in gone:
                    self._delete(run)
            except Exception as exc:  # keep playing; the test sees the error list
                self.errors.append(repr(exc))
            self._stop.wait(self.poll)
