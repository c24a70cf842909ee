"""The wheel `pip` builds from this repository: exactly the packages nanomoe_fn, nanomoe_kernels and
nanomoe_reference (kernels/ and reference/ install under those names, so they never collide with Hugging Face's
`kernels` distribution), every package folder and module of the repo, the tuned kernel tables, the extras and the
`nanomoe` console script once pyproject.toml declares it.

The build runs on a copy of the files a build reads (pyproject.toml, README.md, the package folders), so the
shared working tree gets no build/ or egg-info from it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# repository folder -> the name it installs as ([tool.setuptools.package-dir] of pyproject.toml)
INSTALLS_AS = {"nanomoe_fn": "nanomoe_fn", "kernels": "nanomoe_kernels", "reference": "nanomoe_reference"}
BUILD_FILES = ("pyproject.toml", "README.md", "setup.py", "setup.cfg", "MANIFEST.in", "LICENSE")


def pyproject() -> dict:
    """pyproject.toml, parsed (skips the caller on Python 3.10, which has no tomllib)."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    """The wheel of a copy of the repo's build inputs, built by `pip wheel --no-deps --no-build-isolation`."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed: no wheel can be built without build isolation")
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in BUILD_FILES:
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    for folder in INSTALLS_AS:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(out), str(src)], capture_output=True, text=True, timeout=120)
    if res.returncode and ("No module named pip" in res.stderr or "bdist_wheel" in res.stderr):
        pytest.skip(f"cannot build wheels here: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stdout + res.stderr
    wheels = list(out.glob("nanomoe-*.whl"))
    assert len(wheels) == 1, os.listdir(out)
    with zipfile.ZipFile(wheels[0]) as z:
        yield z


def dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    """The text of a file of the wheel's .dist-info folder."""
    (path,) = [n for n in wheel.namelist() if n.split("/")[0].endswith(".dist-info") and n.endswith("/" + name)]
    return wheel.read(path).decode()


def repo_modules() -> list[tuple[str, str]]:
    """(repository path, path it must have in the wheel) of every .py file under the package folders."""
    out = []
    for folder, name in INSTALLS_AS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).as_posix()
            if "__pycache__" not in rel:
                out.append((f"{folder}/{rel}", f"{name}/{rel}"))
    return out


def test_top_level_names(wheel):
    tops = {n.split("/")[0] for n in wheel.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"nanomoe_fn", "nanomoe_kernels", "nanomoe_reference"}, tops
    assert not tops & {"kernels", "reference", "tests", "bench"}
    if any(n.endswith(".dist-info/top_level.txt") for n in wheel.namelist()):  # setuptools writes one
        assert sorted(dist_info(wheel, "top_level.txt").split()) == sorted(tops)


def test_every_package_folder_and_module_is_in_the_wheel(wheel):
    names = set(wheel.namelist())
    modules = repo_modules()
    assert len(modules) > 60 and ("kernels/fused_moe.py", "nanomoe_kernels/fused_moe.py") in modules
    # a folder holding modules must be a package (a namespace folder would be left out of the wheel)
    folders = {os.path.dirname(repo) for repo, _ in modules}
    assert all(f"{f}/__init__.py" in {r for r, _ in modules} for f in folders), sorted(folders)
    missing = [f"{repo} (as {dest})" for repo, dest in modules if dest not in names]
    assert not missing, "not in the wheel (list the package in pyproject's [tool.setuptools] packages):\n" + \
        "\n".join(missing)


def test_tuned_kernel_tables_are_in_the_wheel(wheel):
    tables = sorted(p.name for p in (ROOT / "kernels" / "tuned").glob("*.json"))
    assert tables, "kernels/tuned holds no JSON tables"
    packed = sorted(n.split("/")[-1] for n in wheel.namelist() if n.startswith("nanomoe_kernels/tuned/"))
    assert packed == tables
    for name in tables:  # the same bytes
        assert wheel.read(f"nanomoe_kernels/tuned/{name}") == (ROOT / "kernels" / "tuned" / name).read_bytes()


def test_package_data_tables_are_in_the_wheel(wheel):
    name = "nanomoe_fn/pipeline/tbo_thresholds.json"  # auto_schedule's measured defaults
    assert wheel.read(name) == (ROOT / name).read_bytes()


def test_metadata_names_the_extras_and_dependencies(wheel):
    meta, project = dist_info(wheel, "METADATA"), pyproject()["project"]
    assert f"Name: {project['name']}" in meta and f"Version: {project['version']}" in meta
    for extra in project.get("optional-dependencies", {}):
        assert f"Provides-Extra: {extra}" in meta, extra
    for dep in ("torch", "numpy", "einops"):
        assert f"Requires-Dist: {dep}" in meta, dep


def test_console_script(wheel):
    scripts = pyproject()["project"].get("scripts", {})
    if "nanomoe" not in scripts:
        pytest.skip("pyproject.toml declares no `nanomoe` script yet ([project.scripts])")
    target = scripts["nanomoe"]
    assert target == "nanomoe_fn.cli:main", target
    entry = dist_info(wheel, "entry_points.txt")
    assert "[console_scripts]" in entry and f"nanomoe = {target}" in entry, entry
    module = target.split(":")[0].replace(".", "/") + ".py"
    assert module in wheel.namelist(), f"{module} (the script's module) is not in the wheel"
