"""The uWSGI pool's entry point (``module = stackctl.wsgi:application``).

It loads the app that ``STACKCTL_WSGI_APP`` names, marks this process ready for
``stackctl reload`` (see :mod:`stackctl.readiness`) and, in development, watches the app's
files (see :mod:`stackctl.autoreload`).
"""

import os
from pathlib import Path

from stackctl import autoreload, graceful
from stackctl.readiness import APP_VARIABLE, load, mark_ready

graceful.install()
application = load(os.environ[APP_VARIABLE])
mark_ready()
if os.environ.get("STACKCTL_AUTORELOAD") == "1":
    autoreload.start(Path.cwd())
