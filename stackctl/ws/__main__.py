"""``python -m stackctl.ws``: the gevent websocket worker, as Circus starts it.

gevent must patch the standard library before anything else imports it (redis, socket,
threading), so this is the first thing the process does.
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from stackctl.ws.server import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
