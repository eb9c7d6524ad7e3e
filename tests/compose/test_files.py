"""The Dockerfile and compose files as issue 23 needs them, checked offline (no Docker):
building behind mirrors (every base image and index a build argument / compose variable with
the public default), installs from the lock, and the shell lines' handling of empty values.
``make compose-test`` (tests/compose/smoke.py) runs the real containers."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_deploy import COMPOSE, COMPOSE_GPU, ROOT, dockerfile_stages, load_compose

LOCK = ROOT / "requirements"
# ${VAR:-default} (empty or unset -> default) and ${VAR-default} (unset only -> default)
_VARIABLE = re.compile(r"^\$\{(?P<var>[A-Z0-9_]+)(?P<op>:?-)(?P<default>[^}]*)\}$")


def arg_defaults(*stages: str) -> dict[str, str]:
    """``ARG NAME=default`` of the global part and of ``stages``."""
    all_stages = dockerfile_stages()
    text = "\n".join(line for name in ("", *stages) for line in all_stages[name])
    return dict(re.findall(r"^ARG (\w+)=(\S*)$", text, re.MULTILINE))


def build_args(service: dict) -> dict[str, re.Match[str]]:
    """A compose service's build args, each a ``${VAR...}`` match."""
    out = {}
    for name, value in service["build"]["args"].items():
        m = _VARIABLE.match(str(value))
        assert m, f"build arg {name}={value!r} is not a ${{VAR:-default}} variable"
        out[name] = m
    return out


def run_line(stage: str, needle: str) -> str:
    """The one RUN instruction of ``stage`` containing ``needle`` (without ``RUN``)."""
    hits = [line for line in dockerfile_stages()[stage]
            if line.startswith("RUN ") and needle in line]
    assert len(hits) == 1, (stage, needle, hits)
    return hits[0][len("RUN "):]


def pip_args(line: str, **env: str) -> list[str]:
    """What ``pip`` is called with when the shell runs ``line`` with ``env`` (pip replaced
    by a function printing its arguments and whether PIP_INDEX_URL is set)."""
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no POSIX shell")
    script = ('pip() { printf "PIP_INDEX_URL=%s\\n" "${PIP_INDEX_URL-<unset>}"; '
              'printf "%s\\n" "$@"; }\n' + line)
    done = subprocess.run([sh, "-c", script], env={"PATH": "/usr/bin:/bin", **env},
                          capture_output=True, text=True, check=True, timeout=10)
    return done.stdout.splitlines()


def test_no_syntax_line_that_would_pull_a_frontend() -> None:
    first = (ROOT / "Dockerfile").read_text().lstrip().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first, re.IGNORECASE)
    assert not re.search(r"^#\s*syntax\s*=", (ROOT / "Dockerfile").read_text(), re.MULTILINE)


