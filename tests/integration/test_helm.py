"""The Helm chart, rendered offline by Helm's own Go SDK and checked as a cluster would.

There is no cluster here. Instead every manifest of every `helm/ftune/ci/*-values.yaml` is
validated against the Kubernetes OpenAPI schemas with kubernetes-validate in strict mode
(unknown fields rejected), for the oldest Kubernetes the chart admits and the newest the
validator ships. KEDA's and the Prometheus Operator's custom resources have no bundled
schema; they are checked field by field below instead. Then the behaviour an operator
relies on is asserted: GPUs requested, secrets referenced and never inlined when an
existingSecret is given, probes, the worker's grace period, Redis AOF, the schema's errors.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, cast

import helm_python as helm
import pytest
import redis
from arq.connections import ArqRedis
from kubernetes_validate import utils as kv

from service import queue, tenants
from service.contract import DatasetRef, Job, JobSpec, JobStatus
from service.dev.localredis import free_port, server_binary
from service.settings import Settings, hash_api_key
from service.store import new_id
from tests.fixtures.helm_chart import (
    CHART,
    CI_VALUES,
    CUSTOM_KINDS,
    KUBE_VERSIONS,
    NAMESPACE,
    PREFIX,
    RELEASE,
    env_of,
    load_values,
    merged,
    render,
    secret_refs,
    validate,
)

# -- the chart as Helm and Kubernetes see it -------------------------------------------------


def test_ci_values_cover_the_documented_scenarios() -> None:
    names = {p.name for p in CI_VALUES}
    assert {
        "default-values.yaml",
        "external-redis-values.yaml",
        "keda-values.yaml",
        "ingress-values.yaml",
        "existing-secrets-values.yaml",
    } <= names


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.stem)
def test_helm_lint_is_clean(values_file: Path) -> None:
    """`helm lint --strict`: no errors and no warnings (only the 'icon is recommended' info)."""
    report = helm.lint(CHART, load_values(values_file.name), strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.stem)
def test_every_manifest_is_valid_kubernetes(
    chart: helm.Chart, values_file: Path, kube_version: str
) -> None:
    manifests = render(chart, load_values(values_file.name))
    assert manifests.objects
    for obj in manifests.objects:
        if (obj["apiVersion"], obj["kind"]) not in CUSTOM_KINDS:
            validate(obj, kube_version)


# Branches the ci/ files do not reach, each rendered and validated the same way.
OPTION_VARIANTS: dict[str, dict[str, Any]] = {
    "redis-without-auth-or-persistence": {
        "redis": {
            "auth": {"enabled": False},
            "persistence": {"enabled": False},
            "extraConfig": "maxclients 2000",
        }
    },
    "existing-claims-and-models-volume": {
        "api": {"mountModels": True},
        "store": {"persistence": {"existingClaim": "shared-store"}},
        "worker": {
            "cache": {"type": "persistentVolumeClaim", "existingClaim": "hf-cache"},
            "models": {"volume": {"persistentVolumeClaim": {"claimName": "base-models"}}},
        },
    },
    "pinned-digests-and-load-balancer": {
        "api": {
            "image": {"digest": "sha256:" + "a" * 64},
            "service": {"type": "LoadBalancer"},
            "podDisruptionBudget": {"enabled": False},
        },
        "worker": {"image": {"digest": "sha256:" + "b" * 64}, "livenessProbe": None},
        "serviceAccount": {"create": False, "name": "ml-runner"},
    },
}


@pytest.mark.parametrize("variant", OPTION_VARIANTS, ids=str)
def test_option_variants_are_valid_kubernetes(chart: helm.Chart, variant: str) -> None:
    manifests = render(chart, OPTION_VARIANTS[variant])
    for obj in manifests.objects:
        if (obj["apiVersion"], obj["kind"]) not in CUSTOM_KINDS:
            kv.validate(obj, KUBE_VERSIONS[1], strict=True)
    if variant == "redis-without-auth-or-persistence":
        sts = manifests.get("StatefulSet", f"{PREFIX}-redis")
        assert "volumeClaimTemplates" not in sts["spec"]
        assert "redis.persistence.enabled is false" in manifests.notes
        env = env_of(manifests.container("Deployment", f"{PREFIX}-api", "api"))
        assert env["FTUNE_REDIS_URL"]["value"] == f"redis://{PREFIX}-redis:6379/0"
    if variant == "existing-claims-and-models-volume":
        assert manifests.of_kind("PersistentVolumeClaim") == []
        pod = manifests.get("Deployment", f"{PREFIX}-worker")["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "base-models"
        assert volumes["store"]["persistentVolumeClaim"]["claimName"] == "shared-store"
        # The API reads the models' config.json to check a file:// job's GPU memory.
        api_pod = manifests.get("Deployment", f"{PREFIX}-api")["spec"]["template"]["spec"]
        api_volumes = {v["name"]: v for v in api_pod["volumes"]}
        assert api_volumes["models"]["persistentVolumeClaim"]["claimName"] == "base-models"
        mounts = {m["name"]: m for m in api_pod["containers"][0]["volumeMounts"]}
        assert mounts["models"] == {"name": "models", "mountPath": "/models", "readOnly": True}
        default_api = render(chart).get("Deployment", f"{PREFIX}-api")["spec"]["template"]
        assert "models" not in {v["name"] for v in default_api["spec"]["volumes"]}
    if variant == "pinned-digests-and-load-balancer":
        api = manifests.container("Deployment", f"{PREFIX}-api", "api")
        assert api["image"] == "ftune-api@sha256:" + "a" * 64
        assert manifests.of_kind("ServiceAccount") == []
        pod = manifests.get("Deployment", f"{PREFIX}-worker")["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "ml-runner"
        assert "livenessProbe" not in pod["containers"][0]


def test_the_validator_rejects_a_misspelled_field(chart: helm.Chart) -> None:
    """Control for the test above: strict validation does catch an unknown field."""
    deployment = render(chart).get("Deployment", f"{PREFIX}-api")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kv.ValidationError, match="livenesProbe"):
        kv.validate(deployment, KUBE_VERSIONS[1], strict=True)


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.stem)
def test_custom_resources_point_at_what_the_chart_renders(
    chart: helm.Chart, values_file: Path
) -> None:
    manifests = render(chart, load_values(values_file.name))
    services = {s["metadata"]["name"]: s for s in manifests.of_kind("Service")}
    for monitor in manifests.of_kind("ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        port = monitor["spec"]["endpoints"][0]["port"]
        matched = [
            s
            for s in services.values()
            if selector.items() <= s["metadata"]["labels"].items()
            and port in {p["name"] for p in s["spec"]["ports"]}
        ]
        assert len(matched) == 1, monitor["metadata"]["name"]
    auths = {a["metadata"]["name"] for a in manifests.of_kind("TriggerAuthentication")}
    for scaled in manifests.of_kind("ScaledObject") + manifests.of_kind("ScaledJob"):
        if scaled["kind"] == "ScaledObject":
            target = scaled["spec"]["scaleTargetRef"]
            assert target["kind"] == "Deployment"
            manifests.get("Deployment", target["name"])
        for trigger in scaled["spec"]["triggers"]:
            assert all(isinstance(v, str) for v in trigger["metadata"].values())
            if "authenticationRef" in trigger:
                assert trigger["authenticationRef"]["name"] in auths


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.stem)
def test_secret_references_resolve(chart: helm.Chart, values_file: Path) -> None:
    """A secretKeyRef to a Secret the chart renders names a key that Secret has."""
    manifests = render(chart, load_values(values_file.name))
    rendered = {s["metadata"]["name"]: s["data"] for s in manifests.of_kind("Secret")}
    for name, key in secret_refs(manifests):
        if name in rendered:
            assert key in rendered[name], (name, key)
    for obj in manifests.of_kind("Deployment"):
        for volume in obj["spec"]["template"]["spec"].get("volumes", []):
            secret = volume.get("secret")
            if secret and secret["secretName"] in rendered:
                for item in secret.get("items", []):
                    assert item["key"] in rendered[secret["secretName"]]


def test_resource_names_fit_63_characters(chart: helm.Chart) -> None:
    long_release = "a-very-long-release-name-for-the-fine-tuning-service"
    manifests = render(chart, name=long_release)
    names = [o["metadata"]["name"] for o in manifests.objects]
    assert all(len(n) <= 63 and not n.endswith("-") for n in names), names
    assert {n.rsplit("-", 1)[-1] for n in names} >= {"api", "worker", "redis"}


# -- schema -----------------------------------------------------------------------------------


def test_schema_rejects_a_wrong_type(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmValuesError, match="/worker/gpu/count': got string, want integer"):
        render(chart, {"worker": {"gpu": {"count": "two"}}})


def test_schema_rejects_an_unknown_key(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmValuesError, match="additional properties 'replicas' not allowed"):
        render(chart, {"api": {"replicas": 3}})
    with pytest.raises(helm.HelmValuesError, match="additional properties 'gpus' not allowed"):
        render(chart, {"worker": {"gpus": 1}})


def test_schema_rejects_bad_credentials_shapes(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmValuesError, match="does not match pattern"):
        render(chart, {"secrets": {"apiKeys": {"keys": {"not-a-sha256": {"tenant": "a"}}}}})
    with pytest.raises(helm.HelmValuesError, match="/redis/auth/password"):
        render(chart, {"redis": {"auth": {"password": "p@ss/word"}}})


def test_every_value_is_documented() -> None:
    """Each key in values.yaml has a `# --` comment above it, or is a section of such keys.

    Below a documented key everything is its default value (e.g. a probe object), not keys.
    """
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented, documented = [], 0
    value_indent: int | None = None
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][\w.]*):(.*)$", line)
        if not m:
            continue
        indent = len(m.group(1))
        if value_indent is not None and indent > value_indent:
            continue
        value_indent = None
        if lines[i - 1].strip().startswith("# --"):
            documented += 1
            value_indent = indent
        elif m.group(3).strip():
            undocumented.append(m.group(2))
    assert undocumented == []
    assert documented > 100


# -- GPU workers --------------------------------------------------------------------------------


def test_worker_requests_its_gpus(chart: helm.Chart) -> None:
    manifests = render(chart)
    worker = manifests.container("Deployment", f"{PREFIX}-worker", "worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    # Memory requests equal limits; the emptyDir volumes' sizes are requested as node disk
    # (scratch 200Gi + /tmp 8Gi + cache 200Gi).
    assert worker["resources"]["requests"]["memory"] == "48Gi"
    assert worker["resources"]["limits"]["memory"] == "48Gi"
    assert worker["resources"]["requests"]["ephemeral-storage"] == f"{408 * 1024}Mi"
    pod = manifests.get("Deployment", f"{PREFIX}-worker")["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert "nvidia.com/gpu" not in str(manifests.get("Deployment", f"{PREFIX}-api"))

    other = render(
        chart,
        {
            "worker": {
                "gpu": {"count": 2, "resourceName": "amd.com/gpu"},
                "runtimeClassName": "nvidia",
                "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
            }
        },
    )
    pod = other.get("Deployment", f"{PREFIX}-worker")["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["amd.com/gpu"] == resources["requests"]["amd.com/gpu"] == 2
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}


def test_gpu_helper_refuses_without_a_gpu_even_past_the_schema(tmp_path: Path) -> None:
    """`helm install --skip-schema-validation` still meets the template's own messages."""
    unchecked = tmp_path / "ftune"
    shutil.copytree(CHART, unchecked)
    (unchecked / "values.schema.json").unlink()
    with helm.Chart.load(unchecked) as bare:
        with pytest.raises(
            helm.HelmRenderError, match=re.escape("worker.gpu.count must be at least 1")
        ):
            render(bare, {"worker": {"gpu": {"count": 0}}})
        with pytest.raises(
            helm.HelmRenderError, match=re.escape("worker.gpu.resourceName is required")
        ):
            render(bare, {"worker": {"gpu": {"resourceName": ""}}})
        with pytest.raises(helm.HelmRenderError, match=re.escape("worker.gpu.count is required")):
            render(bare, {"worker": {"gpu": {"count": None}}})


