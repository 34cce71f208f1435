"""The GKE launcher: launch/gke-jobset.yaml against the JobSet CRD's own schema
(vendored byte for byte in launch/schema/, see its README), its failure policy, and
the container image. Nothing here reaches a cluster (kubectl --dry-run=client needs
one to find the CRD).

What the schema check covers: every field name and type in the JobSet, in its Job
template and in its Pod template (this CRD spells them all out; nothing in it is
x-kubernetes-preserve-unknown-fields), made strict because the API server silently
drops a field that the schema does not declare; enums, required fields, int32 ranges,
and the uniqueness that x-kubernetes-list-type set/map asks for. Top-level metadata
is ObjectMeta, which the CRD leaves to the API server: a small ObjectMeta schema
stands in for it here.

What only a cluster checks: the CRD's CEL rules (x-kubernetes-validations: the
immutable fields on update, startupPolicy vs dependsOn), JobSet's webhook, the
validation of the Job and Pods when the controller creates them (podFailurePolicy
needs restartPolicy Never: asserted here by hand), GKE's TPU webhook, and whether a
node pool with these labels exists.
"""

import copy
import hashlib
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from jax._src.clusters import cloud_tpu_cluster

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
CRD = LAUNCH / "schema" / "jobset.x-k8s.io_jobsets.yaml"
CRD_BLOB = "96add10d030c2ab2c94b1c774edd23c814692808"  # jobset v0.12.0, as its README says

# ObjectMeta as far as a manifest sets it (the CRD says only `type: object`).
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {"type": "object", "additionalProperties": False, "properties": {
    "name": {"type": "string", "pattern": DNS_LABEL, "maxLength": 63},
    "generateName": {"type": "string"}, "namespace": {"type": "string", "pattern": DNS_LABEL},
    "labels": STRING_MAP, "annotations": STRING_MAP}}


