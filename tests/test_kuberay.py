"""The KubeRay manifests validate against KubeRay's real CRD schemas and deploy as written.

tests/data/kuberay-crds/ holds the RayCluster and RayJob CustomResourceDefinitions (provenance in its
README). Each RayCluster / RayJob is checked with a JSON-schema validator against the CRD's OpenAPI v3
schema (types, required fields, enums, patterns), and every key it writes must exist in the schema
(the API server's strict field validation rejects, or prunes, unknown ones). The rest checks what a
schema cannot: volumes and Secrets that exist, the ConfigMap beside the pod that mounts it, the image
the Dockerfile builds, /dev/shm and NCCL settings, a job file lineray accepts.
"""
from __future__ import annotations

import copy
import functools
import gzip
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from lineray.pipelines import JobConfig

REPO = Path(__file__).resolve().parent.parent
KUBERAY = REPO / "configs" / "kuberay"
CRDS = Path(__file__).resolve().parent / "data" / "kuberay-crds"
MANIFESTS = ["raycluster.yaml", "rayjob.yaml"]


@functools.cache
def crd_schema(kind: str) -> dict:
    crd = yaml.load(gzip.open(CRDS / f"ray.io_{kind.lower()}s.yaml.gz"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def unknown_keys(value, schema: dict, path: str = "") -> list[str]:
    """Keys the schema does not declare, where it is closed (no additionalProperties, no preserve-unknown)."""
    if isinstance(value, dict):
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return []
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        found = []
        for key, sub in value.items():
            if props is not None and key in props:
                found += unknown_keys(sub, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_keys(sub, extra, f"{path}.{key}")
            elif not extra:
                found.append(f"{path}.{key}")
        return found
    if isinstance(value, list) and "items" in schema:
        return [k for i, item in enumerate(value) for k in unknown_keys(item, schema["items"], f"{path}[{i}]")]
    return []


def schema_problems(doc: dict) -> list[str]:
    schema = crd_schema(doc["kind"])
    validator = jsonschema.Draft7Validator(schema)  # OpenAPI v3's subset; x-kubernetes-* are annotations
    problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    # The root's metadata is an ObjectMeta the API server checks itself (the CRD says only "object").
    body = {k: v for k, v in doc.items() if k != "metadata"}
    assert doc["metadata"]["name"] and set(doc["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    return problems + [f"{k}: not in the {doc['kind']} schema" for k in unknown_keys(body, schema)]


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifests_validate_against_the_kuberay_crds(name):
    ray_docs = [d for d in documents(name) if d["apiVersion"] == "ray.io/v1"]
    assert ray_docs
    for doc in ray_docs:
        assert schema_problems(doc) == [], doc["kind"]


def test_the_validation_catches_what_the_api_server_rejects():
    cluster = next(d for d in documents("raycluster.yaml") if d["kind"] == "RayCluster")
    bad_type = copy.deepcopy(cluster)
    bad_type["spec"]["workerGroupSpecs"][0]["replicas"] = "1"
    assert any("replicas: '1' is not of type 'integer'" in p for p in schema_problems(bad_type))
    typo = copy.deepcopy(cluster)
    typo["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    assert schema_problems(typo) == [".spec.headGroupSpec.template.spec.containers[0].volumeMount: "
                                     "not in the RayCluster schema"]
    missing = copy.deepcopy(cluster)
    del missing["spec"]["workerGroupSpecs"][0]["groupName"]
    assert any("'groupName' is a required property" in p for p in schema_problems(missing))
    quantity = copy.deepcopy(cluster)
    quantity["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "4 cores"
    assert any("does not match" in p for p in schema_problems(quantity))


# -- what deploys as written means beyond the schema ---------------------------------------------
def ray_cluster_specs() -> list[tuple[str, dict]]:
    """(file, RayCluster spec) for the standing cluster and the RayJob's own cluster."""
    out = []
    for name in MANIFESTS:
        for d in documents(name):
            if d["kind"] == "RayCluster":
                out.append((name, d["spec"]))
            elif d["kind"] == "RayJob" and "rayClusterSpec" in d["spec"]:
                out.append((name, d["spec"]["rayClusterSpec"]))
    return out


def pod_templates(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"]["template"]["spec"])] + [
        (g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]


def test_every_pod_has_its_volumes_shm_and_credentials():
    pvcs = {d["metadata"]["name"]: d for d in documents("models-pvc.yaml") if d["kind"] == "PersistentVolumeClaim"}
    assert all(p["spec"]["accessModes"] == ["ReadOnlyMany"] for p in pvcs.values()) and pvcs
    for name, spec in ray_cluster_specs():
        for group, pod in pod_templates(spec):
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for c in pod["containers"]:
                mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
                assert set(mounts) <= set(volumes), (name, group, set(mounts) - set(volumes))
                shm = [m for m in mounts.values() if m["mountPath"] == "/dev/shm"]
                assert shm and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory", (name, group)
                # S3 credentials from a Secret (optional: pods with a cloud role need none)
                assert {"secretRef": {"name": "lineray-s3", "optional": True}} in c.get("envFrom", []), (name, group)
                gpus = int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                if gpus:
                    assert env.get("NCCL_SOCKET_IFNAME") and env.get("NCCL_DEBUG") == "WARN", (name, group)
            for v in volumes.values():
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in pvcs, (name, group)
                    assert v["persistentVolumeClaim"].get("readOnly") is True


def test_configmaps_live_beside_the_pods_that_mount_them():
    """No apply-order race: a ConfigMap a pod mounts is defined earlier in the same file, and not optional."""
    for name, spec in ray_cluster_specs():
        docs = documents(name)
        order = {(d["kind"], d["metadata"]["name"]): i for i, d in enumerate(docs)}
        owner = next(i for i, d in enumerate(docs) if d["kind"] in ("RayCluster", "RayJob"))
        for _, pod in pod_templates(spec):
            for v in pod.get("volumes", []):
                if "configMap" in v:
                    assert order.get(("ConfigMap", v["configMap"]["name"]), owner) < owner, (name, v)
                    assert not v["configMap"].get("optional"), (name, v)


def test_images_are_the_dockerfile_build():
    dockerfile = (REPO / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)-py(\d)(\d+)-gpu\s*$", dockerfile, re.M)
    assert base, "the Dockerfile builds on a rayproject/ray GPU image"
    ray_version = base.group(1)
    tag = re.search(r"docker build -t (\S+) \.", dockerfile).group(1)
    torch_pin = re.search(r"torch==(\S+)", (REPO / "Makefile").read_text()).group(1)
    assert f"pip install --no-cache-dir torch=={torch_pin}\n" in dockerfile
    project = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert tag.endswith(f":{project}-ray{ray_version}-gpu")
    images = set()
    for name in MANIFESTS:
        for doc in documents(name):
            images |= set(re.findall(r"'image': '([^']+)'", str(doc)))
    assert images == {tag}
    for _, spec in ray_cluster_specs():
        assert spec["rayVersion"] == ray_version


def test_raycluster_has_a_cpu_head_and_an_autoscaling_gpu_group():
    for name, spec in ray_cluster_specs():
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-gpus") == "0"
        for c in head["template"]["spec"]["containers"]:
            assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
            assert {p["containerPort"] for p in c["ports"]} >= {6379, 8265, 10001}
        (gpu,) = spec["workerGroupSpecs"]
        assert 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"] and gpu["maxReplicas"] > 1, name


def test_rayjob_runs_a_valid_lineray_job_on_its_own_cluster():
    docs = {d["kind"]: d for d in documents("rayjob.yaml")}
    job = docs["RayJob"]["spec"]
    assert job["shutdownAfterJobFinishes"] is True and "clusterSelector" not in job
    entry = job["entrypoint"].split()
    assert entry[:2] == ["lineray", "generate"]
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    config_map = docs["ConfigMap"]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"]
                if volumes[m["name"]].get("configMap", {}).get("name") == config_map["metadata"]["name"]]
    key = entry[2].removeprefix(mount["mountPath"].rstrip("/") + "/")
    job_config = JobConfig.from_dict(yaml.safe_load(config_map["data"][key]))
    assert job_config.source.startswith("s3://") and job_config.device == "cuda"
    workers = job["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert workers["maxReplicas"] * gpus >= job_config.replicas * job_config.tp  # the job's GPUs fit
    assert job_config.model.checkpoint.startswith("/models/")  # the PVC mounted on every pod
