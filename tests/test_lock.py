"""The lock (requirements/): what is installed is exactly what the lock says, the lock fits
the ranges pyproject.toml declares, and it names no machine-local index or path."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "requirements"
#: What `make install` installs into the test environment, and the image's runtime set.
INSTALLED_LOCKS = ("torch-cpu.txt", "dev.txt", "model.txt")
ALL_LOCKS = (*INSTALLED_LOCKS, "runtime.txt")
pytestmark = pytest.mark.lock
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def pins(name: str) -> dict[str, str]:
    """``{canonical name: version}`` of one lock file; each pin must carry a hash."""
    text = (LOCKS / name).read_text()
    found: dict[str, str] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        match = _PIN.match(block)
        if match:
            assert "--hash=sha256:" in block, f"{name}: {match.group(1)} has no hash"
            found[canonicalize_name(match.group(1))] = match.group(2)
    assert found, f"{name} pins nothing"
    return found


def declared() -> list[Requirement]:
    """pyproject.toml's dependencies and dev extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in
            [*project["dependencies"], *project["optional-dependencies"]["dev"]]]


@pytest.mark.parametrize("name", INSTALLED_LOCKS)
def test_the_environment_holds_exactly_the_locked_versions(name: str) -> None:
    """`make install` installed every pin of the lock at its version (a stale .venv or an
    install that bypassed the lock fails here)."""
    wrong = {}
    for package, version in pins(name).items():
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            installed = "missing"
        if installed == "missing" or Version(installed) != Version(version):
            wrong[package] = (version, installed)
    assert not wrong, f"locked vs installed: {wrong}; run `make install` (or `make clean test`)"


def test_every_installed_distribution_is_locked() -> None:
    """Nothing outside the lock is in the environment: a dependency the lock misses would
    otherwise come from whatever a machine had."""
    locked = {p for name in INSTALLED_LOCKS for p in pins(name)}
    tools = {"pip", "scls"}  # the installer, and the project itself (editable)
    extra = sorted(
        canonicalize_name(dist.metadata["Name"]) for dist in metadata.distributions()
        if canonicalize_name(dist.metadata["Name"]) not in locked | tools
    )
    assert not extra, f"installed but not locked: {extra}"


def test_the_lock_satisfies_pyproject() -> None:
    """Every dependency pyproject.toml declares is locked at a version its range admits,
    so `make lock` was run after the last change to the ranges."""
    locked = {**pins("dev.txt"), **pins("torch-cpu.txt")}
    bad = {}
    for req in declared():
        if req.marker is not None and not req.marker.evaluate():
            continue
        version = locked.get(canonicalize_name(req.name))
        if version is None or not req.specifier.contains(Version(version), prereleases=True):
            bad[req.name] = (str(req.specifier), version)
    assert not bad, f"pyproject range vs lock: {bad}; run `make lock`"


def test_runtime_and_dev_locks_agree() -> None:
    """The images' runtime set is the tested set: same version of every shared package."""
    dev, runtime = pins("dev.txt"), pins("runtime.txt")
    assert set(runtime) <= set(dev)
    assert {p: v for p, v in runtime.items() if dev[p] != v} == {}


@pytest.mark.parametrize("name", ALL_LOCKS)
def test_a_lock_names_no_local_index_or_path(name: str) -> None:
    """A lock must install on any machine: no file:// index, find-links or local path."""
    text = (LOCKS / name).read_text()
    assert not re.search(r"file://|--find-links|--(extra-)?index-url|/opt/|/tmp/", text)