def strict(node):
    """A copy of an OpenAPI schema where an object that lists its properties takes
    no others (what the API server prunes, this rejects), and a list-type set has
    unique items."""
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict(s) for s in out[key]]
    if out.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def _list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-type: map: no two items share their key fields."""
    if not validator.is_type(instance, "array"):
        return
    seen = set()
    for item in instance:
        key = tuple(repr(item.get(k)) for k in keys) if isinstance(item, dict) else None
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate {dict(zip(keys, key))} in a list "
                                             f"keyed by {keys}")
        seen.add(key)


FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("int32")
def _int32(value):
    return not isinstance(value, int) or -2**31 <= value < 2**31


# OpenAPI 3.0 schemas are JSON Schema draft 4 plus the x-kubernetes-* extensions.
Validator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-map-keys": _list_map_keys})


@pytest.fixture(scope="module")
def crd_schema():
    """The CRD's v1alpha2 openAPIV3Schema, as vendored."""
    raw = CRD.read_bytes()
    blob = hashlib.sha1(b"blob %d\0" % len(raw) + raw).hexdigest()
    assert blob == CRD_BLOB, "launch/schema/ holds an edited CRD: vendor it again, unedited"
    crd = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["group"] == "jobset.x-k8s.io" and crd["spec"]["names"]["kind"] == "JobSet"
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha2"]
    return version["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def strict_validator(crd_schema):
    schema = strict(crd_schema)
    schema["properties"]["metadata"] = OBJECT_META
    return Validator(schema, format_checker=FORMATS)


@pytest.fixture(scope="module")
def manifest():
    return yaml.safe_load((LAUNCH / "gke-jobset.yaml").read_text())


def errors(validator, doc):
    return [(list(e.absolute_path), e.message)
            for e in sorted(validator.iter_errors(doc), key=lambda e: e.path)]


def test_manifest_is_valid_against_the_jobset_crd_schema(manifest, strict_validator):
    assert manifest["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and manifest["kind"] == "JobSet"
    assert errors(strict_validator, manifest) == []


def _set(doc, path, value=None, rename=None):
    *parents, last = path
    for p in parents:
        doc = doc[p]
    if rename:
        doc[rename] = doc.pop(last)
    else:
        doc[last] = value


JOB = ["spec", "replicatedJobs", 0, "template", "spec"]
POD = [*JOB, "template", "spec"]
CONTAINER = [*POD, "containers", 0]


@pytest.mark.parametrize("path, change, where, typo", [
    (["spec", "failurePolicy", "maxRestarts"], {"rename": "maxRestart"},
     ["spec", "failurePolicy"], True),
    ([*POD, "terminationGracePeriodSeconds"], {"rename": "terminationGracePeriodSecond"},
     POD, True),
    ([*CONTAINER, "resources"], {"rename": "resource"}, CONTAINER, True),
    ([*JOB, "podFailurePolicy", "rules", 0, "onPodConditions"], {"rename": "onPodCondition"},
     [*JOB, "podFailurePolicy", "rules", 0], True),
    (["metadata", "annotations"], {"rename": "annotation"}, ["metadata"], True),
    (["spec", "failurePolicy", "maxRestarts"], {"value": "10"},
     ["spec", "failurePolicy", "maxRestarts"], False),
    ([*JOB, "parallelism"], {"value": "four"}, [*JOB, "parallelism"], False),
    ([*JOB, "backoffLimit"], {"value": 2**31}, [*JOB, "backoffLimit"], False),
    ([*POD, "hostNetwork"], {"value": "yes"}, [*POD, "hostNetwork"], False),
    ([*CONTAINER, "command"], {"value": "tini -- lenet-dist train"},
     [*CONTAINER, "command"], False),
    (["spec", "failurePolicy", "rules", 0, "action"], {"value": "FailJobset"},
     ["spec", "failurePolicy", "rules", 0, "action"], False),
    ([*CONTAINER, "ports", 1, "containerPort"], {"value": 8471},
     [*CONTAINER, "ports"], False),
], ids=["maxRestart", "terminationGracePeriodSecond", "container resource", "onPodCondition",
        "metadata annotation", "maxRestarts string", "parallelism string", "backoffLimit int32",
        "hostNetwork string", "command string", "action enum", "duplicate port"])
def test_a_misspelled_field_or_a_wrong_type_is_rejected(manifest, crd_schema, strict_validator,
                                                        path, change, where, typo):
    bad = copy.deepcopy(manifest)
    _set(bad, path, **change)
    found = errors(strict_validator, bad)
    assert [p for p, _ in found] == [where], found
    if typo:  # the CRD's schema as is accepts it: the API server would drop it unseen
        assert Validator(crd_schema, format_checker=FORMATS).is_valid(bad)


def test_manifest_shape(manifest):
    assert manifest["metadata"]["annotations"][
        "alpha.jobset.sigs.k8s.io/exclusive-topology"] == "cloud.google.com/gke-nodepool"
    spec = manifest["spec"]
    assert spec["network"]["enableDNSHostnames"] is True
    [job] = spec["replicatedJobs"]
    job_spec = job["template"]["spec"]
    hosts = job_spec["parallelism"]
    assert job_spec["completions"] == hosts and job_spec["completionMode"] == "Indexed"
    pod = job_spec["template"]["spec"]
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
    ports = {p["containerPort"] for p in container["ports"]}
    assert int(cloud_tpu_cluster.coordinator_port) in ports, "JAX's coordinator port on TPU"


# ---- the failure policy, as Kubernetes and JobSet evaluate it --------------------

def _pod_rule(rules, container, exit_code, conditions):
    """The action of the first podFailurePolicy rule that matches a failed pod
    (Kubernetes: exit code 0 never matches; no match means Count)."""
    for rule in rules:
        codes = rule.get("onExitCodes")
        if codes and exit_code != 0 and codes.get("containerName", container) == container:
            inside = exit_code in codes["values"]
            if inside == (codes["operator"] == "In"):
                return rule["action"]
        for c in rule.get("onPodConditions") or []:
            if conditions.get(c["type"]) == c.get("status", "True"):
                return rule["action"]
    return "Count"


def outcome(manifest, exit_code, conditions=None):
    """What one pod failing this way does to the JobSet."""
    [job] = manifest["spec"]["replicatedJobs"]
    job_spec = job["template"]["spec"]
    [container] = job_spec["template"]["spec"]["containers"]
    action = _pod_rule(job_spec["podFailurePolicy"]["rules"], container["name"], exit_code,
                       conditions or {})
    if action == "Ignore":
        return "pod replaced, not counted"
    reason = "PodFailurePolicy" if action == "FailJob" else "BackoffLimitExceeded"
    assert action == "FailJob" or job_spec["backoffLimit"] == 0
    policy = manifest["spec"]["failurePolicy"]
    for rule in policy.get("rules", []):
        if reason in rule.get("onJobFailureReasons", [reason]) \
                and job["name"] in rule.get("targetReplicatedJobs", [job["name"]]):
            return rule["action"]
    return f"RestartJobSet (counted, at most {policy['maxRestarts']})"


def test_failure_policy_restarts_preemptions_and_crashes_but_not_user_errors(manifest):
    counted = "RestartJobSet (counted, at most 10)"
    disrupted = {"DisruptionTarget": "True"}
    assert outcome(manifest, 2) == "FailJobSet"       # bad flag or --config: fail at once
    assert outcome(manifest, 143, disrupted) == "pod replaced, not counted"  # preempted
    assert outcome(manifest, 2, disrupted) == "pod replaced, not counted"
    assert outcome(manifest, 137, disrupted) == "pod replaced, not counted"
    assert outcome(manifest, 143) == counted          # SIGTERM from elsewhere, checkpointed
    assert outcome(manifest, 1) == counted            # a lost peer host, or a bug
    assert outcome(manifest, 137) == counted          # OOM, SIGKILL
    pod = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never", "a Job's podFailurePolicy needs restartPolicy Never"


def test_grace_period_comment_says_a_spot_preemption_gives_less(manifest):
    text = (LAUNCH / "gke-jobset.yaml").read_text()
    pod = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > 15
    assert re.search(r"spot preemption cannot wait this long", text)
    assert "8476" not in text  # the coordinator port JAX used to use


def test_dockerfile_builds_python_312_with_tpu_extra():
    text = (LAUNCH / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.12", text, re.M)
    assert 'pip install --no-cache-dir "/src[tpu]"' in text
    assert "tini" in text and 'ENTRYPOINT ["tini", "--", "lenet-dist"]' in text
