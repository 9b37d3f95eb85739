"""The wheel as a user installs it: metadata, LICENSE, extras, and every imported package declared."""

from __future__ import annotations

import ast
import email
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "airflow_batch_infer"
# Modules that run inside the local server's own environment (numpy<2, onnxruntime, the Triton stub).
SERVER_SIDE = PACKAGE / "runtimes" / "python_models"
# Imported only when present (``uv`` speeds up ``prepare``; pip is the fallback).
OPTIONAL_IMPORTS = {"uv"}
CORE = {"apache-airflow", "tritonclient", "pyarrow", "pandas", "tenacity"}
EXTRAS = {"amazon", "postgres", "duckdb", "iceberg", "docker", "kubernetes", "openlineage", "report"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the sources (the checkout gets no build/ or egg-info)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(PACKAGE, source / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or "uv"
    built = subprocess.run(
        [
            uv,
            "build",
            "-q",
            "--wheel",
            "--no-build-isolation",
            "-p",
            sys.executable,
            "-o",
            str(out),
            str(source),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (found,) = out.glob("airflow_provider_batch_infer-*.whl")
    return found


@pytest.fixture(scope="module")
def metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(archive.read(name))


def test_the_wheel_carries_license_classifiers_and_urls(wheel: Path, metadata) -> None:
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
    with zipfile.ZipFile(wheel) as archive:
        (license_file,) = [n for n in archive.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
        assert b"Apache License" in archive.read(license_file)
        entry_points = archive.read(license_file.replace("licenses/LICENSE", "entry_points.txt")).decode()
    assert "apache_airflow_provider" in entry_points
    classifiers = metadata.get_all("Classifier")
    assert "Framework :: Apache Airflow :: Provider" in classifiers
    assert not [c for c in classifiers if c.startswith("License ::")]  # the SPDX expression says it
    urls = dict(u.split(", ", 1) for u in metadata.get_all("Project-URL"))
    assert {"Documentation", "Changelog", "Source"} <= set(urls)
    assert all(u.startswith("https://") for u in urls.values())


def test_core_is_small_extras_are_named_and_test_tools_are_not_published(metadata) -> None:
    requires = metadata.get_all("Requires-Dist")
    core = {_name(r) for r in requires if "extra ==" not in r}
    assert core >= CORE
    assert not {n for n in core if n.startswith("apache-airflow-providers-")}  # providers are extras
    assert set(metadata.get_all("Provides-Extra")) == EXTRAS
    by_extra = {extra: {_name(r) for r in requires if f'extra == "{extra}"' in r} for extra in EXTRAS}
    assert "apache-airflow-providers-amazon" in by_extra["amazon"]
    assert "apache-airflow-providers-postgres" in by_extra["postgres"]
    assert "apache-airflow-providers-docker" in by_extra["docker"]
    assert "apache-airflow-providers-cncf-kubernetes" in by_extra["kubernetes"]
    assert not {"pytest", "ruff", "moto"} & {_name(r) for r in requires}
    (triton,) = [r for r in requires if _name(r) == "tritonclient"]
    assert "<" in triton  # bounded above: client/stream.py uses a private helper


def test_every_imported_package_is_declared(metadata) -> None:
    declared = {_name(r) for r in metadata.get_all("Requires-Dist")}
    owners = packages_distributions()
    missing = {}
    for path in PACKAGE.rglob("*.py"):
        if SERVER_SIDE in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                else []
            )
            for module in names:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in OPTIONAL_IMPORTS or top == PACKAGE.name:
                    continue
                if module.startswith("airflow.providers."):
                    provider = module.split(".")[2]
                    provider = {"cncf": "cncf-kubernetes", "common": "common-" + module.split(".")[3]}.get(
                        provider, provider
                    )
                    dists = {f"apache-airflow-providers-{provider}"}
                elif top == "airflow":
                    dists = {"apache-airflow"}
                else:
                    dists = {d.lower().replace("_", "-") for d in owners.get(top, [top])}
                if not dists & declared:
                    missing.setdefault(module, path.relative_to(REPO).as_posix())
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
