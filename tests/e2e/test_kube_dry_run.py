"""The Helm chart's manifests, checked by a real Kubernetes API server.

Every object is sent to kube-apiserver (``kube_api``: etcd and kube-apiserver built from
their Go modules, with the ingress controllers' CRDs from their own modules) as a create with
``dryRun=All&fieldValidation=Strict``: Kubernetes decodes, defaults, validates and admits it
as it would for a real install, and names the path of any field it does not know. The first
tests show that this checker fails where it should."""

from __future__ import annotations

import copy

from tests.support.kube import KubeAPI


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
    assert kube_api.check([deployment()], "checker-valid") == []


def test_an_unknown_field_is_rejected_by_its_path(kube_api: KubeAPI):
    bad = deployment()
    container = bad["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")

    errors = kube_api.check([bad], "checker-unknown-field")

    assert len(errors) == 1, errors
    assert "Deployment bridge: 400" in errors[0]
    assert 'unknown field "spec.template.spec.containers[0].readinesProbe"' in errors[0]


def test_a_wrong_type_is_rejected_by_its_path(kube_api: KubeAPI):
    bad = deployment()
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = [1]

    errors = kube_api.check([bad], "checker-wrong-type")

    assert len(errors) == 1, errors
    assert "readinessProbe.httpGet.port" in errors[0]


def test_a_custom_resource_is_checked_against_its_crds_schema(kube_api: KubeAPI):
    good = middleware({"address": "http://bridge.checker-crd.svc:4480/forward-auth"})
    bad = copy.deepcopy(good)
    bad["spec"]["forwardAuth"]["adress"] = bad["spec"]["forwardAuth"].pop("address")

    assert kube_api.check([good], "checker-crd") == []
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
    assert kube_api.check([pod, account], "checker-pod-with-account") == []
