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

from tests.test_launch import RESTART_TABLE

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

POD = "default/lenet-dist-slice-0-0-x7k2p"


def pod_failure_policy(job_spec, container, exit_code, conditions):
    """Kubernetes' podFailurePolicy for one failed pod: (action, the Job's failure
    message when the action is FailJob). The first matching rule wins; exit code 0
    never matches an exit-code rule; a rule takes exit codes or pod conditions, not
    both; no match is Count. The messages are the Job controller's (pod_failure_policy.go)."""
    for index, rule in enumerate(job_spec["podFailurePolicy"]["rules"]):
        assert ("onExitCodes" in rule) != ("onPodConditions" in rule), rule
        action = rule["action"]
        codes = rule.get("onExitCodes")
        if codes:
            if exit_code != 0 and codes.get("containerName", container) == container \
                    and (exit_code in codes["values"]) == (codes["operator"] == "In"):
                return action, (f"Container {container} for pod {POD} failed with exit code "
                                f"{exit_code} matching {action} rule at index {index}")
            continue
        for c in rule["onPodConditions"]:
            if conditions.get(c["type"]) == c.get("status", "True"):
                return action, (f"Pod {POD} has condition {c['type']} matching {action} "
                                f"rule at index {index}")
    return "Count", None


def jobset_action(policy, job_name, reason, message):
    """JobSet's failurePolicy for a failed Job: the first rule whose reasons, message
    patterns (RE2; these are Python's too) and replicated jobs all match, else
    RestartJobSet."""
    for rule in policy.get("rules", []):
        if reason in (rule.get("onJobFailureReasons") or [reason]) \
                and job_name in (rule.get("targetReplicatedJobs") or [job_name]) \
                and (not rule.get("onJobFailureMessagePatterns")
                     or any(re.search(p, message) for p in rule["onJobFailureMessagePatterns"])):
            return rule["action"]
    return "RestartJobSet"


def outcome(manifest, exit_code, conditions=None):
    """What one pod ending this way does to the JobSet."""
    conditions = conditions or {}
    [job] = manifest["spec"]["replicatedJobs"]
    job_spec = job["template"]["spec"]
    [container] = job_spec["template"]["spec"]["containers"]
    if exit_code == 0 and not conditions:
        return "done"
    action, message = pod_failure_policy(job_spec, container["name"], exit_code, conditions)
    if action == "Ignore":
        return "pod replaced, not counted"
    if action == "FailJob":
        reason = "PodFailurePolicy"
    else:  # Count
        assert job_spec["backoffLimit"] == 0, "one failed pod fails the Job"
        reason, message = "BackoffLimitExceeded", "Job has reached the specified backoff limit"
    policy = manifest["spec"]["failurePolicy"]
    done = jobset_action(policy, job["name"], reason, message)
    return {"FailJobSet": "fail",
            "RestartJobSet": f"restart (counted, at most {policy['maxRestarts']})",
            "RestartJobSetAndIgnoreMaxRestarts": "restart (not counted)"}[done]


@pytest.mark.parametrize("code", sorted(RESTART_TABLE))
def test_failure_policy_restarts_only_restart_me_and_signal_deaths(manifest, code):
    got = outcome(manifest, code)
    assert got.split(" (")[0] == RESTART_TABLE[code], (code, got)
    if RESTART_TABLE[code] == "restart":
        assert got == "restart (counted, at most 10)"


@pytest.mark.parametrize("code", [0, 1, 2, 42, 137, 143])
def test_a_disrupted_pod_restarts_the_whole_jobset_uncounted(manifest, code):
    """Preempted, evicted, drained: whatever its exit code, every pod starts again (one
    replaced pod cannot rejoin a running JAX job), not counted against maxRestarts."""
    assert outcome(manifest, code, {"DisruptionTarget": "True"}) == "restart (not counted)"
    assert outcome(manifest, code or 1, {"DisruptionTarget": "False"}) \
        == outcome(manifest, code or 1)


def test_every_exit_status_follows_the_restart_rule(manifest):
    """The whole range, not only the table's rows: 42 and 127..255 restart, the rest fail."""
    for code in range(1, 256):
        want = "restart" if code == 42 or code >= 127 else "fail"
        assert outcome(manifest, code).split(" (")[0] == want, code


def test_failure_policy_is_valid_for_kubernetes(manifest):
    """What the Job's validation asks of the exit-code rule (beyond the CRD's schema), and
    the rule order the JobSet rules' message patterns rely on."""
    job_spec = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]
    rules = job_spec["podFailurePolicy"]["rules"]
    assert len(rules) <= 20
    assert [c["type"] for c in rules[0]["onPodConditions"]] == ["DisruptionTarget"]
    values = rules[1]["onExitCodes"]["values"]
    assert values == sorted(set(values)) and 0 < len(values) <= 255 and 0 not in values
    assert values == [42, *range(127, 256)]
    pod = job_spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never", "a Job's podFailurePolicy needs restartPolicy Never"
    for rule in manifest["spec"]["failurePolicy"]["rules"]:  # the pattern the CRD states
        assert re.fullmatch(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?", rule["name"]), rule


def test_jobset_is_deleted_after_it_finishes_and_says_so(manifest):
    text = (LAUNCH / "gke-jobset.yaml").read_text()
    assert 3600 <= manifest["spec"]["ttlSecondsAfterFinished"] <= 7 * 86400
    assert "Kueue" in text and "priorityClassName" in text


def test_every_pod_gets_the_jobsets_uid_as_its_job_id(manifest):
    """LENET_DIST_JOB_ID: the same in every restart of this JobSet (its uid), another one
    for a JobSet applied again; the label is JobSet's (v1alpha2 JobSetUIDKey)."""
    [container] = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"][
        "spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["LENET_DIST_JOB_ID"]["valueFrom"] == {"fieldRef": {
        "fieldPath": "metadata.labels['jobset.sigs.k8s.io/jobset-uid']"}}


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
