"""A reload without a dropped request: what gunicorn's master and its workers tell each other.

On SIGHUP the master (paddler_sync/server.py) reads the settings again, sends SIGUSR2 to the running workers ("you
are being replaced"), then lets gunicorn start new workers with ``RELOAD_MARK`` in their environment and stop the
old ones with SIGTERM. A replaced worker (paddler_sync/balancer.py) frees the management port at once (the agents
report to the new workers, which wait up to ``RELOAD_BIND_WAIT`` for the port), sends each request still waiting
for a slot to the new workers through the proxy's own address (paddler_sync/proxy/app.py), and lets its running
answers finish. The new workers see those answers' slots as busy in the agents' reports.
"""

RELOAD_MARK = "RELOADED_BY_PADDLER_SYNC"
RELOAD_BIND_WAIT = 10.0  # seconds a new worker waits for the one it replaces to free the management port
