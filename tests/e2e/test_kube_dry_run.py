"""The Helm chart's manifests, checked by a real Kubernetes API server.

What the chart renders (``helm template`` with real Helm, tests/support/helm_chart.py) for the
default values, for every optional part switched on, and for each example (its values.yaml,
with the manifests beside it) is applied as ``kubectl apply --dry-run=server`` would. Every
object is sent to kube-apiserver (``kube_api``: etcd and kube-apiserver built from
their Go modules, with the ingress controllers' CRDs from their own modules) as a create with
``dryRun=All&fieldValidation=Strict``, then as a server-side apply (Helm 4's way) with the
same: Kubernetes decodes, defaults, validates and admits it as it would for a real install,
and names the path of any field it does not know. The first tests show that this checker
fails where it should."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import SECRET
from tests.support.helm_chart import CHART, EXAMPLES, template, values_file
from tests.support.kube import KubeAPI, load_manifests

NAMESPACE = "auth"
ADMIN_TOKEN = "admin-token-" + "y" * 24
EXAMPLE_NAMES = sorted(path.name for path in EXAMPLES.iterdir() if path.is_dir())
TEMPLATES = sorted(f"templates/{path.name}" for path in (CHART / "templates").glob("*.yaml"))


def deployment() -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "bridge"},
        "spec": {
            "selector": {"matchLabels": {"app": "bridge"}},
            "template": {
                "metadata": {"labels": {"app": "bridge"}},
                "spec": {
                    "containers": [
                        {
                            "name": "bridge",
                            "image": "kratos-session-bridge:test",
                            "readinessProbe": {"httpGet": {"path": "/health/ready", "port": 4480}},
                        }
                    ]
                },
            },
        },
    }


def middleware(forward_auth: dict) -> dict:
    return {
        "apiVersion": "traefik.io/v1alpha1",
        "kind": "Middleware",
        "metadata": {"name": "bridge"},
        "spec": {"forwardAuth": forward_auth},
    }


def test_a_valid_deployment_is_accepted(kube_api: KubeAPI):
    errors = kube_api.check([deployment()], "checker-valid")
    assert not errors, "\n".join(errors)


def test_an_unknown_field_is_rejected_by_its_path(kube_api: KubeAPI):
    bad = deployment()
    container = bad["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")

    errors = kube_api.check([bad], "checker-unknown-field")

    assert len(errors) == 1, errors
    assert "Deployment bridge: 400" in errors[0]
    assert 'unknown field "spec.template.spec.containers[0].readinesProbe"' in errors[0]


def test_a_value_kubernetes_validation_refuses_is_rejected_by_its_path(kube_api: KubeAPI):
    bad = deployment()
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = 70000

    errors = kube_api.check([bad], "checker-invalid-value")

    assert len(errors) == 1, errors
    assert "Deployment bridge: 422" in errors[0]
    assert "spec.template.spec.containers[0].readinessProbe.httpGet.port" in errors[0]


def test_what_only_server_side_apply_refuses_is_rejected(kube_api: KubeAPI):
    """Helm 4 installs by server-side apply, which refuses one env name twice in a
    container (a create keeps the later one)."""
    bad = deployment()
    bad["spec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "BRIDGE_LOG_LEVEL", "value": "info"},
        {"name": "BRIDGE_LOG_LEVEL", "value": "debug"},
    ]

    errors = kube_api.check([bad], "checker-server-side-apply")

    assert len(errors) == 1, errors
    assert 'duplicate entries for key [name="BRIDGE_LOG_LEVEL"]' in errors[0]


def test_a_custom_resource_is_checked_against_its_crds_schema(kube_api: KubeAPI):
    good = middleware({"address": "http://bridge.checker-crd.svc:4480/forward-auth"})
    bad = copy.deepcopy(good)
    bad["spec"]["forwardAuth"]["adress"] = bad["spec"]["forwardAuth"].pop("address")

    errors = kube_api.check([good], "checker-crd")
    assert not errors, "\n".join(errors)
    errors = kube_api.check([bad], "checker-crd")

    assert len(errors) == 1, errors
    assert 'unknown field "spec.forwardAuth.adress"' in errors[0]


def test_a_pod_is_admitted_only_with_its_service_account(kube_api: KubeAPI):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bridge"},
        "spec": {
            "serviceAccountName": "bridge",
            "containers": [{"name": "bridge", "image": "kratos-session-bridge:test"}],
        },
    }
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "bridge"}}

    alone = kube_api.check([pod], "checker-pod-alone")
    assert len(alone) == 1, alone
    assert 'serviceaccount "bridge" not found' in alone[0]
    # Listed after the Pod, as a chart may render it: still created first.
    errors = kube_api.check([pod, account], "checker-pod-with-account")
    assert not errors, "\n".join(errors)


# The chart.


def rendered(*value_files: Path) -> tuple[list[dict], set[str]]:
    """The chart's objects for these values, and the templates they came from."""
    done = template(*value_files, namespace=NAMESPACE)
    assert done.returncode == 0, done.stderr
    sources = set(re.findall(r"^# Source: [^/]+/(templates/\S+)$", done.stdout, re.MULTILINE))
    return load_manifests(done.stdout), sources


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kube-dry-run")