def test_worker_grace_period_covers_its_graceful_stop(chart: helm.Chart) -> None:
    deployment = render(chart).get("Deployment", f"{PREFIX}-worker")
    pod = deployment["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    env = env_of(pod["containers"][0])
    # Long enough for a checkpoint at SIGTERM; the worker's own wait for it is shorter, so
    # re-queueing the job fits in the rest.
    assert grace == 180
    settings = Settings.from_env(
        {"FTUNE_WORKER_GRACE_SECONDS": env["FTUNE_WORKER_GRACE_SECONDS"]["value"]}
    )
    assert settings.worker_grace_seconds == 150
    # An upgrade never asks for GPUs beyond those the old pods hold.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0

    longer = render(
        chart, {"worker": {"terminationGracePeriodSeconds": 600, "stopGraceSeconds": 540}}
    )
    pod = longer.get("Deployment", f"{PREFIX}-worker")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 600
    assert env_of(pod["containers"][0])["FTUNE_WORKER_GRACE_SECONDS"]["value"] == "540"
    with pytest.raises(helm.HelmRenderError, match=re.escape("worker.stopGraceSeconds (180)")):
        render(chart, {"worker": {"stopGraceSeconds": 180}})


def test_the_apis_shutdown_grace_can_be_raised_for_long_uploads(chart: helm.Chart) -> None:
    """A rollout must not cut off a 2 GB upload: the pod's grace and the API's own wait for
    open requests are set together, the API's the shorter."""
    default = render(chart).get("Deployment", f"{PREFIX}-api")["spec"]["template"]["spec"]
    assert default["terminationGracePeriodSeconds"] == 30
    grace = env_of(default["containers"][0])["FTUNE_API_GRACE_SECONDS"]["value"]
    assert Settings.from_env({"FTUNE_API_GRACE_SECONDS": grace}).api_grace_seconds == 20
    longer = render(chart, {"api": {"terminationGracePeriodSeconds": 300, "stopGraceSeconds": 280}})
    pod = longer.get("Deployment", f"{PREFIX}-api")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 300
    assert env_of(pod["containers"][0])["FTUNE_API_GRACE_SECONDS"]["value"] == "280"
    with pytest.raises(helm.HelmRenderError, match=re.escape("api.stopGraceSeconds (30)")):
        render(chart, {"api": {"stopGraceSeconds": 30}})
    with pytest.raises(helm.HelmRenderError, match=re.escape("api.preStopSeconds (10)")):
        render(chart, {"api": {"preStopSeconds": 10}})  # 10 + 20 s leave nothing of 30


def test_a_stopping_api_pod_serves_until_its_endpoint_is_gone(chart: helm.Chart) -> None:
    """uvicorn refuses new connections once signalled, while the ingress and kube-proxy still
    route to the pod: a preStop sleep keeps it serving until its endpoint is removed, so a
    rollout drops no request. The sleep fits in the grace with the API's own wait."""
    pod = render(chart).get("Deployment", f"{PREFIX}-api")["spec"]["template"]["spec"]
    [api] = pod["containers"]
    assert api["lifecycle"] == {"preStop": {"exec": {"command": ["sleep", "5"]}}}
    wait = int(env_of(api)["FTUNE_API_GRACE_SECONDS"]["value"])
    assert 5 + wait < pod["terminationGracePeriodSeconds"]
    none = render(chart, {"api": {"preStopSeconds": 0}}).get("Deployment", f"{PREFIX}-api")
    assert "lifecycle" not in none["spec"]["template"]["spec"]["containers"][0]


def test_worker_filesystem_is_read_only_with_writable_volumes(chart: helm.Chart) -> None:
    manifests = render(chart, load_values("keda-values.yaml"))
    pod = manifests.worker_pod()["spec"]
    worker = pod["containers"][0]
    assert worker["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    # A 500Gi shared model cache is not re-owned file by file at every pod (every job) start.
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
    env = env_of(worker)
    for var in ("HF_HOME", "FTUNE_WORK_DIR", "HOME"):
        path = env[var]["value"]
        assert any(path.startswith(m) for m in mounts), (var, path)
    assert mounts["/dev/shm"] == "dshm"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == f"{PREFIX}-worker-cache"
    pvc = manifests.get("PersistentVolumeClaim", f"{PREFIX}-worker-cache")
    assert pvc["spec"]["storageClassName"] == "fast-rwx"


# -- API -------------------------------------------------------------------------------------------


def test_api_probes_and_security(chart: helm.Chart) -> None:
    manifests = render(chart)
    api = manifests.container("Deployment", f"{PREFIX}-api", "api")
    assert api["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert api["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in api["ports"]
    assert api["args"] == ["api", "--host", "0.0.0.0", "--port", "8000"]
    assert api["securityContext"]["readOnlyRootFilesystem"] is True
    assert "nvidia.com/gpu" not in str(api["resources"])
    assert manifests.get("PodDisruptionBudget", f"{PREFIX}-api")["spec"]["maxUnavailable"] == 1


def test_ingress_and_autoscaling(chart: helm.Chart) -> None:
    manifests = render(chart, load_values("ingress-values.yaml"))
    ingress = manifests.get("Ingress", f"{PREFIX}-api")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{PREFIX}-api", "port": {"number": 8000}}
    assert ingress["spec"]["tls"][0]["secretName"] == "ftune-tls"
    hpa = manifests.get("HorizontalPodAutoscaler", f"{PREFIX}-api")
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}
    assert "replicas" not in manifests.get("Deployment", f"{PREFIX}-api")["spec"]
    # Where the ingress routes: these values route /v1 and /ui, not /docs (a 404 was shown).
    assert "https://ftune.example.com/ui/" in manifests.notes


def test_pod_environment_is_what_settings_reads(chart: helm.Chart) -> None:
    """The env the chart gives each pod, read by the app's own Settings.from_env."""
    manifests = render(chart, load_values("ingress-values.yaml"))

    def settings_of(kind: str, name: str, container: str) -> Settings:
        env: dict[str, str] = {}
        for e in manifests.container(kind, name, container)["env"]:
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            value = f"secret-{ref['key']}" if ref else e["value"]
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], value)
        return Settings.from_env(env)

    api = settings_of("Deployment", f"{PREFIX}-api", "api")
    assert api.redis_url == f"redis://:secret-redis-password@{PREFIX}-redis:6379/0"
    assert api.store_url == "file:///var/lib/ftune/store"
    assert api.queue_name == "ftune:queue"
    assert api.max_dataset_bytes == 2 * 1024**3
    assert api.models_dir == Path("/models")
    assert api.api_keys_file == Path("/etc/ftune/api-keys/keys.json")
    assert api.max_concurrent_uploads == 2

    worker = settings_of("Deployment", f"{PREFIX}-worker", "worker")
    assert worker.redis_url == api.redis_url
    assert worker.device == "cuda"
    assert worker.worker_metrics_port == 9100
    assert worker.hf_home == Path("/var/cache/ftune/huggingface")
    assert worker.work_dir == Path("/var/lib/ftune/work")
    assert worker.hf_tokens == {"": "secret-HF_TOKEN", "research": "secret-FTUNE_HF_TOKEN_RESEARCH"}
    assert worker.job_timeout_hours == 48 and worker.max_attempts == 3
    assert worker.job_retention_days == api.job_retention_days == 30
    assert worker.worker_grace_seconds == 150


