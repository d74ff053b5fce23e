"""The chart against the ordinary events of a cluster, and what an operator runs beside it.

Who may reach Redis (NetworkPolicy), what keeps autoscalers off a training node, which
changes restart which pods, the KEDA modes that never stop a busy worker, renders that do
not change between runs, the Ingress of 2 GB uploads and long event streams, and the
alerts, dashboard and `helm test` pod: rendered by Helm's SDK, validated as Kubernetes
objects, and where a rendered command can run here (the burst worker, the pre-warm script,
the test pod) it is run.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import promql_parser
import pytest
import yaml

from service import queue, webhooks
from service.api import request_metrics
from service.api.spool import MAX_FORM_OVERHEAD
from service.contract import DatasetRef, Job, JobSpec, JobStatus
from service.metrics import ServiceCollector, WorkerMetrics
from service.store import new_id
from tests.fixtures.helm_chart import (
    CHART,
    CI_VALUES,
    NAMESPACE,
    PREFIX,
    RELEASE,
    Manifests,
    env_of,
    load_values,
    render,
    validate,
)
from tools import chart_readme

ROOT = CHART.parents[1]


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


# -- who reaches Redis -------------------------------------------------------------------------


def test_network_policy_admits_only_the_api_and_the_workers(chart: helm.Chart) -> None:
    manifests = render(chart)
    policy = manifests.get("NetworkPolicy", f"{PREFIX}-redis")
    validate(policy)
    redis_pod = manifests.get("StatefulSet", f"{PREFIX}-redis")["spec"]["template"]
    assert labels_match(
        policy["spec"]["podSelector"]["matchLabels"], redis_pod["metadata"]["labels"]
    )
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    selectors = [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
    admitted = {
        name
        for name in ("api", "worker")
        if any(
            labels_match(
                s,
                manifests.get("Deployment", f"{PREFIX}-{name}")["spec"]["template"]["metadata"][
                    "labels"
                ],
            )
            for s in selectors
        )
    }
    assert admitted == {"api", "worker"}
    # The helm test pod does not talk to Redis, and no other pod label is admitted.
    test_pod = manifests.get("Pod", f"{PREFIX}-test")
    assert not any(labels_match(s, test_pod["metadata"]["labels"]) for s in selectors)

    # KEDA's operator reads the queue length for its redis trigger, from its own namespace.
    keda = render(chart, load_values("keda-values.yaml")).get("NetworkPolicy", f"{PREFIX}-redis")
    namespaces = [
        p["namespaceSelector"]
        for p in keda["spec"]["ingress"][0]["from"]
        if "namespaceSelector" in p
    ]
    assert namespaces == [{"matchLabels": {"kubernetes.io/metadata.name": "keda"}}]
    assert render(chart, {"networkPolicy": {"enabled": False}}).of_kind("NetworkPolicy") == []


def test_redis_without_a_password_needs_the_network_policy(chart: helm.Chart) -> None:
    conf = render(chart).get("ConfigMap", f"{PREFIX}-redis")["data"]["redis.conf"]
    assert "protected-mode no" not in conf  # a password is required: protected mode stays on
    open_conf = render(chart, {"redis": {"auth": {"enabled": False}}}).get(
        "ConfigMap", f"{PREFIX}-redis"
    )["data"]["redis.conf"]
    assert "protected-mode no" in open_conf  # only with the NetworkPolicy in front of it
    with pytest.raises(helm.HelmRenderError, match="any pod in the cluster could read"):
        render(chart, {"redis": {"auth": {"enabled": False}}, "networkPolicy": {"enabled": False}})


# -- worker pods and the autoscalers ------------------------------------------------------------


@pytest.mark.parametrize("values_file", ["default-values.yaml", "keda-values.yaml"])
def test_worker_pods_carry_the_eviction_annotations(chart: helm.Chart, values_file: str) -> None:
    annotations = render(chart, load_values(values_file)).worker_pod()["metadata"]["annotations"]
    assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    assert annotations["karpenter.sh/do-not-disrupt"] == "true"
    api = render(chart).get("Deployment", f"{PREFIX}-api")["spec"]["template"]["metadata"]
    assert "karpenter.sh/do-not-disrupt" not in api["annotations"]
    off = render(chart, {"worker": {"protectFromDisruption": False}}).worker_pod()
    assert "karpenter.sh/do-not-disrupt" not in off["metadata"]["annotations"]


def test_worker_memory_is_never_overcommitted(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape("requests.memory (32Gi) must equal")):
        render(chart, {"worker": {"resources": {"requests": {"memory": "32Gi"}}}})
    only_limit = render(
        chart, {"worker": {"resources": {"requests": {"cpu": "8", "memory": None}}}}
    )
    resources = only_limit.worker_pod()["spec"]["containers"][0]["resources"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"] == "48Gi"
    # A cache on a claim takes no node disk; a request you give is kept.
    pvc_cache = render(chart, {"worker": {"cache": {"type": "persistentVolumeClaim"}}})
    requests = pvc_cache.worker_pod()["spec"]["containers"][0]["resources"]["requests"]
    assert requests["ephemeral-storage"] == f"{208 * 1024}Mi"
    given = render(chart, {"worker": {"resources": {"requests": {"ephemeral-storage": "1Ti"}}}})
    requests = given.worker_pod()["spec"]["containers"][0]["resources"]["requests"]
    assert requests["ephemeral-storage"] == "1Ti"


# -- renders and restarts -------------------------------------------------------------------------


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.stem)
def test_two_renders_with_the_same_values_are_identical(
    chart: helm.Chart, values_file: Path
) -> None:
    """What Argo CD and `helm diff` compare: nothing random, nothing time-dependent."""
    values = load_values(values_file.name)
    first = render(chart, values)
    assert first.rendered == render(chart, values).rendered
    assert not re.search(r"^[ \t]+$", first.text, re.M), "whitespace-only lines"


def checksums(manifests: Manifests) -> dict[str, str]:
    pods = {
        "api": manifests.get("Deployment", f"{PREFIX}-api")["spec"]["template"],
        "worker": manifests.worker_pod(),
        "redis": manifests.get("StatefulSet", f"{PREFIX}-redis")["spec"]["template"],
    }
    return {name: pod["metadata"]["annotations"]["checksum/secrets"] for name, pod in pods.items()}


def test_a_secret_change_restarts_only_the_pods_that_mount_it(chart: helm.Chart) -> None:
    base = load_values("ingress-values.yaml")
    before = checksums(render(chart, base))

    def changed(over: dict[str, Any]) -> set[str]:
        after = checksums(render(chart, {**base, **over}))
        return {name for name in before if after[name] != before[name]}

    new_key = {"0" * 64: {"tenant": "new-team", "admin": False}}
    keys = {**base["secrets"]["apiKeys"]["keys"], **new_key}
    # Adding an API key or a webhook secret: the API only, no GPU worker stops training.
    assert changed({"secrets": {**base["secrets"], "apiKeys": {"keys": keys}}}) == {"api"}
    hooks = {"secrets": {"search": "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"}}
    assert changed({"secrets": {**base["secrets"], "webhooks": hooks}}) == {"api"}
    # A Hub token: the workers, and the API, which imports datasets from the Hub (and whose
    # scheduler publishes promoted models): also with the scheduler elsewhere.
    hf = {"value": "hf_rotated"}
    assert changed({"secrets": {**base["secrets"], "hfToken": hf}}) == {"api", "worker"}
    alone = {**base, "api": {**base.get("api", {}), "scheduler": {"enabled": False}}}
    before_alone = checksums(render(chart, alone))
    rotated = checksums(render(chart, {**alone, "secrets": {**base["secrets"], "hfToken": hf}}))
    assert rotated["api"] != before_alone["api"]
    # The Redis password: everyone who connects, and Redis itself.
    password = {"auth": {"password": "rotated-password"}}
    assert changed({"redis": password}) == {"api", "worker", "redis"}


def test_a_chart_upgrade_that_changes_no_pod_restarts_none(
    chart: helm.Chart, tmp_path: Path
) -> None:
    """A new chart version with the same image and values: no pod template changes, so neither
    Redis (every API pod unready while its AOF replays) nor a training job restarts. The
    chart's version was in the pods' labels and in Redis' config checksum."""
    bumped_dir = tmp_path / "ftune"
    shutil.copytree(CHART, bumped_dir)
    meta = bumped_dir / "Chart.yaml"
    meta.write_text(meta.read_text().replace("\nversion: 0.1.0\n", "\nversion: 0.1.1\n"))
    values = load_values("keda-values.yaml")

    def pods(manifests: Manifests) -> dict[str, Any]:
        return {
            "api": manifests.get("Deployment", f"{PREFIX}-api")["spec"]["template"],
            "worker": manifests.worker_pod(),
            "redis": manifests.get("StatefulSet", f"{PREFIX}-redis")["spec"]["template"],
        }

    before = render(chart, values)
    with helm.Chart.load(bumped_dir) as bumped:
        after = render(bumped, values)
    assert (
        after.get("ConfigMap", f"{PREFIX}-redis")["metadata"]["labels"]["helm.sh/chart"]
        == "ftune-0.1.1"
    )  # the other objects say which chart made them
    assert pods(after) == pods(before)


