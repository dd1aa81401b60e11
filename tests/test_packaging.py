"""The project's packaging stays consistent: pyproject.toml, environment.yml, README and CI."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
# conda-forge names the PyPI package "torch" "pytorch"; every other name is the same.
CONDA_NAMES = {"pytorch": "torch"}


def _requirement(spec: str) -> tuple[str, str]:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(.*?)\s*", spec)
    assert match, f"cannot parse requirement {spec!r}"
    return match.group(1).lower().replace("_", "-"), match.group(2).replace(" ", "")


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + project["optional-dependencies"]["test"]
    return dict(_requirement(s) for s in specs)


def _conda_requirements() -> dict[str, str]:
    names = {}
    in_deps = False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        if line.startswith("dependencies:"):
            in_deps = True
            continue
        if in_deps and re.match(r"^\S", line):
            break
        item = re.match(r"^\s+-\s+([^#\s][^#:]*?)\s*(#.*)?$", line)  # also the "pip:" list's entries
        if in_deps and item:
            name, version = _requirement(item.group(1))
            if name not in ("python", "pip"):
                names[CONDA_NAMES.get(name, name)] = version
    return names


def test_environment_yml_lists_the_same_packages_and_versions_as_pyproject():
    assert _conda_requirements() == _pyproject_requirements()


def test_torch_requirement_admits_the_tested_release():
    assert _pyproject_requirements()["torch"] == ">=2.2"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^TORCH \?= torch==2\.13\.0$", makefile, re.M)


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == "make test"
    assert "make test" in re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)[1]


def test_package_version_is_single_sourced():
    import lora_lab

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lora_lab.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", lora_lab.__version__)


def test_license_is_an_spdx_expression_and_every_subpackage_is_packaged():
    """A TOML-table license makes setuptools ≥ 77 print a deprecation warning on every install;
    the package lists its subpackages by discovery, so a new folder is never left out of a wheel."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "MIT"
    assert "setuptools>=77" in pyproject["build-system"]["requires"]  # the first to read SPDX strings
    assert pyproject["tool"]["setuptools"]["packages"] == {"find": {"include": ["lora_lab*"]}}
    folders = {p.parent.name for p in (ROOT / "lora_lab").glob("*/__init__.py")}
    assert {"lora", "model", "data", "training", "experiment", "analysis", "checks"} <= folders
