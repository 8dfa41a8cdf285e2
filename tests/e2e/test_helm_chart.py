"""The Helm chart (config/helm/kratos-session-bridge) with real Helm v4.3.2: it lints and
renders for the default values and each example, its schema rejects a bad value by name,
and its pod, run as Kubernetes would run it (tests/support/helm_chart.py) against the real
Kratos and each Redis topology, passes the kubelet's probes and answers as the bridge.
A wrong variable name, mount path or probe path in what the chart renders fails the pod."""

from __future__ import annotations

import base64
import copy
import re
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.connection import parse_url

from bridge.config.options import OPTIONS
from bridge.pipeline.upstream_headers import DEFAULT_MAPPING
from bridge.store.redis.url import parse_redis_url
from tests.conftest import SECRET
from tests.support.harness import Kratos, forwarded, free_port, wait_until
from tests.support.helm_chart import (
    CHART,
    EXAMPLES,
    PodFailed,
    PodRun,
    helm,
    render,
    template,
    the,
    values_file,
)
from tests.support.kratos_flows import register

ADMIN_TOKEN = "admin-token-" + "y" * 24
EXAMPLE_NAMES = sorted(path.name for path in EXAMPLES.iterdir() if path.is_dir())
BRIDGE_HOST = "kratos-session-bridge.auth.svc.cluster.local"
IDENTITY_HEADERS = [pair.split("=")[0] for pair in DEFAULT_MAPPING.split(",")]
RULES = """\
default: authenticated
rules:
  - id: public
    match: { path: /public/ }
    access: public
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("helm")


@pytest.fixture(scope="module")
def secrets_file(files: Path) -> Path:
    """The two secrets the chart cannot do without (or an existingSecret)."""
    return values_file(files, {"secrets": {"secret": SECRET, "adminToken": ADMIN_TOKEN}})


def lint(*value_files: Path) -> subprocess.CompletedProcess[str]:
    args = [arg for path in value_files for arg in ("-f", str(path))]
    return helm("lint", "--strict", str(CHART), *args)


# Lint and render.


def test_default_values_lint_and_render_what_the_chart_promises(secrets_file: Path) -> None:
    linted = lint(secrets_file)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    objects = render(secrets_file)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        ["Deployment", "HorizontalPodAutoscaler", "NetworkPolicy", "PodDisruptionBudget",
         "Secret", "Service", "Service", "ServiceAccount"]
    )  # fmt: skip
    pod = the(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["resources"]["limits"]["cpu"]  # the worker count follows it
    assert "BRIDGE_WORKERS" not in {e["name"] for e in container["env"]}

    # The admin port is on a Service of its own; the public Service does not carry it.
    public = the(objects, "Service", "bridge-kratos-session-bridge")
    admin = the(objects, "Service", "bridge-kratos-session-bridge-admin")
    assert [p["targetPort"] for p in public["spec"]["ports"]] == ["http"]
    assert [p["targetPort"] for p in admin["spec"]["ports"]] == ["admin"]
    assert admin["spec"]["type"] == "ClusterIP"

    # Only the proxy reaches the public port; nobody the admin port until adminFrom says.
    policy = the(objects, "NetworkPolicy")["spec"]
    (rule,) = policy["ingress"]
    assert [p["port"] for p in rule["ports"]] == ["http"]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    ]
    labels = the(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for selector in (
        policy["podSelector"]["matchLabels"],
        the(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        public["spec"]["selector"],
        admin["spec"]["selector"],
    ):
        assert selector.items() <= labels.items()
    target = the(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert target["name"] == the(objects, "Deployment")["metadata"]["name"]


def test_the_service_monitor_scrapes_the_admin_service_with_the_admin_token(
    files: Path, secrets_file: Path
) -> None:
    prometheus = [{"podSelector": {"matchLabels": {"app": "prometheus"}}}]
    values = {"serviceMonitor": {"enabled": True}, "networkPolicy": {"adminFrom": prometheus}}
    objects = render(secrets_file, values_file(files, values))
    (endpoint,) = the(objects, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == "admin" and endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["credentials"] == {
        "name": the(objects, "Secret")["metadata"]["name"],
        "key": "admin-token",
    }
    admin_rules = [
        rule
        for rule in the(objects, "NetworkPolicy")["spec"]["ingress"]
        if [p["port"] for p in rule["ports"]] == ["admin"]
    ]
    assert [rule["from"] for rule in admin_rules] == [prometheus]

    # Without a NetworkPolicy nothing blocks the scrape, and no adminFrom is needed.
    values = {"serviceMonitor": {"enabled": True}, "networkPolicy": {"enabled": False}}
    objects = render(secrets_file, values_file(files, values))
    assert the(objects, "ServiceMonitor")
    assert not [o for o in objects if o["kind"] == "NetworkPolicy"]


def test_a_changed_secret_or_rule_of_the_chart_s_own_rolls_the_pods(
    files: Path, secrets_file: Path
) -> None:
    """The bridge reads them at start: the pod template changes with them, so Kubernetes
    rolls the pods. (A Secret the user manages is out of Helm's sight: README says so.)"""

    def pod_annotations(values: dict) -> dict:
        objects = render(secrets_file, values_file(files, values))
        return the(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]

    before = pod_annotations({"rules": RULES})
    assert pod_annotations({"rules": RULES}) == before
    changed_secret = pod_annotations({"rules": RULES, "redis": {"password": "new"}})
    assert changed_secret["checksum/secret"] != before["checksum/secret"]
    changed_rules = pod_annotations(
        {"rules": RULES + "  - id: more\n    match: { path: /x/ }\n    access: public\n"}
    )
    assert changed_rules["checksum/rules"] != before["checksum/rules"]


def _bridge_references(node: object, found: set[tuple[int, str | None]]) -> None:
    """Every place an example points at the bridge's Service: (port, path or None)."""
    if isinstance(node, dict):
        names_bridge = "kratos-session-bridge" == node.get("name") or BRIDGE_HOST in (
            node.get("service"),
            node.get("host"),
        )
        if names_bridge and "port" in node:
            port = node["port"]  # a number, or {number: N} (Ingress, Istio)
            found.add((int(port["number"] if isinstance(port, dict) else port), None))
        for key, value in node.items():
            if key == "backendRefs":  # Envoy Gateway's: the path is the extAuth's, beside them
                for ref in value:
                    if ref.get("name") == "kratos-session-bridge":
                        found.add((int(ref["port"]), node.get("path")))
            else:
                _bridge_references(value, found)
    elif isinstance(node, list):
        for item in node:
            _bridge_references(item, found)
    elif isinstance(node, str):
        for port, path in re.findall(
            r"https?://" + re.escape(BRIDGE_HOST) + r"(?::(\d+))?(/[^\s,]*)?", node
        ):
            found.add((int(port or 80), path or None))


def _forwarded_headers(node: object, found: list[list[str]]) -> None:
    """Each list of the bridge's headers an example copies onto the app's request."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "nginx.ingress.kubernetes.io/auth-response-headers":
                found.append(value.split(","))
            elif key in ("authResponseHeaders", "headersToBackend"):
                found.append(value)
            else:
                _forwarded_headers(value, found)
    elif isinstance(node, list):
        for item in node:
            _forwarded_headers(item, found)


# What each example asks the bridge, by the Service port's target and the path.
EXPECTED_ENDPOINTS = {
    "ingress-nginx": {("http", "/auth"), ("http", None)},
    "traefik": {("http", "/forward-auth"), ("http", None)},
    "envoy-gateway": {("http", "/ext-authz"), ("http", None)},
    "istio": {("grpc", None), ("http", None)},
    "contour": {("grpc", None), ("http", None)},
}


def test_every_example_is_checked() -> None:
    assert sorted(EXPECTED_ENDPOINTS) == EXAMPLE_NAMES


@pytest.mark.parametrize("example", EXAMPLE_NAMES)
def test_example_lints_renders_and_points_at_the_bridge_it_renders(example: str) -> None:
    folder = EXAMPLES / example
    values = folder / "values.yaml"
    linted = lint(values)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    objects = render(values)
    service = the(objects, "Service", "kratos-session-bridge")
    target_of = {p["port"]: p["targetPort"] for p in service["spec"]["ports"]}

    documents = []
    for path in sorted(folder.glob("*.yaml")):
        if path.name != "values.yaml":
            documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert documents, f"{example}: no manifests beside values.yaml"
    references: set[tuple[int, str | None]] = set()
    _bridge_references(documents, references)
    for port, _path in references:
        assert port in target_of, f"{example}: port {port} is not a port of {sorted(target_of)}"
    assert {(target_of[port], path) for port, path in references} == EXPECTED_ENDPOINTS[example]

    # The headers copied to the app are the ones the bridge sends, the JWT's with them.
    jwt_header = (yaml.safe_load(values.read_text()).get("jwt") or {}).get("header")
    for listed in _forwarded_headers_of(documents):
        assert listed == IDENTITY_HEADERS + ([jwt_header] if jwt_header else []), example


def _forwarded_headers_of(documents: list[dict]) -> list[list[str]]:
    found: list[list[str]] = []
    _forwarded_headers(documents, found)
    return found


# Bad values are refused by name.


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"redis": {"mode": "sentinal"}}, "/redis/mode"),
        ({"replicas": 3}, "replicas"),
        ({"secrets": {"secret": "short"}}, "/secrets/secret"),
        ({"env": {"LOG_LEVEL": "debug"}}, "/env"),
        ({"ports": {"http": 70000}}, "/ports/http"),
        ({"service": {"type": "NodePort"}}, "/service/type"),  # only the proxy reaches it
        ({"resources": {"limits": {"cpu": None}}}, "/resources/limits"),
        ({"networkPolicy": {"proxyFrom": [{"podSelecter": {}}]}}, "/networkPolicy/proxyFrom/0"),
        (
            {"secrets": {"existingSecretOptionalKeys": ["hook_secret"]}},
            "/secrets/existingSecretOptionalKeys/0",
        ),
        ({"kratos": {"publicUrl": "kratos:4433"}}, "/kratos/publicUrl"),
        ({"jwt": {"keys": {"key.txt": "x"}}}, "/jwt/keys"),
    ],
    ids=lambda value: str(value) if isinstance(value, str) else None,
)
def test_the_schema_rejects_a_bad_value_by_name(
    values: dict, named: str, files: Path, secrets_file: Path
) -> None:
    done = template(secrets_file, values_file(files, values))
    assert done.returncode != 0
    assert "schema" in done.stderr and named in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"secrets": {"secret": ""}}, "secrets.secret: required"),
        ({"secrets": {"adminToken": ""}}, "secrets.adminToken: required"),
        (
            {"redis": {"hosts": ["a:6379", "b:6379"]}},
            "redis.hosts: standalone mode takes exactly one",
        ),
        ({"redis": {"mode": "cluster", "db": 2}}, "redis.db: a Redis Cluster has database 0 only"),
        ({"env": {"BRIDGE_PORT": "1"}}, "env.BRIDGE_PORT: set by the chart"),
        (
            {"env": {"BRIDGE_KRATOS_PUBLIC_URL": "http://kratos:4433"}},
            "env.BRIDGE_KRATOS_PUBLIC_URL: set by the chart from kratos.publicUrl",
        ),
        (
            {"env": {"BRIDGE_TRUSTED_PROXIES": "10.0.0.0/8"}},
            "env.BRIDGE_TRUSTED_PROXIES: set by the chart from trustedProxies",
        ),
        ({"jwt": {"header": "X-Bridge-Jwt"}}, "jwt.header: needs signing keys"),
        (  # the NetworkPolicy would silently keep Prometheus from the admin port
            {"serviceMonitor": {"enabled": True}, "networkPolicy": {"adminFrom": []}},
            "serviceMonitor.enabled: Prometheus could not reach /metrics, "
            "networkPolicy.adminFrom is empty",
        ),
    ],
)
def test_a_value_the_templates_cannot_use_is_refused_by_name(
    values: dict, named: str, files: Path, secrets_file: Path
) -> None:
    done = template(secrets_file, values_file(files, values))
    assert done.returncode != 0
    assert named in done.stderr, done.stderr


def test_a_public_service_clients_could_reach_is_refused_with_the_schema_skipped(
    files: Path, secrets_file: Path
) -> None:
    """The schema refuses it (above); the template too, for an install that skips it."""
    extra = values_file(files, {"service": {"type": "LoadBalancer"}})
    done = helm(
        "template", "bridge", str(CHART), "--skip-schema-validation",
        "-f", str(secrets_file), "-f", str(extra),
    )  # fmt: skip
    assert done.returncode != 0
    assert "service.type: LoadBalancer would let clients reach" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("redis_values", "kind", "nodes", "service", "db"),
    [
        (
            {"mode": "standalone", "hosts": ["redis.ns.svc:6380"], "db": 3},
            "standalone",
            None,
            None,
            3,
        ),
        (
            {
                "mode": "sentinel",
                "hosts": ["s1:26379", "s2:26379", "[fd00::1]:26379"],
                "sentinelService": "main",
            },
            "sentinel",
            (("s1", 26379), ("s2", 26379), ("fd00::1", 26379)),
            "main",
            0,
        ),
        (
            {"mode": "cluster", "hosts": ["c1:6379", "c2:7000"]},
            "cluster",
            (("c1", 6379), ("c2", 7000)),
            None,
            0,
        ),
    ],
)
def test_the_redis_url_in_the_secret_is_the_bridge_s_own_form_with_the_password_intact(
    redis_values: dict,
    kind: str,
    nodes: tuple | None,
    service: str | None,
    db: int,
    files: Path,
    secrets_file: Path,
) -> None:
    password = "p@ss w+rd:/%?#é"
    values = {"redis": {**redis_values, "username": "bridge", "password": password}}
    secret = the(render(secrets_file, values_file(files, values)), "Secret")
    url = base64.b64decode(secret["data"]["redis-url"]).decode()
    address = parse_redis_url(url)
    if kind == "standalone":  # redis-py reads this form itself
        parsed = parse_url(url)
        address = replace(address, db=parsed["db"], username=parsed["username"])
        address = replace(address, password=parsed["password"])
    assert (address.kind, address.service, address.db) == (kind, service, db)
    assert (address.username, address.password) == ("bridge", password)
    if nodes is not None:
        assert address.nodes == nodes


def test_every_variable_the_chart_sets_is_a_setting_and_every_file_it_names_is_mounted(
    files: Path, secrets_file: Path
) -> None:
    """With every optional part on, including those the pod test below cannot run (Secrets
    the chart does not make: the gRPC certificate, Redis's CA): each variable is one the
    bridge reads, and each path it names is a file a volume puts there."""
    values = {
        "secrets": {"kratosAdminToken": "k", "hookSecret": "h", "appToken": "a"},
        "redis": {"mode": "sentinel", "hosts": ["s:26379"], "sentinelPassword": "sp",
                  "tls": {"enabled": True, "caSecret": "redis-ca"}},
        "jwt": {"header": "X-Bridge-Jwt", "existingSecret": "jwt-keys"},
        "grpc": {"enabled": True, "tlsSecret": "grpc-tls"},
        "rules": RULES,
        "env": {"BRIDGE_REVALIDATE_AFTER": "5"},
    }  # fmt: skip
    objects = render(secrets_file, values_file(files, values))
    pod = the(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    known = {option.env for option in OPTIONS}
    env = {entry["name"]: entry.get("value") for entry in container["env"]}
    assert set(env) <= known, set(env) - known
    for name in (
        "BRIDGE_SECRET_FILE", "BRIDGE_ADMIN_TOKEN_FILE", "BRIDGE_KRATOS_ADMIN_TOKEN_FILE",
        "BRIDGE_HOOK_SECRET_FILE", "BRIDGE_APP_TOKEN_FILE", "BRIDGE_REDIS_SENTINEL_PASSWORD_FILE",
        "BRIDGE_RULES_FILE", "BRIDGE_JWT_KEYS_DIR", "BRIDGE_GRPC_TLS_CERT_FILE",
        "BRIDGE_GRPC_TLS_KEY_FILE", "BRIDGE_REDIS_URL_FILE",
    ):  # fmt: skip
        assert name in env, name
    # Every secret, the Redis URL with its password too, is a file: none is in the
    # environment, where /proc/1/environ and `kubectl exec env` would show it.
    assert [e["name"] for e in container["env"] if "valueFrom" in e] == []

    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    provided = set()  # every file (or, for a whole volume, directory) the mounts give
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        source = volume.get("secret") or volume.get("configMap") or {}
        items = source.get("items")
        if items is None:
            provided.add(mount["mountPath"])
        for item in items or []:
            provided.add(f"{mount['mountPath']}/{item['path']}")
    named = {value for value in env.values() if value and value.startswith("/")}
    url = base64.b64decode(the(objects, "Secret")["data"]["redis-url"]).decode()
    named |= set(re.findall(r"ssl_ca_certs=([^&]+)", url))
    assert named and named <= provided, named - provided


# The pod.


def _jwt_key(files: Path) -> dict[str, str]:
    keys = files / "jwt-keys"
    keys.mkdir(exist_ok=True)
    made = subprocess.run(
        [sys.executable, "-m", "bridge", "jwt-keygen", str(keys)], capture_output=True, text=True
    )
    assert made.returncode == 0, made.stderr
    return {path.name: path.read_text() for path in sorted(keys.glob("*.pem"))[:1]}


def _redis_values(url: str) -> dict:
    address = parse_redis_url(url)
    if address.kind == "standalone":
        host_port = url.split("://", 1)[1].split("/", 1)[0]
        return {"mode": "standalone", "hosts": [host_port], "db": address.db}
    hosts = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in address.nodes]
    values = {"mode": address.kind, "hosts": hosts, "db": address.db}
    if address.service:
        values["sentinelService"] = address.service
    return values


def pod_values(kratos: Kratos, redis_url: str, prefix: str, files: Path) -> dict:
    return {
        "kratos": {"publicUrl": kratos.public_url, "adminUrl": kratos.admin_url},
        "redis": _redis_values(redis_url),
        "secrets": {"secret": SECRET, "adminToken": ADMIN_TOKEN},
        "rules": RULES,
        "jwt": {"header": "X-Bridge-Jwt", "audience": "app", "keys": _jwt_key(files)},
        "grpc": {"enabled": True, "port": free_port()},
        "ports": {"http": free_port(), "admin": free_port()},
        "env": {"BRIDGE_KEY_PREFIX": prefix},
    }


def test_the_pod_run_as_kubernetes_runs_it_is_ready_and_answers_as_the_bridge(
    kratos: Kratos, redis_topology, prefix: str, files: Path, workdir: Path
) -> None:
    user = register(kratos)
    objects = render(values_file(files, pod_values(kratos, redis_topology.url, prefix, files)))
    pod = PodRun(objects, workdir).start()
    try:
        answered = pod.become_ready()
        assert answered["readiness"].endswith(": 200"), answered

        # Every Service port reaches a port the container listens on.
        for service in (o for o in objects if o["kind"] == "Service"):
            for port in service["spec"]["ports"]:
                number = pod.port(port["targetPort"])
                wait_until(
                    lambda n=number: _connects(n),
                    30,
                    f"{service['metadata']['name']} {port['name']}",
                )

        # The admin listener takes the token the Secret holds, and says what Redis it runs on.
        admin = f"http://127.0.0.1:{pod.port('admin')}"
        ready = httpx.get(
            admin + "/health/ready", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert ready.status_code == 200, ready.text
        assert ready.json()["status"] == "ok"
        assert httpx.get(admin + "/health/ready").status_code == 401

        # The forward-auth answer: the rules file from the ConfigMap, the session through
        # Kratos and Redis, the JWT signed with the key from the Secret.
        public = f"http://127.0.0.1:{pod.port('http')}/forward-auth"
        anonymous_api = {"Accept": "application/json"}
        assert (
            httpx.get(public, headers={**forwarded("/public/page"), **anonymous_api}).status_code
            == 200
        )
        assert (
            httpx.get(public, headers={**forwarded("/private"), **anonymous_api}).status_code == 401
        )
        allowed = httpx.get(
            public, headers={**forwarded("/private"), "X-Session-Token": user.token}
        )
        assert allowed.status_code == 200, allowed.text
        assert allowed.headers["X-User-Id"] == user.identity_id
        assert allowed.headers["X-Bridge-Jwt"].count(".") == 2

        # Envoy's gRPC port, by the standard health service.
        with grpc.insecure_channel(f"127.0.0.1:{pod.port('grpc')}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        pod.stop()


def _connects(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def _break(objects: list[dict], how: str) -> list[dict]:
    broken = copy.deepcopy(objects)
    (container,) = the(broken, "Deployment")["spec"]["template"]["spec"]["containers"]
    if how == "env name":
        for entry in container["env"]:
            if entry["name"] == "BRIDGE_REDIS_URL_FILE":
                entry["name"] = "BRIDGE_REDIS_URI_FILE"
    elif how == "mount path":
        for entry in container["env"]:
            if entry["name"] == "BRIDGE_SECRET_FILE":
                entry["value"] = "/etc/bridge/secret/secret"
    elif how == "readiness path":
        container["readinessProbe"]["httpGet"]["path"] = "/health/readiness"
    elif how == "probe port":
        container["livenessProbe"]["httpGet"]["port"] = "admin"
    elif how == "file mode":  # owner-only: the pod's user is not root
        for volume in the(broken, "Deployment")["spec"]["template"]["spec"]["volumes"]:
            if volume["name"] == "secrets":
                volume["secret"]["defaultMode"] = 0o400
    return broken


@pytest.mark.parametrize(
    ("how", "said"),
    [
        ("env name", "BRIDGE_REDIS_URI_FILE"),
        ("mount path", "BRIDGE_SECRET_FILE"),
        ("readiness path", "/health/readiness: 404"),
        ("probe port", "liveness probe failed"),
        ("file mode", "uid 10001 (groups [10001]) cannot read it"),
    ],
)
def test_a_pod_rendered_wrong_fails_to_become_ready(
    how: str, said: str, kratos: Kratos, redis_server, prefix: str, files: Path, workdir: Path
) -> None:
    """The check above can fail: the same rendering, broken in one place, is caught."""
    objects = render(values_file(files, pod_values(kratos, redis_server.url, prefix, files)))
    started: list[PodRun] = []
    try:
        with pytest.raises(PodFailed) as failed:
            started.append(PodRun(_break(objects, how), workdir).start())
            started[0].become_ready(readiness_budget=5)
        assert said in str(failed.value)
    finally:
        for pod in started:
            pod.stop()
