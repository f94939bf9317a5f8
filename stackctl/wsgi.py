"""The uWSGI pool's entry point (``module = stackctl.wsgi:application``).

It loads the app that ``STACKCTL_WSGI_APP`` names, answers the load balancers' health check
before it (see :mod:`stackctl.health`), and marks this process ready for ``stackctl reload``
(see :mod:`stackctl.readiness`). In development, code reload is the
``autoreload`` watcher's job (see :mod:`stackctl.autoreload`), not the workers'.
"""

import os
from pathlib import Path

import uwsgi

from stackctl import graceful, health
from stackctl.readiness import APP_VARIABLE, load, mark_ready
from stackctl.workerstats import STATS_DIR_VARIABLE, WorkerStats, measured

in_flight = graceful.install(threads=int(uwsgi.opt.get("threads", b"1")))
application = health.answering(load(os.environ[APP_VARIABLE]))
if in_flight is not None:
    application = graceful.counted(application, in_flight)
if STATS_DIR_VARIABLE in os.environ:  # metrics.listen is set: the exporter reads them
    application = measured(application, WorkerStats(Path(os.environ[STATS_DIR_VARIABLE]),
                                                    os.getpid()))  # fmt: skip
mark_ready()
