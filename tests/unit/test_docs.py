"""The README's table of profile keys is the one SETTINGS produces."""

from __future__ import annotations

from stackctl.settings import markdown_table
from tests.conftest import REPO


def test_readme_lists_every_profile_key_as_declared() -> None:
    readme = (REPO / "README.md").read_text()
    start = readme.index("<!-- keys:")
    table = readme[readme.index("\n", start) + 1 : readme.index("<!-- /keys -->")].strip()
    assert table == markdown_table()
