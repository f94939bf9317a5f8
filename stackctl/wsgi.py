"""The uWSGI pool's entry point (``module = stackctl.wsgi:application``).

It loads the app that ``STACKCTL_WSGI_APP`` names and marks this process ready for
``stackctl reload`` (see :mod:`stackctl.readiness`). In development, code reload is the
``autoreload`` watcher's job (see :mod:`stackctl.autoreload`), not the workers'.
"""

import os

from stackctl import graceful
from stackctl.readiness import APP_VARIABLE, load, mark_ready

graceful.install()
application = load(os.environ[APP_VARIABLE])
mark_ready()
