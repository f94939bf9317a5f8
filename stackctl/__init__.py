"""stackctl: NGiNX, a uWSGI pool, a gevent websocket worker and Redis, supervised by Circus.

This module imports nothing on purpose: the websocket worker must monkey-patch with gevent
before anything else is imported, and it is started as ``python -m stackctl.ws``.
"""

__version__ = "0.1.0"
