"""The repository layout is safe for Python, and the distribution ships what the code reads.

operator/ is the import name `modelship.operator` (pyproject.toml maps it), and it has no
__init__.py: a Python started in the repository root must still import the standard library's
`operator`, which half the standard library needs (collections, typing, dataclasses)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
STDLIB_USERS = "import operator; operator.or_; import collections, typing, dataclasses, json"


def _run_in_root(*args: str, pythonpath: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_no_init_files_shadow_the_standard_library() -> None:
    # A regular package (with __init__.py) on sys.path beats the standard library's module.
    assert not (REPO_ROOT / "operator" / "__init__.py").exists()
    assert not (REPO_ROOT / "runtime" / "__init__.py").exists()


@pytest.mark.parametrize(
    ("flags", "pythonpath"),
    [
        (["-S"], None),  # no site: nothing imported `operator` before the repo root is on the path
        ([], str(REPO_ROOT)),  # the repo root on PYTHONPATH, searched before the standard library
    ],
    ids=["no-site", "root-on-pythonpath"],
)
def test_python_started_in_the_repo_root_imports_the_standard_operator(
    flags: list[str], pythonpath: str | None
) -> None:
    result = _run_in_root(
        *flags, "-c", f"{STDLIB_USERS}; print(operator.__file__)", pythonpath=pythonpath
    )
    assert result.returncode == 0, result.stderr
    assert not result.stdout.strip().startswith(str(REPO_ROOT)), result.stdout


def test_the_package_runs_as_a_module_from_the_repo_root() -> None:
    # Relative imports inside the namespace package and the catalog data file both resolve.
    pythonpath = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO_ROOT)]))
    result = _run_in_root("-m", "modelship.operator.cli", "catalog", pythonpath=pythonpath)
    assert result.returncode == 0, result.stderr
    assert "p5.48xlarge" in result.stdout


def test_the_wheel_ships_the_modules_and_package_data(tmp_path: Path) -> None:
    source = tmp_path / "src"
    for package in ("operator", "runtime"):
        shutil.copytree(
            REPO_ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    # The venv's own setuptools (no build isolation): no package index needed.
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    result = subprocess.run(
        [*pip_wheel, "--wheel-dir", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr  # no setuptools deprecation banners
    (wheel,) = (tmp_path / "dist").glob("modelship-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"modelship/{path.relative_to(REPO_ROOT)}"
        for pattern in ("*/*.py", "operator/data/*.yaml", "*/py.typed")
        for path in REPO_ROOT.glob(pattern)
        if path.parts[len(REPO_ROOT.parts)] in ("operator", "runtime")
    }
    assert "modelship/operator/data/catalog.yaml" in expected
    assert expected <= names, sorted(expected - names)
    assert "modelship/operator/__init__.py" not in names
