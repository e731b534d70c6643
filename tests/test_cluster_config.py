"""cluster.yaml (Ray cluster launcher) and jobs/rayjob.yaml (KubeRay) parse and say what they must."""

from __future__ import annotations

import os
import shlex

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(rel: str) -> dict:
    with open(os.path.join(REPO, rel), encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def test_cluster_yaml_is_a_valid_launcher_config_with_cpu_head_and_gpu_workers():
    from ray.autoscaler._private.util import validate_config

    cfg = load("cluster.yaml")
    validate_config(cfg)  # Ray's own JSON schema for `ray up`
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, key
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no GPU worker type"
    assert all(0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"] for t in gpu_types)
    assert any("pip install" in c and "entropyprune" in c for c in cfg["setup_commands"]), "setup must install this package"
    assert "." in cfg["file_mounts"].values()
    assert any("--head" in c for c in cfg["head_start_ray_commands"])
    assert all("0.0.0.0" not in c for c in cfg["head_start_ray_commands"])  # the dashboard stays on loopback
    assert any("RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"])
    # one Hugging Face cache for every node, on the volume every container mounts
    options = " ".join(cfg["docker"]["run_options"])
    hf_home = options.split("HF_HOME=")[1].split()[0]
    mounts = [o.split()[1].split(":")[1] for o in cfg["docker"]["run_options"] if o.startswith("--volume")]
    assert any(hf_home.startswith(m.rstrip("/") + "/") for m in mounts), (hf_home, mounts)


def test_rayjob_manifest_runs_ep_caption_on_gpu_workers():
    from jobs.cli import build_parser

    job = load("jobs/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["ep", "caption"]
    args = build_parser().parse_args(argv[1:])  # the entrypoint is a valid `ep caption` command
    assert args.model and args.input and args.output
    yaml.safe_load(spec["runtimeEnvYAML"])
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    workers = cluster["workerGroupSpecs"]
    limits = [c["resources"]["limits"] for g in workers for c in g["template"]["spec"]["containers"]]
    assert any(str(lim.get("nvidia.com/gpu")) == "1" for lim in limits)