# -- secrets -----------------------------------------------------------------------------------


def test_inline_api_keys_become_a_keys_file_the_api_accepts(
    chart: helm.Chart, tmp_path: Path
) -> None:
    manifests = render(chart, load_values("ingress-values.yaml"))
    secret = manifests.get("Secret", f"{PREFIX}-api-keys")
    keys_file = tmp_path / "keys.json"
    keys_file.write_bytes(base64.b64decode(secret["data"]["keys.json"]))
    principals = tenants.load(Settings(api_keys_file=keys_file)).keys
    assert principals[hash_api_key("test")].tenant == "search"
    assert principals[hash_api_key("hello world")].admin is True

    pod = manifests.get("Deployment", f"{PREFIX}-api")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == f"{PREFIX}-api-keys"
    hf = manifests.get("Secret", f"{PREFIX}-hf")["data"]
    assert base64.b64decode(hf["FTUNE_HF_TOKEN_RESEARCH"]) == b"hf_inline_research_token"


def test_a_tenants_file_reaches_the_api_and_the_workers(chart: helm.Chart, tmp_path: Path) -> None:
    team = {
        "keys": [{"sha256": hash_api_key("k"), "admin": False}],
        "grants": {"hub_tokens": ["search"], "s3_write": ["s3://search-out/"]},
        "limits": {"queued_jobs": 5},
    }
    values = {"secrets": {"apiKeys": {"keys": {"tenants": {"search": team}}}}}
    manifests = render(chart, values)
    secret = manifests.get("Secret", f"{PREFIX}-api-keys")
    keys_file = tmp_path / "tenants.json"
    keys_file.write_bytes(base64.b64decode(secret["data"]["keys.json"]))
    known = tenants.load(Settings(api_keys_file=keys_file))
    assert known.keys[hash_api_key("k")].tenant == "search"
    assert known.grants_of("search").hub_tokens == ("search",)
    for component in ("api", "worker"):
        pod = manifests.get("Deployment", f"{PREFIX}-{component}")["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["FTUNE_API_KEYS_FILE"] == "/etc/ftune/api-keys/keys.json"
        volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
        assert volume["secret"]["secretName"] == f"{PREFIX}-api-keys"


def test_existing_secrets_are_referenced_never_inlined(chart: helm.Chart) -> None:
    values = load_values("existing-secrets-values.yaml")
    manifests = render(chart, values)
    assert manifests.of_kind("Secret") == []
    for inline in (
        "inlineRedisPasswordMustNotRender",
        "hf_inline_token_must_not_render",
        "AKIA_INLINE_MUST_NOT_RENDER",
        "inline-s3-secret-must-not-render",
    ):
        assert inline not in manifests.text
        assert base64.b64encode(inline.encode()).decode() not in manifests.text

    worker = env_of(manifests.worker_pod()["spec"]["containers"][0])
    expected = {
        "HF_TOKEN": ("ops-hf", "token"),
        "FTUNE_HF_TOKEN_RESEARCH": ("ops-hf-research", "token"),
        "AWS_ACCESS_KEY_ID": ("ops-s3", "access-key"),
        "AWS_SECRET_ACCESS_KEY": ("ops-s3", "secret-key"),
        "FTUNE_REDIS_PASSWORD": ("ops-redis", "password"),
    }
    for var, (name, key) in expected.items():
        assert worker[var]["valueFrom"]["secretKeyRef"] == {"name": name, "key": key}, var
    assert {n for n, _ in secret_refs(manifests)} == {
        "ops-redis",
        "ops-s3",
        "ops-hf",
        "ops-hf-research",
    }

    api_pod = manifests.get("Deployment", f"{PREFIX}-api")["spec"]["template"]["spec"]
    volume = next(v for v in api_pod["volumes"] if v["name"] == "api-keys")
    assert volume["secret"] == {
        "secretName": "ops-ftune-api-keys",
        "items": [{"key": "api-keys.json", "path": "api-keys.json"}],
    }
    api_env = env_of(api_pod["containers"][0])
    assert api_env["FTUNE_API_KEYS_FILE"]["value"] == "/etc/ftune/api-keys/api-keys.json"
    # The API imports datasets from the Hub and its scheduler publishes promoted models: it
    # gets the Hub tokens by reference too, also when the scheduler runs elsewhere.
    assert api_env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "ops-hf", "key": "token"}
    no_scheduler = render(
        chart,
        {
            **values,
            "api": {**values.get("api", {}), "scheduler": {"enabled": False, "intervalSeconds": 5}},
        },
    )
    api_alone = no_scheduler.get("Deployment", f"{PREFIX}-api")["spec"]["template"]["spec"]
    alone_env = env_of(api_alone["containers"][0])
    assert alone_env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "ops-hf", "key": "token"}

    redis_env = env_of(manifests.container("StatefulSet", f"{PREFIX}-redis", "redis"))
    assert redis_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "ops-redis"
    auth = manifests.get("TriggerAuthentication", f"{PREFIX}-worker")
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "ops-redis", "key": "password"}
    ]