# -- KEDA ----------------------------------------------------------------------------------------

# ScaledJob spec fields (KEDA v2, keda.sh/v1alpha1): the CRD has no schema here.
SCALED_JOB_FIELDS = {
    "jobTargetRef",
    "pollingInterval",
    "maxReplicaCount",
    "minReplicaCount",
    "successfulJobsHistoryLimit",
    "failedJobsHistoryLimit",
    "rollout",
    "scalingStrategy",
    "triggers",
    "envSourceContainerName",
    "rolloutStrategy",
}


def test_scaled_job_mode_renders_and_validates(chart: helm.Chart) -> None:
    manifests = render(chart, load_values("keda-values.yaml"))
    assert [d["metadata"]["name"] for d in manifests.of_kind("Deployment")] == [f"{PREFIX}-api"]
    scaled = manifests.get("ScaledJob", f"{PREFIX}-worker")
    spec = scaled["spec"]
    assert set(spec) <= SCALED_JOB_FIELDS
    # KEDA's default scaling strategy, by leaving it out: KEDA 2.20.0 and 2.20.1's CRD refuse
    # `strategy: default` spelled out (kedacore/charts#875), and the install failed.
    assert "scalingStrategy" not in spec
    # Its job template is a batch/v1 JobSpec: validated as one, strictly.
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"{PREFIX}-worker"},
        "spec": spec["jobTargetRef"],
    }
    validate(job)
    assert spec["jobTargetRef"]["backoffLimit"] == 0
    pod = spec["jobTargetRef"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["containers"][0]["args"] == ["worker", "--burst"]
    # An upgrade lets running Jobs finish; one Job per queued job.
    assert spec["rollout"] == {"strategy": "gradual"}
    assert spec["triggers"][0]["metadata"]["listLength"] == "1"
    assert "one Kubernetes Job per queued job" in manifests.notes


def unstored_job(tenant: str) -> Job:
    return Job(
        id=new_id("job"),
        tenant=tenant,
        status=JobStatus.queued,
        spec=JobSpec(base_model="org/model", dataset_id="ds_x"),
        dataset=DatasetRef(id="ds_x", sha256="0" * 64, rows=1, format="standard"),
        created_at=time.time(),
        updated_at=time.time(),
    )


async def test_the_burst_worker_trains_one_job_and_exits(chart: helm.Chart, redis_url: str) -> None:
    """The ScaledJob pod's command, run: it takes one job off the queue and exits 0."""
    manifests = render(chart, load_values("keda-values.yaml"))
    args = manifests.worker_pod()["spec"]["containers"][0]["args"]
    name = manifests.get("ScaledJob", f"{PREFIX}-worker")["spec"]["triggers"][0]["metadata"][
        "listName"
    ]
    pool = await queue.connect(redis_url)
    try:
        # Jobs with no record in the store: the worker picks each in turn and skips it, fast.
        for tenant in ("team-a", "team-b"):
            await queue.enqueue(pool, unstored_job(tenant), queue_name=name)
        env = {
            **os.environ,
            "FTUNE_REDIS_URL": redis_url,
            "FTUNE_QUEUE_NAME": name,
            "FTUNE_WORKER_METRICS_PORT": "0",
            "FTUNE_LOG_FORMAT": "text",
        }
        cli = [sys.executable, "-m", "service.cli", *args]
        done = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        assert await pool.zcard(name) == 1  # one job per pod: the other waits for the next pod
        done = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        assert await pool.zcard(name) == 0
    finally:
        await pool.aclose()


def test_scaled_object_mode_only_scales_down_an_empty_queue(chart: helm.Chart) -> None:
    manifests = render(chart, load_values("keda-scaledobject-values.yaml"))
    scaled = manifests.get("ScaledObject", f"{PREFIX}-worker")
    scale_down = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"][
        "scaleDown"
    ]
    assert scale_down == {"selectPolicy": "Disabled"}
    assert scaled["spec"]["minReplicaCount"] == 0  # KEDA's own scale to zero, queue empty
    assert "replicas" not in manifests.get("Deployment", f"{PREFIX}-worker")["spec"]
    with pytest.raises(helm.HelmRenderError, match="set minReplicaCount to 0"):
        render(
            chart,
            {"worker": {"keda": {"enabled": True, "mode": "scaledObject", "minReplicaCount": 1}}},
        )
    busy = render(
        chart,
        {"worker": {"keda": {"enabled": True, "mode": "scaledObject", "scaleDownWhileBusy": True}}},
    ).get("ScaledObject", f"{PREFIX}-worker")
    policy = busy["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert policy["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 60}]


