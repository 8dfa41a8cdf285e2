"""The Helm chart (``config/helm/kratos-session-bridge``) rendered by real Helm, and its pod
run the way Kubernetes would run it, without Kubernetes.

``render`` is ``helm template``. ``PodRun`` takes the rendered Deployment's one container and
does what the kubelet does before and after starting it, as far as the bridge can tell:
- each volume mount becomes a directory of its own, holding what the rendered Secret or
  ConfigMap puts there (``items`` and ``defaultMode`` obeyed; an ``emptyDir`` is empty), and
  every mount path in the command, args and env values is rewritten to that directory
  (``mounts``: pod path -> directory, explicitly, so a path the chart gets wrong points at
  nothing);
- the environment is the container's ``env`` alone (plus the image's own ``ENV`` and a PATH):
  ``value`` with the kubelet's ``$(VAR)`` expansion, ``secretKeyRef`` and ``configMapKeyRef``
  read from the rendered objects. Nothing of the test's own environment leaks in;
- the command is the container's ``command`` + ``args``; ``kratos-bridge``, the image's
  console script (pyproject.toml), runs as ``python -m bridge`` of this checkout;
- each mounted file must be readable by the pod's user as the kubelet leaves it (owner
  root, group ``fsGroup``, the volume's ``defaultMode`` or the item's ``mode``), judged
  from the pod's ``runAsUser``, ``runAsGroup``, ``fsGroup`` and ``supplementalGroups``: a
  Secret the user could not read fails here as it would in the pod. The process itself
  runs as the test's user: this machine's Python lives where another uid cannot reach it;
- the probes run as the kubelet runs them: an HTTP GET on the probe's port (a name is looked
  up among the container's ports) and path, success on 200-399, the startup probe first
  within ``periodSeconds * failureThreshold``.

Not emulated: the read-only root filesystem, the CPU limit's cgroup, and the network policy.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.harness import stop_process

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "config" / "helm" / "kratos-session-bridge"
EXAMPLES = CHART / "examples"
HELM_VERSION = "v4.3.2"
HELM_BIN = Path(
    os.environ.get("HELM_BIN")
    or Path.home() / ".cache" / "kratos-session-bridge" / f"helm-{HELM_VERSION}" / "helm"
)
# What the image (compose/bridge.Dockerfile) sets for every process it starts.
IMAGE_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
IMAGE_ENTRY_POINT = "kratos-bridge"


def helm_binary() -> Path:
    """Helm, or a skip when it is not built yet, except in CI (``CI`` set), where its absence
    is a failure: tests/run.sh builds it (tests/tools/build-helm.sh)."""
    if HELM_BIN.is_file() and os.access(HELM_BIN, os.X_OK):
        return HELM_BIN
    message = (
        f"no helm binary at {HELM_BIN} ($HELM_BIN or the default); tests/run.sh builds Helm "
        f"{HELM_VERSION} with tests/tools/build-helm.sh"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm_binary()), *args], capture_output=True, text=True, timeout=120, check=False
    )


def values_file(directory: Path, values: dict) -> Path:
    """``values`` as a file for ``-f`` (no --set quoting to get wrong)."""
    path = Path(tempfile.mkstemp(suffix=".yaml", dir=directory)[1])
    path.write_text(yaml.safe_dump(values))
    return path


def template(
    *value_files: Path, release: str = "bridge", namespace: str = "auth"
) -> subprocess.CompletedProcess[str]:
    files = [arg for path in value_files for arg in ("-f", str(path))]
    return helm("template", release, str(CHART), "--namespace", namespace, *files)


def render(*value_files: Path, release: str = "bridge", namespace: str = "auth") -> list[dict]:
    """The chart's objects for these values files, as ``helm template`` writes them."""
    done = template(*value_files, release=release, namespace=namespace)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def the(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, rendered {len(found)}"
    return found[0]


class PodFailed(AssertionError):
    """The pod would not have become ready; the message says which probe and shows the log."""


@dataclass
class PodRun:
    """The rendered Deployment's container, started as the kubelet would start it."""

    objects: list[dict]
    workdir: Path
    mounts: dict[str, Path] = field(default_factory=dict)  # pod path -> directory here
    env: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        deployment = the(self.objects, "Deployment")
        self.pod = deployment["spec"]["template"]["spec"]
        (self.container,) = self.pod["containers"]
        self.root = Path(tempfile.mkdtemp(prefix="pod-", dir=self.workdir))
        self.log_path = self.root / "container.log"
        self._mount_volumes()
        self.env = self._environment()
        self.argv = self._command()

    # The volumes.

    def _mount_volumes(self) -> None:
        volumes = {volume["name"]: volume for volume in self.pod.get("volumes", [])}
        for mount in self.container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            directory = self.root / "mounts" / mount["mountPath"].strip("/")
            directory.mkdir(parents=True)
            if "secret" in volume:
                source = volume["secret"]
                data = self._secret_data(source["secretName"])
            elif "configMap" in volume:
                source = volume["configMap"]
                data = self._config_map_data(source["name"])
            elif "emptyDir" in volume:
                source, data = {}, {}
            else:
                raise AssertionError(f"volume {volume['name']}: a kind this harness cannot mount")
            mode = source.get("defaultMode", 0o644)
            items = source.get("items") or [{"key": key, "path": key} for key in data]
            for item in items:
                if item["key"] not in data:
                    raise PodFailed(
                        f"volume {volume['name']}: key {item['key']!r} is not in its source, "
                        "so the kubelet could not mount it"
                    )
                path = directory / item["path"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data[item["key"]])
                self._require_readable(path, item.get("mode", mode), volume["name"])
            self.mounts[mount["mountPath"]] = directory

    def _secret_data(self, name: str) -> dict[str, bytes]:
        secret = the(self.objects, "Secret", name)
        data = {key: base64.b64decode(value) for key, value in (secret.get("data") or {}).items()}
        data.update({k: v.encode() for k, v in (secret.get("stringData") or {}).items()})
        return data

    def _config_map_data(self, name: str) -> dict[str, bytes]:
        config_map = the(self.objects, "ConfigMap", name)
        return {key: value.encode() for key, value in (config_map.get("data") or {}).items()}

    def _require_readable(self, path: Path, mode: int, volume: str) -> None:
        """``PodFailed`` unless the pod's user can read a file the kubelet mounts as root's,
        in group ``fsGroup``, with ``mode``."""
        context = {
            **self.pod.get("securityContext", {}),
            **self.container.get("securityContext", {}),
        }
        uid = context.get("runAsUser", 0)
        groups = {context.get("runAsGroup", 0), *context.get("supplementalGroups", [])}
        file_group = context.get("fsGroup", 0)
        groups.add(file_group)
        readable = (
            (uid == 0 and mode & 0o400) or (file_group in groups and mode & 0o040) or mode & 0o004
        )
        if not readable:
            raise PodFailed(
                f"volume {volume}: {path.name} has mode {mode:o}, owner root, group {file_group}: "
                f"uid {uid} (groups {sorted(groups)}) cannot read it"
            )
        path.chmod(mode | 0o400)  # this test's own user reads it

    def _to_host(self, text: str) -> str:
        """``text`` with a mount path (the whole value, or a path under it) put where it is here."""
        for pod_path, here in sorted(self.mounts.items(), key=lambda item: -len(item[0])):
            if text == pod_path or text.startswith(pod_path.rstrip("/") + "/"):
                return str(here) + text[len(pod_path.rstrip("/")) :]
        return text

    # The environment and command.

    def _environment(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for entry in self.container.get("env", []):
            name = entry["name"]
            if "value" in entry:
                value = _expand(str(entry["value"]), env)
            else:
                source = entry["valueFrom"]
                if "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    value = self._secret_data(ref["name"])[ref["key"]].decode()
                elif "configMapKeyRef" in source:
                    ref = source["configMapKeyRef"]
                    value = self._config_map_data(ref["name"])[ref["key"]].decode()
                else:
                    raise AssertionError(f"env {name}: a valueFrom this harness cannot resolve")
            env[name] = self._to_host(value)
        assert not self.container.get("envFrom"), "envFrom: not resolved by this harness"
        return env

    def _command(self) -> list[str]:
        command = self.container.get("command") or []
        assert command[:1] == [IMAGE_ENTRY_POINT], (
            f"the container's command is {command}, not the image's {IMAGE_ENTRY_POINT}"
        )
        args = [self._to_host(_expand(arg, self.env)) for arg in self.container.get("args", [])]
        return [sys.executable, "-m", "bridge", *command[1:], *args]

    # Running it.

    def start(self) -> PodRun:
        env = {
            **IMAGE_ENV,
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.root),
            "PYTHONPATH": str(ROOT),
            **self.env,
        }
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                env=env,
                cwd="/",
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def port(self, name_or_number: str | int) -> int:
        """A port as a probe or a Service's targetPort names it."""
        if isinstance(name_or_number, int):
            return name_or_number
        for port in self.container.get("ports", []):
            if port.get("name") == name_or_number:
                return int(port["containerPort"])
        raise PodFailed(f"no container port is named {name_or_number!r}")

    def probe_once(self, kind: str) -> tuple[bool, str]:
        """One run of the container's ``<kind>Probe``, as the kubelet runs an httpGet probe."""
        probe = self.container.get(f"{kind}Probe")
        assert probe is not None, f"the container has no {kind}Probe"
        get = probe["httpGet"]
        url = (
            f"{get.get('scheme', 'HTTP').lower()}://127.0.0.1:{self.port(get['port'])}{get['path']}"
        )
        headers = {"User-Agent": "kube-probe/1.37", "Accept": "*/*"}
        headers.update({h["name"]: h["value"] for h in get.get("httpHeaders", [])})
        try:
            answer = httpx.get(url, headers=headers, timeout=probe.get("timeoutSeconds", 1))
        except httpx.HTTPError as error:
            return False, f"GET {url}: {type(error).__name__}"
        return 200 <= answer.status_code < 400, f"GET {url}: {answer.status_code}"

    def probe_until(self, kind: str, budget: float) -> str:
        """The probe run every ``periodSeconds`` until it succeeds; ``PodFailed`` when the
        budget is spent or the container exited."""
        probe = self.container[f"{kind}Probe"]
        deadline = time.monotonic() + budget
        while True:
            ok, what = self.probe_once(kind)
            if ok:
                return what
            exited = self.process is not None and self.process.poll() is not None
            if exited or time.monotonic() > deadline:
                state = f"exited {self.process.returncode}" if exited else "still running"
                raise PodFailed(
                    f"{kind} probe failed ({what}); container {state}; log:\n{self.log()}"
                )
            time.sleep(min(probe.get("periodSeconds", 10), 1))

    def become_ready(self, readiness_budget: float = 60) -> dict[str, str]:
        """The kubelet's order: the startup probe within its budget, then liveness and
        readiness. Returns what each last answered."""
        startup = self.container["startupProbe"]
        budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
        return {
            "startup": self.probe_until("startup", budget),
            "liveness": self.probe_until("liveness", 0),
            "readiness": self.probe_until("readiness", readiness_budget),
        }


_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def _expand(text: str, defined: dict[str, str]) -> str:
    """The kubelet's expansion of a value: ``$(VAR)`` of a variable defined earlier in the
    list, ``$$`` for ``$``; an unknown ``$(VAR)`` stays as it is."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return defined.get(match.group(1), match.group(0))

    return _REFERENCE.sub(one, text)
