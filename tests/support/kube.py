"""A real Kubernetes API server for the tests, and server-side dry-run of manifests on it.

etcd and kube-apiserver are built from their Go modules once per machine
(``tests/tools/build-etcd.sh``, ``build-kube-apiserver.sh``; ``$ETCD_BIN``,
``$KUBE_APISERVER_BIN``) and run on loopback. A manifest is sent as
``POST ...?dryRun=All&fieldValidation=Strict``: Kubernetes decodes, defaults, validates and
admits it as it would for ``kubectl apply``, stores nothing, and names the path of any field
it does not know. The CRDs of the ingress controllers the chart's examples are for come from
those projects' own Go modules (``CRD_SOURCES``), cached under ``~/.cache``.

There is no controller-manager and no kubelet: nothing is scheduled or reconciled, which a
dry-run does not need. What admission looks up among stored objects (an object's namespace,
a Pod's ServiceAccount) is created for real first, by server-side apply."""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.harness import free_port, stop_process, wait_until

KUBE_VERSION = "v1.37.2"
ETCD_VERSION = "v3.7.3"
CACHE = Path.home() / ".cache" / "kratos-session-bridge"
KUBE_APISERVER_BIN = Path(
    os.environ.get("KUBE_APISERVER_BIN")
    or CACHE / f"kube-apiserver-{KUBE_VERSION}" / "kube-apiserver"
)
ETCD_BIN = Path(os.environ.get("ETCD_BIN") or CACHE / f"etcd-{ETCD_VERSION}" / "etcd")
CRD_CACHE = CACHE / "crds"

# Objects that admission of other objects reads from storage: created for real (by
# server-side apply, which validates as strictly) before the rest is dry-run.
PREREQUISITE_KINDS = ("Namespace", "ServiceAccount")


@dataclass(frozen=True)
class CrdSource:
    """CRD files of one project: ``pattern`` is a path (or glob) inside ``module``'s zip."""

    project: str
    module: str  # MODULE@VERSION, as go mod download takes it
    pattern: str


CRD_SOURCES = (
    CrdSource(
        "Traefik (Middleware and the other traefik.io kinds)",
        "github.com/traefik/traefik/v3@v3.6.12",
        "docs/content/reference/dynamic-configuration/kubernetes-crd-definition-v1.yml",
    ),
    # The Gateway API CRDs as Envoy Gateway's own chart installs them (the kinds its
    # SecurityPolicy's targetRefs name), and Envoy Gateway's kinds.
    CrdSource(
        "Gateway API (as Envoy Gateway ships it)",
        "github.com/envoyproxy/gateway@v1.9.1",
        "charts/gateway-helm/charts/crds/crds/gatewayapi-crds.yaml",
    ),
    CrdSource(
        "Envoy Gateway (SecurityPolicy and the other gateway.envoyproxy.io kinds)",
        "github.com/envoyproxy/gateway@v1.9.1",
        "charts/gateway-helm/charts/crds/crds/generated/*.yaml",
    ),
    CrdSource(
        "Istio (AuthorizationPolicy and the other istio.io kinds)",
        "istio.io/api@v1.32.0",
        "kubernetes/customresourcedefinitions.gen.yaml",
    ),
    CrdSource(
        "Contour (ExtensionService, HTTPProxy)",
        "github.com/projectcontour/contour@v1.33.8",
        "examples/contour/01-crds.yaml",
    ),
    # The module that carries the CRD files: the Go module proxy serves it up to v0.85.0
    # (its pkg/apis/monitoring module, served up to v0.95.2, has the Go types only).
    CrdSource(
        "Prometheus operator (ServiceMonitor)",
        "github.com/prometheus-operator/prometheus-operator@v0.85.0",
        "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml",
    ),
)


