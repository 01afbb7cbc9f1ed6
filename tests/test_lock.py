"""requirements.lock: what `make setup` installs, and that it follows pyproject.toml."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import re
import sysconfig
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from convpipe.tracking.provenance import LOCK_FILE, environment_tags
from tests.helpers.project import ROOT

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
VIA_PROJECT = re.compile(r"#\s+(?:via\s+)?convpipe \(pyproject\.toml\)")
# `make setup` installs every extra: the tests export ONNX and use PostgreSQL
EXTRAS = ("dev", "onnx", "postgres")


def locked() -> dict[str, tuple[Version, list[str], str]]:
    """{name: (version, hashes, the pin's `# via` block)} of every pin in the lock."""
    pins: dict[str, tuple[Version, list[str], str]] = {}
    name = ""
    for line in (ROOT / LOCK_FILE).read_text().splitlines():
        if match := PIN.match(line):
            name = canonicalize_name(match[1])
            pins[name] = (Version(match[2]), [], "")
        elif name and (hashed := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            pins[name][1].append(hashed[1])
        elif name and line.lstrip().startswith("#"):
            version, hashes, via = pins[name]
            pins[name] = (version, hashes, via + line + "\n")
    return pins


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in EXTRAS:
        requirements += project["optional-dependencies"][extra]
    return [Requirement(text) for text in requirements]


def test_every_pin_is_hashed() -> None:
    pins = locked()
    assert len(pins) > 50
    assert not [name for name, (_, hashes, _) in pins.items() if not hashes]


def test_lock_satisfies_pyproject_and_holds_nothing_it_did_not_ask_for() -> None:
    """After editing pyproject.toml, `make lock` brings the lock back in line."""
    pins = locked()
    direct = {canonicalize_name(r.name) for r in declared() if r.name != "convpipe"}
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is in pyproject.toml but not in {LOCK_FILE}: run `make lock`"
        version = pins[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{LOCK_FILE} pins {name}=={version}, outside pyproject.toml's "
            f"{requirement.specifier}: run `make lock`"
        )
    via_project = {name for name, (_, _, via) in pins.items() if VIA_PROJECT.search(via)}
    assert via_project == direct, f"stale {LOCK_FILE}: run `make lock`"


def test_known_bad_releases_are_excluded() -> None:
    lightning = next(r for r in declared() if r.name == "lightning")
    for bad in ("2.6.2", "2.6.3", "2.6.5"):  # malicious; runs a checkpoint's _instantiator
        assert not lightning.specifier.contains(bad)
    assert locked()["lightning"][0] >= Version("2.6.6")


def test_the_environment_is_exactly_the_lock() -> None:
    """What `make setup` installed: every locked version and nothing else but convpipe.

    A `.venv` made before the lock existed fails here: `rm -rf .venv && make setup`.
    """
    # the environment's own site-packages only: sys.path may also hold copies a library
    # vendors (setuptools/_vendor adds its packaging, wheel, zipp... once something imports it)
    paths = sysconfig.get_paths()
    installed = {
        canonicalize_name(dist.metadata["Name"]): Version(dist.version)
        for dist in importlib.metadata.distributions(path=[paths["purelib"], paths["platlib"]])
    }
    pins = {name: version for name, (version, _, _) in locked().items()}
    wrong = {n: (str(v), str(installed.get(n))) for n, v in pins.items() if installed.get(n) != v}
    assert not wrong, f"installed versions differ from {LOCK_FILE} (locked, installed): {wrong}"
    extra = set(installed) - set(pins) - {"convpipe"}
    assert not extra, f"installed but not locked: {sorted(extra)}"


def test_runs_are_tagged_with_the_lock_hash(tmp_path: Path) -> None:
    tags = environment_tags(ROOT)
    assert (
        tags["convpipe.lock_sha256"] == hashlib.sha256((ROOT / LOCK_FILE).read_bytes()).hexdigest()
    )
    assert environment_tags(tmp_path)["convpipe.lock_sha256"] == "none"


def test_the_train_stage_reruns_when_the_lock_changes() -> None:
    from ruamel.yaml import YAML

    stages = YAML(typ="safe").load(ROOT / "dvc.yaml")["stages"]
    assert LOCK_FILE in stages["train"]["deps"]


def test_torchvision_stays_out_of_the_lock_and_the_environment() -> None:
    """litdata lists it; PyPI's build breaks `import torchmetrics` with the CPU torch wheel."""
    assert "torchvision" not in locked()
    assert importlib.util.find_spec("torchvision") is None
    import litdata  # noqa: F401 - and the streaming format works without it
    import torchmetrics  # noqa: F401
