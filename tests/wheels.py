"""Building stackctl's wheel from this checkout, as a release would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def build_wheel(out: Path) -> Path:
    """The wheel of this checkout, built into ``out`` with the hatchling of the test venv."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    (wheel,) = out.glob("stackctl-*.whl")
    return wheel