def test_no_password_and_no_cluster_fails_saying_what_to_set(chart: helm.Chart) -> None:
    """`helm template` / Argo CD: no cluster to read the generated password back from, so a
    new random one on each render would lock the running pods out; the render refuses."""
    with pytest.raises(helm.HelmRenderError) as failed:
        chart.render({}, name=RELEASE, namespace=NAMESPACE)
    message = str(failed.value)
    assert "set redis.auth.password" in message
    assert "redis.auth.existingSecret" in message
    # Either answer renders, and the same way twice.
    for values in ({"redis": {"auth": {"existingSecret": "ops-redis"}}}, {}):
        first = render(chart, values).text
        assert render(chart, values).text == first
    secret = render(chart).get("Secret", f"{PREFIX}-redis")
    assert base64.b64decode(secret["data"]["redis-password"]) == b"ci-password-not-a-secret"


# -- Redis -------------------------------------------------------------------------------------


def test_bundled_redis_persists_with_aof(chart: helm.Chart) -> None:
    manifests = render(chart)
    conf = manifests.get("ConfigMap", f"{PREFIX}-redis")["data"]["redis.conf"]
    directives = {
        line.split()[0]: line.split()[1:]
        for line in conf.splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert directives["appendonly"] == ["yes"]
    assert directives["appendfsync"] == ["everysec"]
    assert directives["maxmemory-policy"] == ["noeviction"]
    assert directives["dir"] == ["/data"]

    sts = manifests.get("StatefulSet", f"{PREFIX}-redis")
    redis_c = sts["spec"]["template"]["spec"]["containers"][0]
    assert redis_c["args"][0] == "/etc/redis/redis.conf"
    assert {"name": "data", "mountPath": "/data"} in redis_c["volumeMounts"]
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"


def test_rendered_redis_config_runs_on_a_real_server(chart: helm.Chart, tmp_path: Path) -> None:
    """Start redis-server as the StatefulSet does: its config file and its arguments, with the
    pod's mounts (/etc/redis, /data) mapped to temporary directories."""
    manifests = render(chart, {"redis": {"auth": {"password": "s3cret-pw"}}})
    data = tmp_path / "data"
    data.mkdir()
    conf = tmp_path / "redis.conf"
    text = manifests.get("ConfigMap", f"{PREFIX}-redis")["data"]["redis.conf"]
    conf.write_text(text.replace("dir /data", f"dir {data}"))
    container = manifests.container("StatefulSet", f"{PREFIX}-redis", "redis")
    assert container["command"] == ["redis-server"]
    args = [str(conf) if a == "/etc/redis/redis.conf" else a for a in container["args"]]
    args = [a.replace("$(REDIS_PASSWORD)", "s3cret-pw") for a in args]
    port = free_port()
    overrides = ["--port", str(port), "--bind", "127.0.0.1"]
    process = subprocess.Popen(
        [server_binary(), *args, *overrides], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    client = redis.Redis(port=port, password="s3cret-pw", socket_connect_timeout=0.2)
    try:
        with client:
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if process.poll() is not None:
                        output = process.stdout.read().decode() if process.stdout else ""
                        pytest.fail(f"redis-server refused the rendered config:\n{output}")
                    assert time.monotonic() < deadline, "redis-server did not start"
                    time.sleep(0.05)
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
            # 75% of the 4Gi container limit: writes fail before the kernel kills Redis.
            assert client.config_get("maxmemory") == {"maxmemory": str(3 * 1024**3)}
            assert client.config_get("protected-mode") == {"protected-mode": "yes"}
            client.set("job:1", "queued")
            assert list(data.glob("appendonly*")), "no AOF file written"
            with pytest.raises(redis.AuthenticationError):
                redis.Redis(port=port).get("job:1")
    finally:
        process.terminate()
        process.wait(10)


def test_external_redis_url_stays_in_a_secret(chart: helm.Chart) -> None:
    manifests = render(chart, load_values("external-redis-values.yaml"))
    assert manifests.of_kind("StatefulSet") == []
    url_secret = manifests.get("Secret", f"{PREFIX}-redis-url")
    assert base64.b64decode(url_secret["data"]["redis-url"]) == (
        b"rediss://:s3cr3t@redis.example.internal:6380/2"
    )
    for name in ("api", "worker"):
        env = env_of(manifests.container("Deployment", f"{PREFIX}-{name}", name))
        assert env["FTUNE_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": f"{PREFIX}-redis-url",
            "key": "redis-url",
        }
        assert env["FTUNE_STORE_URL"]["value"] == "s3://ftune-bucket/prod"
        assert env["FTUNE_S3_ENDPOINT_URL"]["value"] == "https://minio.example.internal"
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == f"{PREFIX}-s3"
    assert "s3cr3t" not in str(manifests.of_kind("Deployment"))
    # s3:// store: no shared volume.
    assert manifests.of_kind("PersistentVolumeClaim") == []

    existing = render(chart, load_values("external-redis-existing-secret-values.yaml"))
    env = env_of(existing.container("Deployment", f"{PREFIX}-api", "api"))
    assert env["FTUNE_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "ops-redis-url",
        "key": "url",
    }
    assert existing.of_kind("Secret") == []


def test_misconfigurations_fail_with_a_message(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape("store.persistence.enabled is false")):
        render(chart, {"store": {"persistence": {"enabled": False}}})
    with pytest.raises(helm.HelmRenderError, match="no external Redis is set"):
        render(chart, {"redis": {"enabled": False}})
    with pytest.raises(helm.HelmRenderError, match=re.escape("set worker.keda.redis.address")):
        render(
            chart,
            {
                "redis": {"enabled": False, "external": {"url": "redis://r:6379/0"}},
                "worker": {"keda": {"enabled": True}},
            },
        )


# -- KEDA --------------------------------------------------------------------------------------

# What KEDA's redis scaler runs to measure a "list": it dispatches on the key's TYPE, so a
# sorted set is counted with ZCARD (same logic as kedacore/keda pkg/scalers/redis_scaler.go).
KEDA_LENGTH = """
local kind = redis.call('TYPE', KEYS[1]).ok
local count = {zset = 'ZCARD', set = 'SCARD', list = 'LLEN', hash = 'HLEN', none = 'LLEN'}
return redis.call(count[kind], KEYS[1])
"""


async def keda_length(pool: ArqRedis, key: str) -> int:
    return int(await cast(Awaitable[Any], pool.eval(KEDA_LENGTH, 1, key)))


def queued_job(tenant: str) -> Job:
    return Job(
        id=new_id("job"),
        tenant=tenant,
        status=JobStatus.queued,
        spec=JobSpec(base_model="org/model", dataset_id="ds_x"),
        dataset=DatasetRef(id="ds_x", sha256="0" * 64, rows=1, format="standard"),
        created_at=time.time(),
        updated_at=time.time(),
    )


async def test_keda_trigger_counts_the_arq_queue(chart: helm.Chart, redis_url: str) -> None:
    manifests = render(chart, load_values("keda-values.yaml"))
    assert manifests.of_kind("Deployment") == [manifests.get("Deployment", f"{PREFIX}-api")]
    scaled = manifests.get("ScaledJob", f"{PREFIX}-worker")
    assert scaled["spec"]["maxReplicaCount"] == 8
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "redis"
    meta = trigger["metadata"]
    assert meta["address"] == f"{PREFIX}-redis.{NAMESPACE}.svc:6379"
    assert meta["listName"] == Settings().queue_name
    assert meta["listLength"] == "1"
    auth = manifests.get("TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth["spec"]["secretTargetRef"][0]["name"] == f"{PREFIX}-redis"

    pool = await queue.connect(redis_url)
    try:
        assert await keda_length(pool, meta["listName"]) == 0
        for tenant in ("team-a", "team-b"):
            await queue.enqueue(pool, queued_job(tenant), queue_name=meta["listName"])
        assert await pool.type(meta["listName"]) == b"zset"
        assert await keda_length(pool, meta["listName"]) == 2
    finally:
        await pool.aclose()


def test_keda_prometheus_trigger(chart: helm.Chart) -> None:
    manifests = render(chart, load_values("external-redis-existing-secret-values.yaml"))
    trigger = manifests.get("ScaledJob", f"{PREFIX}-worker")["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    # This release's queue only: another release's, in the same Prometheus, is not its work.
    assert trigger["metadata"]["query"] == f'max(ftune_queue_depth{{namespace="{NAMESPACE}"}})'
    mine = render(
        chart,
        merged(
            load_values("external-redis-existing-secret-values.yaml"),
            {"worker": {"keda": {"prometheus": {"query": "max(my_depth)"}}}},
        ),
    )
    assert (
        mine.get("ScaledJob", f"{PREFIX}-worker")["spec"]["triggers"][0]["metadata"]["query"]
        == "max(my_depth)"
    )
    assert trigger["metadata"]["threshold"] == "1"
    assert manifests.of_kind("TriggerAuthentication") == []