@pytest.fixture(scope="module")
def secrets_file(files: Path) -> Path:
    return values_file(files, {"secrets": {"secret": SECRET, "adminToken": ADMIN_TOKEN}})


def test_the_default_values_render_objects_kubernetes_accepts(
    kube_api: KubeAPI, secrets_file: Path
):
    objects, _ = rendered(secrets_file)
    assert {o["kind"] for o in objects} >= {"Deployment", "Service", "Secret"}

    errors = kube_api.check(objects, NAMESPACE)
    assert not errors, "\n".join(errors)


def every_optional_part(files: Path) -> dict:
    """Values that switch on every template and every optional block of the chart."""
    key = subprocess.run(
        ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {
        "secrets": {
            "secret": SECRET,
            "adminToken": ADMIN_TOKEN,
            "kratosAdminToken": "ory-api-key",
            "hookSecret": "hook-secret-" + "z" * 24,
            "appToken": "app-token-" + "w" * 24,
        },
        "redis": {
            "mode": "sentinel",
            "hosts": ["sentinel-0.redis:26379", "sentinel-1.redis:26379"],
            "password": "redis-password",
            "sentinelPassword": "sentinel-password",
            "tls": {"enabled": True, "caSecret": "redis-ca"},
        },
        "rules": "default: authenticated\nrules: []\n",
        "returnToOrigins": ["https://app.example.com"],
        "trustedProxies": ["10.0.0.0/8"],
        "jwt": {"header": "X-Bridge-Jwt", "audience": "app", "keys": {"2026-12.pem": key}},
        "grpc": {"enabled": True, "tlsSecret": "bridge-grpc-tls"},
        "env": {"BRIDGE_REVALIDATE_AFTER": "5"},
        "imagePullSecrets": [{"name": "registry"}],
        "service": {"annotations": {"example.com/owner": "auth"}},
        "adminService": {"annotations": {"example.com/owner": "auth"}},
        "serviceAccount": {"annotations": {"example.com/owner": "auth"}},
        "podAnnotations": {"example.com/owner": "auth"},
        "podLabels": {"tier": "auth"},
        "networkPolicy": {
            "adminFrom": [{"podSelector": {"matchLabels": {"app": "prometheus"}}}],
            "appFrom": [{"podSelector": {"matchLabels": {"app": "my-app"}}}],
        },
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "auth", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"app": "kratos-session-bridge"}},
                        },
                    }
                ]
            }
        },
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"app": "kratos-session-bridge"}},
            }
        ],
    }


def test_every_template_with_every_optional_part_renders_objects_kubernetes_accepts(
    kube_api: KubeAPI, files: Path
):
    objects, sources = rendered(values_file(files, every_optional_part(files)))
    assert sources == set(TEMPLATES), "a template rendered nothing; switch it on above"

    errors = kube_api.check(objects, NAMESPACE)
    assert not errors, "\n".join(errors)


def example_manifests(folder: Path) -> list[dict]:
    """The manifests beside an example's values.yaml (a ``*-values.yaml`` is values for
    another chart, such as istiod's, not objects)."""
    return [
        document
        for path in sorted(folder.glob("*.yaml"))
        if path.name != "values.yaml" and not path.name.endswith("-values.yaml")
        for document in load_manifests(path.read_text())
    ]


@pytest.mark.parametrize("example", EXAMPLE_NAMES)
def test_each_example_renders_objects_kubernetes_accepts(kube_api: KubeAPI, example: str):
    folder = EXAMPLES / example
    objects, _ = rendered(folder / "values.yaml")
    manifests = example_manifests(folder)
    assert manifests, f"{example}: no manifests beside values.yaml"

    errors = kube_api.check([*objects, *manifests], NAMESPACE)
    assert not errors, "\n".join(errors)
