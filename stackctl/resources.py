"""Where the shipped templates, profiles and demo app live.

An installed wheel carries them in ``stackctl/_data``; a source checkout (or an editable
install) keeps them at the top of the repository, where a reader of the project finds them first.
"""

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def data_dir() -> Path:
    bundled = _PACKAGE_DIR / "_data"
    if bundled.is_dir():
        return bundled
    return _PACKAGE_DIR.parent


def templates_dir() -> Path:
    return data_dir()


def bundled_profiles_dir() -> Path:
    return data_dir() / "profiles"


def demo_dir() -> Path:
    bundled = _PACKAGE_DIR / "_data" / "demo"
    if bundled.is_dir():
        return bundled
    return _PACKAGE_DIR.parent / "examples" / "demo"


def client_dir() -> Path:
    """realtime.js, the browser client NGiNX serves at /_stackctl/."""
    return _PACKAGE_DIR / "static"
