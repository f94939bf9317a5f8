"""Where the shipped templates, profiles and demo app live.

An installed wheel carries them in ``stackctl/_data``; a source checkout (or an editable
install) keeps them at the top of the repository, where a reader of the project finds them first.
"""

from pathlib import Path

from stackctl.errors import StackError

_PACKAGE_DIR = Path(__file__).resolve().parent


def _bundled() -> Path:
    return _PACKAGE_DIR / "_data"


def _checkout() -> Path | None:
    """The repository this package is part of, or None when it is installed: only a
    checkout has pyproject.toml beside the package (a site-packages directory never does)."""
    top = _PACKAGE_DIR.parent
    return top if (top / "pyproject.toml").is_file() else None


def data_dir() -> Path:
    if _bundled().is_dir():
        return _bundled()
    checkout = _checkout()
    if checkout is None:
        raise StackError(
            f"{_bundled()} is missing: this copy of stackctl was installed without its "
            "templates and profiles; reinstall it from a wheel (pip install stackctl-*.whl)"
        )
    return checkout


def templates_dir() -> Path:
    return data_dir()


def bundled_profiles_dir() -> Path:
    return data_dir() / "profiles"


def demo_dir() -> Path:
    data = data_dir()
    return data / "demo" if data == _bundled() else data / "examples" / "demo"


def client_dir() -> Path:
    """realtime.js, the browser client NGiNX serves at /_stackctl/."""
    return _PACKAGE_DIR / "static"