# -- files the service reads ---------------------------------------------------------------------


def test_extra_volumes_reach_the_worker(chart: helm.Chart) -> None:
    pod = render(chart, load_values("keda-scaledobject-values.yaml")).worker_pod()["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["ca-bundle"] == {"name": "ca-bundle", "configMap": {"name": "corporate-ca"}}
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/etc/ssl/corporate"]["name"] == "ca-bundle"


def test_webhook_secrets_are_a_file_the_api_loads(chart: helm.Chart, tmp_path: Path) -> None:
    manifests = render(chart, load_values("ingress-values.yaml"))
    secret = manifests.get("Secret", f"{PREFIX}-webhooks")
    pod = manifests.get("Deployment", f"{PREFIX}-api")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "webhook-secrets")
    (item,) = volume["secret"]["items"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "webhook-secrets")
    path = env_of(pod["containers"][0])["FTUNE_WEBHOOK_SECRETS_FILE"]["value"]
    assert path == f"{mount['mountPath']}/{item['path']}"
    # The file the pod sees, read by the API's own loader.
    file = tmp_path / item["path"]
    file.write_bytes(base64.b64decode(secret["data"][item["key"]]))
    loaded = webhooks.load_secrets(file)
    assert set(loaded) == {"search", "platform"}
    worker = render(chart, load_values("ingress-values.yaml")).worker_pod()["spec"]
    assert "FTUNE_WEBHOOK_SECRETS_FILE" not in env_of(worker["containers"][0])


