"""deploy/kubernetes/: valid against the Kubernetes schemas (offline), and saying what docs/kubernetes.md promises.

kubernetes-validate ships the schemas of each Kubernetes release inside the package, so
this needs no cluster and no network. Strict mode refuses a misspelt field, which a cluster
would silently drop (a `readinesProbe` that is never run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy.settings import SETTINGS, Settings

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
KUBERNETES = "1.37.0"


def resources() -> list[dict[str, Any]]:
    return [
        document
        for path in MANIFESTS
        for document in yaml.safe_load_all(path.read_text())
        if document is not None
    ]


def find(kind: str, name: str) -> dict[str, Any]:
    (found,) = [r for r in resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {entry["name"]: entry.get("value", entry.get("valueFrom")) for entry in container["env"]}


def test_the_manifests_exist_and_each_resource_is_valid_against_the_schemas_strictly() -> None:
    assert MANIFESTS, "no manifests in deploy/kubernetes"
    kinds = sorted((r["kind"], r["metadata"]["name"]) for r in resources())
    assert kinds == [
        ("Deployment", "llm-gateway"),
        ("Deployment", "llm-gateway-redis"),
        ("PodDisruptionBudget", "llm-gateway"),
        ("Service", "llm-gateway"),
        ("Service", "llm-gateway-redis"),
    ]
    for resource in resources():
        kubernetes_validate.validate(resource, KUBERNETES, strict=True)


def test_the_validation_refuses_a_misspelt_field() -> None:
    broken = find("Deployment", "llm-gateway")
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_the_gateway_pod_probes_drains_runs_unprivileged_and_watches_its_secret() -> None:
    pod = find("Deployment", "llm-gateway")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(container)
    settings = Settings.from_env({k: v for k, v in env.items() if isinstance(v, str)})
    assert {entry for entry in env} <= {setting.variable for setting in SETTINGS}

    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + settings.shutdown_grace_seconds

    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert settings.log_to_file is False  # the log goes to stdout, nothing writes the root fs

    # keys.json from a Secret mounted as a directory (a subPath mount never gets updates),
    # watched so that an update of the Secret reloads without a restart.
    assert settings.keys_file_watch is True
    (keys,) = [m for m in container["volumeMounts"] if m["name"] == "keys"]
    assert "subPath" not in keys and keys["readOnly"] is True
    assert Path(settings.keys_file_path).parent == Path(keys["mountPath"])
    (volume,) = [v for v in pod["volumes"] if v["name"] == "keys"]
    assert volume["secret"]["secretName"]


def test_the_gateway_shares_quotas_through_the_redis_service() -> None:
    pod = find("Deployment", "llm-gateway")["spec"]["template"]["spec"]
    url = env_of(pod["containers"][0])["REDIS_URL"]
    redis_service = find("Service", "llm-gateway-redis")
    assert url.startswith(f"redis://{redis_service['metadata']['name']}:6379")
    redis_pod = find("Deployment", "llm-gateway-redis")["spec"]["template"]
    assert redis_service["spec"]["selector"].items() <= redis_pod["metadata"]["labels"].items()
    assert redis_pod["spec"]["securityContext"]["runAsNonRoot"] is True
    gateway_pod = find("Deployment", "llm-gateway")["spec"]["template"]
    for selecting in (find("Service", "llm-gateway"), find("PodDisruptionBudget", "llm-gateway")):
        selector = selecting["spec"]["selector"]
        labels = selector.get("matchLabels", selector)
        assert labels.items() <= gateway_pod["metadata"]["labels"].items()
    assert (
        not redis_service["spec"]["selector"].items() <= gateway_pod["metadata"]["labels"].items()
    )


def test_the_manifests_point_at_the_prometheus_alert_rules_that_exist() -> None:
    text = (ROOT / "deploy" / "kubernetes" / "gateway.yaml").read_text()
    assert "deploy/prometheus/alerts.yml" in text
    assert (ROOT / "deploy" / "prometheus" / "alerts.yml").exists()
    page = (ROOT / "docs" / "kubernetes.md").read_text()
    assert "# Running on Kubernetes" in page and "deploy/prometheus/alerts.yml" in page