def require_binaries() -> None:
    """Fails under CI (``$CI``, as CI sets it) when etcd or kube-apiserver is missing, skips
    elsewhere: ``bash tests/run.sh`` builds both before pytest."""
    missing = [str(path) for path in (ETCD_BIN, KUBE_APISERVER_BIN) if not path.is_file()]
    if not missing:
        return
    message = (
        f"no binary at {', '.join(missing)} ($ETCD_BIN, $KUBE_APISERVER_BIN or the default); "
        "run the README test command (bash tests/run.sh), which builds etcd "
        f"{ETCD_VERSION} and kube-apiserver {KUBE_VERSION} with tests/tools/"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _module_dir(module: str) -> Path:
    """The unpacked module from the Go module proxy (``go mod download``, in a folder of
    its own so no go.mod or go.work of the caller's applies)."""
    with tempfile.TemporaryDirectory() as scratch:
        done = subprocess.run(
            ["go", "mod", "download", "-json", module],
            capture_output=True,
            text=True,
            cwd=scratch,
            env={**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"},
        )
    # A go older than the module's go line still fetches it and names the folder.
    info = json.loads(done.stdout or "{}")
    if not info.get("Dir") or not Path(info["Dir"]).is_dir():
        raise RuntimeError(f"go mod download {module}: {info.get('Error') or done.stderr}")
    return Path(info["Dir"])


def crd_files(source: CrdSource) -> list[Path]:
    """The source's CRD files, copied once into ``~/.cache`` (``crds/MODULE@VERSION/...``)."""
    cached = CRD_CACHE / source.module
    found = sorted(cached.glob(source.pattern))
    if found:
        return found
    module_dir = _module_dir(source.module)
    matches = sorted(glob.glob(source.pattern, root_dir=module_dir))
    if not matches:
        raise RuntimeError(f"{source.module} has no file {source.pattern} ({source.project})")
    for relative in matches:
        target = cached / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(target.suffix + ".partial")
        shutil.copyfile(module_dir / relative, partial)
        partial.chmod(0o644)
        partial.replace(target)
    return sorted(cached.glob(source.pattern))


def load_manifests(text: str) -> list[dict]:
    """The objects of a multi-document YAML stream (empty documents, as Helm leaves
    between templates, dropped)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [doc for doc in yaml.load_all(text, Loader=loader) if doc]


class Rejected(AssertionError):
    """Kubernetes refused an object; the message is Kubernetes's own."""


class KubeAPI:
    """etcd and kube-apiserver in ``workdir``, on free loopback ports, with one static
    admin token and every request allowed (authorization is not what is checked)."""

    def __init__(self, workdir: Path) -> None:
        self.home = workdir
        self.home.mkdir(parents=True, exist_ok=True)
        self.processes: list[subprocess.Popen] = []
        self._resources: dict[str, dict[str, tuple[str, bool]]] = {}
        try:
            self._start_etcd()
            self._start_apiserver()
        except BaseException:
            self.stop()
            raise

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        peer_url = f"http://127.0.0.1:{peer}"
        self.etcd_log = self.home / "etcd.log"
        with self.etcd_log.open("ab") as log:
            self.processes.append(
                subprocess.Popen(
                    [
                        str(ETCD_BIN),
                        "--name=test",
                        f"--data-dir={self.home / 'etcd'}",
                        f"--listen-client-urls={self.etcd_url}",
                        f"--advertise-client-urls={self.etcd_url}",
                        f"--listen-peer-urls={peer_url}",
                        f"--initial-advertise-peer-urls={peer_url}",
                        f"--initial-cluster=test={peer_url}",
                        "--listen-metrics-urls=",
                        # Its data lives as long as the test session: no fsync needed.
                        "--unsafe-no-fsync",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        self._wait_up(
            lambda: httpx.get(self.etcd_url + "/health").json()["health"] == "true",
            30,
            "etcd",
            self.etcd_log,
        )

    def _start_apiserver(self) -> None:
        certs = self.home / "certs"
        certs.mkdir(exist_ok=True)
        key = certs / "service-account.key"
        subprocess.run(
            ["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True
        )
        self._token = secrets.token_urlsafe(32)
        tokens = self.home / "tokens.csv"
        tokens.touch(mode=0o600)
        tokens.write_text(f'{self._token},admin,admin-uid,"system:masters"\n')
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.apiserver_log = self.home / "kube-apiserver.log"
        started = time.monotonic()
        with self.apiserver_log.open("ab") as log:
            self.processes.append(
                subprocess.Popen(
                    [
                        str(KUBE_APISERVER_BIN),
                        f"--etcd-servers={self.etcd_url}",
                        "--bind-address=127.0.0.1",
                        "--advertise-address=127.0.0.1",
                        # The endpoints of the `kubernetes` Service may not be on loopback;
                        # nothing here reaches the API server through that Service.
                        "--endpoint-reconciler-type=none",
                        f"--secure-port={self.port}",
                        f"--cert-dir={certs}",
                        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                        f"--service-account-key-file={key}",
                        f"--service-account-signing-key-file={key}",
                        "--service-cluster-ip-range=10.96.0.0/16",
                        f"--token-auth-file={tokens}",
                        "--authorization-mode=AlwaysAllow",
                        "--profiling=false",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        # --cert-dir gets a self-signed serving certificate (and its CA) on first start.
        serving = certs / "apiserver.crt"
        self._wait_up(serving.exists, 60, "kube-apiserver's certificate", self.apiserver_log)
        self.client = httpx.Client(
            base_url=self.url,
            verify=ssl.create_default_context(cafile=str(serving)),
            headers={"Authorization": f"Bearer {self._token}"},
            timeout=60,
        )
        self._wait_up(
            lambda: self.client.get("/readyz").text == "ok",
            120,
            "kube-apiserver",
            self.apiserver_log,
        )
        self.start_seconds = time.monotonic() - started

    def _wait_up(self, check: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
        """Until ``check`` holds; a process that exits meanwhile fails at once, with the end
        of its log."""
        deadline = time.monotonic() + timeout
        while True:
            for process in self.processes:
                if process.poll() is not None:
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                    raise RuntimeError(f"{what}: {process.args[0]} exited; {log} ends:\n{tail}")
            try:
                if check():
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not come up within {timeout}s (log: {log})")
            time.sleep(0.1)

    def stop(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        for process in reversed(self.processes):
            stop_process(process)

    def version(self) -> str:
        return self.client.get("/version").json()["gitVersion"]

    def _resource(self, api_version: str, kind: str) -> tuple[str, bool]:
        """(plural name, namespaced) of a kind, by API discovery of its group version."""
        known = self._resources.get(api_version)
        if known is None or kind not in known:
            path = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
            answer = self.client.get(path)
            if answer.status_code == 404:
                raise Rejected(f"{kind}: the API server serves no {api_version}")
            answer.raise_for_status()
            known = {
                item["kind"]: (item["name"], item["namespaced"])
                for item in answer.json()["resources"]
                if "/" not in item["name"]  # subresources (status, scale, ...)
            }
            self._resources[api_version] = known
        if kind not in known:
            raise Rejected(f"{kind}: the API server serves no such kind in {api_version}")
        return known[kind]

    def _path(self, manifest: dict, namespace: str) -> str:
        api_version, kind = manifest.get("apiVersion"), manifest.get("kind")
        if not isinstance(api_version, str) or not isinstance(kind, str):
            raise Rejected(f"an object without apiVersion or kind: {manifest!r:.200}")
        plural, namespaced = self._resource(api_version, kind)
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        if namespaced:
            namespace = (manifest.get("metadata") or {}).get("namespace") or namespace
            return f"{base}/namespaces/{namespace}/{plural}"
        return f"{base}/{plural}"

    @staticmethod
    def _error(manifest: dict, answer: httpx.Response) -> str:
        try:
            message = answer.json()["message"]
        except (ValueError, KeyError, TypeError):
            message = answer.text
        name = (manifest.get("metadata") or {}).get("name")
        return f"{manifest.get('kind')} {name}: {answer.status_code} {message}"

    def dry_run(self, manifest: dict, namespace: str = "default") -> str | None:
        """Kubernetes's answer to creating ``manifest`` with ``dryRun=All`` and
        ``fieldValidation=Strict``, then (if that is accepted) to server-side applying it,
        as Helm 4 installs by default, with ``dryRun=All``: ``None`` if both accept it, else
        the error message (which names the path of an unknown field). Server-side apply
        also refuses what a create lets through, e.g. one env name twice in a container."""
        answer = self.client.post(
            self._path(manifest, namespace),
            params={"dryRun": "All", "fieldValidation": "Strict"},
            json=manifest,
        )
        if answer.is_success:
            answer = self._server_side_apply(manifest, namespace, dry_run=True)
        return None if answer.is_success else self._error(manifest, answer)

    def apply(self, manifest: dict, namespace: str = "default") -> None:
        """Creates or updates ``manifest`` for real, by server-side apply (validated as
        strictly as a dry-run): for what admission of other objects needs to find."""
        answer = self._server_side_apply(manifest, namespace, dry_run=False)
        if not answer.is_success:
            raise Rejected(self._error(manifest, answer))

    def _server_side_apply(self, manifest: dict, namespace: str, dry_run: bool) -> httpx.Response:
        params = {"fieldManager": "kratos-session-bridge-tests", "fieldValidation": "Strict"}
        if dry_run:
            params["dryRun"] = "All"
        return self.client.patch(
            f"{self._path(manifest, namespace)}/{manifest['metadata']['name']}",
            params=params,
            content=json.dumps(manifest),
            headers={"Content-Type": "application/apply-patch+yaml"},
        )

    def check(self, manifests: Iterable[dict], namespace: str) -> list[str]:
        """Every object of ``manifests`` as ``kubectl apply --dry-run=server`` into
        ``namespace`` would see it: the namespaces (``namespace`` and any an object names)
        and the ServiceAccounts created for real first, the rest dry-run. Kubernetes's error
        messages, one per refused object."""
        manifests = list(manifests)
        named = {(m.get("metadata") or {}).get("namespace") for m in manifests}
        for name in sorted({namespace, *named} - {None}):
            self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        errors = []
        for kind in PREREQUISITE_KINDS:
            for manifest in manifests:
                if manifest.get("kind") == kind:
                    try:
                        self.apply(manifest, namespace)
                    except Rejected as refused:
                        errors.append(str(refused))
        for manifest in manifests:
            if manifest.get("kind") not in PREREQUISITE_KINDS:
                try:
                    error = self.dry_run(manifest, namespace)
                except Rejected as refused:
                    error = str(refused)
                if error:
                    errors.append(error)
        return errors

    def install_crds(self, sources: Iterable[CrdSource] = CRD_SOURCES) -> list[str]:
        """Installs each source's CRDs for real and waits until each kind is served;
        returns the CRD names."""
        crds = [
            doc
            for source in sources
            for path in crd_files(source)
            for doc in load_manifests(path.read_text())
            if doc.get("kind") == "CustomResourceDefinition"
        ]
        for crd in crds:
            self.apply(crd)
        for crd in crds:
            self._wait_served(crd)
        return [crd["metadata"]["name"] for crd in crds]

    def _wait_served(self, crd: dict) -> None:
        spec = crd["spec"]
        kind = spec["names"]["kind"]
        for version in spec["versions"]:
            if version.get("served", True):
                api_version = f"{spec['group']}/{version['name']}"

                def served(api_version: str = api_version) -> bool:
                    self._resources.pop(api_version, None)
                    self._resource(api_version, kind)
                    return True

                wait_until(served, 60, f"{kind} in {api_version}")
