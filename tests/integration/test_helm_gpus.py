"""A worker pod with several GPUs: the chart requests them and tells the workers (one training
process per GPU) and the API (memory estimated per GPU) how many there are."""

from __future__ import annotations

import helm_python as helm

from service.settings import Settings
from tests.fixtures.helm_chart import CUSTOM_KINDS, KUBE_VERSIONS, PREFIX, env_of, render, validate


def test_two_gpus_per_worker_reach_the_pod_the_workers_and_the_api(chart: helm.Chart) -> None:
    manifests = render(chart, {"worker": {"gpu": {"count": 2}}})
    for obj in manifests.objects:
        if (obj["apiVersion"], obj["kind"]) not in CUSTOM_KINDS:
            validate(obj, KUBE_VERSIONS[1])
    worker = manifests.container("Deployment", f"{PREFIX}-worker", "worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 2
    for container in (worker, manifests.container("Deployment", f"{PREFIX}-api", "api")):
        value = env_of(container)["FTUNE_WORKER_GPUS"]["value"]
        assert Settings.from_env({"FTUNE_WORKER_GPUS": value}).worker_gpus == 2

    one = render(chart)
    api = one.container("Deployment", f"{PREFIX}-api", "api")
    assert env_of(api)["FTUNE_WORKER_GPUS"]["value"] == "1"


def test_the_gpus_memory_reaches_the_api_and_the_workers_when_given(chart: helm.Chart) -> None:
    """Without it the API cannot refuse at submit a job too big for the GPUs."""
    manifests = render(chart, {"worker": {"gpu": {"count": 2, "memoryGb": 79.6}}})
    worker = manifests.container("Deployment", f"{PREFIX}-worker", "worker")
    for container in (worker, manifests.container("Deployment", f"{PREFIX}-api", "api")):
        value = env_of(container)["FTUNE_WORKER_GPU_MEMORY_GB"]["value"]
        assert Settings.from_env({"FTUNE_WORKER_GPU_MEMORY_GB": value}).worker_gpu_memory_gb == 79.6
    unset = render(chart).container("Deployment", f"{PREFIX}-api", "api")
    assert "FTUNE_WORKER_GPU_MEMORY_GB" not in env_of(unset)
