"""The reviewer's checks of tests/k8s_checks.py on every kustomize overlay of deploy/k8s/,
and, for each check, broken manifest fragments it must report (so that none passes by
checking nothing).

No cluster is needed: overlays are rendered by the real kustomize (``kubectl kustomize``);
probe paths are requested from the real ``scls`` command's servers, run in-process against
the test Redis (conftest.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import pytest
import yaml

from tests import k8s_checks as k8s

Check = Callable[[k8s.Objects], list[str]]
CHECKS = ("schema", "env", "ports", "services", "resources", "disruption", "worker")


@pytest.fixture(scope="module")
def checks(redis_url: str) -> dict[str, Check]:
    """Each check, with the real processes and model sizes as its oracles."""
    serve = k8s.SclsProcesses(redis_url)
    return {
        "schema": k8s.schema_problems,
        "env": k8s.env_problems,
        "ports": lambda objects: k8s.port_problems(objects, serve),
        "services": k8s.service_problems,
        "resources": k8s.resource_problems,
        "disruption": k8s.disruption_problems,
        "worker": lambda objects: k8s.worker_problems(objects, k8s.model_weights),
    }


# --------------------------------------------------------------------------------------------
# every overlay
# --------------------------------------------------------------------------------------------


def test_overlays_are_discovered() -> None:
    assert {"base", "overlays/cpu-dev", "overlays/gpu", "overlays/autoscale",
            "overlays/redis-sentinel"} <= set(k8s.OVERLAY_DIRS)


@pytest.mark.parametrize("overlay", k8s.OVERLAY_DIRS)
def test_overlay_renders_without_warnings(overlay: str) -> None:
    objects, warnings = k8s.kustomize(overlay)
    assert objects and not warnings, f"kustomize {overlay}: {warnings}"


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("overlay", k8s.OVERLAY_DIRS)
def test_overlay_passes(overlay: str, check: str, checks: dict[str, Check]) -> None:
    problems = checks[check](k8s.render(overlay))
    assert not problems, f"{overlay}: {check}:\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------------------------
# each check fails on a broken fragment
# --------------------------------------------------------------------------------------------

# A small, correct deployment: an ingest and a worker with their settings, Secret, Services,
# PDBs and HPA. Every check passes on it; each case below breaks one thing.
GOOD = """
apiVersion: v1
kind: ConfigMap
metadata: {name: cfg}
data:
  SCLS_HOST: 0.0.0.0
  SCLS_METRICS_PORT: "9100"
  SCLS_TORCH_THREADS: "1"
  SCLS_MEMORY_BUDGET_BYTES: "536870912"
---
apiVersion: v1
kind: Secret
metadata: {name: sec}
data: {REDIS_PASSWORD: cHc=, SCLS_API_KEY: a2V5}
---
apiVersion: v1
kind: Service
metadata: {name: ingest}
spec:
  selector: {app: ingest}
  ports: [{name: http, port: 8000, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: worker}
spec:
  clusterIP: None
  selector: {app: worker}
  ports: [{name: metrics, port: 9100, targetPort: metrics}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ingest}
spec:
  replicas: 2
  selector: {matchLabels: {app: ingest}}
  template:
    metadata: {labels: {app: ingest}}
    spec:
      containers:
        - name: ingest
          image: scls:cpu
          args: [ingest]
          envFrom: [{configMapRef: {name: cfg}}]
          env:
            - {name: REDIS_PASSWORD, valueFrom: {secretKeyRef: {name: sec, key: REDIS_PASSWORD}}}
            - {name: SCLS_REDIS_URL, value: "redis://:$(REDIS_PASSWORD)@redis:6379/0"}
            - {name: SCLS_API_KEY, valueFrom: {secretKeyRef: {name: sec, key: SCLS_API_KEY}}}
          ports: [{name: http, containerPort: 8000}]
          readinessProbe: {httpGet: {path: /healthz, port: http}}
          livenessProbe: {httpGet: {path: /metrics, port: 8000}}
          resources:
            requests: {cpu: 100m, memory: 256Mi}
            limits: {cpu: "1", memory: 512Mi}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: worker}