def test_prewarm_downloads_each_named_model(chart: helm.Chart, tmp_path: Path) -> None:
    """The init container's script, run with a stand-in `hf` that records its arguments."""
    pod = render(chart, load_values("keda-values.yaml")).worker_pod()["spec"]
    (init,) = pod["initContainers"]
    assert init["image"] == pod["containers"][0]["image"]
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    env = env_of(init)
    assert env["HF_HOME"]["value"].startswith(mounts["cache"])
    worker_env = env_of(pod["containers"][0])
    for var in ("HF_HOME", "HF_TOKEN", "HF_ENDPOINT"):  # the worker's Hub, as the worker sees it
        assert env.get(var) == worker_env.get(var), var
    calls = tmp_path / "calls"
    hf = tmp_path / "bin" / "hf"
    hf.parent.mkdir()
    hf.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    hf.chmod(0o755)
    path = f"{hf.parent}:{os.environ['PATH']}"
    subprocess.run(init["command"], env={"PATH": path}, check=True, timeout=30)
    assert calls.read_text().splitlines() == [
        "download Qwen/Qwen2.5-7B-Instruct",
        "download meta-llama/Llama-3.1-8B-Instruct --revision main",
    ]
    assert "initContainers" not in render(chart).worker_pod()["spec"]


# -- Ingress -------------------------------------------------------------------------------------


