"""The KubeRay manifests parse and carry what KubeRay needs; the RayJob's job file is a valid lineray job."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lineray.pipelines import JobConfig

KUBERAY = Path(__file__).resolve().parent.parent / "configs" / "kuberay"


def _docs(name: str) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]
    return {d["kind"]: d for d in docs}


def _containers(pod_template: dict) -> list[dict]:
    containers = pod_template["spec"]["containers"]
    assert containers and all(c.get("image") and c.get("name") for c in containers)
    return containers


def test_raycluster_has_a_cpu_head_and_an_autoscaling_gpu_group():
    cluster = _docs("raycluster.yaml")["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["name"]
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head and head["rayStartParams"].get("num-gpus") == "0"
    for c in _containers(head["template"]):
        assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
        assert {p["containerPort"] for p in c["ports"]} >= {6379, 8265, 10001}
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["groupName"] and "rayStartParams" in gpu
    assert 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"] and gpu["maxReplicas"] > 1
    for c in _containers(gpu["template"]):
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_rayjob_runs_lineray_generate_on_the_cluster():
    docs = _docs("rayjob.yaml")
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    entry = job["spec"]["entrypoint"]
    assert entry.startswith("lineray generate ")
    cluster = _docs("raycluster.yaml")["RayCluster"]
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]

    # The job file the entrypoint reads comes from the ConfigMap the head mounts.
    config_map = docs["ConfigMap"]
    mounts = {v["name"]: v for v in cluster["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]}
    volume = next(v for v in mounts.values() if v.get("configMap", {}).get("name") == config_map["metadata"]["name"])
    mount = next(m for c in _containers(cluster["spec"]["headGroupSpec"]["template"])
                 for m in c["volumeMounts"] if m["name"] == volume["name"])
    path = entry.split()[2]
    key = path.removeprefix(mount["mountPath"].rstrip("/") + "/")
    assert key in config_map["data"]
    data = yaml.safe_load(config_map["data"][key])
    job_config = JobConfig.from_dict(data)
    assert job_config.source.startswith("s3://") and job_config.device == "cuda" and job_config.tp >= 1


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_every_manifest_has_api_version_kind_and_name(name):
    for doc in yaml.safe_load_all((KUBERAY / name).read_text()):
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]