spec:
  serviceName: worker
  replicas: 2
  selector: {matchLabels: {app: worker}}
  template:
    metadata:
      labels: {app: worker}
      annotations:
        prometheus.io/scrape: "true"
        prometheus.io/port: "9100"
        prometheus.io/path: /metrics
    spec:
      terminationGracePeriodSeconds: 60
      containers:
        - name: worker
          image: scls:cpu
          args: [worker]
          envFrom: [{configMapRef: {name: cfg}}]
          env:
            - {name: SCLS_INSTANCE_ID, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
          ports: [{name: metrics, containerPort: 9100}]
          startupProbe: {httpGet: {path: /metrics, port: metrics}}
          livenessProbe: {httpGet: {path: /livez, port: metrics}}
          resources:
            requests: {cpu: "1", memory: 2304Mi}
            limits: {cpu: "2", memory: 3Gi}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {name: ingest}
spec: {maxUnavailable: 1, selector: {matchLabels: {app: ingest}}}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {name: worker}
spec: {minAvailable: 1, selector: {matchLabels: {app: worker}}}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: ingest}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: ingest}
  minReplicas: 2
  maxReplicas: 4
"""

CFG, SECRET = "ConfigMap/cfg", "Secret/sec"
ING, WRK = "Deployment/ingest", "StatefulSet/worker"
SVC_I, SVC_W = "Service/ingest", "Service/worker"
PDB_I, PDB_W, HPA = ("PodDisruptionBudget/ingest", "PodDisruptionBudget/worker",
                     "HorizontalPodAutoscaler/ingest")
POD = ("spec", "template", "spec")
C = (*POD, "containers", 0)
ADD = "+"  # target of an edit that adds its value as a new object
DELETE = object()  # value of an edit that removes the key


def scaled_object(kind: str, name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": name},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": kind, "name": name},
                     "triggers": [{"type": "cpu", "metricType": "Utilization",
                                   "metadata": {"value": "70"}}], **spec}}


Edit = tuple[str, tuple[Any, ...], Any]

# (id, check, edits of GOOD, a line the check must report)
CASES: list[tuple[str, str, list[Edit], str]] = [
    # 1. schemas
    ("schema-misspelt-field", "schema",
     [(WRK, (*C, "livenessprobe"), {"httpGet": {"path": "/livez", "port": "metrics"}})],
     "StatefulSet/worker: invalid for Kubernetes"),
    ("schema-keda-field", "schema",
     [(ADD, (), scaled_object("StatefulSet", "worker", minReplicas=1))],
     "ScaledObject/worker: ['spec']"),
    # 2. environment
    ("env-setting-typo", "env", [(CFG, ("data", "SCLS_SLICE_LENGHT"), "32")],
     "StatefulSet/worker container worker: SCLS_SLICE_LENGHT is not a setting: "
     "shared.settings.Settings has no field slice_lenght (did you mean SCLS_SLICE_LENGTH?)"),
    ("env-not-allowed", "env", [(WRK, (*C, "env", 1), {"name": "HF_TOKEN", "value": "x"})],
     "StatefulSet/worker container worker: HF_TOKEN is neither a setting"),
    ("env-value-out-of-range", "env", [(CFG, ("data", "SCLS_SLICE_LENGTH"), "0")],
     "Deployment/ingest container ingest: SCLS_SLICE_LENGTH='0' does not validate"),
    ("env-value-not-a-bool", "env", [(CFG, ("data", "SCLS_KV_RETENTION"), "maybe")],
     "StatefulSet/worker container worker: SCLS_KV_RETENTION='maybe' does not validate"),
    ("env-not-a-choice", "env", [(WRK, (*C, "env", 1),
                                  {"name": "SCLS_PROFILE_MODE", "value": "fast"})],
     "SCLS_PROFILE_MODE='fast' does not validate"),
    ("env-reference-before-definition", "env",
     [(ING, (*C, "env", 0), {"name": "SCLS_REDIS_URL", "value": "redis://:$(REDIS_PASSWORD)@r"}),
      (ING, (*C, "env", 1), {"name": "REDIS_PASSWORD", "value": "pw"})],
     "Deployment/ingest container ingest: env SCLS_REDIS_URL uses $(REDIS_PASSWORD), which is "
     "not defined before it"),
    ("env-secret-key-missing", "env",
     [(ING, (*C, "env", 2, "valueFrom", "secretKeyRef", "key"), "API_KEY")],
     "Deployment/ingest container ingest: env SCLS_API_KEY: Secret sec has no key API_KEY"),
    ("env-configmap-missing", "env", [(WRK, (*C, "envFrom", 0, "configMapRef", "name"), "cfg2")],
     "StatefulSet/worker container worker: envFrom ConfigMap cfg2 does not exist"),
    # 2. probes: paths the process serves, ports it declares and listens on
    ("probe-path-mistyped", "ports",
     [(WRK, (*C, "livenessProbe", "httpGet", "path"), "/livz")],
     "StatefulSet/worker container worker livenessProbe: GET /livz answers 404 (no such "
     "route)"),
    ("probe-path-not-routed", "ports", [(ING, (*C, "readinessProbe", "httpGet", "path"), "/ready")],
     "Deployment/ingest container ingest readinessProbe: GET /ready answers 404 (no such route)"),
    ("probe-path-needs-the-api-key", "ports",
     [(ING, (*C, "livenessProbe", "httpGet", "path"), "/v1/models")],
     "Deployment/ingest container ingest livenessProbe: GET /v1/models answers 401 (it needs "
     "credentials"),
    ("probe-port-name-undeclared", "ports",
     [(WRK, (*C, "startupProbe", "httpGet", "port"), "http")],
     "StatefulSet/worker container worker startupProbe: port 'http': the container declares "
     "no port of that name"),
    ("probe-port-number-undeclared", "ports",
     [(ING, (*C, "livenessProbe", "httpGet", "port"), 8080)],
     "Deployment/ingest container ingest livenessProbe: port 8080 is 8080, but `scls ingest` "
     "listens on 8000"),
    ("process-listens-elsewhere", "ports", [(CFG, ("data", "SCLS_METRICS_PORT"), "9101")],
     "StatefulSet/worker container worker livenessProbe: port metrics is 9100, but "
     "`scls worker` listens on 9101"),
    ("process-on-localhost", "ports", [(CFG, ("data", "SCLS_HOST"), "127.0.0.1")],
     "Deployment/ingest container ingest: `scls ingest` listens on 127.0.0.1"),
    ("exporter-disabled", "ports", [(CFG, ("data", "SCLS_METRICS_PORT"), "0")],
     "StatefulSet/worker container worker: `scls worker` serves no HTTP"),
    ("no-such-command", "ports", [(WRK, (*C, "args"), ["wroker"])],
     "StatefulSet/worker container worker: `scls wroker` fails: exit 2"),
    ("probe-on-a-foreign-image", "ports", [(WRK, (*C, "image"), "busybox:1.36")],
     "StatefulSet/worker container worker: has HTTP probes but runs the entrypoint of "
     "busybox:1.36"),
    ("scrape-annotation-port", "ports",
     [(WRK, ("spec", "template", "metadata", "annotations", "prometheus.io/port"), "9200")],
     "StatefulSet/worker: prometheus.io/port 9200 path /metrics: no container"),
    # Services
    ("service-target-port-undeclared", "services",
     [(SVC_W, ("spec", "ports", 0, "targetPort"), "metrix")],
     "Service/worker: port metrics targets 'metrix', which StatefulSet/worker declares"),
    ("service-selects-nothing", "services", [(SVC_I, ("spec", "selector"), {"app": "ingset"})],
     "Service/ingest: selector {'app': 'ingset'} selects no pod"),
    ("statefulset-service-missing", "services", [(WRK, ("spec", "serviceName"), "workers")],
     "StatefulSet/worker: serviceName workers is not a Service"),
    # 4. resources
    ("no-cpu-limit", "resources", [(WRK, (*C, "resources", "limits", "cpu"), DELETE)],
     "StatefulSet/worker container worker: no resources.limits.cpu"),
    ("no-memory-request", "resources", [(ING, (*C, "resources", "requests", "memory"), DELETE)],
     "Deployment/ingest container ingest: no resources.requests.memory"),
    ("request-over-limit", "resources",
     [(ING, (*C, "resources", "requests", "memory"), "1Gi")],
     "Deployment/ingest container ingest: requests.memory 1Gi > limits.memory 512Mi"),
    ("gpu-limit-without-request", "resources",
     [(WRK, (*C, "resources", "limits", "nvidia.com/gpu"), 1)],
     "StatefulSet/worker container worker: extended resource nvidia.com/gpu: requests None != "
     "limits 1"),
    # 4. disruption budgets against replicas and autoscalers
    ("pdb-selects-nothing", "disruption",
     [(PDB_I, ("spec", "selector", "matchLabels", "app"), "ingset")],
     "PodDisruptionBudget/ingest: selects no workload"),
    ("pdb-min-available-every-replica", "disruption", [(PDB_W, ("spec", "minAvailable"), 2)],
     "PodDisruptionBudget/worker: minAvailable 2 with StatefulSet/worker at 2 replicas"),
    ("pdb-min-available-percent", "disruption", [(PDB_W, ("spec", "minAvailable"), "100%")],
     "PodDisruptionBudget/worker: minAvailable 100% with StatefulSet/worker at 2 replicas"),
    ("pdb-max-unavailable-zero", "disruption", [(PDB_I, ("spec", "maxUnavailable"), 0)],
     "PodDisruptionBudget/ingest: maxUnavailable 0 with Deployment/ingest at 2 replicas"),
    ("pdb-both-fields", "disruption", [(PDB_I, ("spec", "minAvailable"), 1)],
     "PodDisruptionBudget/ingest: set exactly one of minAvailable and maxUnavailable"),
    ("pdb-against-hpa-minimum", "disruption",
     [(HPA, ("spec", "minReplicas"), 1), (PDB_I, ("spec", "maxUnavailable"), DELETE),
      (PDB_I, ("spec", "minAvailable"), 1)],
     "PodDisruptionBudget/ingest: minAvailable 1 with Deployment/ingest at 1 replicas"),
    ("pdb-against-keda-minimum", "disruption",
     [(ADD, (), scaled_object("StatefulSet", "worker", minReplicaCount=1, maxReplicaCount=4)),
      (WRK, ("spec", "replicas"), DELETE)],
     "PodDisruptionBudget/worker: minAvailable 1 with StatefulSet/worker at 1 replicas"),
    ("two-pdbs-on-one-pod", "disruption",
     [(ADD, (), {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                 "metadata": {"name": "worker-2"},
                 "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "worker"}}}})],
     "StatefulSet/worker: pods selected by PodDisruptionBudget/worker, "
     "PodDisruptionBudget/worker-2"),
    ("hpa-min-over-max", "disruption", [(HPA, ("spec", "minReplicas"), 5)],
     "HorizontalPodAutoscaler/ingest: min replicas 5 > max replicas 4"),
    ("replicas-outside-hpa-range", "disruption", [(ING, ("spec", "replicas"), 6)],
     "Deployment/ingest: replicas 6 outside HorizontalPodAutoscaler/ingest's [2, 4]"),
    ("hpa-and-keda-on-one-workload", "disruption",
     [(ADD, (), scaled_object("Deployment", "ingest", minReplicaCount=2))],
     "Deployment/ingest: scaled by HorizontalPodAutoscaler/ingest, ScaledObject/ingest at once"),
    ("keda-fallback-outside-range", "disruption",
     [(ADD, (), scaled_object("StatefulSet", "worker", minReplicaCount=2, maxReplicaCount=4,
                              fallback={"failureThreshold": 3, "replicas": 8})),
      (WRK, ("spec", "replicas"), DELETE)],
     "ScaledObject/worker: fallback replicas 8 outside [2, 4]"),
    ("scaler-targets-nothing", "disruption", [(HPA, ("spec", "scaleTargetRef", "name"), "ingset")],
     "HorizontalPodAutoscaler/ingest: scaleTargetRef Deployment/ingset is not a workload"),
    # 4. the worker against its settings
    ("grace-below-drain", "worker", [(WRK, (*POD, "terminationGracePeriodSeconds"), 20)],
     "StatefulSet/worker container worker: terminationGracePeriodSeconds 20 < "
     "SCLS_DRAIN_TIMEOUT_S 30 + hand-back 2 s"),
    ("grace-default-below-drain", "worker",
     [(WRK, (*POD, "terminationGracePeriodSeconds"), DELETE)],
     "terminationGracePeriodSeconds 30 < SCLS_DRAIN_TIMEOUT_S 30 + hand-back 2 s"),
    ("grace-past-slice-timeout", "worker", [(CFG, ("data", "SCLS_SLICE_TIMEOUT_S"), "45")],
     "StatefulSet/worker container worker: terminationGracePeriodSeconds 60 > "
     "SCLS_SLICE_TIMEOUT_S 45"),
    ("memory-below-weights-and-budget", "worker",
     [(CFG, ("data", "SCLS_MEMORY_BUDGET_BYTES"), str(2 * 2**30))],
     "StatefulSet/worker container worker: requests.memory 2304Mi < weights 0.50 GiB "
     "(smollm2-135m, cpu) + SCLS_MEMORY_BUDGET_BYTES 2.00 GiB + runtime 1.00 GiB = 3.50 GiB"),
    ("threads-unset", "worker", [(CFG, ("data", "SCLS_TORCH_THREADS"), DELETE)],
     "StatefulSet/worker container worker: SCLS_TORCH_THREADS unset"),
    ("threads-not-the-cpu-request", "worker", [(CFG, ("data", "SCLS_TORCH_THREADS"), "2")],
     "StatefulSet/worker container worker: SCLS_TORCH_THREADS 2 does not match the CPU "
     "request 1"),
    ("cpu-limit-without-headroom", "worker", [(WRK, (*C, "resources", "limits", "cpu"), "1")],
     "StatefulSet/worker container worker: limits.cpu 1 < SCLS_TORCH_THREADS 1 + 1"),
    ("memory-below-budget-model-of-unknown-size", "worker",
     [(WRK, (*C, "env", 1), {"name": "SCLS_MODEL", "value": "/models/mine"}),
      (CFG, ("data", "SCLS_MEMORY_BUDGET_BYTES"), str(2 * 2**30))],
     "StatefulSet/worker container worker: requests.memory 2304Mi < weights unknown "
     "(/models/mine: not sized offline, counted as 0) + SCLS_MEMORY_BUDGET_BYTES 2.00 GiB"),
]


def good() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(GOOD) if d]


def edited(edits: list[Edit]) -> list[dict[str, Any]]:
    """GOOD with ``edits`` applied: (``Kind/name``, key path, value or DELETE), or
    (ADD, (), a new object)."""
    objects = good()
    for target, path, value in edits:
        if target == ADD:
            objects.append(copy.deepcopy(value))
            continue
        (node,) = [o for o in objects if k8s.ref(o) == target]
        for key in path[:-1]:
            node = node[key]
        if value is DELETE:
            del node[path[-1]]
        elif isinstance(node, list) and path[-1] == len(node):
            node.append(copy.deepcopy(value))
        else:
            node[path[-1]] = copy.deepcopy(value)
    return objects


@pytest.mark.parametrize("check", CHECKS)
def test_the_good_fragment_passes(check: str, checks: dict[str, Check]) -> None:
    assert checks[check](good()) == []


def test_every_check_has_a_failing_case() -> None:
    assert {check for _, check, _, _ in CASES} == set(CHECKS)


@pytest.mark.parametrize("check,edits,expected",
                         [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_check_reports_a_broken_fragment(check: str, edits: list[Edit], expected: str,
                                         checks: dict[str, Check]) -> None:
    problems = checks[check](edited(edits))
    assert any(expected in p for p in problems), (
        f"{check} did not report {expected!r}; it reported:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,value", [
    ("500m", Fraction(1, 2)), ("2", 2), (4, 4), ("1.5", Fraction(3, 2)), ("1Gi", 2**30),
    ("1536Mi", 1536 * 2**20), ("2G", 2 * 10**9), ("1e3", 1000), ("128974848", 128974848),
])
def test_quantity(text: Any, value: Fraction) -> None:
    assert k8s.quantity(text) == value


@pytest.mark.parametrize("text", ["", "1Gb", "Gi", "1 Gi"])
def test_quantity_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        k8s.quantity(text)


@pytest.mark.parametrize("value,defined,out,missing", [
    ("redis://:$(P)@r", {"P": "pw"}, "redis://:pw@r", []),
    ("$(P)-$(Q)", {"P": "pw"}, "pw-$(Q)", ["Q"]),
    ("$$(P)", {"P": "pw"}, "$(P)", []),  # $$ escapes, as in the kubelet
])
def test_expand(value: str, defined: dict[str, str], out: str, missing: list[str]) -> None:
    assert k8s.expand(value, defined) == (out, missing)