def test_ingress_serves_the_api_not_the_metrics(chart: helm.Chart) -> None:
    ingress = render(chart, {"api": {"ingress": {"enabled": True}}}).get("Ingress", f"{PREFIX}-api")
    validate(ingress)
    paths = [p["path"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert paths == ["/v1", "/ui", "/docs"]
    annotations = ingress["metadata"]["annotations"]
    # A multipart form (the OpenAI SDK's files.create) may be this much over the dataset limit.
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == str(
        2 * 1024**3 + MAX_FORM_OVERHEAD
    )
    assert annotations["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    # Yours win over the chart's.
    mine = render(chart, load_values("ingress-values.yaml")).get("Ingress", f"{PREFIX}-api")
    assert (
        mine["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "7200"
    )
    bare = render(chart, {"api": {"ingress": {"enabled": True, "nginxAnnotations": False}}})
    assert "annotations" not in bare.get("Ingress", f"{PREFIX}-api")["metadata"]


# -- helm test, alerts and dashboard --------------------------------------------------------------


class _Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def ready_api() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def test_helm_test_pod_asks_the_api_for_readyz(chart: helm.Chart, ready_api: int) -> None:
    pod = render(chart).get("Pod", f"{PREFIX}-test")
    validate(pod)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    command = pod["spec"]["containers"][0]["command"]
    assert command[-1] == f"http://{PREFIX}-api:8000/readyz"
    assert render(chart).get("Service", f"{PREFIX}-api")["spec"]["ports"][0]["port"] == 8000
    local = [*command[:-1], f"http://127.0.0.1:{ready_api}/readyz"]
    done = subprocess.run(local, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0 and "200" in done.stdout, done.stdout + done.stderr
    assert f"helm test {RELEASE} -n {NAMESPACE}" in render(chart).notes
    assert render(chart, {"test": {"enabled": False}}).of_kind("Pod") == []


def exported_metric_names() -> set[str]:
    """Every series name ftune exports: the API's collector, a worker's registry, and the
    API's request metrics."""
    families = list(ServiceCollector().collect()) + list(WorkerMetrics().registry.collect())
    for metric in request_metrics.METRICS:
        families += metric.collect()
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",)}
    names = set()
    for family in families:
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def test_alerts_and_dashboard_query_what_ftune_exports(chart: helm.Chart) -> None:
    manifests = render(chart, load_values("keda-values.yaml"))
    exported = exported_metric_names()
    rule = manifests.get("PrometheusRule", f"{PREFIX}")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {
        "FtuneJobsWaitingWithoutWorkers",
        "FtuneJobFailureRateHigh",
        "FtuneRedisMemoryHigh",
        "FtuneWebhooksGivenUp",
    }
    dashboard_map = manifests.get("ConfigMap", f"{PREFIX}-dashboard")
    assert dashboard_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(dashboard_map["data"]["ftune.json"])
    exprs = [r["expr"] for r in alerts.values()] + [
        t["expr"] for panel in dashboard["panels"] for t in panel["targets"]
    ]
    assert len(exprs) > 10
    for expr in exprs:
        promql_parser.parse(expr.replace("$namespace", NAMESPACE))  # ValueError if malformed
        used = set(re.findall(r"\bftune_\w+", expr))
        assert used and used <= exported, used - exported
    # Rendered into the rule: the thresholds from values and the release's namespace.
    assert f'namespace="{NAMESPACE}"' in alerts["FtuneRedisMemoryHigh"]["expr"]
    assert alerts["FtuneRedisMemoryHigh"]["expr"].endswith("> 0.8")
    assert alerts["FtuneJobsWaitingWithoutWorkers"]["for"] == "30m"
    assert render(chart).of_kind("PrometheusRule") == []


def test_rendered_redis_maxmemory_is_below_the_container_limit(chart: helm.Chart) -> None:
    manifests = render(chart, {"redis": {"resources": {"limits": {"memory": "8Gi"}}}})
    conf = manifests.get("ConfigMap", f"{PREFIX}-redis")["data"]["redis.conf"]
    assert "maxmemory 6144mb" in conf.splitlines()  # 75% of 8Gi: the rest is fork headroom
    for limit, maxmemory in (("500G", 357627), (2**30, 768), ("4096Mi", 3072)):
        sized = render(chart, {"redis": {"resources": {"limits": {"memory": limit}}}})
        conf = sized.get("ConfigMap", f"{PREFIX}-redis")["data"]["redis.conf"]
        assert f"maxmemory {maxmemory}mb" in conf.splitlines(), limit
    with pytest.raises(helm.HelmRenderError, match=re.escape('cannot size "1.5Gi"')):
        render(chart, {"redis": {"resources": {"limits": {"memory": "1.5Gi"}}}})
    with pytest.raises(
        helm.HelmRenderError, match=re.escape("redis.resources.limits.memory is required")
    ):
        render(chart, {"redis": {"resources": {"limits": None}}})


def test_chart_metadata(chart: helm.Chart) -> None:
    """What Artifact Hub shows: the licence of the project and the images the chart runs."""
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["appVersion"] == project["version"]
    assert meta["annotations"]["artifacthub.io/license"] == project["license"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    listed = {i["image"] for i in yaml.safe_load(meta["annotations"]["artifacthub.io/images"])}
    assert listed == {
        f"{values['api']['image']['repository']}:{meta['appVersion']}",
        f"{values['worker']['image']['repository']}:{meta['appVersion']}",
        f"{values['redis']['image']['repository']}:{values['redis']['image']['tag']}",
    }


def test_chart_readme_is_generated_from_the_values() -> None:
    """helm/ftune/README.md is what tools/chart_readme.py makes of values.yaml today."""
    values_text = (CHART / "values.yaml").read_text()
    keys = dict(chart_readme.documented_keys(values_text))
    assert len(keys) == len(re.findall(r"^\s*# --", values_text, re.M))  # each one, once
    assert keys["worker.stopGraceSeconds"].startswith("FTUNE_WORKER_GRACE_SECONDS")
    assert "worker.resources.requests" not in keys  # a documented key's children are its default
    readme = (CHART / "README.md").read_text()
    assert "| `worker.terminationGracePeriodSeconds` | int | `180` |" in readme
    check = [sys.executable, str(ROOT / "tools" / "chart_readme.py"), "--check"]
    done = subprocess.run(check, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
