"""The GKE launcher: the JobSet manifest and the container image it runs."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def test_jobset_manifest():
    doc = yaml.safe_load((LAUNCH / "gke-jobset.yaml").read_text())
    assert doc["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and doc["kind"] == "JobSet"
    assert doc["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"] \
        == "cloud.google.com/gke-nodepool"
    spec = doc["spec"]
    assert spec["failurePolicy"]["maxRestarts"] >= 1
    assert spec["network"]["enableDNSHostnames"] is True
    [job] = spec["replicatedJobs"]
    job_spec = job["template"]["spec"]
    hosts = job_spec["parallelism"]
    assert job_spec["completions"] == hosts and job_spec["backoffLimit"] == 0
    pod = job_spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    selector = pod["nodeSelector"]
    assert selector["cloud.google.com/gke-tpu-accelerator"] == "tpu-v5-lite-podslice"
    topology = selector["cloud.google.com/gke-tpu-topology"]
    [container] = pod["containers"]
    chips = container["resources"]["limits"]["google.com/tpu"]
    x, y = map(int, topology.split("x"))
    assert x * y == hosts * chips, "topology chips = hosts x chips per host"
    command = container["command"]
    i = command.index("lenet-dist")
    assert command[i:i + 4] == ["lenet-dist", "train", "--distributed", "auto"]
    assert command[command.index("--workdir") + 1].startswith("gs://")
    assert command[0] == "tini", "PID 1 must pass SIGTERM on for the checkpoint"


def test_dockerfile_builds_python_312_with_tpu_extra():
    text = (LAUNCH / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.12", text, re.M)
    assert 'pip install --no-cache-dir "/src[tpu]"' in text
    assert "tini" in text and 'ENTRYPOINT ["tini", "--", "lenet-dist"]' in text
