"""The uWSGI pool's entry point (``module = stackctl.wsgi:application``).

It loads the app that ``STACKCTL_WSGI_APP`` names, then marks this process ready for
``stackctl reload`` (see :mod:`stackctl.readiness`).
"""

import os

from stackctl.readiness import APP_VARIABLE, load, mark_ready

application = load(os.environ[APP_VARIABLE])
mark_ready()