def test_compose_build_args_are_dockerfile_args_with_the_same_defaults() -> None:
    cpu = build_args(load_compose(COMPOSE)["services"]["ingest"])
    defaults = arg_defaults("cpu-builder", "cpu")
    assert set(cpu) == {"PYTHON_IMAGE", "TORCH_INDEX_URL", "PIP_INDEX_URL", "EXTRA_CA_CERTS",
                        "PREBAKE_MODEL"}
    for name, m in cpu.items():
        assert name in defaults, name
        assert m["default"] == defaults[name], name  # one public default, in both files
        # the variable is the build arg's name, except for the GPU file's CUDA torch index
        assert m["var"] == name
    assert defaults["PYTHON_IMAGE"] == "python:3.11.13-slim-bookworm"
    assert defaults["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    # set-but-empty TORCH_INDEX_URL must reach the build as empty ("no extra index"): only
    # ${VAR-default} keeps it, ${VAR:-default} would put the public index back
    assert cpu["TORCH_INDEX_URL"]["op"] == "-"
    assert all(m["op"] == ":-" for n, m in cpu.items() if n != "TORCH_INDEX_URL")

    gpu = build_args(load_compose(COMPOSE, COMPOSE_GPU)["services"]["worker-gpu1"])
    cuda = arg_defaults("cuda-builder", "cuda")
    assert gpu["CUDA_IMAGE"]["default"] == cuda["CUDA_IMAGE"] == (
        "nvidia/cuda:13.0.1-base-ubuntu24.04")
    assert gpu["TORCH_INDEX_URL"]["var"] == "CUDA_TORCH_INDEX_URL"  # not the CPU index
    assert gpu["TORCH_INDEX_URL"]["default"] == cuda["TORCH_INDEX_URL"] == ""  # pip's: PyPI
    assert gpu["TORCH_VERSION"]["default"] == cuda["TORCH_VERSION"]


def test_redis_image_is_a_variable_and_redis_leaves_protected_mode() -> None:
    redis = load_compose(COMPOSE)["services"]["redis"]
    assert redis["image"] == "${REDIS_IMAGE:-redis:7.2.5-bookworm}"
    command = redis["command"]
    assert command[command.index("--protected-mode") + 1] == "no"


def test_images_install_the_lock_as_make_install_does() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "--no-deps --require-hashes" in makefile  # what the images mirror
    for builder in ("cpu-builder", "cuda-builder"):
        text = "\n".join(dockerfile_stages()[builder])
        assert "COPY requirements ./requirements" in text
        for lock in ("runtime", "model"):
            assert f"pip install --no-deps --require-hashes -r requirements/{lock}.txt" in text
        assert "pip install --no-deps --no-build-isolation ." in text
        assert "pip install . " not in text + " "  # nothing resolved outside the lock
    cpu = "\n".join(dockerfile_stages()["cpu-builder"])
    assert "-r requirements/torch-cpu.txt" in cpu
    # the CUDA build of the lock's torch version (pinned by version there, not by hash)
    lock_torch = re.search(r"^torch==([\d.]+)\+cpu", (LOCK / "torch-cpu.txt").read_text(),
                           re.MULTILINE)
    assert lock_torch
    assert arg_defaults("cuda-builder")["TORCH_VERSION"] == lock_torch[1]
    assert '"torch==${TORCH_VERSION}"' in "\n".join(dockerfile_stages()["cuda-builder"])


def test_empty_index_urls_mean_the_default_index() -> None:
    """The RUN lines themselves, run by sh with a stand-in pip: an empty TORCH_INDEX_URL
    adds no index (it used to give `--index-url ""`) and an empty PIP_INDEX_URL is unset."""
    cpu_torch = run_line("cpu-builder", "requirements/torch-cpu.txt")
    args = pip_args(cpu_torch, TORCH_INDEX_URL="", PIP_INDEX_URL="")
    assert args[0] == "PIP_INDEX_URL=<unset>"
    assert "--extra-index-url" not in args and "" not in args[1:]
    assert args[1:] == ["install", "--no-deps", "--require-hashes", "-r",
                        "requirements/torch-cpu.txt"]
    args = pip_args(cpu_torch, TORCH_INDEX_URL="https://mirror.example/torch-cpu",
                    PIP_INDEX_URL="https://mirror.example/simple")
    assert args[0] == "PIP_INDEX_URL=https://mirror.example/simple"
    i = args.index("--extra-index-url")
    assert args[i + 1] == "https://mirror.example/torch-cpu"

    cuda_torch = run_line("cuda-builder", "torch==${TORCH_VERSION}")
    args = pip_args(cuda_torch, TORCH_INDEX_URL="", TORCH_VERSION="2.13.0", PIP_INDEX_URL="")
    assert args == ["PIP_INDEX_URL=<unset>", "install", "torch==2.13.0"]
    args = pip_args(cuda_torch, TORCH_INDEX_URL="https://download.pytorch.org/whl/cu128",
                    TORCH_VERSION="2.13.0")
    assert args[-2:] == ["--index-url", "https://download.pytorch.org/whl/cu128"]


def test_extra_ca_certs_join_the_bundle_pip_uses() -> None:
    line = run_line("cpu-builder", "EXTRA_CA_CERTS")
    assert "/etc/ssl/certs/ca-certificates.crt" in line and "/etc/pip.conf" in line
    for final in ("cpu", "cuda"):  # trusted at run time too (rediss:// with a private CA)
        assert any("EXTRA_CA_CERTS" in x for x in dockerfile_stages()[final])


def test_workers_scale_and_drain() -> None:
    worker = load_compose(COMPOSE)["services"]["worker"]
    assert worker["deploy"]["replicas"] == 2
    assert "SCLS_INSTANCE_ID" not in worker["environment"]
    assert worker["init"] is True  # SIGTERM reaches scls: the drain runs on a scale-down
    assert worker["environment"]["SCLS_PROFILE_MODE"] == "${SCLS_PROFILE_MODE:-cached}"
    assert worker["mem_limit"] == "6g"  # read back from the cgroup by the worker


def test_the_smoke_override_only_publishes_redis_on_loopback() -> None:
    override = yaml.safe_load((Path(__file__).with_name("smoke.override.yml")).read_text())
    assert list(override["services"]) == ["redis"]
    (port,) = override["services"]["redis"]["ports"]
    assert port.startswith("127.0.0.1:") and port.endswith(":6379")
